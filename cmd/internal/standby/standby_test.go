package standby

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"
	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/bitmap/wire"
)

// fakeMasters are masters in memory: one bitmap per host; a host in
// stalled answers nothing until its context ends; one in broken refuses.
type fakeMasters struct {
	mu      sync.Mutex
	bms     map[string]*bitmap.Bitmap
	stalled map[string]bool
	broken  map[string]bool
	fetches int
}

func newFake(hosts ...string) *fakeMasters {
	f := &fakeMasters{bms: map[string]*bitmap.Bitmap{}, stalled: map[string]bool{}, broken: map[string]bool{}}
	for _, h := range hosts {
		f.bms[h], _ = bitmap.New(1 << 20)
	}
	return f
}

var errBroken = errors.New("broken")

func (f *fakeMasters) BitSet(ctx context.Context, host, set, writer string, rs []wire.Range) (uint64, error) {
	f.mu.Lock()
	stalled, broken := f.stalled[host], f.broken[host]
	f.mu.Unlock()
	if stalled {
		<-ctx.Done()
		return 1, ctx.Err()
	}
	if broken {
		return 1, errBroken
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range rs {
		for c := r.First; c <= r.Last; c++ {
			f.bms[host].Add(c)
		}
	}
	return 1, nil
}

func (f *fakeMasters) Fetch(ctx context.Context, host, set, writer string) (*bitmap.Bitmap, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fetches++
	if f.broken[host] || f.stalled[host] {
		return nil, errBroken
	}
	return f.bms[host].Clone(), nil
}

func (f *fakeMasters) set(m map[string]bool, host string, on bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m[host] = on
}

func (f *fakeMasters) chunks(host string) []uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Collect(f.bms[host].Chunks())
}

// start runs a tracker of writer W in DSA1 over masters hosts, copying
// from active ("" none), until cancel.
func start(active string, hosts ...string) (*fakeMasters, *Tracker, context.Context, context.CancelFunc) {
	f := newFake(hosts...)
	tr := New(f, "DSA1", "W", 0, zerolog.Nop())
	ctx, cancel := context.WithCancel(context.Background())
	go tr.Run(ctx, func() string { return active })
	return f, tr, ctx, cancel
}

func state(t *Tracker, host string) string {
	for _, s := range t.Show() {
		if s.Host == host {
			return s.State
		}
	}
	return "absent"
}

// write is what the writer does under write policy active: the active
// master synchronously, the standbys through the tracker.
func write(t *Tracker, f *fakeMasters, chunks ...uint64) {
	for _, c := range chunks {
		rs := []wire.Range{{First: c, Last: c}}
		t.Send(context.Background(), rs)
		_, _ = f.BitSet(context.Background(), "A", "DSA1", "W", rs)
	}
}

func TestStandbyCatchesUpAndStaysInStep(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, tr, ctx, cancel := start("A", "A", "B")
		defer cancel()
		// Chunks acknowledged before B became a standby reach it by copy.
		write(tr, f, 1, 2, 3)
		tr.SetStandbys([]string{"B"})
		if got := state(tr, "B"); got != Behind {
			t.Fatalf("a new standby is %s, want %s", got, Behind)
		}
		synctest.Wait()
		if got := state(tr, "B"); got != InStep {
			t.Fatalf("after the copy the standby is %s, want %s", got, InStep)
		}
		write(tr, f, 7, 8)
		synctest.Wait()
		if !tr.Confirm(ctx, "B") {
			t.Fatal("Confirm: a standby in step was refused")
		}
		if got, want := f.chunks("B"), f.chunks("A"); !slices.Equal(got, want) {
			t.Fatalf("standby holds %v, the active master %v", got, want)
		}
	})
}

func TestStalledStandbyIsBehindUntilItCopies(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, tr, ctx, cancel := start("A", "A", "B")
		defer cancel()
		tr.SetStandbys([]string{"B"})
		synctest.Wait()
		// B stops answering (SIGSTOP): the writes go on, B falls behind.
		f.set(f.stalled, "B", true)
		write(tr, f, 10, 11)
		time.Sleep(DefaultAckTimeout + time.Millisecond)
		synctest.Wait()
		if got := state(tr, "B"); got == InStep {
			t.Fatalf("a stalled standby that missed bit-sets is %s", got)
		}
		if tr.Confirm(ctx, "B") {
			t.Fatal("Confirm accepted a standby that missed bit-sets")
		}
		// B resumes: the copy under way (stalled until its timeout) or
		// the next one makes it whole again.
		f.set(f.stalled, "B", false)
		time.Sleep(copyTimeout + retryDelay + time.Millisecond)
		synctest.Wait()
		if got := state(tr, "B"); got != InStep {
			t.Fatalf("a resumed standby is %s after the retry, want %s", got, InStep)
		}
		if got, want := f.chunks("B"), f.chunks("A"); !slices.Equal(got, want) {
			t.Fatalf("standby holds %v, the active master %v", got, want)
		}
	})
}

func TestFailedCopyIsUnusableAndRetried(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, tr, _, cancel := start("A", "A", "B")
		defer cancel()
		// (Nothing is due before SetStandbys: Run waits.)
		write(tr, f, 5)
		f.set(f.broken, "A", true) // the fetch from the active master fails
		tr.SetStandbys([]string{"B"})
		synctest.Wait()
		if got := state(tr, "B"); got != Unusable {
			t.Fatalf("after a failed copy the standby is %s, want %s", got, Unusable)
		}
		f.set(f.broken, "A", false)
		time.Sleep(retryDelay + time.Millisecond)
		synctest.Wait()
		if got := state(tr, "B"); got != InStep || !slices.Contains(f.chunks("B"), 5) {
			t.Fatalf("after the retry: %s with %v, want in step with chunk 5", state(tr, "B"), f.chunks("B"))
		}
	})
}

func TestNoActiveMasterNoCopy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, tr, _, cancel := start("", "A", "B")
		defer cancel()
		tr.SetStandbys([]string{"B"})
		time.Sleep(3 * retryDelay)
		synctest.Wait()
		if got := state(tr, "B"); got != Behind {
			t.Fatalf("with nobody to copy from the standby is %s, want %s", got, Behind)
		}
		if f.fetches != 0 {
			t.Fatalf("%d fetches with no active master", f.fetches)
		}
	})
}

func TestDroppedStandbyKeepsItsStateForConfirm(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, tr, ctx, cancel := start("A", "A", "B", "C")
		defer cancel()
		tr.SetStandbys([]string{"B", "C"})
		synctest.Wait()
		// A fails; B becomes the candidate: no longer a standby, still
		// confirmable; C stays one.
		tr.SetStandbys([]string{"C"})
		if !tr.Confirm(ctx, "B") {
			t.Fatal("the candidate, in step when it stopped being a standby, was refused")
		}
		if got := tr.Standbys(); !slices.Equal(got, []string{"C"}) {
			t.Fatalf("standbys %v, want [C]", got)
		}
		// Back as a standby later: it missed bit-sets meanwhile.
		tr.SetStandbys([]string{"B", "C"})
		if got := state(tr, "B"); got != Behind {
			t.Fatalf("a standby again is %s, want %s", got, Behind)
		}
	})
}

func TestOverflowMakesBehind(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, tr, ctx, cancel := start("", "A", "B")
		defer cancel()
		tr.SetStandbys([]string{"B"})
		tr.mu.Lock()
		tr.sbs["B"].state = InStep
		tr.mu.Unlock()
		f.set(f.stalled, "B", true)
		for c := range uint64(MaxOutstanding + 1) {
			tr.Send(ctx, []wire.Range{{First: c, Last: c}})
		}
		tr.mu.Lock()
		st, out := tr.sbs["B"].state, tr.sbs["B"].outstanding
		tr.mu.Unlock()
		if st != Behind || out != MaxOutstanding {
			t.Fatalf("after %d sends to a stalled standby: %s with %d in flight, want behind with %d", MaxOutstanding+1, st, out, MaxOutstanding)
		}
		cancel()
		synctest.Wait()
	})
}
