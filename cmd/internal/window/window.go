// Package window owns the engine's side of the cluster's merge and copy
// windows (docs/cluster.md, "Merges and copies against other hosts'
// writes"): which range a window claims, and when the next one is due.
// Announcing a window and waiting for the other hosts' acks is the
// caller's (the cluster log's); holding other hosts' windows is the
// agent's.
package window

import "time"

// Size is how much of a shared set a merge or copy claims at once:
// other hosts' writes there wait while it is processed. A writer that hits
// the window waits about Size / (2 × the engine's rate), and the
// share of writes that hit it is Size / volume size, so the stall
// grows with the square of the window and the inverse of the rate; each
// window also costs a log entry (an fsync on every voter). Measured with
// make bench (docs/performance.md): 16 MiB at full engine speed gave the
// other hosts' writers the most; smaller windows, or slowing the engine
// while they write, gave them less.
const Size = 16 << 20

// NewClaim returns the windows of one op over a volume of size bytes.
// next, for a bitmap op, finds its next chunk with work (nil for a full
// op); announce claims [lo, hi) and returns once every other host has
// acknowledged.
func NewClaim(size int64, next func(off int64) (int64, bool), announce func(lo, hi int64) error) *Claim {
	return &Claim{hi: -1, size: size, next: next, announce: announce}
}

// Claim is one op's windows: the one it holds, and what they cost.
type Claim struct {
	lo, hi, size int64
	next         func(off int64) (int64, bool)
	announce     func(lo, hi int64) error
	// Cost, if set, hears of each window announced and the time spent
	// announcing it and waiting for every host's ack.
	Cost func(waited time.Duration)
}

// Claim is the walk's Claim (merge/walk.Config.Claim).
func (c *Claim) Claim(off, n int64) error {
	if off >= c.lo && off+n <= c.hi {
		return nil
	}
	c.lo, c.hi = off, End(off, n, c.size, c.next)
	began := time.Now()
	err := c.announce(c.lo, c.hi)
	if c.Cost != nil {
		c.Cost(time.Since(began))
	}
	if err != nil {
		c.hi = -1
	}
	return err
}

// End is where the window opened for the chunk [off, off+n) ends.
// A full op's window is Size of the volume. A bitmap op's holds
// Size of work: it stretches over the op's next chunks, however far
// apart. A minimerge of 1% random dirt would otherwise pay a log entry and
// a round of acks for every two or three chunks it moves (measured: 64
// windows for 164 chunks, 3.6 ms per chunk against 0.43 on one host). The
// stretch costs other hosts no more than a full merge does: a window is
// held for the handshake plus at most Size of work either way, so no
// write waits longer than behind a full merge's window, and the sum over
// the op of span × time held stays below the full merge's.
func End(off, n, size int64, next func(off int64) (int64, bool)) int64 {
	if next == nil {
		return min(off+max(Size, n), size)
	}
	end, work := off+n, n
	for work < Size && end < size {
		c, ok := next(end)
		if !ok || c >= size {
			break
		}
		end, work = min(c+n, size), work+n
	}
	return end
}
