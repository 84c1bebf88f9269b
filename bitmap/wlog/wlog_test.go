package wlog_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/shadow-project/shadow/bitmap/wlog"
	"github.com/shadow-project/shadow/bitmap/wlog/wlogtest"
)

// regionLength is the standard region: 1 MiB minus the two metadata
// slots (meta.Layout).
const regionLength = 1<<20 - 2*4096

var bg = context.Background()

// member is a test member: a MemDevice holding only the log region at
// the end of a (possibly huge, never allocated) volume.
type member struct {
	*wlogtest.MemDevice
	base int64
}

func (m member) ReadAt(p []byte, off int64) (int, error) { return m.MemDevice.ReadAt(p, off-m.base) }
func (m member) SyncWriteAt(p []byte, off int64) (int, error) {
	return m.MemDevice.SyncWriteAt(p, off-m.base)
}

// newMember returns a member for a volume of volumeSize bytes and the
// region of its log.
func newMember(volumeSize int64) (member, wlog.Region) {
	base := (volumeSize + 4095) &^ 4095
	return member{wlogtest.NewMemDevice(regionLength), base}, wlog.Region{Offset: base, Length: regionLength}
}

// durable is what would survive a power loss now (the member itself
// goes on).
func (m member) durable() member { return member{m.Restarted(), m.base} }

func mustFormat(t *testing.T, dev wlog.Device, region wlog.Region, volumeSize, extentSize int64) *wlog.Log {
	t.Helper()
	l, err := wlog.Format(dev, region, volumeSize, extentSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func mustLoad(t *testing.T, dev wlog.Device, region wlog.Region, volumeSize int64) wlog.Logged {
	t.Helper()
	g, err := wlog.Load(dev, region, volumeSize)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func acquire(t *testing.T, l *wlog.Log, off, length int64) {
	t.Helper()
	if err := l.Acquire(bg, off, length); err != nil {
		t.Fatalf("acquire %d+%d: %v", off, length, err)
	}
}

// flush plays a successful flush of the member.
func flush(l *wlog.Log) { l.FlushDone(l.FlushBegin(), true) }

func sweep(t *testing.T, l *wlog.Log, now time.Time, idle time.Duration) {
	t.Helper()
	if err := l.Sweep(now, idle); err != nil {
		t.Fatalf("sweep: %v", err)
	}
}

// sweepExpect sweeps at time at and checks that n extents stay logged on
// dev as it is now; why says what a wrong count means. (A dev.durable()
// argument would be taken before the sweep: check those by hand.)
func sweepExpect(t *testing.T, l *wlog.Log, dev wlog.Device, region wlog.Region, at time.Time, idle time.Duration, n int, why string) {
	t.Helper()
	sweep(t, l, at, idle)
	if got := extents(t, dev, region, 0); len(got) != n {
		t.Fatalf("%s: %d extents logged %v, want %d", why, len(got), got, n)
	}
}

func extents(t *testing.T, dev wlog.Device, region wlog.Region, volumeSize int64) []uint64 {
	t.Helper()
	return mustLoad(t, dev, region, volumeSize).Extents
}

const (
	KiB = int64(1) << 10
	MiB = KiB << 10
	GiB = MiB << 10
	TiB = GiB << 10
)

func TestChooseExtentSize(t *testing.T) {
	std := wlog.Region{Offset: 0, Length: regionLength}
	small := wlog.Region{Offset: 0, Length: 2 * 4096} // 32256 extents
	for _, c := range []struct {
		region    wlog.Region
		vol, req  int64
		want      int64
		wantError bool
	}{
		{std, 4 * GiB, 0, 4 * MiB, false},
		{std, 4 * GiB, 64 * KiB, 64 * KiB, false},
		{std, 4 * GiB, 100 * KiB, 128 * KiB, false},
		{std, 4 * GiB, 4 * KiB, 64 * KiB, false},
		{std, 498 * GiB, 64 * KiB, 64 * KiB, false},
		{std, 499 * GiB, 64 * KiB, 128 * KiB, false},
		{std, 1 * TiB, 64 * KiB, 256 * KiB, false},
		{std, 100 * TiB, 0, 16 * MiB, false},
		{small, 4 * GiB, 0, 4 * MiB, false},
		{small, 4 * GiB, 64 * KiB, 256 * KiB, false},
		{std, 0, 0, 0, true},
		{std, 4 * GiB, 2 * TiB, 0, true},
		{wlog.Region{Offset: 100, Length: regionLength}, 4 * GiB, 0, 0, true},
		{wlog.Region{Offset: 0, Length: 4096}, 4 * GiB, 0, 0, true},
	} {
		got, err := wlog.ChooseExtentSize(c.region, c.vol, c.req)
		if c.wantError {
			if !errors.Is(err, wlog.ErrInvalid) {
				t.Errorf("%+v: %d, %v; want ErrInvalid", c, got, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("region %d blocks, volume %d, requested %d: %d, %v; want %d", c.region.Length/4096, c.vol, c.req, got, err, c.want)
		}
	}
}

func TestFormatLoadEmpty(t *testing.T) {
	dev, region := newMember(4 * GiB)
	l := mustFormat(t, dev, region, 4*GiB, 0)
	if l.ExtentSize() != 4*MiB {
		t.Fatalf("extent size %d", l.ExtentSize())
	}
	g := mustLoad(t, dev, region, 4*GiB)
	if g.ExtentSize != 4*MiB || g.VolumeSize != 4*GiB || len(g.Extents) != 0 || g.Bytes() != 0 {
		t.Fatalf("loaded %+v", g)
	}
	// Format is durable on return: a crash right after keeps it.
	if g := mustLoad(t, dev.durable(), region, 0); len(g.Extents) != 0 {
		t.Fatalf("after a crash: %+v", g)
	}
}

// TestAcquireLogs: acquired ranges are in the log, durably, at once;
// Ranges joins adjacent extents and cuts the last at the volume's end.
func TestAcquireLogs(t *testing.T) {
	const vol = 64*MiB + 12345 // a ragged last extent
	dev, region := newMember(vol)
	l := mustFormat(t, dev, region, vol, 64*KiB)
	acquire(t, l, 0, 4096)           // extent 0
	acquire(t, l, 64*KiB-1, 2)       // extents 0 and 1
	acquire(t, l, 10*64*KiB, 64*KiB) // extent 10 exactly
	acquire(t, l, vol-1, 1)          // the last extent, 1024
	acquire(t, l, 20*64*KiB+5, 0)    // nothing
	g := mustLoad(t, dev.durable(), region, vol)
	if want := []uint64{0, 1, 10, 1024}; !slices.Equal(g.Extents, want) {
		t.Fatalf("logged %v, want %v", g.Extents, want)
	}
	type rng struct{ off, length int64 }
	var got []rng
	for off, length := range g.Ranges() {
		got = append(got, rng{off, length})
	}
	want := []rng{{0, 128 * KiB}, {640 * KiB, 64 * KiB}, {64 * MiB, 12345}}
	if !slices.Equal(got, want) {
		t.Fatalf("ranges %v, want %v", got, want)
	}
	if g.Bytes() != 192*KiB+12345 {
		t.Fatalf("bytes %d", g.Bytes())
	}
	if s := l.Stats(); s.Set != 4 || s.Misses != 4 || s.LogWrites != 4 || s.Extents != 1025 {
		t.Fatalf("stats %+v", s)
	}
}

func TestSweepClearsAfterFlush(t *testing.T) {
	dev, region := newMember(64 * MiB)
	l := mustFormat(t, dev, region, 64*MiB, 64*KiB)
	now := time.Unix(1000, 0)
	acquire(t, l, 0, 200*KiB) // extents 0–3
	l.Release(0, 200*KiB)
	sweepExpect(t, l, dev, region, now, 0, 4, "cleared with no flush")
	flush(l)
	sweep(t, l, now, 0)
	if got := extents(t, dev.durable(), region, 0); len(got) != 0 {
		t.Fatalf("after flush and sweep: %v", got)
	}
	// Set again, it costs a log write again.
	acquire(t, l, 0, 1)
	if s := l.Stats(); s.Set != 1 || s.Misses != 2 {
		t.Fatalf("stats %+v", s)
	}
}

// TestSweepKeeps: each thing that must keep a bit set does.
func TestSweepKeeps(t *testing.T) {
	t0 := time.Unix(1000, 0)
	setup := func(t *testing.T) (member, wlog.Region, *wlog.Log) {
		dev, region := newMember(64 * MiB)
		return dev, region, mustFormat(t, dev, region, 64*MiB, 64*KiB)
	}
	t.Run("in flight", func(t *testing.T) {
		dev, region, l := setup(t)
		acquire(t, l, 0, 1)
		acquire(t, l, 0, 1)
		l.Release(0, 1) // one of the two
		flush(l)
		sweepExpect(t, l, dev, region, t0, 0, 1, "cleared under a write in flight")
		l.Release(0, 1)
		sweepExpect(t, l, dev, region, t0, 0, 1, "cleared a write no flush covers")
		flush(l)
		sweepExpect(t, l, dev, region, t0, 0, 0, "not cleared")
	})
	t.Run("released after the flush began", func(t *testing.T) {
		dev, region, l := setup(t)
		acquire(t, l, 0, 1)
		seq := l.FlushBegin()
		l.Release(0, 1)
		l.FlushDone(seq, true)
		sweepExpect(t, l, dev, region, t0, 0, 1, "cleared a write that completed after the flush was issued")
		flush(l)
		sweepExpect(t, l, dev, region, t0, 0, 0, "not cleared")
	})
	t.Run("flushes completing out of order", func(t *testing.T) {
		dev, region, l := setup(t)
		acquire(t, l, 0, 1)
		s1 := l.FlushBegin()
		l.Release(0, 1)
		s2 := l.FlushBegin()
		l.FlushDone(s2, true)
		l.FlushDone(s1, true) // late: must not lower what s2 covered
		sweepExpect(t, l, dev, region, t0, 0, 0, "not cleared after s2")
	})
	t.Run("idle", func(t *testing.T) {
		dev, region, l := setup(t)
		const idle = 5 * time.Second
		acquire(t, l, 0, 1)
		l.Release(0, 1)
		flush(l)
		for _, at := range []time.Duration{0, 4 * time.Second} {
			sweep(t, l, t0.Add(at), idle)
			if got := extents(t, dev, region, 0); len(got) != 1 {
				t.Fatalf("cleared after %v of %v idle", at, idle)
			}
		}
		// A write in between restarts the idle period.
		acquire(t, l, 1, 1)
		l.Release(1, 1)
		flush(l)
		sweepExpect(t, l, dev, region, t0.Add(idle), idle, 1, "cleared although written since the extent was first seen idle")
		sweepExpect(t, l, dev, region, t0.Add(2*idle-time.Nanosecond), idle, 1, "cleared before a full idle period after the last write")
		sweepExpect(t, l, dev, region, t0.Add(2*idle), idle, 0, "not cleared after idle")
	})
	t.Run("failed flush", func(t *testing.T) {
		dev, region, l := setup(t)
		acquire(t, l, 0, 1)
		l.Release(0, 1)
		flush(l)
		acquire(t, l, 64*KiB, 1)
		l.Release(64*KiB, 1)
		l.FlushDone(l.FlushBegin(), false)
		flush(l) // a later "success" proves nothing
		if err := l.Sweep(t0, 0); !errors.Is(err, wlog.ErrFailed) {
			t.Fatalf("sweep after a failed flush: %v", err)
		}
		if got := extents(t, dev, region, 0); len(got) != 2 {
			t.Fatalf("cleared after a failed flush: %v", got)
		}
		// A bit already durable still admits writes (the member is
		// being expelled; the bit is there); a new one cannot be set.
		if err := l.Acquire(bg, 0, 1); err != nil {
			t.Fatalf("acquire of a set extent: %v", err)
		}
		l.Release(0, 1)
		if err := l.Acquire(bg, 10*64*KiB, 1); !errors.Is(err, wlog.ErrFailed) {
			t.Fatalf("acquire of a new extent: %v", err)
		}
	})
}

// gate holds log writes in the sync hook until opened.
type gate struct {
	entered chan struct{}
	open    chan struct{}
	once    sync.Once
	err     error
}

// newGate installs a gate on dev; it opens at the latest when the test
// ends, so that a failing test does not leave log writes hanging.
func newGate(t *testing.T, dev member) *gate {
	g := &gate{entered: make(chan struct{}, 100), open: make(chan struct{})}
	dev.SetSyncHook(func(off, length int64) error {
		g.entered <- struct{}{}
		<-g.open
		return g.err
	})
	t.Cleanup(g.release)
	return g
}

func (g *gate) release() { g.once.Do(func() { close(g.open) }) }

// waitSet waits, in a synctest bubble, until every goroutine is blocked,
// and checks that n extents are then set (or being set) in l.
func waitSet(t *testing.T, l *wlog.Log, n int) {
	t.Helper()
	synctest.Wait()
	if got := l.Stats().Set; got < n {
		t.Fatalf("only %d extents set, want %d", got, n)
	}
}

// TestGroupCommit: while one log write is in flight, sixteen Acquires
// of new extents in the same block gather and share the next write.
func TestGroupCommit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dev, region := newMember(64 * MiB)
		l := mustFormat(t, dev, region, 64*MiB, 64*KiB)
		g := newGate(t, dev)
		var wg sync.WaitGroup
		var returned atomic.Int32
		wg.Go(func() { acquire(t, l, 0, 1); returned.Add(1) })
		<-g.entered // the leader's write is in flight
		for i := range 16 {
			wg.Go(func() { acquire(t, l, int64(i+1)*64*KiB, 1); returned.Add(1) })
		}
		waitSet(t, l, 17) // every straggler has had its chance to start a write
		select {
		case <-g.entered:
			t.Fatal("a second log write started while the first was in flight")
		default:
		}
		if n := returned.Load(); n != 0 {
			t.Fatalf("%d Acquires returned before their log write was done", n)
		}
		g.release()
		wg.Wait()
		if s := l.Stats(); s.LogWrites != 2 || s.Misses != 17 {
			t.Fatalf("stats %+v: want 2 log writes for 17 misses", s)
		}
		dev.SetSyncHook(nil)
		if got := extents(t, dev.durable(), region, 0); len(got) != 17 {
			t.Fatalf("logged %v", got)
		}
	})
}

// TestAcquireAlreadyInFlight: an Acquire whose bit the write in flight
// already carries waits for that write only.
func TestAcquireAlreadyInFlight(t *testing.T) {
	dev, region := newMember(64 * MiB)
	l := mustFormat(t, dev, region, 64*MiB, 64*KiB)
	g := newGate(t, dev)
	var wg sync.WaitGroup
	wg.Go(func() { acquire(t, l, 0, 1) })
	<-g.entered
	wg.Go(func() { acquire(t, l, 1, 1) }) // same extent
	g.release()
	wg.Wait()
	if s := l.Stats(); s.LogWrites != 1 {
		t.Fatalf("%d log writes, want 1", s.LogWrites)
	}
}

// TestSweepThenAcquire: Sweep clears an extent while a write of its
// block is in flight whose snapshot still has the bit; an Acquire of
// that extent then waits only for that write, but must put the bit
// back into the image, or the clearing write that follows would take it
// off the member under the Acquire's data write.
func TestSweepThenAcquire(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dev, region := newMember(64 * MiB)
		l := mustFormat(t, dev, region, 64*MiB, 64*KiB)
		acquire(t, l, 0, 1) // extent 0
		l.Release(0, 1)
		flush(l)
		g := newGate(t, dev)
		var wg sync.WaitGroup
		wg.Go(func() { acquire(t, l, 64*KiB, 1) }) // extent 1: its write carries extent 0 too
		<-g.entered
		wg.Go(func() { sweep(t, l, time.Unix(0, 0), 0) })
		synctest.Wait()
		if n := l.Stats().Set; n != 1 { // Sweep took extent 0 out of the image
			t.Fatalf("%d extents set after the sweep, want 1", n)
		}
		wg.Go(func() { acquire(t, l, 0, 1) })
		synctest.Wait()
		if n := l.Stats().Misses; n != 3 {
			t.Fatalf("%d misses, want 3", n)
		}
		g.release()
		wg.Wait()
		if got := extents(t, dev.durable(), region, 0); !slices.Equal(got, []uint64{0, 1}) {
			t.Fatalf("logged %v with writes in flight on extents 0 and 1", got)
		}
	})
}

// TestAcquireCanceled: a waiter whose context ends returns at once
// holding nothing; the batch goes on, and its extent is cleared later.
func TestAcquireCanceled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dev, region := newMember(64 * MiB)
		l := mustFormat(t, dev, region, 64*MiB, 64*KiB)
		g := newGate(t, dev)
		var wg sync.WaitGroup
		wg.Go(func() { acquire(t, l, 0, 1) })
		<-g.entered
		ctx, cancel := context.WithCancel(bg)
		errc := make(chan error)
		go func() { errc <- l.Acquire(ctx, 64*KiB, 1) }()
		waitSet(t, l, 2)
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("canceled acquire: %v", err)
		}
		g.release()
		wg.Wait()
		dev.SetSyncHook(nil)
		l.Release(0, 1)
		// Let the goroutine that writes the second batch finish.
		synctest.Wait()
		if n := l.Stats().LogWrites; n < 2 {
			t.Fatalf("%d log writes, want the canceled waiter's batch written too", n)
		}
		flush(l)
		sweepExpect(t, l, dev, region, time.Unix(0, 0), 0, 0, "after flush and sweep (the canceled acquire leaked a count?)")
		if err := l.Acquire(ctx, 128*KiB, 1); !errors.Is(err, context.Canceled) {
			t.Fatalf("acquire with a canceled context: %v", err)
		}
		acquire(t, l, 0, 1)
		if err := l.Acquire(ctx, 0, 1); err != nil {
			t.Fatalf("hit with a canceled context: %v", err) // no wait, no error
		}
	})
}

// TestLogWriteFails: a failed log write fails its batch and the next
// one, and every later miss: the data writes are never admitted.
func TestLogWriteFails(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dev, region := newMember(64 * MiB)
		l := mustFormat(t, dev, region, 64*MiB, 64*KiB)
		g := newGate(t, dev)
		g.err = syscall.EIO
		errs := make(chan error, 2)
		go func() { errs <- l.Acquire(bg, 0, 1) }()
		<-g.entered
		go func() { errs <- l.Acquire(bg, 64*KiB, 1) }()
		waitSet(t, l, 2)
		g.release()
		for range 2 {
			if err := <-errs; !errors.Is(err, wlog.ErrFailed) {
				t.Fatalf("acquire: %v, want ErrFailed", err)
			}
		}
		if err := l.Acquire(bg, 128*KiB, 1); !errors.Is(err, wlog.ErrFailed) {
			t.Fatalf("later acquire: %v", err)
		}
	})
}

func TestLoadErrors(t *testing.T) {
	const vol = 64 * MiB
	// formatted returns a member with a log holding extents 0 and 5.
	formatted := func(t *testing.T) (member, wlog.Region) {
		dev, region := newMember(vol)
		l := mustFormat(t, dev, region, vol, 64*KiB)
		acquire(t, l, 0, 1)
		acquire(t, l, 5*64*KiB, 1)
		return dev, region
	}
	block := func(i int64) int64 { return i * 4096 } // offset in the MemDevice
	for _, c := range []struct {
		name  string
		spoil func(dev member)
		vol   int64
		want  error
	}{
		{"blank", func(dev member) { dev.Poke(0, make([]byte, regionLength)) }, vol, wlog.ErrBlank},
		{"torn bitmap block", func(dev member) { flip(dev, block(1)+64+100) }, vol, wlog.ErrTorn},
		{"torn header", func(dev member) { flip(dev, block(0)+2000) }, vol, wlog.ErrTorn},
		{"header magic", func(dev member) { flip(dev, block(0)) }, vol, wlog.ErrCorrupt},
		{"bitmap magic", func(dev member) { flip(dev, block(1)+3) }, vol, wlog.ErrCorrupt},
		{"other volume", func(member) {}, vol + 4096, wlog.ErrCorrupt},
		{"blank header", func(dev member) { dev.Poke(0, make([]byte, 4096)) }, vol, wlog.ErrCorrupt},
		{"unreadable bitmap block", func(dev member) {
			dev.SetReadHook(func(off, length int64) error {
				if off+length > block(1) {
					return syscall.EIO
				}
				return nil
			})
		}, vol, wlog.ErrTorn},
		{"unknown version", func(dev member) { reseal(dev, block(0), func(b []byte) { b[8] = 2 }) }, vol, wlog.ErrCorrupt},
		{"bad extent size", func(dev member) { reseal(dev, block(0), func(b []byte) { b[16] = 1 }) }, vol, wlog.ErrCorrupt},
		{"block count", func(dev member) { reseal(dev, block(0), func(b []byte) { b[32] = 9 }) }, vol, wlog.ErrCorrupt},
		{"block index", func(dev member) { reseal(dev, block(1), func(b []byte) { b[8] = 2 }) }, vol, wlog.ErrCorrupt},
		{"other log", func(dev member) { reseal(dev, block(1), func(b []byte) { b[16] ^= 1 }) }, vol, wlog.ErrCorrupt},
		// 64 MiB of 64 KiB extents: 1024 bits; bit 1024 is past the end.
		{"bit past the end", func(dev member) { reseal(dev, block(1), func(b []byte) { b[64+128] = 1 }) }, vol, wlog.ErrCorrupt},
	} {
		t.Run(c.name, func(t *testing.T) {
			dev, region := formatted(t)
			c.spoil(dev)
			_, err := wlog.Load(dev, region, c.vol)
			if !errors.Is(err, c.want) {
				t.Fatalf("load: %v, want %v", err, c.want)
			}
			if _, _, err := wlog.Open(dev, region, c.vol); !errors.Is(err, c.want) {
				t.Fatalf("open: %v, want %v", err, c.want)
			}
		})
	}
	t.Run("sanity", func(t *testing.T) {
		dev, region := formatted(t)
		if got := extents(t, dev, region, vol); !slices.Equal(got, []uint64{0, 5}) {
			t.Fatalf("unspoiled: %v", got)
		}
		if _, err := wlog.Load(dev, wlog.Region{Offset: region.Offset + 1, Length: regionLength}, vol); !errors.Is(err, wlog.ErrInvalid) {
			t.Fatalf("misaligned region: %v", err)
		}
	})
	t.Run("interrupted format", func(t *testing.T) {
		// A log formatted over another: the crash came after the new
		// bitmap blocks, before the new header.
		dev, region := formatted(t)
		oldHeader := dev.Bytes(0, 4096)
		mustFormat(t, dev, region, vol, 64*KiB)
		dev.Poke(0, oldHeader)
		if _, err := wlog.Load(dev, region, vol); !errors.Is(err, wlog.ErrCorrupt) {
			t.Fatalf("load: %v, want ErrCorrupt", err)
		}
	})
}

func flip(dev member, off int64) {
	b := dev.Bytes(off, 1)
	dev.Poke(off, []byte{b[0] ^ 0x40})
}

// reseal changes a block and fixes its checksum, to reach the checks
// behind it.
func reseal(dev member, off int64, change func(b []byte)) {
	b := dev.Bytes(off, 4096)
	change(b)
	resealBytes(b)
	dev.Poke(off, b)
}

// TestOpenResume: after a crash, Open returns the logged extents and
// keeps them set, pinned, until Unpin and a flush after it.
func TestOpenResume(t *testing.T) {
	const vol = 64 * MiB
	dev, region := newMember(vol)
	l := mustFormat(t, dev, region, vol, 64*KiB)
	acquire(t, l, 0, 1)
	acquire(t, l, 3*64*KiB, 1)
	dev = dev.durable()

	l2, logged, err := wlog.Open(dev, region, vol)
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	if !slices.Equal(logged.Extents, []uint64{0, 3}) {
		t.Fatalf("open: %v", logged.Extents)
	}
	acquire(t, l2, 0, 1) // a hit: set already
	l2.Release(0, 1)
	if s := l2.Stats(); s.Misses != 0 || s.Set != 2 {
		t.Fatalf("stats %+v", s)
	}
	t0 := time.Unix(0, 0)
	flush(l2)
	sweep(t, l2, t0, 0)
	if got := extents(t, dev, region, vol); !slices.Equal(got, []uint64{0, 3}) {
		t.Fatalf("pinned extents cleared: %v", got)
	}
	if err := l2.Unpin(0, 64*KiB); err != nil {
		t.Fatal(err)
	}
	sweep(t, l2, t0, 0)
	if got := extents(t, dev, region, vol); len(got) != 2 {
		t.Fatalf("cleared after Unpin with no flush since: %v", got)
	}
	flush(l2)
	sweep(t, l2, t0, 0)
	if got := extents(t, dev, region, vol); !slices.Equal(got, []uint64{3}) {
		t.Fatalf("after unpin, flush, sweep: %v", got)
	}
	if _, _, err := wlog.Open(dev, region, 0); !errors.Is(err, wlog.ErrInvalid) {
		t.Fatalf("open with no volume size: %v", err)
	}
}

func TestFormatDirty(t *testing.T) {
	const vol = 64 * MiB
	dev, region := newMember(vol)
	l, err := wlog.FormatDirty(dev, region, vol, 64*KiB)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if got := extents(t, dev.durable(), region, vol); len(got) != 1024 {
		t.Fatalf("%d extents logged, want all 1024", len(got))
	}
	if err := l.Unpin(0, vol/2); err != nil {
		t.Fatal(err)
	}
	flush(l)
	sweep(t, l, time.Unix(0, 0), 0)
	got := extents(t, dev, region, vol)
	if len(got) != 512 || got[0] != 512 {
		t.Fatalf("after unpinning half: %d extents from %v", len(got), got[:min(len(got), 1)])
	}
}

// TestMultiBlock: a volume whose extents need many bitmap blocks; one
// Acquire across a block boundary sets bits in two blocks.
func TestMultiBlock(t *testing.T) {
	const vol = 100 * GiB
	dev, region := newMember(vol)
	l := mustFormat(t, dev, region, vol, 64*KiB)
	const perBlock = wlog.BitsPerBlock
	off := int64(perBlock-1) * 64 * KiB
	acquire(t, l, off, 128*KiB) // extents perBlock-1 and perBlock
	acquire(t, l, vol-1, 1)
	if s := l.Stats(); s.LogWrites != 3 {
		t.Fatalf("%d log writes, want 3 (two blocks, then the last)", s.LogWrites)
	}
	last := uint64(vol/(64*KiB)) - 1
	if got := extents(t, dev.durable(), region, vol); !slices.Equal(got, []uint64{perBlock - 1, perBlock, last}) {
		t.Fatalf("logged %v", got)
	}
}

func TestMisuse(t *testing.T) {
	const vol = 64 * MiB
	dev, region := newMember(vol)
	l, err := wlog.Format(dev, region, vol, 64*KiB)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]int64{{-1, 1}, {vol, 1}, {vol - 1, 2}, {0, -1}} {
		if err := l.Acquire(bg, r[0], r[1]); !errors.Is(err, wlog.ErrInvalid) {
			t.Errorf("acquire %v: %v", r, err)
		}
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("Release of a range never acquired did not panic")
			}
		}()
		l.Release(0, 1)
	}()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); !errors.Is(err, wlog.ErrClosed) {
		t.Fatalf("second close: %v", err)
	}
	if err := l.Acquire(bg, 0, 1); !errors.Is(err, wlog.ErrClosed) {
		t.Fatalf("acquire after close: %v", err)
	}
	if _, err := wlog.Format(dev, wlog.Region{Offset: region.Offset, Length: 2 * 4096}, 1<<62, 0); !errors.Is(err, wlog.ErrInvalid) {
		t.Fatalf("format of a volume too large for the region: %v", err)
	}
}

// TestHitPath: an Acquire and Release of a durably set extent allocate
// nothing and write nothing.
func TestHitPath(t *testing.T) {
	const vol = 64 * MiB
	dev, region := newMember(vol)
	l := mustFormat(t, dev, region, vol, 64*KiB)
	acquire(t, l, 0, vol)
	l.Release(0, vol)
	writes := l.Stats().LogWrites
	allocs := testing.AllocsPerRun(1000, func() {
		if err := l.Acquire(bg, 12345, 4096); err != nil {
			t.Fatal(err)
		}
		l.Release(12345, 4096)
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per hit", allocs)
	}
	if s := l.Stats(); s.LogWrites != writes {
		t.Fatalf("hits wrote the log: %d writes, had %d", s.LogWrites, writes)
	}
}

// TestStress runs the randomized crash test over MemDevice, with sweeps
// that clear at once and sweeps that wait.
func TestStress(t *testing.T) {
	seeds := 8
	if testing.Short() {
		seeds = 3
	}
	for _, idle := range []time.Duration{0, 3 * time.Millisecond} {
		for seed := range uint64(seeds) {
			t.Run(idle.String()+"/"+string(rune('a'+seed)), func(t *testing.T) {
				const vol = 16 * MiB // 256 extents of 64 KiB
				region := wlog.Region{Offset: vol, Length: regionLength}
				// Log writes take a while now and then, so that the
				// crash can fall while one is in flight, with waiters.
				slow := func(m *wlogtest.MemDevice) *wlogtest.MemDevice {
					m.SetSyncHook(func(off, length int64) error {
						if n := rand.IntN(400); n < 100 {
							time.Sleep(time.Duration(n) * time.Microsecond)
						}
						return nil
					})
					return m
				}
				cur := slow(wlogtest.NewMemDevice(vol + 1<<20))
				res := wlogtest.Stress(t, cur, wlogtest.Config{
					Seed:       seed,
					Region:     region,
					VolumeSize: vol,
					ExtentSize: 64 * KiB,
					Rounds:     3,
					Idle:       idle,
					Crash:      func() error { cur.Crash(); return nil },
					Reopen: func() (wlogtest.Target, error) {
						cur = slow(cur.Restarted())
						return cur, nil
					},
				})
				t.Logf("%+v", res)
				if idle == 0 && res.Logged >= int(res.Extents)*3 {
					t.Errorf("every extent logged at every crash: the sweeps never cleared anything")
				}
			})
		}
	}
}

// TestTryAcquire admits a write only where no log write is needed, and a
// refusal leaves nothing counted in flight (a leak would keep Sweep from
// ever clearing the extent).
func TestTryAcquire(t *testing.T) {
	dev, region := newMember(64 * MiB)
	l := mustFormat(t, dev, region, 64*MiB, 64*KiB)
	if l.TryAcquire(0, 4096) {
		t.Fatal("TryAcquire admitted a write to an extent not yet logged")
	}
	if s := l.Stats(); s.LogWrites != 0 || s.Set != 0 {
		t.Fatalf("a refused TryAcquire wrote the log: %+v", s)
	}
	acquire(t, l, 0, 4096) // extent 0 durable now
	if !l.TryAcquire(100, 4096) {
		t.Fatal("TryAcquire refused a durable extent")
	}
	if l.TryAcquire(64*KiB-1, 2) { // extents 0 and 1; 1 is not durable
		t.Fatal("TryAcquire admitted a range with an extent not yet logged")
	}
	l.Release(0, 4096)
	l.Release(100, 4096)
	flush(l)
	sweep(t, l, time.Unix(1000, 0), 0)
	if got := extents(t, dev.durable(), region, 0); len(got) != 0 {
		t.Fatalf("extents still logged after release, flush and sweep: %v (a refused TryAcquire leaked?)", got)
	}
	if s := l.Stats(); s.LogWrites == 0 || s.Misses != 1 {
		t.Fatalf("stats %+v", s)
	}
}
