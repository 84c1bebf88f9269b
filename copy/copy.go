package copy

import (
	"context"
	"fmt"

	"github.com/shadow-project/shadow/merge/walk"
)

// Device is what a copy needs of a member.
type Device = walk.Device

// Job is one copy: fill Target from Source, from a checkpoint.
type Job struct {
	Source, Target Device
	Size           int64
	StartLBN       uint64
	Lock           func(off, n int64) func()
	// Want, if set, limits the copy to chunks with work (a minicopy).
	Want func(off, n int64) bool
	// Progress receives checkpoints: the target holds the source's data
	// below the LBN, flushed.
	Progress         func(lbn uint64)
	Chunk            int64
	MinRate, MaxRate int64
	Busy             func() bool
}

// Run copies. The range lock keeps application writes from interleaving
// with a chunk in flight; writes outside the chunk reach the target
// directly (it is a copy target), so the target is complete when the walk
// ends.
func Run(ctx context.Context, j Job) error {
	if j.Source == nil || j.Target == nil {
		return fmt.Errorf("copy: source and target are required")
	}
	chunk := j.Chunk
	if chunk <= 0 {
		chunk = walk.DefaultChunk
	}
	buf := make([]byte, chunk)
	return walk.Run(ctx, walk.Config{
		Size: j.Size, Start: int64(j.StartLBN) * walk.SectorSize, Chunk: chunk,
		Lock: j.Lock, Want: j.Want,
		Step: func(off, n int64) error {
			if _, err := j.Source.ReadAt(buf[:n], off); err != nil {
				return fmt.Errorf("copy: read source: %w", err)
			}
			if _, err := j.Target.WriteAt(buf[:n], off); err != nil {
				return fmt.Errorf("copy: write target: %w", err)
			}
			return nil
		},
		Flush: j.Target.Flush,
		Progress: func(done int64) {
			if j.Progress != nil {
				j.Progress(uint64(done / walk.SectorSize))
			}
		},
		MinRate: j.MinRate, MaxRate: j.MaxRate, Busy: j.Busy,
	})
}
