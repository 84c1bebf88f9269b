package fence

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Deferred is member I/O the cluster log's apply path owes while the
// lease is not valid. The log's hooks run in log order under its lock,
// and some do member I/O (the set's metadata writer records a change, a
// member another host added is opened and read). With the lease lapsed,
// that I/O would wait at the gate for a renewal that can only be applied
// after the very entry being applied: the host would stall until the
// no-quorum timeout. So, while the lease has less than a margin left, the
// work is queued, in log order, and done once the lease is back. Held
// says work is queued: the owner's application writes wait on it (none
// may miss a member another host added), and so does its answer to "have
// you applied index k?" (Settle).
type Deferred struct {
	gate   *Gate // nil: no lease, nothing is ever deferred
	margin time.Duration
	ctx    context.Context
	spawn  func(func())

	mu    sync.Mutex
	queue []func(queued bool)
	held  atomic.Bool
}

// NewDeferred queues work behind g (nil: none); spawn starts the
// goroutine that drains the queue, which stops when ctx ends.
func NewDeferred(ctx context.Context, g *Gate, margin time.Duration, spawn func(func())) *Deferred {
	return &Deferred{gate: g, margin: margin, ctx: ctx, spawn: spawn}
}

// SetGate gives the queue its gate (the gate comes with the lease).
func (d *Deferred) SetGate(g *Gate) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.gate = g
}

// Held is set while work is queued.
func (d *Deferred) Held() *atomic.Bool { return &d.held }

// Do runs fn now (queued false), or queues it behind earlier queued work
// and runs it once the lease is valid (queued true).
func (d *Deferred) Do(fn func(queued bool)) {
	d.mu.Lock()
	g := d.gate
	if len(d.queue) == 0 && (g == nil || !g.Enforcing() || g.ValidFor(d.margin)) {
		d.mu.Unlock()
		fn(false)
		return
	}
	d.queue = append(d.queue, fn)
	d.held.Store(true)
	start := len(d.queue) == 1
	d.mu.Unlock()
	if start {
		d.spawn(func() { d.drain(g) })
	}
}

func (d *Deferred) drain(g *Gate) {
	for {
		if err := g.WaitValid(d.ctx); err != nil {
			// Fenced (the owner drops what the work was for) or stopping.
			d.mu.Lock()
			d.queue = nil
			d.held.Store(false)
			d.mu.Unlock()
			return
		}
		d.mu.Lock()
		if len(d.queue) == 0 {
			d.held.Store(false)
			d.mu.Unlock()
			return
		}
		fn := d.queue[0]
		d.mu.Unlock()
		fn(true)
		d.mu.Lock()
		d.queue = d.queue[1:]
		d.mu.Unlock()
	}
}

// Settle waits until no work is queued.
func (d *Deferred) Settle(ctx context.Context) error {
	for d.held.Load() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("fence: changes applied but not yet carried out (no lease): %w", ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}
