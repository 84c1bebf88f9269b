package bitmap

import (
	"errors"
	"math"
	"slices"
	"sync"
	"testing"
)

const kib = 1 << 10

func mustNew(t testing.TB, chunkSize int64) *Bitmap {
	t.Helper()
	b, err := New(chunkSize)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func chunksOf(b *Bitmap) []uint64 {
	var out []uint64
	for c := range b.Chunks() {
		out = append(out, c)
	}
	return out
}

func TestValidChunkSize(t *testing.T) {
	for _, tc := range []struct {
		n  int64
		ok bool
	}{
		{DefaultChunkSize, true},
		{MinChunkSize, true},
		{MaxChunkSize, true},
		{1 << 20, true},
		{0, false},
		{-4096, false},
		{2 * kib, false},
		{MaxChunkSize * 2, false},
		{48 * kib, false},
		{MinChunkSize + 1, false},
	} {
		err := ValidChunkSize(tc.n)
		if (err == nil) != tc.ok {
			t.Errorf("ValidChunkSize(%d) = %v, want ok=%v", tc.n, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrChunkSize) {
			t.Errorf("ValidChunkSize(%d) = %v, does not wrap ErrChunkSize", tc.n, err)
		}
		if _, err := New(tc.n); (err == nil) != tc.ok {
			t.Errorf("New(%d) = %v, want ok=%v", tc.n, err, tc.ok)
		}
	}
}

func TestChunkRange(t *testing.T) {
	const shift = 16 // 64 KiB
	for _, tc := range []struct {
		name        string
		off, length int64
		first, last uint64
		ok          bool
	}{
		{"empty", 0, 0, 0, 0, false},
		{"negative length", 0, -1, 0, 0, false},
		{"negative offset", -1, 10, 0, 0, false},
		{"one byte", 0, 1, 0, 0, true},
		{"whole chunk", 0, 64 * kib, 0, 0, true},
		{"one past chunk", 0, 64*kib + 1, 0, 1, true},
		{"last byte of chunk", 64*kib - 1, 1, 0, 0, true},
		{"straddle", 64*kib - 512, 1024, 0, 1, true},
		{"4k write in chunk 3", 3*64*kib + 8*kib, 4 * kib, 3, 3, true},
		{"int64 end", math.MaxInt64 - 10, 11, math.MaxInt64 >> shift, math.MaxInt64 >> shift, true},
		{"sum past int64", math.MaxInt64, math.MaxInt64, math.MaxInt64 >> shift, (2*uint64(math.MaxInt64) - 1) >> shift, true},
	} {
		first, last, ok := chunkRange(shift, tc.off, tc.length)
		if ok != tc.ok || (ok && (first != tc.first || last != tc.last)) {
			t.Errorf("%s: chunkRange(%d, %d) = %d, %d, %v; want %d, %d, %v",
				tc.name, tc.off, tc.length, first, last, ok, tc.first, tc.last, tc.ok)
		}
	}
}

func TestAddRangeAndContains(t *testing.T) {
	type rng struct{ off, length int64 }
	for _, tc := range []struct {
		name      string
		chunkSize int64
		add       []rng
		want      []uint64
		covered   []rng
		uncovered []rng
	}{
		{
			name:      "nothing",
			chunkSize: 64 * kib,
			add:       []rng{{0, 0}, {-5, 100}, {100, -1}},
			covered:   []rng{{0, 0}, {123, 0}},
			uncovered: []rng{{0, 1}, {-1, 0}, {0, -1}},
		},
		{
			name:      "4k writes",
			chunkSize: 4 * kib,
			add:       []rng{{0, 4 * kib}, {8 * kib, 4 * kib}, {8*kib + 512, 512}},
			want:      []uint64{0, 2},
			covered:   []rng{{0, 1}, {100, 3000}, {8 * kib, 4 * kib}},
			uncovered: []rng{{0, 8 * kib}, {4 * kib, 1}, {12 * kib, 1}},
		},
		{
			name:      "straddling write",
			chunkSize: 64 * kib,
			add:       []rng{{64*kib - 1, 2}},
			want:      []uint64{0, 1},
			covered:   []rng{{0, 128 * kib}},
			uncovered: []rng{{0, 128*kib + 1}},
		},
		{
			name:      "large write",
			chunkSize: 64 * kib,
			add:       []rng{{64 * kib, 200 * 64 * kib}},
			want:      seq(1, 200),
			covered:   []rng{{64 * kib, 200 * 64 * kib}, {100 * 64 * kib, 100 * 64 * kib}},
			uncovered: []rng{{0, 201 * 64 * kib}, {64 * kib, 201 * 64 * kib}},
		},
		{
			name:      "from zero, rank path",
			chunkSize: 4 * kib,
			add:       []rng{{0, 1000 * 4 * kib}},
			want:      seq(0, 1000),
			covered:   []rng{{0, 1000 * 4 * kib}, {0, 999*4*kib + 1}},
			uncovered: []rng{{0, 1000*4*kib + 1}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := mustNew(t, tc.chunkSize)
			for _, r := range tc.add {
				b.AddRange(r.off, r.length)
			}
			if got := chunksOf(b); !slices.Equal(got, tc.want) {
				t.Errorf("chunks = %v, want %v", got, tc.want)
			}
			if got := b.Count(); got != uint64(len(tc.want)) {
				t.Errorf("Count() = %d, want %d", got, len(tc.want))
			}
			if b.IsEmpty() != (len(tc.want) == 0) {
				t.Errorf("IsEmpty() = %v with %d chunks", b.IsEmpty(), len(tc.want))
			}
			for _, r := range tc.covered {
				if !b.ContainsRange(r.off, r.length) {
					t.Errorf("ContainsRange(%d, %d) = false, want true", r.off, r.length)
				}
			}
			for _, r := range tc.uncovered {
				if b.ContainsRange(r.off, r.length) {
					t.Errorf("ContainsRange(%d, %d) = true, want false", r.off, r.length)
				}
			}
		})
	}
}

// seq returns n consecutive chunks from first.
func seq(first, n uint64) []uint64 {
	out := make([]uint64, n)
	for i := range out {
		out[i] = first + uint64(i)
	}
	return out
}

func TestContainsRangeHole(t *testing.T) {
	// A hole anywhere in a long range must be seen, on both the probing and
	// the rank path, including at its ends and across a 2^16 container.
	const cs = 4 * kib
	for _, span := range []uint64{2, 63, 64, 65, 1000, 70000} {
		for _, hole := range []uint64{0, 1, span / 2, span - 2, span - 1} {
			b := mustNew(t, cs)
			base := uint64(65530)
			b.AddRange(int64(base*cs), int64(span*cs))
			if !b.ContainsRange(int64(base*cs), int64(span*cs)) {
				t.Fatalf("span %d: full range not contained", span)
			}
			b.Remove(base + hole)
			if b.ContainsRange(int64(base*cs), int64(span*cs)) {
				t.Errorf("span %d: hole at %d not seen", span, hole)
			}
			if b.Contains(base + hole) {
				t.Errorf("span %d: Contains(%d) after Remove", span, base+hole)
			}
		}
	}
}

func TestNextFrom(t *testing.T) {
	b := mustNew(t, DefaultChunkSize)
	for _, c := range []uint64{3, 4, 100, 1 << 20, 1<<32 + 5} {
		b.Add(c)
	}
	for _, tc := range []struct {
		from, want uint64
		ok         bool
	}{
		{0, 3, true},
		{3, 3, true},
		{4, 4, true},
		{5, 100, true},
		{101, 1 << 20, true},
		{1<<20 + 1, 1<<32 + 5, true},
		{1 << 32, 1<<32 + 5, true},
		{1<<32 + 6, 0, false},
		{math.MaxUint64, 0, false},
	} {
		got, ok := b.NextFrom(tc.from)
		if got != tc.want || ok != tc.ok {
			t.Errorf("NextFrom(%d) = %d, %v; want %d, %v", tc.from, got, ok, tc.want, tc.ok)
		}
	}
	empty := mustNew(t, DefaultChunkSize)
	if c, ok := empty.NextFrom(0); ok {
		t.Errorf("empty NextFrom(0) = %d, true", c)
	}
}

func TestSetOps(t *testing.T) {
	a := mustNew(t, DefaultChunkSize)
	b := mustNew(t, DefaultChunkSize)
	for _, c := range []uint64{1, 2, 3, 1 << 40} {
		a.Add(c)
	}
	for _, c := range []uint64{3, 4, 1 << 40} {
		b.Add(c)
	}
	u := a.Clone()
	if err := u.Or(b); err != nil {
		t.Fatal(err)
	}
	if got, want := chunksOf(u), []uint64{1, 2, 3, 4, 1 << 40}; !slices.Equal(got, want) {
		t.Errorf("a|b = %v, want %v", got, want)
	}
	if got, want := chunksOf(a), []uint64{1, 2, 3, 1 << 40}; !slices.Equal(got, want) {
		t.Errorf("Clone shares with a: a = %v, want %v", got, want)
	}
	d := a.Clone()
	if err := d.AndNot(b); err != nil {
		t.Fatal(err)
	}
	if got, want := chunksOf(d), []uint64{1, 2}; !slices.Equal(got, want) {
		t.Errorf("a&^b = %v, want %v", got, want)
	}
	if err := d.Or(d); err != nil || d.Count() != 2 {
		t.Errorf("d.Or(d) = %v, count %d", err, d.Count())
	}
	if err := d.AndNot(d); err != nil || !d.IsEmpty() {
		t.Errorf("d.AndNot(d) = %v, count %d", err, d.Count())
	}
	a.Clear()
	if !a.IsEmpty() || a.Count() != 0 {
		t.Errorf("after Clear: count %d", a.Count())
	}

	other := mustNew(t, 4*kib)
	if err := u.Or(other); !errors.Is(err, ErrChunkSize) {
		t.Errorf("Or with another chunk size = %v, want ErrChunkSize", err)
	}
	if err := u.AndNot(other); !errors.Is(err, ErrChunkSize) {
		t.Errorf("AndNot with another chunk size = %v, want ErrChunkSize", err)
	}
}

func TestChunksIsSnapshot(t *testing.T) {
	b := mustNew(t, DefaultChunkSize)
	b.Add(1)
	b.Add(2)
	var got []uint64
	for c := range b.Chunks() {
		got = append(got, c)
		b.Add(c + 10) // must not deadlock, nor be seen by this walk
	}
	if !slices.Equal(got, []uint64{1, 2}) {
		t.Errorf("walk saw %v, want [1 2]", got)
	}
	for c := range b.Chunks() {
		if c > 1 {
			t.Errorf("walk continued past break: %d", c)
		}
		break
	}
}

func TestOptimizeKeepsChunks(t *testing.T) {
	b := mustNew(t, DefaultChunkSize)
	for c := uint64(0); c < 100000; c++ {
		b.Add(c)
	}
	before := b.SizeInBytes()
	b.Optimize()
	if b.Count() != 100000 || !b.ContainsRange(0, 100000*DefaultChunkSize) {
		t.Fatalf("Optimize changed the set: count %d", b.Count())
	}
	if after := b.SizeInBytes(); after >= before {
		t.Errorf("Optimize did not shrink a run: %d -> %d bytes", before, after)
	}
}

// TestBitmapConcurrent runs every method at once; its checks are the race
// detector and the absence of deadlock (a.Or(b) racing b.Or(a)).
func TestBitmapConcurrent(t *testing.T) {
	a := mustNew(t, 4*kib)
	b := mustNew(t, 4*kib)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			x, y := a, b
			if g%2 == 1 {
				x, y = b, a
			}
			for i := range 300 {
				c := uint64(g*1000 + i)
				x.Add(c)
				x.AddRange(int64(c)*4*kib, 3*4*kib)
				_ = x.Contains(c)
				_ = x.ContainsRange(0, int64(c)*4*kib)
				_, _ = x.NextFrom(c)
				if err := x.Or(y); err != nil {
					t.Error(err)
				}
				if i%50 == 0 {
					if _, err := x.MarshalBinary(); err != nil {
						t.Error(err)
					}
					for range x.Chunks() {
					}
					_ = x.Clone().AndNot(y)
					x.Remove(c)
					_ = x.SizeInBytes()
				}
			}
		})
	}
	wg.Wait()
}

func TestIntersects(t *testing.T) {
	b := mustNew(t, 64<<10)
	b.Add(0)
	b.Add(3)
	b.Add(1 << 40) // far away: Rank across containers
	cases := []struct {
		off, n int64
		want   bool
	}{
		{0, 1, true},
		{64 << 10, 64 << 10, false},        // chunk 1
		{64 << 10, 3 << 16, true},          // chunks 1–3
		{3<<16 - 1, 2, true},               // crosses into chunk 3
		{4 << 16, 1 << 30, false},          // chunks 4 and up, before 2^40
		{(1<<40 - 1) << 16, 2 << 16, true}, // around chunk 2^40
		{3 << 16, 0, false},                // empty
		{-1, 10, false},                    // negative
	}
	for _, c := range cases {
		if got := b.Intersects(c.off, c.n); got != c.want {
			t.Errorf("Intersects(%d, %d) = %v, want %v", c.off, c.n, got, c.want)
		}
	}
}
