package device

import (
	"bytes"
	"errors"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestFaultyStickyAfterFlushError(t *testing.T) {
	f := NewFaulty(mustOpen(t, newFile(t, 64<<10), Options{}))
	var fail atomic.Bool
	fail.Store(true)
	f.Inject(When(func(op Op, off, length int64) bool { return op == OpFlush && fail.Load() }, syscall.EIO, 0))
	if _, err := f.WriteAt([]byte("data"), 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Flush(); !errors.Is(err, syscall.EIO) || !errors.Is(err, ErrFailed) {
		t.Fatalf("flush: %v, want EIO and ErrFailed", err)
	}
	// The fault is gone, but a second flush must not report success for
	// data that may be lost: the device stays failed.
	fail.Store(false)
	f.ClearRules()
	if err := f.Flush(); !errors.Is(err, ErrFailed) || !errors.Is(err, syscall.EIO) {
		t.Fatalf("second flush: %v, want the sticky failure", err)
	}
	if _, err := f.WriteAt([]byte("more"), 0); !errors.Is(err, ErrFailed) {
		t.Fatalf("write after failed flush: %v", err)
	}
	if err := f.Zero(0, 1); !errors.Is(err, ErrFailed) {
		t.Fatalf("zero after failed flush: %v", err)
	}
}

func TestFaultyReadErrorNotSticky(t *testing.T) {
	f := NewFaulty(mustOpen(t, newFile(t, 64<<10), Options{}))
	var once atomic.Bool
	f.Inject(When(func(op Op, off, length int64) bool {
		return op == OpRead && once.CompareAndSwap(false, true)
	}, syscall.EIO, 0))
	b := make([]byte, 10)
	if _, err := f.ReadAt(b, 0); !errors.Is(err, syscall.EIO) || errors.Is(err, ErrFailed) {
		t.Fatalf("first read: %v, want a plain EIO", err)
	}
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatalf("second read: %v", err)
	}
	if err := f.Flush(); err != nil {
		t.Fatalf("flush after read error: %v", err)
	}
}

// TestFaultyPredicate injects errors into writes that touch one range and
// a delay into reads of another, and leaves everything else alone.
func TestFaultyPredicate(t *testing.T) {
	f := NewFaulty(mustOpen(t, newFile(t, 64<<10), Options{}))
	const delay = 200 * time.Millisecond
	var seen sync.Map
	// A raw Rule, as the type allows.
	//lint:ignore ST1008 Rule puts the error first
	f.Inject(func(op Op, off, length int64) (error, time.Duration) {
		seen.Store(op, true)
		if op == OpRead && off < 512 {
			return nil, delay
		}
		return nil, 0
	})
	f.Inject(When(func(op Op, off, length int64) bool {
		return (op == OpWrite || op == OpZero) && off < 8192 && off+length > 4096
	}, syscall.ENOSPC, 0))

	b := make([]byte, 100)
	start := time.Now()
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < delay {
		t.Fatalf("delayed read took %v, want at least %v", el, delay)
	}
	start = time.Now()
	if _, err := f.ReadAt(b, 1024); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el >= delay {
		t.Fatalf("undelayed read took %v", el)
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatalf("write outside the faulty range: %v", err)
	}
	if err := f.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(b, 4090); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write into the faulty range: %v", err)
	}
	for _, op := range []Op{OpRead, OpWrite, OpFlush} {
		if _, ok := seen.Load(op); !ok {
			t.Errorf("rule never saw %v", op)
		}
	}
}

// TestFaultyPowerLoss: write A, flush, write B (and zero part of A):
// after Crash and a reopen the device holds A only.
func TestFaultyPowerLoss(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(map[bool]string{false: "buffered", true: "direct"}[direct], func(t *testing.T) {
			const size = 256 << 10
			p := newFile(t, size)
			dev, err := Open(p, Options{Direct: direct})
			if err != nil {
				if direct {
					t.Skipf("direct I/O unavailable: %v", err)
				}
				t.Fatal(err)
			}
			f := NewFaulty(dev)
			f.PowerLoss()
			a := pattern(10, 20000)
			if _, err := f.WriteAt(a, 1000); err != nil {
				t.Fatal(err)
			}
			if err := f.Flush(); err != nil {
				t.Fatal(err)
			}
			if f.Unflushed() != 0 {
				t.Fatalf("undo log after flush: %d records", f.Unflushed())
			}
			b := pattern(11, 30000)
			if _, err := f.WriteAt(b, 5000); err != nil { // overlaps A
				t.Fatal(err)
			}
			if _, err := f.WriteAt(b[:100], 200000); err != nil {
				t.Fatal(err)
			}
			if err := f.Zero(1500, 1000); err != nil {
				t.Fatal(err)
			}
			if f.Unflushed() != 3 {
				t.Fatalf("undo log: %d records, want 3", f.Unflushed())
			}
			if err := f.Crash(); err != nil {
				t.Fatal(err)
			}
			if _, err := f.ReadAt(make([]byte, 1), 0); !errors.Is(err, ErrCrashed) {
				t.Fatalf("read after crash: %v", err)
			}
			if err := f.Flush(); !errors.Is(err, ErrCrashed) {
				t.Fatalf("flush after crash: %v", err)
			}
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}

			d := mustOpen(t, p, Options{})
			want := make([]byte, size)
			copy(want[1000:], a)
			if !bytes.Equal(readAll(t, d), want) {
				t.Fatal("after the crash the device does not hold exactly A")
			}
		})
	}
}

// TestFaultyConcurrent runs writers, readers and flushers at once on an
// armed Faulty, for the race detector, then crashes: what was flushed
// by the last Flush survives, nothing else does.
func TestFaultyConcurrent(t *testing.T) {
	const size = 1 << 20
	p := newFile(t, size)
	dev, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	f := NewFaulty(dev)
	f.Inject(When(func(Op, int64, int64) bool { return true }, nil, 0))
	f.PowerLoss()
	const writers = 4
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			region := int64(w) * (size / writers)
			for i := range 50 {
				b := bytes.Repeat([]byte{byte(i + 1)}, 4096)
				if _, err := f.WriteAt(b, region+int64(i%16)*4096); err != nil {
					t.Error(err)
					return
				}
				if i%10 == 0 {
					if err := f.Flush(); err != nil {
						t.Error(err)
						return
					}
				}
				if _, err := f.ReadAt(make([]byte, 512), region); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err := f.Flush(); err != nil {
		t.Fatal(err)
	}
	before := readAll(t, f)
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xee}, 8192), 4096); err != nil {
		t.Fatal(err)
	}
	if err := f.Crash(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if !bytes.Equal(readAll(t, mustOpen(t, p, Options{})), before) {
		t.Fatal("crash did not restore the last flushed state")
	}
}

func TestFaultyRangeNotSticky(t *testing.T) {
	f := NewFaulty(mustOpen(t, newFile(t, 4096), Options{}))
	if _, err := f.WriteAt(make([]byte, 10), 4090); !errors.Is(err, ErrRange) {
		t.Fatalf("write across end: %v", err)
	}
	if err := f.Flush(); err != nil {
		t.Fatalf("flush after range error: %v", err)
	}
}
