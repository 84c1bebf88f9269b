package agent

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/shadow-project/shadow/cluster"
	"github.com/shadow-project/shadow/cmd/internal/device"
	"github.com/shadow-project/shadow/cmd/internal/fence"
	"github.com/shadow-project/shadow/cmd/internal/report"
	"github.com/shadow-project/shadow/shadowset"
)

// Fencing on the agent's side: the lease is renewed through the log
// (cluster/lease.go) and enforced on every member device through the
// fence gate (cmd/internal/fence), whose watchdog kills the agent when a
// lapse leaves member I/O outstanding. A run the cluster declared failed
// drops its sets without writing a byte and registers as a new run; its
// sets come back only by mounting them again.

// newIncarnation numbers a run of this host's agent.
func newIncarnation() uint64 {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return binary.LittleEndian.Uint64(b[:]) | 1
}

// startLease starts the watchdog and arms the lease before the
// registration that carries its configuration.
func (a *Agent) startLease() error {
	cc := a.cfg.Cluster
	if cc.Witness || cc.Lease.Lease <= 0 || cluster.CoreLevel() < cluster.LevelLeases {
		// A witness does no member I/O; 0: fencing off (benchmarks); a
		// build below the lease level has none.
		return nil
	}
	if err := cc.Lease.Check(cc.Timing); err != nil {
		return err
	}
	g, wd, err := fence.StartWatchdog(cc.Lease.Watchdog, cc.OnNoQuorum, cc.NoQuorumTimeout)
	if err != nil {
		return err
	}
	a.gate, a.watchdog = g, wd
	a.deferred.SetGate(g)
	a.clog.EnableLease(cc.Lease, cluster.LeaseHooks{Now: fence.Now, Extended: g.Extend, Fenced: a.onFenced, Before: a.reportPartialWrites})
	a.log.Info().Dur("lease", cc.Lease.Lease).Dur("watchdog", cc.Lease.Watchdog).Int("watchdog_pid", wd.PID()).
		Str("on_no_quorum", cc.OnNoQuorum.String()).Msg("fencing armed")
	return nil
}

// holdLease starts renewing and waits for the first lease: until then no
// member I/O may be done, mounts included. In a cluster whose level has no
// leases yet (a rolling upgrade under way) it waits for nothing: the
// renewals start when the level switches (onLevel).
func (a *Agent) holdLease(ctx context.Context) error {
	if a.gate == nil || a.clog.Level() < cluster.LevelLeases {
		return nil
	}
	a.startRenewals()
	if err := a.gate.WaitValid(ctx); err != nil {
		return fmt.Errorf("agent: first lease: %w", err)
	}
	return nil
}

// startRenewals starts this run's renewal loop, once.
func (a *Agent) startRenewals() {
	a.fenceMu.Lock()
	defer a.fenceMu.Unlock()
	if a.renewStop != nil {
		return
	}
	a.gate.Enforce()
	rctx, cancel := context.WithCancel(context.Background())
	a.renewStop = cancel
	a.wg.Go(func() { a.clog.RenewLoop(rctx) })
}

// onLevel hears the cluster's core level change (under the log's lock):
// at the lease level, member I/O needs a lease from this entry on.
func (a *Agent) onLevel(level int) {
	a.log.Info().Int("core_level", level).Msg("cluster core level raised")
	if level >= cluster.LevelLeases && a.gate != nil {
		a.gate.Enforce()
		go a.startRenewals()
	}
}

// stopLease ends the renewals and the watchdog (after the last member
// I/O of a clean stop, or when startup failed).
func (a *Agent) stopLease() {
	a.fenceMu.Lock()
	if a.renewStop != nil {
		a.renewStop()
	}
	a.fenceMu.Unlock()
	if a.watchdog != nil {
		a.watchdog.Stop()
	}
}

// sharedOptions opens a member of a set other hosts may hold.
func (a *Agent) sharedOptions() device.Options {
	o := device.Options{Direct: true, Shared: true}
	if a.gate != nil {
		o.Fence = a.gate.Handle()
	}
	return o
}

// acknowledgeFence is the VU's last check before it acknowledges a
// write: the lease of the run that opened the members must still hold
// (waiting as the on-no-quorum policy says), so that a host declared
// failed while its reply was pending fails the write instead (nil: no
// fencing).
func (a *Agent) acknowledgeFence() func() error {
	if a.gate == nil {
		return nil
	}
	h := a.gate.Handle()
	return func() error {
		if err := h.Enter(); err != nil {
			return err
		}
		h.Exit()
		return nil
	}
}

// onFenced runs under the log's lock when this run is declared failed:
// the gate closes at once; the rest cannot wait for the lock.
func (a *Agent) onFenced(reason string, rejoin bool) {
	if a.gate != nil {
		a.gate.Fence()
	}
	a.fenceMu.Lock()
	a.fenceReason = reason
	a.fencedAt = time.Now()
	a.fenceMu.Unlock()
	a.log.Error().Str("reason", reason).Msg("fenced: this run's member I/O is over; its sets are dropped without writing (mount them again)")
	a.wg.Go(func() { a.afterFenced(rejoin) })
}

// afterFenced drops every set (its pending and future I/O fails) and,
// unless another run of this host's name took over, registers a new run.
func (a *Agent) afterFenced(rejoin bool) {
	for _, name := range a.setNames() {
		vol, err := a.volume(name)
		if err != nil {
			continue
		}
		a.nbd.RemoveExport(name)
		a.mu.Lock()
		for op, r := range a.runs {
			if r.set == name {
				r.cancel()
				delete(a.runs, op)
			}
		}
		a.mu.Unlock()
		vol.remote.release()
		close(vol.stopCleaner)
		<-vol.cleanerDone
		_ = a.forgetVolume(vol)
		a.log.Warn().Str("vu", name).Msg("set dropped by the fenced run: mount it again to rejoin")
	}
	if !rejoin || a.ctx.Err() != nil {
		return
	}
	a.fenceMu.Lock()
	if a.renewStop != nil {
		a.renewStop()
		a.renewStop = nil
	}
	a.fenceMu.Unlock()
	inc := newIncarnation()
	a.gate.Reset()
	a.clog.Reincarnate(inc)
	for a.ctx.Err() == nil {
		ctx, cancel := context.WithTimeout(a.ctx, 30*time.Second)
		err := a.clog.Register(ctx, false)
		if err == nil {
			err = a.holdLease(ctx)
		}
		cancel()
		if err == nil {
			a.log.Info().Uint64("incarnation", inc).Msg("registered as a new run after fencing")
			return
		}
		a.log.Warn().Err(err).Msg("cannot register a new run after fencing; retrying")
		time.Sleep(time.Second)
	}
}

// reportPartialWrites runs before each renewal: a set whose write reached
// some members and not others while the lease was refused is aborted on
// this host with writes in flight (Table 8-1 row 3), so that the others
// merge it. It is the first entry this host makes once it reaches the
// log again.
func (a *Agent) reportPartialWrites() {
	for _, name := range a.setNames() {
		vol, err := a.volume(name)
		if err != nil || vol.vu == nil || !vol.vu.TakePartial() {
			continue
		}
		a.log.Error().Str("vu", name).Msg("a write reached only some members while the lease was refused: aborting the set here (Table 8-1 row 3)")
		if err := a.abortSet(name); err != nil {
			a.log.Error().Str("vu", name).Err(err).Msg("cannot abort the set after a partial write; retrying at the next renewal")
			vol.vu.MarkPartial()
		}
	}
}

// leaseShow is the fencing part of show.
func (a *Agent) leaseShow(cs *report.ClusterShow) {
	cc := a.cfg.Cluster
	cs.OnNoQuorum = cc.OnNoQuorum.String()
	cs.CoreLevel, cs.BuildLevel, cs.Behind = a.clog.Level(), cluster.CoreLevel(), a.clog.Behind()
	if len(cs.Behind) > 0 {
		cs.Warnings = append(cs.Warnings, fmt.Sprintf("rolling upgrade under way: hosts %v run an older core level; level %d switches on when they run this build", cs.Behind, cluster.CoreLevel()))
	}
	cs.Authenticated = a.node.Authenticated()
	if !cs.Authenticated {
		cs.Warnings = append(cs.Warnings, "the cluster's transports are not authenticated (no --gossip-key-file): any local process can speak raft")
	}
	var delay time.Duration
	a.elog.View(func(c *shadowset.Core) { delay = c.Delay() })
	cs.RecoveryDelayMs = delay.Milliseconds()
	leases := a.clog.Leases()
	byHost := map[string]cluster.LeaseView{}
	for _, v := range leases {
		byHost[v.Host] = v
		need := v.Config.RequiredDelay()
		switch {
		case delay < need:
			cs.Warnings = append(cs.Warnings, fmt.Sprintf("host %s: recovery delay %s is below lease + watchdog with drift and margin (%s): a cut-off host could write after the others merge", v.Host, delay, need.Round(time.Millisecond)))
		case delay < need+need/5:
			cs.Warnings = append(cs.Warnings, fmt.Sprintf("host %s: recovery delay %s leaves less than 20%% margin over lease + watchdog (%s)", v.Host, delay, need.Round(time.Millisecond)))
		}
	}
	for i := range cs.Hosts {
		h := &cs.Hosts[i]
		if h.Host == a.host && a.gate != nil {
			st := a.gate.Snapshot()
			h.Lease, h.LeaseLeftMs = st.State, &st.LeftMs
			cs.Fence = &report.FenceShow{LeaseMs: cc.Lease.Lease.Milliseconds(), WatchdogMs: cc.Lease.Watchdog.Milliseconds(),
				RequiredDelayMs: cc.Lease.RequiredDelay().Milliseconds(), Outstanding: st.Outstanding, Refused: st.Refused,
				Waited: st.Waited, Lapses: st.Lapses, WatchdogPID: a.watchdog.PID()}
			a.fenceMu.Lock()
			if a.fenceReason != "" {
				cs.Fence.LastFenced = a.fenceReason + " at " + a.fencedAt.Format(time.RFC3339)
			}
			a.fenceMu.Unlock()
			continue
		}
		v, ok := byHost[h.Host]
		switch {
		case cs.CoreLevel < cluster.LevelLeases:
			h.Lease = "off"
		case !ok:
			h.Lease = "none"
		case h.State == "failed":
			h.Lease = "fenced"
		case v.SinceRenewal >= 0 && v.SinceRenewal <= v.Config.Lease:
			h.Lease = "valid"
		default:
			h.Lease = "lapsed"
		}
	}
	own := a.gate == nil || a.gate.Valid()
	cs.Quorum = a.node.Leader() != "" && own
	if !cs.Quorum {
		cs.Warnings = append(cs.Warnings, "this host has no quorum: it decides nothing, and its member I/O "+map[bool]string{true: "waits", false: "fails"}[cc.OnNoQuorum == fence.SuspendIO])
	}
}

// applyHeld is what a volume's writes wait on (nil: a cluster of one).
func (a *Agent) applyHeld() *atomic.Bool {
	if a.deferred == nil {
		return nil
	}
	return a.deferred.Held()
}
