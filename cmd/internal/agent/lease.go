package agent

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
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

// Apply-path member I/O. The log's hooks run in log order under its lock,
// and some of them do member I/O (the metadata writer records a change,
// a member another host added is opened and read). With the lease not
// valid, that I/O would wait at the gate for a renewal that can only be
// applied after the very entry being applied: the host would stall until
// the no-quorum timeout (found by TestClusterE2EQuorumLost: quorum back,
// the leader records a failure before its own renewal). So, while the
// lease is not valid with a margin, such work is queued, in log order,
// and done once the lease is back; while any is queued, application
// writes wait (so none can miss a member another host added), and this
// host's answer to "have you applied index k?" waits too (so a change is
// in force only once its metadata is written).

// applyMargin: the lease must have at least this long left for the
// apply path to do member I/O itself.
const applyMargin = 250 * time.Millisecond

// applyWork runs fn now, or queues it behind earlier queued work (the
// caller holds the log's lock).
func (a *Agent) applyWork(fn func(queued bool)) {
	a.applyMu.Lock()
	if len(a.applyQueue) == 0 && (a.gate == nil || !a.gate.Enforcing() || a.gate.ValidFor(applyMargin)) {
		a.applyMu.Unlock()
		fn(false)
		return
	}
	a.applyQueue = append(a.applyQueue, fn)
	a.applyHeld.Store(true)
	start := len(a.applyQueue) == 1
	a.applyMu.Unlock()
	if start {
		a.wg.Go(a.drainApplyWork)
	}
}

// drainApplyWork does the queued work once the lease is valid again.
func (a *Agent) drainApplyWork() {
	for {
		if err := a.gate.WaitValid(a.ctx); err != nil {
			// Fenced (the sets are being dropped) or stopping.
			a.applyMu.Lock()
			a.applyQueue = nil
			a.applyHeld.Store(false)
			a.applyMu.Unlock()
			return
		}
		a.applyMu.Lock()
		if len(a.applyQueue) == 0 {
			a.applyHeld.Store(false)
			a.applyMu.Unlock()
			return
		}
		fn := a.applyQueue[0]
		a.applyMu.Unlock()
		fn(true)
		a.applyMu.Lock()
		a.applyQueue = a.applyQueue[1:]
		a.applyMu.Unlock()
	}
}

// settleApplied waits until no apply-path work is queued.
func (a *Agent) settleApplied(ctx context.Context) error {
	for a.applyHeld.Load() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("agent: changes applied but not yet written (no lease): %w", ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}
