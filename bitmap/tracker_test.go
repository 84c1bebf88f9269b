package bitmap

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
)

func mustTracker(t testing.TB, chunkSize int64, sinks ...string) *Tracker {
	t.Helper()
	tr, err := NewTracker(chunkSize)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range sinks {
		if err := tr.AddSink(name, mustNew(t, chunkSize)); err != nil {
			t.Fatal(err)
		}
	}
	return tr
}

func sink(t testing.TB, tr *Tracker, name string) *Bitmap {
	t.Helper()
	b, ok := tr.Sink(name)
	if !ok {
		t.Fatalf("no sink %q", name)
	}
	return b
}

func TestNewTrackerChunkSize(t *testing.T) {
	if _, err := NewTracker(1000); !errors.Is(err, ErrChunkSize) {
		t.Errorf("NewTracker(1000) = %v, want ErrChunkSize", err)
	}
}

func TestTrackerMarkReachesEverySink(t *testing.T) {
	const cs = 64 * kib
	tr := mustTracker(t, cs, HBMMSink, "/dev/sdb", "/dev/sdc")
	type rng struct{ off, length int64 }
	for _, tc := range []struct {
		name string
		mark []rng
		want []uint64
	}{
		{"nothing", []rng{{0, 0}, {-1, 5}}, nil},
		{"4k write", []rng{{3*cs + 4096, 4096}}, []uint64{3}},
		{"same chunk again", []rng{{3 * cs, 512}}, []uint64{3}},
		{"straddle", []rng{{5*cs - 512, 1024}}, []uint64{3, 4, 5}},
		{"1 MiB write", []rng{{100 * cs, 1 << 20}}, slices.Concat([]uint64{3, 4, 5}, seq(100, 16))},
	} {
		for _, r := range tc.mark {
			tr.Mark(r.off, r.length)
		}
		for _, name := range tr.Sinks() {
			if got := chunksOf(sink(t, tr, name)); !slices.Equal(got, tc.want) {
				t.Errorf("%s: sink %s = %v, want %v", tc.name, name, got, tc.want)
			}
		}
		if got := tr.Modified(HBMMSink); got != uint64(len(tc.want)) {
			t.Errorf("%s: Modified = %d, want %d", tc.name, got, len(tc.want))
		}
	}
	if got, want := tr.Sinks(), []string{"/dev/sdb", "/dev/sdc", HBMMSink}; !slices.Equal(got, want) {
		t.Errorf("Sinks() = %v, want %v", got, want)
	}
}

// TestTrackerCache shows the cache at work, by breaking the rule that sinks
// are cleared only through Reset: a cached chunk is not written to the sinks
// again, and a new sink, or a reset, makes it be.
func TestTrackerCache(t *testing.T) {
	const cs = 64 * kib
	tr := mustTracker(t, cs, HBMMSink)
	hbmm := sink(t, tr, HBMMSink)

	tr.Mark(7*cs, 1)
	hbmm.Remove(7) // behind the tracker's back
	tr.Mark(7*cs, 1)
	if hbmm.Contains(7) {
		t.Fatalf("cached chunk written to the sink again: the cache is not used")
	}
	if tr.CachedChunks() != 1 {
		t.Errorf("CachedChunks = %d, want 1", tr.CachedChunks())
	}

	mc := mustNew(t, cs)
	if err := tr.AddSink("/dev/sdb", mc); err != nil {
		t.Fatal(err)
	}
	if tr.CachedChunks() != 0 {
		t.Errorf("AddSink left %d chunks in the cache", tr.CachedChunks())
	}
	tr.Mark(7*cs, 1)
	if !mc.Contains(7) || !hbmm.Contains(7) {
		t.Errorf("after AddSink, Mark reached minicopy %v, hbmm %v; want both", mc.Contains(7), hbmm.Contains(7))
	}

	// RemoveSink keeps the cache: it is still true of the sinks left.
	if got := tr.RemoveSink("/dev/sdb"); got != mc {
		t.Errorf("RemoveSink returned %p, want %p", got, mc)
	}
	if tr.CachedChunks() != 1 {
		t.Errorf("RemoveSink emptied the cache")
	}
	if tr.RemoveSink("/dev/sdb") != nil {
		t.Errorf("second RemoveSink returned a bitmap")
	}
	tr.Mark(8*cs, 1)
	if mc.Contains(8) {
		t.Errorf("removed sink still receives marks")
	}
}

func TestTrackerReset(t *testing.T) {
	const cs = 64 * kib
	tr := mustTracker(t, cs, HBMMSink, "/dev/sdb")
	hbmm, mc := sink(t, tr, HBMMSink), sink(t, tr, "/dev/sdb")
	tr.Mark(0, 10*cs)
	if err := tr.Reset(HBMMSink); err != nil {
		t.Fatal(err)
	}
	if !hbmm.IsEmpty() || tr.Modified(HBMMSink) != 0 {
		t.Errorf("Reset left %d chunks", hbmm.Count())
	}
	if tr.CachedChunks() != 0 {
		t.Errorf("Reset left %d chunks in the cache", tr.CachedChunks())
	}
	if mc.Count() != 10 {
		t.Errorf("Reset of hbmm touched the minicopy sink: %d chunks", mc.Count())
	}
	// The first write after a reset must mark again.
	tr.Mark(2*cs, 1)
	if !hbmm.Contains(2) || hbmm.Count() != 1 {
		t.Errorf("after Reset, Mark gave hbmm %v", chunksOf(hbmm))
	}
	if err := tr.Reset("nope"); !errors.Is(err, ErrNoSink) {
		t.Errorf("Reset(unknown) = %v, want ErrNoSink", err)
	}
	if tr.Modified("nope") != 0 {
		t.Errorf("Modified(unknown) != 0")
	}
}

func TestTrackerAddSinkErrors(t *testing.T) {
	tr := mustTracker(t, 64*kib, HBMMSink)
	if err := tr.AddSink(HBMMSink, mustNew(t, 64*kib)); !errors.Is(err, ErrSinkExists) {
		t.Errorf("duplicate AddSink = %v, want ErrSinkExists", err)
	}
	if err := tr.AddSink("/dev/sdb", mustNew(t, 4*kib)); !errors.Is(err, ErrChunkSize) {
		t.Errorf("AddSink with another chunk size = %v, want ErrChunkSize", err)
	}
	if got := tr.Sinks(); !slices.Equal(got, []string{HBMMSink}) {
		t.Errorf("failed AddSinks changed the sinks: %v", got)
	}
}

func sinkMap(tr *Tracker) map[string]*Bitmap {
	m := map[string]*Bitmap{}
	for _, name := range tr.Sinks() {
		if b, ok := tr.Sink(name); ok {
			m[name] = b
		}
	}
	return m
}

// TestTrackerConcurrent checks invariant 2 under concurrency: when Mark
// returns, the write's chunks are in every sink registered before Mark was
// called, while sinks come and go and the HBMM sink is reset. Writers hold a
// write gate shared, and the resetter holds it exclusively, as the VU does.
func TestTrackerConcurrent(t *testing.T) {
	const cs = 4 * kib
	tr := mustTracker(t, cs, HBMMSink)
	var (
		gate sync.RWMutex
		wg   sync.WaitGroup
		stop = make(chan struct{})
	)
	for w := range 4 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 9))
			for i := 0; i < 3000; i++ {
				off := int64(r.IntN(2000)) * cs / 2
				length := int64(1 + r.IntN(int(3*cs)))
				gate.RLock()
				before := sinkMap(tr)
				tr.Mark(off, length)
				// A sink registered all along must hold the write; the test
				// never registers the same bitmap twice, so the same pointer
				// before and after means registered all along.
				for name, b := range sinkMap(tr) {
					if before[name] == b && !b.ContainsRange(off, length) {
						t.Errorf("sink %s lacks [%d, +%d) after Mark", name, off, length)
					}
				}
				gate.RUnlock()
			}
		})
	}
	var aux sync.WaitGroup
	aux.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			name := fmt.Sprintf("/dev/m%d", i%3)
			if b := tr.RemoveSink(name); b == nil {
				if err := tr.AddSink(name, mustNew(t, cs)); err != nil {
					t.Error(err)
				}
			}
			if i%5 == 0 {
				gate.Lock()
				if err := tr.Reset(HBMMSink); err != nil {
					t.Error(err)
				}
				gate.Unlock()
			}
			_ = tr.Modified(HBMMSink)
		}
	})
	wg.Wait()
	close(stop)
	aux.Wait()
}

// Without sinks Mark records nothing, not even in the cache, and a sink
// added later still sees every chunk written after it.
func TestTrackerWithoutSinks(t *testing.T) {
	const cs = 64 * kib
	tr, err := NewTracker(cs)
	if err != nil {
		t.Fatal(err)
	}
	tr.Mark(3*cs, cs)
	if tr.CachedChunks() != 0 {
		t.Fatalf("a tracker without sinks cached %d chunks", tr.CachedChunks())
	}
	b := mustNew(t, cs)
	if err := tr.AddSink(HBMMSink, b); err != nil {
		t.Fatal(err)
	}
	tr.Mark(3*cs, cs)
	if !b.Contains(3) {
		t.Fatal("a chunk written before the sink existed was not recorded after it")
	}
}

// fakeRemote records the ranges a tracker sends and fails while fail is set.
type fakeRemote struct {
	calls [][2]uint64
	fail  error
	// during runs inside Set (a cache invalidation racing the round trip).
	during func()
}

func (r *fakeRemote) Set(first, last uint64) error {
	r.calls = append(r.calls, [2]uint64{first, last})
	if r.during != nil {
		r.during()
	}
	return r.fail
}

func TestTrackerRemote(t *testing.T) {
	tr, err := NewTracker(64 << 10)
	if err != nil {
		t.Fatal(err)
	}
	r := &fakeRemote{}
	tr.SetRemote(r)
	if tr.Cached(0, 4096) {
		t.Fatal("a remote sink with an empty cache claims chunk 0 cached")
	}
	if err := tr.Mark(0, 4096); err != nil {
		t.Fatal(err)
	}
	if err := tr.Mark(100, 4096); err != nil {
		t.Fatal(err)
	}
	if len(r.calls) != 1 || r.calls[0] != [2]uint64{0, 0} {
		t.Fatalf("remote calls %v, want one for chunk 0", r.calls)
	}
	// A failed remote set fails the mark and leaves the chunk uncached.
	r.fail = errors.New("master gone")
	if err := tr.Mark(128<<10, 128<<10); err == nil {
		t.Fatal("mark succeeded although the remote sink failed")
	}
	if tr.Cached(128<<10, 1) {
		t.Fatal("a chunk whose remote set failed is cached")
	}
	r.fail = nil
	// An invalidation during the round trip keeps the chunk out of the
	// cache: it was sent to the sinks of before.
	r.during = tr.Invalidate
	if err := tr.Mark(5<<20, 1); err != nil {
		t.Fatal(err)
	}
	r.during = nil
	if tr.Cached(5<<20, 1) {
		t.Fatal("a chunk marked across an invalidation is cached")
	}
	// SetRemote empties the cache.
	if err := tr.Mark(0, 1); err != nil {
		t.Fatal(err)
	}
	if !tr.Cached(0, 1) {
		t.Fatal("chunk 0 not cached after its remote set succeeded")
	}
	tr.SetRemote(r)
	if tr.Cached(0, 1) {
		t.Fatal("SetRemote kept the cache")
	}
	tr.SetRemote(nil)
	if !tr.Cached(0, 1) {
		t.Fatal("with no sink and no remote, nothing needs recording")
	}
}
