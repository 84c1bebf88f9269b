package bitmap

import (
	"errors"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
)

func mustSinceFlush(t testing.TB, chunkSize int64) *SinceFlush {
	t.Helper()
	s, err := NewSinceFlush(chunkSize)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestSinceFlushInterleavings drives SinceFlush through the orderings of
// write issue, write completion, flush begin and flush end that matter. One
// chunk is one byte range of the chunk size; write w covers chunk w.
func TestSinceFlushInterleavings(t *testing.T) {
	type step struct {
		op    string // issue, complete, write (both), begin, ok, fail, want
		arg   int    // write number, or flush number
		wants []uint64
	}
	issue := func(w int) step { return step{op: "issue", arg: w} }
	complete := func(w int) step { return step{op: "complete", arg: w} }
	write := func(w int) step { return step{op: "write", arg: w} }
	begin := func(f int) step { return step{op: "begin", arg: f} }
	ok := func(f int) step { return step{op: "ok", arg: f} }
	fail := func(f int) step { return step{op: "fail", arg: f} }
	want := func(c ...uint64) step { return step{op: "want", wants: c} }

	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"nothing", []step{want()}},
		{"completed before the flush is flushed", []step{
			write(1), want(1), begin(1), want(1), ok(1), want(),
		}},
		{"in flight is kept", []step{
			issue(1), want(1), begin(1), ok(1), want(1), complete(1), want(1),
			begin(2), ok(2), want(),
		}},
		{"issued before begin, completed after, is kept", []step{
			issue(1), begin(1), complete(1), ok(1), want(1), begin(2), ok(2), want(),
		}},
		{"issued and completed during the flush is kept", []step{
			begin(1), write(1), ok(1), want(1), begin(2), ok(2), want(),
		}},
		{"failure keeps everything", []step{
			write(1), begin(1), write(2), fail(1), want(1, 2),
			begin(2), ok(2), want(),
		}},
		{"later success waits for an earlier flush", []step{
			write(1), begin(1), write(2), begin(2), write(3),
			ok(2), want(1, 2, 3), ok(1), want(3),
		}},
		{"earlier failure takes back a later success", []step{
			write(1), begin(1), write(2), begin(2), ok(2), fail(1), want(1, 2),
			begin(3), ok(3), want(),
		}},
		{"later failure takes back an earlier flush in progress", []step{
			write(1), begin(1), write(2), begin(2), fail(2), want(1, 2),
			ok(1), want(1, 2), begin(3), ok(3), want(),
		}},
		{"in flight across a failure and two flushes", []step{
			issue(1), begin(1), fail(1), begin(2), ok(2), want(1),
			complete(1), begin(3), ok(3), want(),
		}},
		{"same chunk written twice, one still in flight", []step{
			issue(1), issue(1), complete(1), begin(1), ok(1), want(1),
			complete(1), want(1), begin(2), ok(2), want(),
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const cs = 64 * kib
			s := mustSinceFlush(t, cs)
			toks := map[int]FlushToken{}
			for i, st := range tc.steps {
				switch st.op {
				case "issue":
					s.Issued(int64(st.arg)*cs, cs)
				case "complete":
					s.Completed(int64(st.arg)*cs, cs)
				case "write":
					s.Issued(int64(st.arg)*cs, cs)
					s.Completed(int64(st.arg)*cs, cs)
				case "begin":
					toks[st.arg] = s.FlushBegin()
				case "ok", "fail":
					if err := s.FlushDone(toks[st.arg], st.op == "ok"); err != nil {
						t.Fatalf("step %d: %v", i, err)
					}
				case "want":
					if got := chunksOf(s.Snapshot()); !slices.Equal(got, st.wants) {
						t.Fatalf("step %d: snapshot %v, want %v", i, got, st.wants)
					}
				}
			}
		})
	}
}

func TestSinceFlushTokens(t *testing.T) {
	s := mustSinceFlush(t, DefaultChunkSize)
	if err := s.FlushDone(FlushToken{}, true); !errors.Is(err, ErrFlushToken) {
		t.Errorf("zero token: %v, want ErrFlushToken", err)
	}
	a, b := s.FlushBegin(), s.FlushBegin()
	if a == b {
		t.Fatalf("two flushes got the same token")
	}
	if err := s.FlushDone(b, true); err != nil {
		t.Fatal(err)
	}
	if err := s.FlushDone(b, true); !errors.Is(err, ErrFlushToken) {
		t.Errorf("token done twice: %v, want ErrFlushToken", err)
	}
	if s.PendingFlushes() != 2 {
		t.Errorf("PendingFlushes = %d, want 2 (b waits for a)", s.PendingFlushes())
	}
	if err := s.FlushDone(a, false); err != nil {
		t.Fatal(err)
	}
	if err := s.FlushDone(a, true); !errors.Is(err, ErrFlushToken) {
		t.Errorf("failed token reused: %v, want ErrFlushToken", err)
	}
	if s.PendingFlushes() != 0 {
		t.Errorf("PendingFlushes = %d, want 0", s.PendingFlushes())
	}
	// A completion without its issue must not break later accounting.
	s.Completed(0, 1)
	s.Issued(0, 1)
	s.Completed(0, 1)
	tok := s.FlushBegin()
	if err := s.FlushDone(tok, true); err != nil {
		t.Fatal(err)
	}
	if !s.Snapshot().IsEmpty() {
		t.Errorf("snapshot not empty: %v", chunksOf(s.Snapshot()))
	}
	if _, err := NewSinceFlush(3); !errors.Is(err, ErrChunkSize) {
		t.Errorf("NewSinceFlush(3) = %v, want ErrChunkSize", err)
	}
}

// TestSinceFlushConcurrent checks, with writers and one flusher racing, that
// the snapshot holds every write that is in flight or whose completion was
// reported after the last successful flush began, failures in between. A logical clock
// orders the events the check relies on.
func TestSinceFlushConcurrent(t *testing.T) {
	const (
		cs      = 4 * kib
		writers = 4
		perW    = 2000
	)
	type rec struct {
		chunk      uint64
		issued     atomic.Uint64 // clock after Issued returned
		completing atomic.Uint64 // clock before Completed was called
	}
	var (
		clock atomic.Uint64
		recs  = make([]rec, writers*perW)
		s     = mustSinceFlush(t, cs)
		wg    sync.WaitGroup
		done  atomic.Bool
	)
	for w := range writers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 1))
			for i := range perW {
				rc := &recs[w*perW+i]
				rc.chunk = r.Uint64N(50000)
				s.Issued(int64(rc.chunk)*cs, cs)
				rc.issued.Store(clock.Add(1))
				rc.completing.Store(clock.Add(1))
				s.Completed(int64(rc.chunk)*cs, cs)
			}
		})
	}
	var flusher sync.WaitGroup
	flusher.Go(func() {
		r := rand.New(rand.NewPCG(7, 7))
		var retired uint64 // clock when the last successful flush began
		for !done.Load() {
			tok := s.FlushBegin()
			begun := clock.Add(1)
			ok := r.IntN(10) != 0
			if err := s.FlushDone(tok, ok); err != nil {
				t.Error(err)
				return
			}
			if ok {
				retired = begun
			}
			before := clock.Add(1)
			snap := s.Snapshot()
			for i := range recs {
				rc := &recs[i]
				iss := rc.issued.Load()
				if iss == 0 || iss > before {
					continue
				}
				c := rc.completing.Load()
				if (c == 0 || c > retired) && !snap.Contains(rc.chunk) {
					t.Errorf("chunk %d (issued at %d, completing at %d) missing after the flush begun at %d",
						rc.chunk, iss, c, retired)
					return
				}
			}
		}
	})
	wg.Wait()
	done.Store(true)
	flusher.Wait()
}
