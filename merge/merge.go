package merge

import (
	"bytes"
	"context"
	"fmt"

	"github.com/shadow-project/shadow/merge/walk"
)

// Device is what a merge needs of a member.
type Device = walk.Device

// Job is one merge: make every other member agree with the master (any
// full member can be the logical merge master) in the volume's data
// region, from a checkpoint.
type Job struct {
	walk.Plan
	Master Device
	Others []Device
}

// Stats counts what a merge did.
type Stats struct {
	ChunksRead, ChunksRepaired int64
}

// Run merges. It reads every member's copy of each chunk and rewrites only
// the members that differ from the master: a merge mostly finds agreement,
// and reading is cheaper than rewriting.
func Run(ctx context.Context, j Job) (Stats, error) {
	var st Stats
	if j.Master == nil {
		return st, fmt.Errorf("merge: no master member")
	}
	chunk := j.ChunkSize()
	want, have := make([]byte, chunk), make([]byte, chunk)
	err := j.Plan.Run(ctx,
		func(off, n int64) error {
			st.ChunksRead++
			if _, err := j.Master.ReadAt(want[:n], off); err != nil {
				return fmt.Errorf("merge: read master: %w", err)
			}
			for _, d := range j.Others {
				if _, err := d.ReadAt(have[:n], off); err == nil && bytes.Equal(want[:n], have[:n]) {
					continue
				}
				// A member that cannot be read there is rewritten too: the
				// write repairs it, or fails and the caller expels it.
				if _, err := d.WriteAt(want[:n], off); err != nil {
					return fmt.Errorf("merge: write member: %w", err)
				}
				st.ChunksRepaired++
			}
			return nil
		},
		func() error {
			for _, d := range j.Others {
				if err := d.Flush(); err != nil {
					return err
				}
			}
			return nil
		})
	return st, err
}
