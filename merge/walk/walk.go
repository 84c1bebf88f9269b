// Package walk owns the loop that merges and copies share: visit the
// volume in LBN order from a checkpoint, one chunk at a time under the VU's
// range lock, flush the members written before recording a checkpoint,
// throttle between a minimum and a maximum rate (the minimum while
// application I/O is busy, like md's speed_limit_min/max), and stop
// promptly on cancel.
package walk

import (
	"context"
	"fmt"
	"time"
)

// Device is what merges and copies need of a member.
type Device interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Flush() error
}

// SectorSize is the unit of LBNs.
const SectorSize = 512

// Defaults.
const (
	DefaultChunk           = 1 << 20
	DefaultCheckpointEvery = 64 << 20
)

// Config is one walk.
type Config struct {
	// Size of the volume in bytes; Start the byte offset to resume from
	// (a checkpoint LBN times SectorSize).
	Size, Start int64
	// Chunk is the bytes moved per step (default 1 MiB).
	Chunk int64
	// Lock takes the VU's range lock for one chunk.
	Lock func(off, n int64) (unlock func())
	// Claim, if set, runs before Lock for each chunk: on a set other
	// hosts write, it makes sure they have stopped writing the chunk (the
	// cluster's window); an error stops the walk.
	Claim func(off, n int64) error
	// Want, if set, skips chunks with no work (a minimerge or minicopy
	// walks only its bitmap's chunks).
	Want func(off, n int64) bool
	// Next, if set, jumps over chunks with no work: it returns the first
	// byte offset at or after off that has work, or false if none is
	// left. A sparse walk over a large volume then costs its work, not
	// the volume's size.
	Next func(off int64) (int64, bool)
	// Stepped, if set, hears of every chunk whose Step succeeded.
	Stepped func(off, n int64)
	// Step does the chunk's work, under the lock.
	Step func(off, n int64) error
	// Flush makes every Step so far durable on the members written.
	Flush func() error
	// Progress reports a checkpoint: everything below byte offset done is
	// done and durable. Called after Flush, every CheckpointEvery bytes
	// moved (default: 1% of the volume, between one chunk and 64 MiB) and
	// once at the end with Size. Counting bytes moved rather than bytes
	// passed keeps a sparse walk (a minimerge of 1% of the chunks) from
	// paying a hundred flushes for little data.
	Progress        func(done int64)
	CheckpointEvery int64
	// MinRate and MaxRate bound the speed in bytes per second (0: no
	// bound); Busy says application I/O is active, which selects MinRate.
	MinRate, MaxRate int64
	Busy             func() bool
}

// Plan is what every merge and copy job shares: the volume, where to
// resume, the lock, the work filter, progress reports and speed limits.
type Plan struct {
	Size int64
	// StartLBN is the checkpoint to resume from.
	StartLBN uint64
	Lock     func(off, n int64) (unlock func())
	// Claim: see Config.Claim.
	Claim func(off, n int64) error
	// Want, if set, limits the walk to chunks with work (a minimerge or
	// minicopy); Next, if set, finds the next chunk with work.
	Want func(off, n int64) bool
	Next func(off int64) (int64, bool)
	// Stepped hears of every chunk moved (for counters).
	Stepped func(off, n int64)
	// Progress receives checkpoints as LBNs: everything below is done and
	// flushed.
	Progress         func(lbn uint64)
	Chunk            int64
	MinRate, MaxRate int64
	Busy             func() bool
}

// ChunkSize is the plan's chunk, or the default.
func (p Plan) ChunkSize() int64 {
	if p.Chunk > 0 {
		return p.Chunk
	}
	return DefaultChunk
}

// Run walks the plan with the job's step and flush.
func (p Plan) Run(ctx context.Context, step func(off, n int64) error, flush func() error) error {
	return Run(ctx, Config{
		Size: p.Size, Start: int64(p.StartLBN) * SectorSize, Chunk: p.ChunkSize(),
		Lock: p.Lock, Claim: p.Claim, Want: p.Want, Next: p.Next, Stepped: p.Stepped, Step: step, Flush: flush,
		Progress: func(done int64) {
			if p.Progress != nil {
				p.Progress(uint64(done / SectorSize))
			}
		},
		MinRate: p.MinRate, MaxRate: p.MaxRate, Busy: p.Busy,
	})
}

// Run walks from Start to Size. On cancel it returns the context's error
// without recording a checkpoint for chunks not yet flushed.
func Run(ctx context.Context, c Config) error {
	if c.Chunk <= 0 {
		c.Chunk = DefaultChunk
	}
	if c.CheckpointEvery <= 0 {
		// About every 1% of the volume, so progress shows, but no more
		// often than every chunk nor less than every 64 MiB: each
		// checkpoint costs a flush and a metadata write.
		c.CheckpointEvery = min(max(c.Size/100, c.Chunk), DefaultCheckpointEvery)
	}
	if c.Start < 0 || c.Start > c.Size {
		return fmt.Errorf("walk: start %d outside volume of %d bytes", c.Start, c.Size)
	}
	if c.Next != nil {
		// Jumps land on chunk boundaries counted from 0.
		c.Start -= c.Start % c.Chunk
	}
	began, moved := time.Now(), int64(0)
	sinceCheckpoint := int64(0)
	for off := c.Start; off < c.Size; off += c.Chunk {
		if err := ctx.Err(); err != nil {
			return err
		}
		if c.Next != nil {
			next, ok := c.Next(off)
			if !ok || next >= c.Size {
				break
			}
			if next > off {
				off = next - next%c.Chunk
			}
		}
		n := min(c.Chunk, c.Size-off)
		if c.Want == nil || c.Want(off, n) {
			if c.Claim != nil {
				if err := c.Claim(off, n); err != nil {
					return fmt.Errorf("walk: claim chunk at %d: %w", off, err)
				}
			}
			unlock := c.Lock(off, n)
			err := c.Step(off, n)
			unlock()
			if err != nil {
				return fmt.Errorf("walk: chunk at %d: %w", off, err)
			}
			if c.Stepped != nil {
				c.Stepped(off, n)
			}
			moved += n
			sinceCheckpoint += n
			if err := throttle(ctx, c, began, moved); err != nil {
				return err
			}
		}
		if sinceCheckpoint >= c.CheckpointEvery && off+n < c.Size {
			if err := checkpoint(c, off+n); err != nil {
				return err
			}
			sinceCheckpoint = 0
		}
	}
	return checkpoint(c, c.Size)
}

func checkpoint(c Config, done int64) error {
	if c.Flush != nil {
		if err := c.Flush(); err != nil {
			return fmt.Errorf("walk: flush before checkpoint %d: %w", done, err)
		}
	}
	if c.Progress != nil {
		c.Progress(done)
	}
	return nil
}

// throttle sleeps when the walk runs ahead of its allowed rate.
func throttle(ctx context.Context, c Config, began time.Time, moved int64) error {
	rate := c.MaxRate
	if c.Busy != nil && c.Busy() && c.MinRate > 0 {
		rate = c.MinRate
	}
	if rate <= 0 {
		return nil
	}
	due := time.Duration(float64(moved) / float64(rate) * float64(time.Second))
	wait := due - time.Since(began)
	if wait <= 0 {
		return nil
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
