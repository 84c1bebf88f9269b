package masters

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/bitmap/wire"
)

const testChunk = bitmap.DefaultChunkSize

func openStore(t *testing.T, sets ...string) *Store {
	t.Helper()
	st := NewStore()
	for _, set := range sets {
		if err := st.Open(set, testChunk); err != nil {
			t.Fatal(err)
		}
	}
	return st
}

func mustApply(t *testing.T, st *Store, set, writer string, seq uint64, rs ...wire.Range) {
	t.Helper()
	if err := st.Apply(set, writer, testInc, seq, rs); err != nil {
		t.Fatalf("Apply(%s, %s, %d, %v): %v", set, writer, seq, rs, err)
	}
}

func mustRollback(t *testing.T, st *Store, set, writer string, seq uint64) {
	t.Helper()
	if err := st.Rollback(set, writer, seq); err != nil {
		t.Fatalf("Rollback(%s, %s, %d): %v", set, writer, seq, err)
	}
}

// chunks returns writer's chunks in set, in order.
func chunks(t *testing.T, st *Store, set, writer string) []uint64 {
	t.Helper()
	b, ok := st.Snapshot(set, writer)
	if !ok {
		t.Fatalf("no bitmap of %s in %s", writer, set)
	}
	return slices.Collect(b.Chunks())
}

// chunkSpan is the range of chunks first to last.
func chunkSpan(first, last uint64) wire.Range { return wire.Range{First: first, Last: last} }

func span(first, last uint64) []uint64 {
	var out []uint64
	for c := first; c <= last; c++ {
		out = append(out, c)
	}
	return out
}

func wantChunks(t *testing.T, st *Store, set, writer string, want []uint64) {
	t.Helper()
	if got := chunks(t, st, set, writer); !slices.Equal(got, want) {
		t.Fatalf("chunks of %s in %s: %v, want %v", writer, set, got, want)
	}
}

func TestStoreOpen(t *testing.T) {
	st := openStore(t, "DSA1")
	if err := st.Open("DSA1", testChunk); err != nil {
		t.Fatalf("reopening with the same size: %v", err)
	}
	if err := st.Open("DSA1", testChunk*2); !errors.Is(err, bitmap.ErrChunkSize) {
		t.Fatalf("reopening with another size: %v, want bitmap.ErrChunkSize", err)
	}
	if err := st.Open("DSA2", 1000); !errors.Is(err, bitmap.ErrChunkSize) {
		t.Fatalf("opening with an invalid size: %v, want bitmap.ErrChunkSize", err)
	}
	if w := st.Writers("DSA2"); w != nil {
		t.Fatalf("a refused Open opened the set: %v", w)
	}
}

func TestStoreRefusesUnopenedSet(t *testing.T) {
	st := openStore(t, "DSA1")
	if err := st.Apply("DSA2", "w", testInc, 1, []wire.Range{chunkSpan(1, 1)}); !errors.Is(err, ErrNotOpen) {
		t.Fatalf("Apply: %v, want ErrNotOpen", err)
	}
	if err := st.Rollback("DSA2", "w", 1); !errors.Is(err, ErrNotOpen) {
		t.Fatalf("Rollback: %v, want ErrNotOpen", err)
	}
	if _, err := st.Bitmap("DSA2", "w"); !errors.Is(err, ErrNotOpen) {
		t.Fatalf("Bitmap: %v, want ErrNotOpen", err)
	}
	if st.Writers("DSA2") != nil {
		t.Fatal("Apply on an unopened set opened it")
	}
}

func TestStoreRollbackClearsOnlyNewlySet(t *testing.T) {
	st := openStore(t, "DSA1")
	mustApply(t, st, "DSA1", "w", 1, chunkSpan(3, 3))
	mustApply(t, st, "DSA1", "w", 2, chunkSpan(0, 5), chunkSpan(100, 100))
	wantChunks(t, st, "DSA1", "w", append(span(0, 5), 100))

	mustRollback(t, st, "DSA1", "w", 2)
	wantChunks(t, st, "DSA1", "w", []uint64{3}) // set before bit-set 2, so it stays

	mustRollback(t, st, "DSA1", "w", 2) // twice: nothing left to clear
	mustRollback(t, st, "DSA1", "w", 77)
	mustRollback(t, st, "DSA1", "other", 1)
	wantChunks(t, st, "DSA1", "w", []uint64{3})

	// Bit-set 2 named chunk 3 again, so rolling back 1 leaves it (see
	// TestStoreRollbackKeepsChunksNamedLater).
	mustRollback(t, st, "DSA1", "w", 1)
	wantChunks(t, st, "DSA1", "w", []uint64{3})
}

// TestStoreRollbackKeepsChunksNamedLater: a later bit-set of the same chunk
// may have been acknowledged and its write issued, so rolling back the
// earlier one must not clear the chunk under it.
func TestStoreRollbackKeepsChunksNamedLater(t *testing.T) {
	st := openStore(t, "DSA1")
	mustApply(t, st, "DSA1", "w", 1, chunkSpan(10, 12))
	mustApply(t, st, "DSA1", "w", 2, chunkSpan(11, 11))
	mustRollback(t, st, "DSA1", "w", 1)
	wantChunks(t, st, "DSA1", "w", []uint64{11})
	mustRollback(t, st, "DSA1", "w", 2) // set nothing new: conservative, 11 stays
	wantChunks(t, st, "DSA1", "w", []uint64{11})
}

func TestStoreRollbackFindsNewChunksAmongSetOnes(t *testing.T) {
	st := openStore(t, "DSA1")
	var before []uint64
	for c := uint64(0); c < 1000; c += 2 {
		mustApply(t, st, "DSA1", "w", c+1, chunkSpan(c, c))
		before = append(before, c)
	}
	mustApply(t, st, "DSA1", "w", 5000, chunkSpan(0, 999))
	wantChunks(t, st, "DSA1", "w", span(0, 999))
	mustRollback(t, st, "DSA1", "w", 5000)
	wantChunks(t, st, "DSA1", "w", before)
}

func TestStoreOverlappingRangesInOneBitSet(t *testing.T) {
	st := openStore(t, "DSA1")
	mustApply(t, st, "DSA1", "w", 1, chunkSpan(0, 5), chunkSpan(3, 8))
	wantChunks(t, st, "DSA1", "w", span(0, 8))
	mustRollback(t, st, "DSA1", "w", 1)
	wantChunks(t, st, "DSA1", "w", nil)
}

func TestStoreForgetsOldestSeqs(t *testing.T) {
	st := openStore(t, "DSA1")
	for seq := uint64(1); seq <= undoDepth+1; seq++ {
		mustApply(t, st, "DSA1", "w", seq, chunkSpan(seq, seq))
	}
	mustRollback(t, st, "DSA1", "w", 1) // forgotten: a no-op
	mustRollback(t, st, "DSA1", "w", 2) // the oldest remembered
	mustRollback(t, st, "DSA1", "w", undoDepth+1)
	got := chunks(t, st, "DSA1", "w")
	if len(got) != undoDepth-1 || got[0] != 1 || got[1] != 3 || got[len(got)-1] != undoDepth {
		t.Fatalf("after rollbacks: %d chunks starting %v ending %d; want 1, 3, ..., %d",
			len(got), got[:min(3, len(got))], got[len(got)-1], undoDepth)
	}
}

func TestStoreRepeatedSeqReplacesTheRecord(t *testing.T) {
	st := openStore(t, "DSA1")
	mustApply(t, st, "DSA1", "w", 5, chunkSpan(1, 1))
	// The writer restarted and numbers from scratch: the older bit-set 5
	// can no longer be named, so its chunk stays.
	mustApply(t, st, "DSA1", "w", 5, chunkSpan(2, 2))
	mustRollback(t, st, "DSA1", "w", 5)
	wantChunks(t, st, "DSA1", "w", []uint64{1})
}

func TestStoreRefusesBadBitSets(t *testing.T) {
	st := NewStore()
	if err := st.Open("DSA1", bitmap.MaxChunkSize); err != nil {
		t.Fatal(err)
	}
	mustApply(t, st, "DSA1", "w", 1, chunkSpan(7, 7))
	// 2^37 chunks of 64 MiB reach 2^63 bytes, past any int64 offset.
	for name, c := range map[string]struct {
		rs   []wire.Range
		want error
	}{
		"reversed":         {[]wire.Range{chunkSpan(1, 1), chunkSpan(5, 4)}, ErrBadRange},
		"past the volume":  {[]wire.Range{chunkSpan(1, 1), chunkSpan(0, 1<<37)}, ErrBadRange},
		"too many chunks":  {[]wire.Range{chunkSpan(0, MaxApplyChunks)}, ErrTooLarge},
		"too many, summed": {[]wire.Range{chunkSpan(0, MaxApplyChunks/2-1), chunkSpan(1<<30, 1<<30+MaxApplyChunks/2)}, ErrTooLarge},
	} {
		t.Run(name, func(t *testing.T) {
			if err := st.Apply("DSA1", "w", testInc, 2, c.rs); !errors.Is(err, c.want) {
				t.Fatalf("Apply: %v, want %v", err, c.want)
			}
			wantChunks(t, st, "DSA1", "w", []uint64{7})
			if err := st.Apply("DSA1", "new", testInc, 2, c.rs); !errors.Is(err, c.want) {
				t.Fatalf("Apply for a new writer: %v, want %v", err, c.want)
			}
			if _, ok := st.Writers("DSA1")["new"]; ok {
				t.Fatal("a refused bit-set created a writer's bitmap")
			}
		})
	}
	mustApply(t, st, "DSA1", "big", 3, chunkSpan(0, MaxApplyChunks-1))
	if n := st.Writers("DSA1")["big"]; n != MaxApplyChunks {
		t.Fatalf("a bit-set of exactly MaxApplyChunks set %d chunks", n)
	}
}

func TestStoreSnapshotWritersForgetClose(t *testing.T) {
	st := openStore(t, "DSA1", "DSA2")
	mustApply(t, st, "DSA1", "a", 1, chunkSpan(0, 9))
	mustApply(t, st, "DSA1", "b", 1, chunkSpan(4, 4))
	mustApply(t, st, "DSA2", "a", 1, chunkSpan(4, 5))

	snap, ok := st.Snapshot("DSA1", "b")
	if !ok {
		t.Fatal("no snapshot")
	}
	snap.Add(99)
	wantChunks(t, st, "DSA1", "b", []uint64{4})
	if _, ok := st.Snapshot("DSA1", "nobody"); ok {
		t.Fatal("snapshot of a writer never seen")
	}

	live, err := st.Bitmap("DSA1", "local")
	if err != nil {
		t.Fatal(err)
	}
	live.Add(42) // the local writer's tracker sets chunks directly
	if got := fmt.Sprint(st.Writers("DSA1")); got != "map[a:10 b:1 local:1]" {
		t.Fatalf("Writers: %s", got)
	}

	if !st.Forget("DSA1", "a", testInc) {
		t.Fatal("Forget of the only incarnation kept the bitmap")
	}
	if got := fmt.Sprint(st.Writers("DSA1")); got != "map[b:1 local:1]" {
		t.Fatalf("Writers after Forget: %s", got)
	}
	if got := fmt.Sprint(st.Writers("DSA2")); got != "map[a:2]" {
		t.Fatalf("Forget reached another set: %s", got)
	}
	st.Close("DSA1")
	if st.Writers("DSA1") != nil {
		t.Fatal("Writers of a closed set")
	}
	if err := st.Apply("DSA1", "a", testInc, 2, []wire.Range{chunkSpan(1, 1)}); !errors.Is(err, ErrNotOpen) {
		t.Fatalf("Apply after Close: %v", err)
	}
}

func TestStoreConcurrentUse(t *testing.T) {
	st := openStore(t, "DSA1")
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			w := fmt.Sprint("w", g)
			for i := range uint64(200) {
				if err := st.Apply("DSA1", w, testInc, i+1, []wire.Range{chunkSpan(i, i+1)}); err != nil {
					t.Error(err)
					return
				}
				if i%3 == 0 {
					if err := st.Rollback("DSA1", w, i+1); err != nil {
						t.Error(err)
						return
					}
				}
				st.Snapshot("DSA1", w)
				st.Writers("DSA1")
			}
		})
	}
	wg.Wait()
	for g := range 8 {
		w := fmt.Sprint("w", g)
		// Bit-set i+1 names chunks i and i+1; a rolled-back one clears what
		// it newly set, which the next bit-set sets again, except chunk 0,
		// which no other bit-set names.
		got := chunks(t, st, "DSA1", w)
		if !slices.Equal(got, span(1, 200)) {
			t.Fatalf("%s: %d chunks, first %v", w, len(got), got[:min(3, len(got))])
		}
	}
}

// A reset clears the writer's bitmap only if no bit-set numbered above it
// was applied first: a late reset must never drop a later write's chunks.
func TestStoreReset(t *testing.T) {
	st := openStore(t, "DSA1")
	mustApply(t, st, "DSA1", "w", 1, chunkSpan(1, 3))
	mustApply(t, st, "DSA1", "w", 2, chunkSpan(10, 10))
	mustApply(t, st, "DSA1", "x", 9, chunkSpan(5, 5))
	if err := st.Reset("DSA1", "w", testInc, 3); err != nil {
		t.Fatalf("reset 3: %v", err)
	}
	wantChunks(t, st, "DSA1", "w", nil)
	wantChunks(t, st, "DSA1", "x", []uint64{5}) // another writer's stay
	// The undo records went too: rolling back an earlier bit-set after
	// the reset, or a later one, clears only what that one set.
	mustApply(t, st, "DSA1", "w", 4, chunkSpan(20, 21))
	mustRollback(t, st, "DSA1", "w", 2)
	wantChunks(t, st, "DSA1", "w", []uint64{20, 21})

	// Overtaken: bit-set 6 was applied before reset 5 arrived.
	mustApply(t, st, "DSA1", "w", 6, chunkSpan(30, 30))
	err := st.Reset("DSA1", "w", testInc, 5)
	if !errors.Is(err, ErrStaleReset) {
		t.Fatalf("reset 5 after bit-set 6: %v, want ErrStaleReset", err)
	}
	wantChunks(t, st, "DSA1", "w", []uint64{20, 21, 30})
	// Each run of a writer numbers from 1: another run's bit-sets do not
	// make this run's reset stale.
	if err := st.Apply("DSA1", "v", testInc+1, 900, []wire.Range{chunkSpan(40, 40)}); err != nil {
		t.Fatal(err)
	}
	if err := st.Apply("DSA1", "v", testInc+2, 1, []wire.Range{chunkSpan(41, 41)}); err != nil {
		t.Fatal(err)
	}
	if err := st.Reset("DSA1", "v", testInc+2, 2); err != nil {
		t.Fatalf("reset 2 of a run whose last bit-set is 1: %v", err)
	}
	wantChunks(t, st, "DSA1", "v", nil)

	// The agent's check comes first and refuses without clearing.
	refuse := errors.New("a merge is owed")
	var asked []string
	st.SetResetCheck(func(set, writer string, inc uint64) error {
		asked = append(asked, fmt.Sprintf("%s/%s/%d", set, writer, inc))
		return refuse
	})
	if err := st.Reset("DSA1", "w", 7, 8); !errors.Is(err, refuse) {
		t.Fatalf("reset refused by the check: %v", err)
	}
	wantChunks(t, st, "DSA1", "w", []uint64{20, 21, 30})
	if !slices.Equal(asked, []string{"DSA1/w/7"}) {
		t.Fatalf("check asked %v", asked)
	}
	st.SetResetCheck(nil)

	if err := st.Reset("DSA1", "nobody", 1, 1); err != nil {
		t.Fatalf("reset of a writer with no bitmap: %v", err)
	}
	if err := st.Reset("DSA9", "w", 1, 99); !errors.Is(err, ErrNotOpen) {
		t.Fatalf("reset on an unopened set: %v", err)
	}
}

// testInc is the incarnation the store tests' writer runs.
const testInc = 5

// A writer's bitmap is forgotten with the incarnation that left, unless a
// later run of the writer set bits in it meanwhile (a restart whose first
// bit-sets beat the master's apply of the previous run's failure).
func TestStoreForget(t *testing.T) {
	st := openStore(t, "DSA1")
	mustApply(t, st, "DSA1", "w", 1, chunkSpan(1, 2))
	if !st.Forget("DSA1", "w", testInc) {
		t.Fatal("the only incarnation left, yet the bitmap was kept")
	}
	if _, ok := st.Snapshot("DSA1", "w"); ok {
		t.Fatal("bitmap still there after Forget")
	}

	mustApply(t, st, "DSA1", "w", 1, chunkSpan(1, 2))
	if err := st.Apply("DSA1", "w", testInc+1, 1, []wire.Range{chunkSpan(7, 7)}); err != nil {
		t.Fatal(err)
	}
	if st.Forget("DSA1", "w", testInc) {
		t.Fatal("the old run's departure dropped the new run's bits")
	}
	wantChunks(t, st, "DSA1", "w", []uint64{1, 2, 7}) // too many, never too few
	if st.Forget("DSA1", "w", 0) {
		t.Fatal("an unknown incarnation's departure dropped the bitmap")
	}
	if !st.Forget("DSA1", "w", testInc+1) {
		t.Fatal("the new run left too, yet the bitmap was kept")
	}
	if st.Forget("DSA1", "nobody", 1) || st.Forget("DSA9", "w", 1) {
		t.Fatal("Forget of nothing reported a drop")
	}
}
