package walk

import (
	"context"
	"slices"
	"testing"
)

// A sparse walk visits exactly the chunks Next reports, in order, and
// checkpoints by bytes moved: few flushes for little work.
func TestSparseWalkVisitsOnlyWorkAndCheckpointsByBytesMoved(t *testing.T) {
	const chunk, size = 64 << 10, 1 << 30
	work := []int64{0, 5 * chunk, 6 * chunk, 1000 * chunk, size - chunk}
	var stepped, stepsSeen []int64
	flushes := 0
	var progress []int64
	err := Run(context.Background(), Config{
		Size: size, Chunk: chunk,
		Lock: func(off, n int64) func() { return func() {} },
		Next: func(off int64) (int64, bool) {
			i, _ := slices.BinarySearch(work, off)
			if i == len(work) {
				return 0, false
			}
			return work[i], true
		},
		Step:     func(off, n int64) error { stepsSeen = append(stepsSeen, off); return nil },
		Stepped:  func(off, n int64) { stepped = append(stepped, off) },
		Flush:    func() error { flushes++; return nil },
		Progress: func(done int64) { progress = append(progress, done) },
	})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(stepsSeen, work) || !slices.Equal(stepped, work) {
		t.Fatalf("stepped %v (reported %v), want %v", stepsSeen, stepped, work)
	}
	// 5 chunks moved is far below 1% of 1 GiB: only the final checkpoint.
	if flushes != 1 || !slices.Equal(progress, []int64{size}) {
		t.Fatalf("flushes %d, progress %v; want 1 flush and one checkpoint at the end", flushes, progress)
	}
}

// Resuming a sparse walk from a checkpoint skips the work below it.
func TestSparseWalkResumes(t *testing.T) {
	const chunk, size = 4096, 1 << 20
	var seen []int64
	err := Run(context.Background(), Config{
		Size: size, Chunk: chunk, Start: 10*chunk + 512,
		Lock: func(off, n int64) func() { return func() {} },
		Next: func(off int64) (int64, bool) {
			for _, w := range []int64{2 * chunk, 10 * chunk, 20 * chunk} {
				if w >= off {
					return w, true
				}
			}
			return 0, false
		},
		Step: func(off, n int64) error { seen = append(seen, off); return nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(seen, []int64{10 * chunk, 20 * chunk}) {
		t.Fatalf("resumed walk stepped %v", seen)
	}
}
