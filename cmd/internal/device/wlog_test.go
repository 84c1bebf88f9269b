package device

// The write log (bitmap/wlog) over the real devices of this package: its
// crash invariant over Faulty and its benchmarks over a file opened with
// Open. They live here because bitmap/wlog cannot import an internal
// package of cmd; wlog itself only needs ReadAt and SyncWriteAt.

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shadow-project/shadow/bitmap/wlog"
	"github.com/shadow-project/shadow/bitmap/wlog/wlogtest"
)

// wlogRegion is the write-log region of meta.Layout for a member of
// volume+1 MiB bytes: 1 MiB reserved, less the two 4 KiB metadata slots.
func wlogRegion(volume int64) wlog.Region {
	return wlog.Region{Offset: volume, Length: 1<<20 - 2*4096}
}

// TestWriteLogPowerLoss runs wlogtest.Stress over Faulty on a real file:
// writers Acquire, write and Release, a flusher and a sweeper run, and
// at a random instant the power goes; the log on the reopened file must
// hold every extent written since the last completed flush. Log writes
// are delayed now and then, so that crashes fall while one is in flight.
func TestWriteLogPowerLoss(t *testing.T) {
	seeds := 4
	if testing.Short() {
		seeds = 2
	}
	for _, idle := range []time.Duration{0, 2 * time.Millisecond} {
		for seed := range uint64(seeds) {
			t.Run(idle.String()+"/"+string(rune('a'+seed)), func(t *testing.T) {
				const vol = 8 << 20 // 128 extents of 64 KiB
				p := newFile(t, vol+1<<20)
				open := func() (*Faulty, error) {
					d, err := Open(p, Options{})
					if err != nil {
						return nil, err
					}
					f := NewFaulty(d)
					f.Inject(When(func(op Op, off, length int64) bool {
						return op == OpSyncWrite && rand.IntN(4) == 0
					}, nil, 50*time.Microsecond))
					f.PowerLoss()
					return f, nil
				}
				f, err := open()
				if err != nil {
					t.Fatal(err)
				}
				res := wlogtest.Stress(t, f, wlogtest.Config{
					Seed:       seed,
					Region:     wlogRegion(vol),
					VolumeSize: vol,
					ExtentSize: 64 << 10,
					Writes:     600,
					Rounds:     2,
					Idle:       idle,
					Crash:      func() error { return f.Crash() },
					Reopen: func() (wlogtest.Target, error) {
						if err := f.Close(); err != nil {
							return nil, err
						}
						f, err = open()
						return f, err
					},
				})
				f.Close()
				t.Logf("%+v", res)
			})
		}
	}
}

// TestWriteLogTornOnFile: one log block overwritten in part (a torn
// write) makes Load return ErrTorn, so the set gets a full merge.
func TestWriteLogTornOnFile(t *testing.T) {
	const vol = 64 << 20
	p := newFile(t, vol+1<<20)
	d := mustOpen(t, p, Options{Direct: true})
	region := wlogRegion(vol)
	l, err := wlog.Format(d.(wlog.Device), region, vol, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(context.Background(), 0, 4096); err != nil {
		t.Fatal(err)
	}
	l.Release(0, 4096)
	l.Close()
	if g, err := wlog.Load(d.(wlog.Device), region, vol); err != nil || len(g.Extents) != 1 {
		t.Fatalf("load: %+v, %v", g, err)
	}
	// The second half of bitmap block 1 is from some older write.
	if _, err := d.WriteAt(pattern(9, 2048), region.Offset+4096+2048); err != nil {
		t.Fatal(err)
	}
	if _, err := wlog.Load(d.(wlog.Device), region, vol); !errors.Is(err, wlog.ErrTorn) {
		t.Fatalf("load of a torn block: %v, want ErrTorn", err)
	}
}

// benchLog formats a log on a sparse file of volume+1 MiB bytes.
func benchLog(b *testing.B, volume, extentSize int64, opts Options) (Device, *wlog.Log) {
	b.Helper()
	p := filepath.Join(b.TempDir(), "member.img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		b.Fatal(err)
	}
	if err := os.Truncate(p, volume+1<<20); err != nil {
		b.Fatal(err)
	}
	d, err := Open(p, opts)
	if err != nil {
		b.Skipf("open: %v", err)
	}
	b.Cleanup(func() { d.Close() })
	l, err := wlog.Format(d.(wlog.Device), wlogRegion(volume), volume, extentSize)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	return d, l
}

// BenchmarkAcquireHit: Acquire and Release of a 4 KiB write at random
// offsets of a 4 GiB volume whose 4 MiB extents are all set already:
// the cost a write pays in the steady state of a random-write load.
func BenchmarkAcquireHit(b *testing.B) {
	const vol = 4 << 30
	_, l := benchLog(b, vol, 0, Options{})
	ctx := context.Background()
	if err := l.Acquire(ctx, 0, vol); err != nil {
		b.Fatal(err)
	}
	l.Release(0, vol)
	var seeds atomic.Uint64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		x := seeds.Add(1) * 0x9e3779b97f4a7c15
		for pb.Next() {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			off := int64(x%(vol/4096)) * 4096
			if err := l.Acquire(ctx, off, 4096); err != nil {
				b.Fatal(err)
			}
			l.Release(off, 4096)
		}
	})
	b.StopTimer()
	if s := l.Stats(); s.Misses != 1 {
		b.Fatalf("%d misses, want the one that set every extent", s.Misses)
	}
}

// BenchmarkAcquireMissGrouped: concurrent Acquires of extents never set
// before, adjacent ones so that they share log blocks: each needs a bit
// made durable, and group commit makes one synchronous block write carry
// many. Reports log writes per Acquire and the Acquires per log write.
func BenchmarkAcquireMissGrouped(b *testing.B) {
	for _, direct := range []bool{false, true} {
		for _, writers := range []int{1, 16, 64} {
			name := map[bool]string{false: "buffered", true: "direct"}[direct] + "/writers=" + string(rune('0'+writers/10)) + string(rune('0'+writers%10))
			b.Run(name, func(b *testing.B) {
				const vol, ext = 256 << 30, 64 << 10 // 4 Mi extents
				_, l := benchLog(b, vol, ext, Options{Direct: direct})
				if b.N > vol/ext {
					b.Fatalf("b.N %d is more than the %d extents", b.N, vol/ext)
				}
				ctx := context.Background()
				var next atomic.Int64
				var wg sync.WaitGroup
				b.ResetTimer()
				for range writers {
					wg.Go(func() {
						for {
							i := next.Add(1) - 1
							if i >= int64(b.N) {
								return
							}
							if err := l.Acquire(ctx, i*ext, 4096); err != nil {
								b.Error(err)
								return
							}
							l.Release(i*ext, 4096)
						}
					})
				}
				wg.Wait()
				b.StopTimer()
				s := l.Stats()
				b.ReportMetric(float64(s.LogWrites)/float64(b.N), "logwrites/op")
				b.ReportMetric(float64(s.Misses)/float64(max(s.LogWrites, 1)), "acquires/logwrite")
			})
		}
	}
}

// BenchmarkRandomWrite4K approximates the speed target: 4 KiB random
// writes, 16 in flight, over a 4 GiB volume, with the write log on and
// off; the log starts empty, so the first write to each extent pays its
// log write inside the measurement.
func BenchmarkRandomWrite4K(b *testing.B) {
	for _, direct := range []bool{false, true} {
		for _, on := range []bool{false, true} {
			name := map[bool]string{false: "buffered", true: "direct"}[direct] + map[bool]string{false: "/log=off", true: "/log=on"}[on]
			b.Run(name, func(b *testing.B) {
				const vol = 4 << 30
				d, l := benchLog(b, vol, 0, Options{Direct: direct})
				ctx := context.Background()
				var seeds, done atomic.Int64
				var wg sync.WaitGroup
				b.SetBytes(4096)
				b.ResetTimer()
				start := time.Now()
				for range 16 {
					wg.Go(func() {
						buf := AlignedBuffer(4096, 4096)
						x := uint64(seeds.Add(1)) * 0x9e3779b97f4a7c15
						for done.Add(1) <= int64(b.N) {
							x ^= x << 13
							x ^= x >> 7
							x ^= x << 17
							off := int64(x%(vol/4096)) * 4096
							if on {
								if err := l.Acquire(ctx, off, 4096); err != nil {
									b.Error(err)
									return
								}
							}
							_, err := d.WriteAt(buf, off)
							if on {
								l.Release(off, 4096)
							}
							if err != nil {
								b.Error(err)
								return
							}
						}
					})
				}
				wg.Wait()
				b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "IOPS")
				if on {
					b.ReportMetric(float64(l.Stats().LogWrites), "logwrites")
				}
			})
		}
	}
}
