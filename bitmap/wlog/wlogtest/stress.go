package wlogtest

import (
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shadow-project/shadow/bitmap/wlog"
)

// Target is a member Stress drives: what the log needs, plus data
// writes and flushes.
type Target interface {
	wlog.Device
	WriteAt(p []byte, off int64) (int, error)
	Flush() error
}

// Config of a Stress run.
type Config struct {
	// Seed makes the writers' choices reproducible (the interleaving
	// is the scheduler's).
	Seed uint64
	// Region, VolumeSize and ExtentSize are Format's arguments. The
	// data writes go to [0, VolumeSize) of the target.
	Region                 wlog.Region
	VolumeSize, ExtentSize int64
	// Writers is the number of concurrent writers (default 8).
	Writers int
	// Writes bounds the data writes of a round; the crash comes after a
	// random number of them in the second half (default 1000).
	Writes int
	// MaxWrite is the largest data write, a multiple of 512 (default:
	// two extents, so some writes straddle extents).
	MaxWrite int64
	// Idle is Sweep's idle period. The sweeper's fake clock advances
	// 1 ms per Sweep.
	Idle time.Duration
	// Rounds is the number of crash-and-restart rounds (default 2).
	Rounds int
	// Crash simulates the power loss of the current target, now.
	Crash func() error
	// Reopen returns the member as it comes up after the crash.
	Reopen func() (Target, error)
}

// Result sums what the rounds saw.
type Result struct {
	Extents   uint64 // in the volume
	Required  int    // extents that had to be logged at the crashes
	Logged    int    // extents the logs held after the crashes
	LogWrites uint64 // synchronous log block writes
	Flushes   int    // successful flushes
}

// Stress checks the write log's safety invariant under concurrency and
// power loss: writers do Acquire, WriteAt, Release over random ranges
// (a few with a context canceled under them), a flusher flushes the
// member (FlushBegin, Flush, FlushDone), a sweeper Sweeps, and at a
// random instant the member loses power. Then every extent that
// received a write not covered by a completed flush, and every extent
// still pinned from the round before, must be in the log that Open
// finds. Each round after the first resumes the log with Open and
// Unpins a random half of what it loaded (the "merged" part).
//
// The accounting is conservative in the log's favour where it must be:
// a write counts as issued from just before WriteAt, and a flush covers
// only writes that completed before the log's FlushBegin returned and
// is credited before FlushDone tells the log, so a bit the log may
// legitimately clear is never required.
func Stress(t testing.TB, dev Target, cfg Config) Result {
	t.Helper()
	if cfg.Writers <= 0 {
		cfg.Writers = 8
	}
	if cfg.Writes <= 0 {
		cfg.Writes = 1000
	}
	if cfg.Rounds <= 0 {
		cfg.Rounds = 2
	}
	l, err := wlog.Format(dev, cfg.Region, cfg.VolumeSize, cfg.ExtentSize)
	if err != nil {
		t.Fatalf("format: %v", err)
	}
	ext := l.ExtentSize()
	if cfg.MaxWrite <= 0 {
		cfg.MaxWrite = 2 * ext
	}
	cfg.MaxWrite = min(cfg.MaxWrite, cfg.VolumeSize) &^ 511
	res := Result{Extents: uint64((cfg.VolumeSize-1)/ext + 1)}
	rng := rand.New(rand.NewPCG(cfg.Seed, 0x3c))
	pinned := map[uint64]bool{}
	for round := range cfg.Rounds {
		required := runRound(t, l, dev, cfg, rng.Uint64(), pinned, &res)
		res.LogWrites += l.Stats().LogWrites
		if err := l.Close(); err != nil {
			t.Fatalf("round %d: close: %v", round, err)
		}
		if t.Failed() {
			return res
		}
		if dev, err = cfg.Reopen(); err != nil {
			t.Fatalf("round %d: reopen: %v", round, err)
		}
		var logged wlog.Logged
		l, logged, err = wlog.Open(dev, cfg.Region, cfg.VolumeSize)
		if err != nil {
			t.Fatalf("round %d: open the log after the crash: %v", round, err)
		}
		var missing []uint64
		for e := range required {
			if _, found := slices.BinarySearch(logged.Extents, e); !found {
				missing = append(missing, e)
			}
		}
		if len(missing) > 0 {
			slices.Sort(missing)
			t.Fatalf("round %d (seed %d): %d extents written and not flushed (or still pinned) are missing from the log: %v", round, cfg.Seed, len(missing), missing)
		}
		res.Required += len(required)
		res.Logged += len(logged.Extents)
		clear(pinned)
		for _, e := range logged.Extents {
			if rng.IntN(2) == 0 {
				off := int64(e) * ext
				if err := l.Unpin(off, min(ext, cfg.VolumeSize-off)); err != nil {
					t.Fatal(err)
				}
			} else {
				pinned[e] = true
			}
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return res
}

// runRound runs writers, flusher and sweeper until the crash and returns
// the extents the log must hold.
func runRound(t testing.TB, l *wlog.Log, dev Target, cfg Config, seed uint64, pinned map[uint64]bool, res *Result) map[uint64]bool {
	ext := l.ExtentSize()
	tr := &tracker{writes: map[int]span{}}
	crashAt := int64(cfg.Writes/2 + rand.New(rand.NewPCG(seed, 0)).IntN(cfg.Writes/2+1))
	var done, live atomic.Int64
	var stop atomic.Bool
	var wg sync.WaitGroup
	unexpected := func(what string, err error) {
		if !tr.isCrashed() {
			t.Errorf("%s before the crash: %v", what, err)
		}
	}

	live.Store(int64(cfg.Writers))
	for w := range cfg.Writers {
		wg.Go(func() {
			defer live.Add(-1)
			r := rand.New(rand.NewPCG(seed, uint64(w)+1))
			buf := make([]byte, cfg.MaxWrite)
			for !stop.Load() {
				length := 512 * (1 + r.Int64N(cfg.MaxWrite/512))
				off := pick(r, cfg.VolumeSize, length, ext, done.Load())
				if r.IntN(4) == 0 {
					// Pace the writers a little, so that flushes and
					// sweeps interleave with them.
					time.Sleep(time.Duration(r.IntN(50)) * time.Microsecond)
				}
				ctx, cancel := context.WithCancel(context.Background())
				if r.IntN(20) == 0 {
					go cancel() // races the Acquire
				}
				err := l.Acquire(ctx, off, length)
				cancel()
				if errors.Is(err, context.Canceled) {
					continue
				}
				if err != nil {
					unexpected("acquire", err)
					return
				}
				id := tr.issue(off/ext, (off+length-1)/ext+1)
				for i := range buf[:length] {
					buf[i] = byte(id)
				}
				_, werr := dev.WriteAt(buf[:length], off)
				if werr == nil {
					tr.complete(id)
				}
				l.Release(off, length)
				if werr != nil {
					unexpected("write", werr)
					return
				}
				done.Add(1)
			}
		})
	}
	wg.Go(func() {
		r := rand.New(rand.NewPCG(seed, 0xf1))
		for !stop.Load() {
			time.Sleep(time.Duration(r.IntN(300)) * time.Microsecond)
			seq := l.FlushBegin()
			ids := tr.completed()
			err := dev.Flush()
			if err == nil {
				// Credited before the log hears of it: from FlushDone
				// on, the log may clear these writes' bits.
				tr.cover(ids)
			}
			l.FlushDone(seq, err == nil)
			if err != nil {
				unexpected("flush", err)
				return
			}
		}
	})
	wg.Go(func() {
		r := rand.New(rand.NewPCG(seed, 0x5e))
		now := time.Unix(1<<30, 0)
		for !stop.Load() {
			time.Sleep(time.Duration(r.IntN(200)) * time.Microsecond)
			now = now.Add(time.Millisecond)
			if err := l.Sweep(now, cfg.Idle); err != nil {
				unexpected("sweep", err)
				return
			}
		}
	})

	for done.Load() < crashAt && live.Load() > 0 {
		time.Sleep(50 * time.Microsecond)
	}
	required := tr.crash(t, cfg.Crash, pinned)
	stop.Store(true)
	wg.Wait()
	res.Flushes += tr.flushes
	return required
}

// pick chooses where a write of length bytes goes. Most writes go to a
// window of 16 extents that moves one extent every 16 writes, as a real
// load's working set moves, so that extents fall idle and get swept
// while others are hot; one in eight goes anywhere.
func pick(r *rand.Rand, vol, length, ext, done int64) int64 {
	if r.IntN(8) == 0 {
		return 512 * r.Int64N((vol-length)/512+1)
	}
	win := min(vol, 16*ext)
	start := (done / 16 * ext) % (vol - win + 1) &^ 511
	return min(start+512*r.Int64N(max(win-length, 0)/512+1), vol-length)
}

// span is a data write's extents [first, end), and whether it
// completed.
type span struct {
	first, end int64
	completed  bool
}

// tracker knows which writes are not yet covered by a successful flush.
type tracker struct {
	mu      sync.Mutex
	writes  map[int]span // issued, not covered
	next    int
	crashed bool
	flushes int
}

func (tr *tracker) issue(first, end int64) int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.next++
	tr.writes[tr.next] = span{first: first, end: end}
	return tr.next
}

func (tr *tracker) complete(id int) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	s := tr.writes[id]
	s.completed = true
	tr.writes[id] = s
}

func (tr *tracker) completed() []int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	var ids []int
	for id, s := range tr.writes {
		if s.completed {
			ids = append(ids, id)
		}
	}
	return ids
}

func (tr *tracker) cover(ids []int) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if tr.crashed {
		return
	}
	for _, id := range ids {
		delete(tr.writes, id)
	}
	tr.flushes++
}

func (tr *tracker) isCrashed() bool {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.crashed
}

// crash pulls the plug and, in the same instant as far as the tracker
// is concerned, lists the extents that must be logged.
func (tr *tracker) crash(t testing.TB, crash func() error, pinned map[uint64]bool) map[uint64]bool {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if err := crash(); err != nil {
		t.Errorf("crash: %v", err)
	}
	tr.crashed = true
	req := map[uint64]bool{}
	for _, s := range tr.writes {
		for e := s.first; e < s.end; e++ {
			req[uint64(e)] = true
		}
	}
	for e := range pinned {
		req[e] = true
	}
	return req
}
