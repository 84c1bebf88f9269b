package cluster

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/shadow-project/shadow/shadowset"
)

// Leases. A host that mounts sets may issue member I/O only while it holds
// a lease, which it renews with a log entry (entryRenew). The rules, and
// why each one is needed (docs/cluster.md, "Fencing"):
//
//   - The leader commits a renewal only while the host's incarnation is
//     current and up in the core: once the log has the host failed, no
//     renewal of that run is ever accepted again.
//   - A renewal names the host's previous renewal (Prev) as this host has
//     applied it. A host that cannot apply the log (its raft port cut, its
//     disk stuck) sends stale Prevs and is refused: a lease never rests
//     on entries the host has not seen.
//   - The lease lasts L from the moment the host sent the renewal, on its
//     own monotonic clock, and counts only once the host has applied the
//     renewal (Apply calls Renewed then).
//   - The leader records, on its own clock, when it applied each host's
//     last accepted renewal; past L(1+ρ)² + LeaseMargin without one, the
//     host's lease has surely lapsed and the leader records its failure.
//   - After the failure entry the survivors wait the recovery delay D
//     before merging behind the host, so D must cover the lease and the
//     watchdog that kills a host whose I/O outlives its lease:
//     D ≥ (L + W)(1 + ρ)² + LeaseMargin (RequiredDelay). Registrations
//     and delay changes that break this are refused.

// ClockDrift is ρ: how far apart two hosts' monotonic clocks may run, as
// a rate. CLOCK_MONOTONIC is slewed by NTP at most 500 ppm; 1% leaves room
// for virtual machines whose clocks are worse.
const ClockDrift = 0.01

// LeaseMargin is added to every bound that compares two hosts' clocks:
// the time a SIGKILL takes to stop a process, a write already in the
// kernel to land, a timer to fire late.
const LeaseMargin = 250 * time.Millisecond

// ErrFenced: this run of the host was declared failed (or a newer run
// registered): it must never issue member I/O again.
var ErrFenced = errors.New("cluster: fenced")

// ErrLeaseConfig: a lease, watchdog and recovery delay that leave no
// margin.
var ErrLeaseConfig = errors.New("cluster: lease configuration")

// LeaseConfig is one host's lease L and watchdog W.
type LeaseConfig struct {
	Lease    time.Duration `json:"l"`
	Watchdog time.Duration `json:"w"`
}

// drifted stretches d by the clock drift between two hosts.
func drifted(d time.Duration) time.Duration {
	return time.Duration(math.Ceil(float64(d) * (1 + ClockDrift) * (1 + ClockDrift)))
}

// RequiredDelay is the shortest recovery delay that is safe with this
// lease and watchdog.
func (c LeaseConfig) RequiredDelay() time.Duration {
	return drifted(c.Lease+c.Watchdog) + LeaseMargin
}

// lapseAfter is how long the leader waits, from applying a host's last
// renewal, before it takes the lease for lapsed and the host for failed:
// at least L(1+ρ)² + margin, when the lease has surely lapsed, and 2L so
// that a host stalled a little longer than its lease (a pause, a slow
// disk) gets it back instead of being failed. Waiting longer is safe: the
// recovery delay counts from the failure entry.
func (c LeaseConfig) lapseAfter() time.Duration { return max(drifted(c.Lease)+LeaseMargin, 2*c.Lease) }

// RenewEvery is how often a host renews: four tries per lease, so that
// one slow commit does not lapse it.
func (c LeaseConfig) RenewEvery() time.Duration { return c.Lease / 4 }

// Check refuses a lease shorter than a raft election (a lease that
// lapses whenever a leader is re-elected) and a watchdog of nothing.
func (c LeaseConfig) Check(t Timing) error {
	if c.Lease <= 0 {
		return nil // fencing off (benchmarks only)
	}
	election := 2 * t.RaftHeartbeat
	if c.Lease < election {
		return fmt.Errorf("%w: lease %s is shorter than a raft election (2 × raft-heartbeat = %s)", ErrLeaseConfig, c.Lease, election)
	}
	if c.Watchdog <= 0 {
		return fmt.Errorf("%w: the watchdog must be positive (got %s)", ErrLeaseConfig, c.Watchdog)
	}
	return nil
}

// CheckDelay refuses a recovery delay that leaves no margin.
func (c LeaseConfig) CheckDelay(d time.Duration) error {
	if c.Lease <= 0 {
		return nil
	}
	if need := c.RequiredDelay(); d < need {
		return fmt.Errorf("%w: lease %s + watchdog %s need a recovery delay of at least %s ((L+W)(1+%.2f)² + %s), the cluster's is %s: raise --recovery-delay or shorten --lease/--watchdog",
			ErrLeaseConfig, c.Lease, c.Watchdog, need.Round(time.Millisecond), ClockDrift, LeaseMargin, d)
	}
	return nil
}

// LeaseHooks is how a lease holder hears of its lease.
type LeaseHooks struct {
	// Now reads the monotonic clock the lease is counted on (nanoseconds;
	// shared with the watchdog).
	Now func() int64
	// Extended: the lease now lasts until this reading of Now.
	Extended func(until int64)
	// Fenced: this run was declared failed (why); rejoin: it may register
	// a new run (false when another run of the host's name took over).
	// It runs under the log's lock.
	Fenced func(reason string, rejoin bool)
	// Before runs before each renewal (outside the lock): the holder's
	// first entries once it reaches the log again.
	Before func()
}

// EnableLease makes this host a lease holder (before Register, which
// carries the configuration to the log).
func (l *Log) EnableLease(c LeaseConfig, h LeaseHooks) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.leaseCfg, l.leaseHooks = c, h
	l.renewSent = map[uint64]int64{}
}

// Renew proposes one renewal and returns once it is applied here (then
// the lease is extended) or refused. A refusal that fences is ErrFenced.
func (l *Log) Renew(ctx context.Context) error {
	l.mu.Lock()
	if l.leaseHooks.Now == nil {
		l.mu.Unlock()
		return errors.New("cluster: renew without a lease")
	}
	if l.fenced {
		l.mu.Unlock()
		return ErrFenced
	}
	prev := l.lastRenew[l.host]
	inc := l.inc.Load()
	sent := l.leaseHooks.Now()
	l.lastID++
	id := l.lastID
	l.renewSent[id] = sent
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		delete(l.renewSent, id)
		l.mu.Unlock()
	}()
	err := l.proposeWithID(ctx, entry{Type: entryRenew, Prev: prev, Inc: inc}, id)
	if err != nil && (errors.Is(err, ErrStaleIncarnation) || containsAny(err.Error(), ErrFenced.Error())) {
		l.mu.Lock()
		// Only if this run is still the one that renewed: a renewal of a
		// run already replaced (Reincarnate) says nothing of the new one.
		if l.inc.Load() == inc {
			l.fenceLocked("a renewal was refused: "+err.Error(), !errors.Is(err, ErrStaleIncarnation))
		}
		l.mu.Unlock()
		return fmt.Errorf("%w: %w", ErrFenced, err)
	}
	return err
}

// RenewLoop renews until ctx ends or the host is fenced.
func (l *Log) RenewLoop(ctx context.Context) {
	every := l.leaseCfg.RenewEvery()
	for {
		start := time.Now()
		if l.leaseHooks.Before != nil {
			l.leaseHooks.Before()
		}
		rctx, cancel := context.WithTimeout(ctx, l.leaseCfg.Lease)
		err := l.Renew(rctx)
		cancel()
		if errors.Is(err, ErrFenced) || ctx.Err() != nil {
			return
		}
		if err != nil && l.node != nil {
			l.node.log.Debug().Err(err).Msg("lease renewal failed")
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(every - min(time.Since(start), every)):
		}
	}
}

// Fenced reports whether this run was fenced.
func (l *Log) Fenced() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.fenced
}

// fenceLocked ends this run's right to I/O, once.
func (l *Log) fenceLocked(reason string, rejoin bool) {
	if l.fenced {
		return
	}
	l.fenced = true
	if l.leaseHooks.Fenced != nil {
		l.leaseHooks.Fenced(reason, rejoin)
	}
}

// applyRenew accepts a renewal from a host that is current, up, and has
// applied its previous renewal.
func (l *Log) applyRenew(e entry) error {
	if !l.hostUp(e.Host) {
		return fmt.Errorf("%w: %s incarnation %x is failed: renewal refused", ErrFenced, e.Host, e.Inc)
	}
	if last := l.lastRenew[e.Host]; e.Prev != last {
		return fmt.Errorf("%w: renewal of %s names renewal %d, the last is %d (the host lags the log)", shadowset.ErrBadEvent, e.Host, e.Prev, last)
	}
	l.lastRenew[e.Host] = e.ID
	l.renewedAt[e.Host] = time.Now()
	if e.Host == l.host && e.Inc == l.inc.Load() {
		if sent, ok := l.renewSent[e.ID]; ok && l.leaseHooks.Extended != nil {
			l.leaseHooks.Extended(sent + int64(l.leaseCfg.Lease))
		}
	}
	return nil
}

// hostUp reports whether the core has host up.
func (l *Log) hostUp(host string) bool {
	for _, h := range l.core.Hosts() {
		if h.Name == host {
			return h.Alive
		}
	}
	return false
}

// checkLeaseDelay refuses a recovery delay d that some registered host's
// lease does not fit.
func (l *Log) checkLeaseDelay(d time.Duration) error {
	for h, c := range l.leases {
		if inc := l.incs[h]; inc == 0 {
			continue
		}
		if err := c.CheckDelay(d); err != nil {
			return fmt.Errorf("host %s: %w", h, err)
		}
	}
	return nil
}

// lapsed returns the hosts (and runs) whose leases the leader sees lapsed.
func (l *Log) lapsed() map[string]uint64 {
	out := map[string]uint64{}
	if l.level < LevelLeases {
		return out
	}
	now := time.Now()
	for h, c := range l.leases {
		inc := l.incs[h]
		if inc == 0 || c.Lease <= 0 || !l.hostUp(h) {
			continue
		}
		at, ok := l.renewedAt[h]
		if !ok {
			continue
		}
		lapse := c.lapseAfter()
		if l.lastRenew[h] == 0 {
			// Not renewed yet since it registered: it holds no lease, so it
			// issues no member I/O, and a host that was down a while may
			// take seconds to catch up with the log (raft backs off from
			// a peer that failed) before it can renew at all. Gossip still
			// reports it if it dies.
			lapse = max(lapse, firstRenewGrace)
		}
		if now.Sub(at) > lapse {
			out[h] = inc
		}
	}
	return out
}

// firstRenewGrace bounds how long a registered host may take to apply the
// log up to its registration and send its first renewal.
const firstRenewGrace = 30 * time.Second

// reconcileGap: a leader whose reconcile ticks (every 500 ms) were this
// far apart was stopped or starved, and judges no lease on that round.
const reconcileGap = 2 * time.Second

// LeaseView is one host's lease as the log sees it.
type LeaseView struct {
	Host   string
	Config LeaseConfig
	// SinceRenewal: how long ago this host applied the host's last
	// renewal (its own clock); -1: none seen by this host's run.
	SinceRenewal time.Duration
}

// Leases lists the lease holders' configurations and last renewals.
func (l *Log) Leases() []LeaseView {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []LeaseView
	for h, c := range l.leases {
		if l.incs[h] == 0 {
			continue
		}
		v := LeaseView{Host: h, Config: c, SinceRenewal: -1}
		if at, ok := l.renewedAt[h]; ok {
			v.SinceRenewal = time.Since(at)
		}
		out = append(out, v)
	}
	return out
}
