package bitmap

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"strings"
	"testing"
)

// drbdBytesPerTiB is what DRBD spends per TiB and per peer whatever is
// written: one bit per 4 KiB block, in memory and in its on-disk metadata.
const drbdBytesPerTiB = 32 << 20

// TestMemoryFigures measures the cost of a write bitmap of a 1 TiB volume in
// 64 KiB chunks (16 Mi chunks) for sparse and sequential write patterns, and
// prints it as a markdown table (go test -run MemoryFigures -v ./bitmap).
// Bitmaps are filled as Tracker.Mark fills them: one 4 KiB write at a time
// for random writes, one 1 MiB write at a time for sequential ones.
func TestMemoryFigures(t *testing.T) {
	if testing.Short() || raceEnabled {
		t.Skip("builds bitmaps of a 1 TiB volume; skipped with -short and -race")
	}
	const (
		cs     = DefaultChunkSize
		chunks = uint64(1 << 40 / cs)
		runLen = 1024 // chunks per sequential run: 64 MiB
	)
	type pattern struct {
		name string
		fill func(b *Bitmap, r *rand.Rand)
	}
	random := func(n uint64) func(*Bitmap, *rand.Rand) {
		return func(b *Bitmap, r *rand.Rand) {
			for b.Count() < n {
				b.AddRange(int64(r.Uint64N(chunks))*cs, 4*kib)
			}
		}
	}
	// runs writes fraction f of the volume as 64 MiB runs at random places,
	// each written sequentially 1 MiB at a time.
	runs := func(f float64) func(*Bitmap, *rand.Rand) {
		return func(b *Bitmap, r *rand.Rand) {
			slots := chunks / runLen
			for _, s := range r.Perm(int(slots))[:int(float64(slots)*f)] {
				for off := int64(0); off < runLen*cs; off += 1 << 20 {
					b.AddRange(int64(s)*runLen*cs+off, 1<<20)
				}
			}
		}
	}
	// seq4k writes the first fraction f of the volume 4 KiB at a time: each
	// chunk is added alone, so roaring holds arrays and plain bitmaps until
	// Optimize turns them into runs.
	seq4k := func(f float64) func(*Bitmap, *rand.Rand) {
		return func(b *Bitmap, _ *rand.Rand) {
			for c := range uint64(float64(chunks) * f) {
				b.AddRange(int64(c)*cs, 4*kib)
			}
		}
	}
	patterns := []pattern{
		{"random, 1000 chunks", random(1000)},
		{"random, 0.1%", random(chunks / 1000)},
		{"random, 1%", random(chunks / 100)},
		{"random, 10%", random(chunks / 10)},
		{"64 MiB runs, 1%", runs(0.01)},
		{"64 MiB runs, 10%", runs(0.10)},
		{"64 MiB runs, 50%", runs(0.50)},
		{"64 MiB runs, 100%", runs(1)},
		{"sequential 4 KiB writes, 10%", seq4k(0.10)},
		{"sequential 4 KiB writes, 100%", seq4k(1)},
	}
	var out strings.Builder
	fmt.Fprintf(&out, "| pattern | dirty chunks | encoded | B per dirty chunk | Go heap | B per dirty chunk | heap after Optimize | encoded / DRBD | heap / DRBD |\n")
	fmt.Fprintf(&out, "|---|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	heap() // settle what the test binary allocated at start
	for _, p := range patterns {
		base := heap()
		b := mustNew(t, cs)
		p.fill(b, rand.New(rand.NewPCG(42, 42)))
		mem := max(heap(), base) - base
		enc, err := b.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		b.Optimize()
		opt := max(heap(), base) - base
		n := b.Count()
		fmt.Fprintf(&out, "| %s | %d | %s | %.3f | %s | %.3f | %s | %.3f%% | %.3f%% |\n",
			p.name, n, size(uint64(len(enc))), float64(len(enc))/float64(n),
			size(mem), float64(mem)/float64(n), size(opt),
			100*float64(len(enc))/drbdBytesPerTiB, 100*float64(mem)/drbdBytesPerTiB)
		runtime.KeepAlive(b)
	}
	t.Logf("\n%s", out.String())
}

// heap returns the bytes of live heap objects after a full collection.
func heap() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

func size(n uint64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.2f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
