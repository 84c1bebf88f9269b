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
	Master Device
	Others []Device
	Size   int64
	// StartLBN is the checkpoint to resume from.
	StartLBN uint64
	Lock     func(off, n int64) func()
	// Want, if set, limits the merge to chunks with work (a minimerge).
	Want func(off, n int64) bool
	// Progress receives checkpoints (LBN below which every member agrees,
	// flushed).
	Progress         func(lbn uint64)
	Chunk            int64
	MinRate, MaxRate int64
	Busy             func() bool
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
	chunk := j.Chunk
	if chunk <= 0 {
		chunk = walk.DefaultChunk
	}
	want, have := make([]byte, chunk), make([]byte, chunk)
	err := walk.Run(ctx, walk.Config{
		Size: j.Size, Start: int64(j.StartLBN) * walk.SectorSize, Chunk: chunk,
		Lock: j.Lock, Want: j.Want,
		Step: func(off, n int64) error {
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
		Flush: func() error {
			for _, d := range j.Others {
				if err := d.Flush(); err != nil {
					return err
				}
			}
			return nil
		},
		Progress: func(done int64) {
			if j.Progress != nil {
				j.Progress(uint64(done / walk.SectorSize))
			}
		},
		MinRate: j.MinRate, MaxRate: j.MaxRate, Busy: j.Busy,
	})
	return st, err
}
