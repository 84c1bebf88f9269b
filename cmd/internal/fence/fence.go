// Package fence owns this host's right to member I/O in a cluster: the
// gate every member read, write and flush passes (device.Options.Fence),
// open only while the host's lease is valid, and the watchdog process
// that kills the agent when a lease lapses with member I/O still
// outstanding (an I/O that passed the gate and then stalled: a SIGSTOP
// between the check and the system call, a partition during a slow
// write). The lease itself is renewed through the cluster's log
// (cluster/lease.go); this package only enforces it.
//
// The lease end and the count of outstanding I/O live in a page of shared
// memory that the watchdog, a child process, reads: it needs nothing from
// the agent's goroutines, which may be stopped or starved.
package fence

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/shadow-project/shadow/cmd/internal/device"
)

// Now reads CLOCK_MONOTONIC in nanoseconds: the clock the lease is
// counted on, the same in the agent and its watchdog (Go's own monotonic
// readings are relative to each process's start).
func Now() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

// Policy is what member I/O does while the host has no lease (after
// DRBD's on-no-quorum).
type Policy uint8

const (
	// SuspendIO: I/O waits for the lease to come back, up to a timeout.
	SuspendIO Policy = iota
	// IOError: I/O fails at once.
	IOError
)

func (p Policy) String() string {
	if p == IOError {
		return "io-error"
	}
	return "suspend-io"
}

// ParsePolicy reads suspend-io or io-error.
func ParsePolicy(s string) (Policy, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "suspend-io":
		return SuspendIO, nil
	case "io-error":
		return IOError, nil
	}
	return 0, fmt.Errorf("fence: on-no-quorum %q: want suspend-io or io-error", s)
}

// Errors; both wrap device.ErrFenced, which tells the I/O engines that
// no member is to blame.
var (
	// ErrNoLease: the host's lease is not valid (quorum lost, or not yet
	// renewed) and the policy, or its timeout, fails the I/O.
	ErrNoLease = fmt.Errorf("fence: no valid lease: %w", device.ErrFenced)
	// ErrFenced: this run of the host was declared failed; its I/O fails
	// for good (mount again).
	ErrFenced = fmt.Errorf("fence: this host was declared failed: %w", device.ErrFenced)
)

// Shared-memory words.
const (
	wordLeaseEnd = iota
	wordOutstanding
	wordFenced
	wordWatchdog // the watchdog's W, in nanoseconds
	words
)

// Gate is the lease's hold on member I/O.
type Gate struct {
	mem     []int64 // words, in shared memory when a watchdog runs
	policy  Policy
	timeout time.Duration

	mu   sync.Mutex
	wake chan struct{} // closed when the lease is extended or fenced
	// epoch numbers the runs (incarnations) the gate has served: a
	// Handle of an earlier run refuses everything.
	epoch atomic.Uint64
	// enforcing: the cluster runs leases (its core level has them). Until
	// then the gate only counts I/O, as a cluster of older builds would.
	enforcing atomic.Bool

	// Counters for show.
	refused atomic.Uint64
	waited  atomic.Uint64
	lapses  atomic.Uint64
	wasOK   atomic.Bool
}

// New makes a gate with no lease yet: I/O waits (or fails) until Extend.
// mem, if not nil, is the shared page (at least 64 bytes).
func New(policy Policy, timeout time.Duration, mem []byte) *Gate {
	g := &Gate{policy: policy, timeout: timeout, wake: make(chan struct{})}
	if mem == nil {
		mem = make([]byte, words*8)
	}
	g.mem = unsafe.Slice((*int64)(unsafe.Pointer(&mem[0])), words)
	return g
}

func (g *Gate) word(i int) *int64 { return &g.mem[i] }

// ValidFor reports whether the lease is valid for at least d more.
func (g *Gate) ValidFor(d time.Duration) bool {
	return atomic.LoadInt64(g.word(wordFenced)) == 0 && Now()+int64(d) < atomic.LoadInt64(g.word(wordLeaseEnd))
}

// Valid reports whether the lease is valid now.
func (g *Gate) Valid() bool {
	return atomic.LoadInt64(g.word(wordFenced)) == 0 && Now() < atomic.LoadInt64(g.word(wordLeaseEnd))
}

// Enter admits one member I/O, or refuses it (an error wrapping
// device.ErrFenced). The I/O counts as outstanding before the lease is
// checked, so that the watchdog sees every I/O that passed the check.
func (g *Gate) Enter() error { return g.enter(g.epoch.Load()) }

func (g *Gate) enter(epoch uint64) error {
	if !g.enforcing.Load() && g.epoch.Load() == epoch {
		atomic.AddInt64(g.word(wordOutstanding), 1)
		return nil
	}
	if g.validFor(epoch) {
		atomic.AddInt64(g.word(wordOutstanding), 1)
		if g.validFor(epoch) {
			return nil
		}
		atomic.AddInt64(g.word(wordOutstanding), -1)
	}
	return g.slow(epoch)
}

// validFor: the lease is valid and run epoch is still the gate's.
func (g *Gate) validFor(epoch uint64) bool { return g.epoch.Load() == epoch && g.Valid() }

// Handle is the gate as this run's member devices hold it.
func (g *Gate) Handle() device.Fence { return &handle{g: g, epoch: g.epoch.Load()} }

type handle struct {
	g     *Gate
	epoch uint64
}

func (h *handle) Enter() error { return h.g.enter(h.epoch) }

func (h *handle) Exit() { h.g.Exit() }

// Reset starts a new run after Fence: the lease is void until extended
// again, and every Handle taken before refuses for good.
func (g *Gate) Reset() {
	g.epoch.Add(1)
	atomic.StoreInt64(g.word(wordLeaseEnd), 0)
	atomic.StoreInt64(g.word(wordFenced), 0)
	g.broadcast()
}

// Exit ends an admitted I/O.
func (g *Gate) Exit() { atomic.AddInt64(g.word(wordOutstanding), -1) }

// slow waits for the lease as the policy says.
func (g *Gate) slow(epoch uint64) error {
	if g.wasOK.Swap(false) {
		g.lapses.Add(1)
	}
	var deadline <-chan time.Time
	for {
		if atomic.LoadInt64(g.word(wordFenced)) != 0 || g.epoch.Load() != epoch {
			g.refused.Add(1)
			return ErrFenced
		}
		if g.policy == IOError {
			g.refused.Add(1)
			return ErrNoLease
		}
		if deadline == nil {
			g.waited.Add(1)
			t := time.NewTimer(g.timeout)
			defer t.Stop()
			deadline = t.C
		}
		g.mu.Lock()
		wake := g.wake
		g.mu.Unlock()
		if g.validFor(epoch) {
			atomic.AddInt64(g.word(wordOutstanding), 1)
			if g.validFor(epoch) {
				return nil
			}
			atomic.AddInt64(g.word(wordOutstanding), -1)
		}
		select {
		case <-wake:
		case <-deadline:
			g.refused.Add(1)
			return fmt.Errorf("%w (waited %s for quorum)", ErrNoLease, g.timeout)
		case <-time.After(50 * time.Millisecond):
			// The lease may have been extended while this I/O looked.
		}
	}
}

// WaitValid waits, up to ctx, for a valid lease (start-up, mount).
func (g *Gate) WaitValid(ctx context.Context) error {
	for !g.Valid() {
		if atomic.LoadInt64(g.word(wordFenced)) != 0 {
			return ErrFenced
		}
		g.mu.Lock()
		wake := g.wake
		g.mu.Unlock()
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %w", ErrNoLease, ctx.Err())
		case <-wake:
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

// Enforce makes the gate require a lease from now on (for good).
func (g *Gate) Enforce() { g.enforcing.Store(true) }

// Enforcing reports whether the gate requires a lease.
func (g *Gate) Enforcing() bool { return g.enforcing.Load() }

// Extend moves the lease's end to until (a Now reading), never back, and
// makes the gate require a lease.
func (g *Gate) Extend(until int64) {
	g.enforcing.Store(true)
	for {
		cur := atomic.LoadInt64(g.word(wordLeaseEnd))
		if until <= cur || atomic.CompareAndSwapInt64(g.word(wordLeaseEnd), cur, until) {
			break
		}
	}
	if g.Valid() {
		g.wasOK.Store(true)
	}
	g.broadcast()
}

// Fence ends every I/O of this run, for good.
func (g *Gate) Fence() {
	atomic.StoreInt64(g.word(wordFenced), 1)
	g.broadcast()
}

func (g *Gate) broadcast() {
	g.mu.Lock()
	close(g.wake)
	g.wake = make(chan struct{})
	g.mu.Unlock()
}

// State is the gate as show reports it.
type State struct {
	// State: valid, lapsed or fenced.
	State       string
	LeftMs      int64 // lease time left (negative: lapsed that long ago)
	Outstanding int64
	Refused     uint64 // I/Os failed for want of a lease
	Waited      uint64 // I/Os that waited for one
	Lapses      uint64 // times the lease lapsed under I/O
	Policy      string
}

// Snapshot reads the gate's state.
func (g *Gate) Snapshot() State {
	s := State{Policy: g.policy.String(), Outstanding: atomic.LoadInt64(g.word(wordOutstanding)),
		Refused: g.refused.Load(), Waited: g.waited.Load(), Lapses: g.lapses.Load()}
	end := atomic.LoadInt64(g.word(wordLeaseEnd))
	s.LeftMs = (end - Now()) / int64(time.Millisecond)
	switch {
	case atomic.LoadInt64(g.word(wordFenced)) != 0:
		s.State = "fenced"
	case !g.enforcing.Load():
		s.State = "off"
	case g.Valid():
		s.State = "valid"
	default:
		s.State = "lapsed"
	}
	return s
}

// ErrWatchdog: the watchdog could not be started.
var ErrWatchdog = errors.New("fence: watchdog")
