package bitmap

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// A 1 TiB volume in 64 KiB chunks, written with 4 KiB writes: the shape of
// the HBMM speed target (4 KiB random writes at ~60k IOPS on 2 cores).
const (
	benchChunk   = DefaultChunkSize
	benchChunks  = 1 << 24 // 1 TiB / 64 KiB
	benchWrite   = 4 * kib
	benchOffsets = 1 << 12
)

// hitOffsets returns 4 KiB write offsets inside the first n chunks.
func hitOffsets(n uint64) []int64 {
	r := rand.New(rand.NewPCG(3, 4))
	out := make([]int64, benchOffsets)
	for i := range out {
		out[i] = int64(r.Uint64N(n*uint64(benchChunk/benchWrite))) * benchWrite
	}
	return out
}

func warmTracker(b *testing.B, chunks uint64) *Tracker {
	tr := mustTracker(b, benchChunk, HBMMSink)
	tr.Mark(0, int64(chunks)*benchChunk)
	return tr
}

func BenchmarkTrackerMarkHit(b *testing.B) {
	const warm = 1 << 16 // 4 GiB written
	tr := warmTracker(b, warm)
	offs := hitOffsets(warm)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		tr.Mark(offs[i%benchOffsets], benchWrite)
		i++
	}
}

func BenchmarkTrackerMarkHitParallel(b *testing.B) {
	const warm = 1 << 16
	tr := warmTracker(b, warm)
	offs := hitOffsets(warm)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := rand.IntN(benchOffsets)
		for pb.Next() {
			tr.Mark(offs[i%benchOffsets], benchWrite)
			i++
		}
	})
}

// BenchmarkTrackerMarkMiss marks a chunk never marked before on every op,
// spread over the volume, in 1 and 3 sinks (HBMM and two minicopy bitmaps).
func BenchmarkTrackerMarkMiss(b *testing.B) {
	for _, sinks := range []int{1, 3} {
		b.Run(fmt.Sprintf("sinks=%d", sinks), func(b *testing.B) {
			names := []string{HBMMSink, "/dev/sdb", "/dev/sdc"}[:sinks]
			tr := mustTracker(b, benchChunk, names...)
			b.ReportAllocs()
			i := uint64(0)
			for b.Loop() {
				// An odd multiplier permutes the chunks of the volume, so no
				// chunk repeats within benchChunks ops.
				c := (i * 2654435761) % benchChunks
				tr.Mark(int64(c)*benchChunk, benchWrite)
				i++
				if i%benchChunks == 0 {
					b.StopTimer()
					tr = mustTracker(b, benchChunk, names...)
					b.StartTimer()
				}
			}
		})
	}
}

// BenchmarkSinceFlush records one write's issue and completion per op,
// random 4 KiB writes over the volume, with a flush every 1024 writes.
func BenchmarkSinceFlush(b *testing.B) {
	s := mustSinceFlush(b, benchChunk)
	r := rand.New(rand.NewPCG(5, 6))
	offs := make([]int64, benchOffsets)
	for i := range offs {
		offs[i] = int64(r.Uint64N(benchChunks*uint64(benchChunk/benchWrite))) * benchWrite
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		if err := sinceFlushStep(s, offs[i%benchOffsets], i); err != nil {
			b.Fatal(err)
		}
	}
}

// sinceFlushStep plays the i-th write, at off, and a flush every 1024.
func sinceFlushStep(s *SinceFlush, off int64, i int) error {
	s.Issued(off, benchWrite)
	s.Completed(off, benchWrite)
	if i%1024 == 0 {
		return s.FlushDone(s.FlushBegin(), true)
	}
	return nil
}

func BenchmarkSinceFlushParallel(b *testing.B) {
	s := mustSinceFlush(b, benchChunk)
	offs := hitOffsets(benchChunks)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := rand.IntN(benchOffsets)
		for pb.Next() {
			i++
			if err := sinceFlushStep(s, offs[i%benchOffsets], i); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkEncoding encodes and decodes a 1 TiB volume's bitmap with 1% of
// its chunks set at random.
func BenchmarkEncoding(b *testing.B) {
	bm := mustNew(b, benchChunk)
	r := rand.New(rand.NewPCG(1, 1))
	for range benchChunks / 100 {
		bm.Add(r.Uint64N(benchChunks))
	}
	enc, err := bm.MarshalBinary()
	if err != nil {
		b.Fatal(err)
	}
	b.Run("marshal", func(b *testing.B) {
		b.SetBytes(int64(len(enc)))
		for b.Loop() {
			if _, err := bm.MarshalBinary(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("decode", func(b *testing.B) {
		b.SetBytes(int64(len(enc)))
		for b.Loop() {
			if _, err := Decode(enc); err != nil {
				b.Fatal(err)
			}
		}
	})
}
