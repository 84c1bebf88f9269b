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
	walk.Plan
	Source, Target Device
}

// Run copies. The range lock keeps application writes from interleaving
// with a chunk in flight; writes outside the chunk reach the target
// directly (it is a copy target), so the target is complete when the walk
// ends.
func Run(ctx context.Context, j Job) error {
	if j.Source == nil || j.Target == nil {
		return fmt.Errorf("copy: source and target are required")
	}
	buf := make([]byte, j.ChunkSize())
	return j.Plan.Run(ctx,
		func(off, n int64) error {
			if _, err := j.Source.ReadAt(buf[:n], off); err != nil {
				return fmt.Errorf("copy: read source: %w", err)
			}
			if _, err := j.Target.WriteAt(buf[:n], off); err != nil {
				return fmt.Errorf("copy: write target: %w", err)
			}
			return nil
		},
		j.Target.Flush)
}
