package agent

import (
	"context"
	"errors"
	"fmt"
	"github.com/shadow-project/shadow/cmd/internal/masters"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/cluster"
	"github.com/shadow-project/shadow/cmd/internal/device"
	"github.com/shadow-project/shadow/cmd/internal/fence"
	"github.com/shadow-project/shadow/cmd/internal/meta"
	"github.com/shadow-project/shadow/cmd/internal/nbd"
	"github.com/shadow-project/shadow/cmd/internal/report"
	"github.com/shadow-project/shadow/cmd/internal/vu"
	"github.com/shadow-project/shadow/cmd/internal/window"
	"github.com/shadow-project/shadow/shadowset"
)

// ClusterConfig joins the agent to a cluster.
type ClusterConfig struct {
	// Listen is the gossip address (UDP and TCP); raft and forwarding
	// use the next TCP port.
	Listen string
	// Join lists gossip addresses of hosts already in the cluster; none:
	// this host forms a new cluster (or resumes its own from StateDir).
	Join     []string
	StateDir string
	// Witness: a voter that mounts nothing (a two-host cluster's third
	// vote).
	Witness   bool
	GossipKey []byte
	Timing    cluster.Timing
	// Lease and watchdog (Lease 0: fencing off, for benchmarks only);
	// what member I/O does without a lease, and for how long it waits.
	Lease           cluster.LeaseConfig
	OnNoQuorum      fence.Policy
	NoQuorumTimeout time.Duration
	// StandbyTimeout: under write policy active, how long a standby may
	// take to acknowledge a bit-set before it is behind (0: the default).
	StandbyTimeout time.Duration
}

// startCluster joins the cluster and declares this run's incarnation: its
// first entry, which fails the previous run if the log still has it up.
func (a *Agent) startCluster() error {
	cc := a.cfg.Cluster
	// The apply path's member I/O waits for no lease while the lease is
	// about to lapse or lapsed (fence.Deferred): 250 ms of margin.
	a.deferred = fence.NewDeferred(a.ctx, nil, 250*time.Millisecond, a.wg.Go)
	a.clog = cluster.NewLog(a.host, newIncarnation(), cluster.Hooks{Applied: a.applyCluster, Window: a.onWindow, Level: a.onLevel})
	if err := a.startLease(); err != nil {
		return err
	}
	if a.cfg.RecoveryDelay != nil {
		a.clog.SetRegisterDelay(*a.cfg.RecoveryDelay)
	}
	inc := a.clog.Incarnation()
	node, err := cluster.Start(cluster.NodeConfig{
		Host: a.host, Listen: cc.Listen, Join: cc.Join, StateDir: cc.StateDir, Witness: cc.Witness,
		GossipKey: cc.GossipKey, Timing: cc.Timing, Logger: a.log, FSM: a.clog, Reconciler: a.clog,
		Bitmaps: func(c net.Conn) { masters.Serve(a.ctx, c, a.host, inc, a.mstore, a.log) },
	})
	if err != nil {
		a.stopLease()
		return err
	}
	a.node = node
	a.mstore.SetResetCheck(a.allowRemoteReset)
	a.mpool = masters.NewPool(a.host, inc, func(ctx context.Context, host string) (net.Conn, error) {
		return node.DialBitmaps(host, 2*time.Second)
	}, a.log)
	node.SetSettle(a.deferred.Settle)
	a.clog.Attach(node)
	a.elog = a.clog
	ctx, cancel := context.WithTimeout(a.ctx, 60*time.Second)
	defer cancel()
	if err := a.clog.Register(ctx, cc.Witness); err != nil {
		node.Shutdown()
		a.stopLease()
		return fmt.Errorf("agent: join the cluster's log: %w", err)
	}
	if err := a.holdLease(ctx); err != nil {
		node.Shutdown()
		a.stopLease()
		return err
	}
	a.log.Info().Str("host", a.host).Str("gossip", cc.Listen).Strs("join", cc.Join).Bool("witness", cc.Witness).Str("leader", node.Leader()).Msg("cluster joined")
	return nil
}

// stopCluster leaves the cluster (graceful) or just stops.
func (a *Agent) stopCluster(graceful bool) {
	if a.node == nil {
		return
	}
	a.stopLease()
	if graceful {
		a.node.Leave()
	} else {
		a.node.Shutdown()
	}
}

// clustered reports whether other hosts may share this agent's sets.
func (a *Agent) clustered() bool { return a.clog != nil }

// applyCluster is the cluster log's hook: the core's decisions, then what
// another host's change means for this host's view of a set it mounts.
func (a *Agent) applyCluster(ev shadowset.Event, origin string, rd shadowset.Ready) {
	a.apply(rd)
	if origin != a.host {
		switch ev.Kind {
		case shadowset.EvRemoveMember:
			a.deferred.Do(func(bool) { a.remoteRemoved(ev.Set, ev.Member, ev.Minicopy, "") })
		case shadowset.EvIOError:
			// The expelling host keeps the automatic minicopy bitmap:
			// this host's chunks not yet flushed to the member go there.
			a.deferred.Do(func(bool) { a.remoteRemoved(ev.Set, ev.Member, true, origin) })
		case shadowset.EvAddMember:
			a.deferred.Do(func(queued bool) { a.remoteAdded(ev.Set, ev.Member, !queued) })
		}
	}
	a.syncMetaAll(ev)
}

// attachHBMM gives a volume its master store entry and remote sink (the
// apply path then follows the core's masters: syncHBMM). Under a.mu.
func (a *Agent) attachHBMM(vol *volume) {
	_ = a.mstore.Open(vol.name, vol.bm.chunkSize)
	vol.bm.closeRemote = a.mstore.Close
	vol.hbw = newHBMMWriter(a, vol)
}

// detachHBMM is the end of a volume's HBMM on this host.
func (a *Agent) detachHBMM(vol *volume) {
	if vol.hbw == nil {
		return
	}
	vol.bm.tracker.SetRemote(nil)
	vol.hbw.stop()
	a.mstore.Close(vol.name)
}

// remoteRemoved takes out of this host's VU a member another host
// removed or expelled (that host wrote the metadata). With a minicopy
// bitmap on that host, the apply path has already made it a target of
// this host's bit-sets (syncHBMM); the cache of known-set chunks is
// emptied again with no write in flight, so that every write the member
// misses from here on records its chunks there first.
//
// gatherTo names the host that expelled the member after an I/O error:
// the chunks this host had not flushed when the member left its I/O path
// may be missing from the member, and go to that host's automatic
// minicopy bitmap (gatherUnflushed).
func (a *Agent) remoteRemoved(set, path string, minicopy bool, gatherTo string) {
	vol, err := a.volume(set)
	if err != nil {
		return // not mounted here
	}
	vol.mdMu.Lock()
	m, ok := vol.members[path]
	delete(vol.members, path)
	vol.mdMu.Unlock()
	if !ok {
		return
	}
	var unflushed *bitmap.Bitmap
	if minicopy {
		vol.quiesce(func() {
			vol.bm.tracker.Invalidate()
			if gatherTo != "" {
				// (With no write in flight and before any later flush,
				// which would no longer reach the member.)
				unflushed = vol.bm.sinceFlush.Snapshot()
			}
			err = vol.vu.RemoveMember(path)
		})
	} else {
		err = vol.vu.RemoveMember(path)
	}
	if err != nil {
		a.log.Warn().Str("vu", set).Str("member", path).Err(err).Msg("cannot drop a member another host removed")
	}
	vol.retire(m.dev)
	a.log.Warn().Str("vu", set).Str("member", path).Msg("member removed by another host")
	if unflushed != nil && err == nil {
		// Not on the apply path (this may run under the log's lock, and
		// the stream to the holder may need the log to be dialed).
		a.wg.Go(func() { a.gatherUnflushed(vol, path, gatherTo, unflushed) })
	}
}

// remoteAdded opens a member another host added, so that this host's
// writes reach it before its copy starts. inApply: the caller runs under
// the log's lock.
func (a *Agent) remoteAdded(set, path string, inApply bool) {
	vol, err := a.volume(set)
	if err != nil {
		return // not mounted here
	}
	vol.mdMu.Lock()
	_, dup := vol.members[path]
	vol.mdMu.Unlock()
	if dup {
		return
	}
	vol.closeRetired(path)
	dev, err := a.cfg.OpenDevice(path, a.sharedOptions())
	if err != nil {
		a.log.Error().Str("vu", set).Str("member", path).Err(err).Msg("cannot open a member another host added: this host's writes miss it")
		return
	}
	md, _, err := meta.Read(dev)
	if err != nil {
		dev.Close()
		a.log.Error().Str("vu", set).Str("member", path).Err(err).Msg("cannot read the metadata of a member another host added")
		return
	}
	m := &memberRT{path: path, dev: dev, uuid: md.MemberUUID}
	vol.mdMu.Lock()
	vol.members[path] = m
	vol.md.Members = slices.DeleteFunc(vol.md.Members, func(x meta.Member) bool { return x.UUID == m.uuid })
	vol.md.Members = append(vol.md.Members, meta.Member{UUID: m.uuid, Role: meta.RoleCopyTarget, PathHint: path})
	vol.md.Generation, vol.md.History = md.Generation, md.History
	vol.mdMu.Unlock()
	if err := vol.vu.AddMember(vu.MemberSpec{Dev: dev, Role: vu.CopyTarget}); err != nil {
		a.log.Error().Str("vu", set).Str("member", path).Err(err).Msg("cannot add a member another host added")
		return
	}
	// Writes reach it now: stop recording them in its minicopy bitmap on
	// another host.
	var sv shadowset.SetView
	var ok bool
	if inApply {
		sv, ok = a.viewLocked(set)
	} else {
		sv, ok = a.setView(set)
	}
	if ok {
		a.mu.Lock()
		a.syncHBMM(vol, sv, inApply)
		a.mu.Unlock()
	}
}

// remoteWindow is the window another host's merge or copy holds on a set
// this host mounts: this host holds the range lock over it, so none of
// its writes are in flight there while the engine works.
type remoteWindow struct {
	mu     sync.Mutex
	seq    uint64
	unlock func()
}

// release drops the range lock held for the window, if any.
func (rw *remoteWindow) release() {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	rw.seq = 0
	if rw.unlock != nil {
		rw.unlock()
		rw.unlock = nil
	}
}

// onWindow is the cluster log's window hook (under the log's lock): take
// the range lock over another host's window, which waits for this host's
// writes in flight there and holds back new ones, then acknowledge.
func (a *Agent) onWindow(set string, w *cluster.Window) {
	a.mu.Lock()
	vol := a.sets[set]
	a.mu.Unlock()
	if vol == nil || vol.vu == nil {
		return
	}
	rw := &vol.remote
	rw.mu.Lock()
	if w != nil && rw.seq == w.Seq {
		rw.mu.Unlock()
		return // held already
	}
	if rw.unlock != nil {
		rw.unlock()
		rw.unlock = nil
	}
	rw.seq = 0
	if w == nil || w.Host == a.host {
		rw.mu.Unlock()
		return
	}
	rw.seq = w.Seq
	rw.mu.Unlock()
	seq, lo, n := w.Seq, w.Lo, w.Hi-w.Lo
	a.wg.Go(func() {
		unlock := vol.vu.Lock(lo, n)
		rw.mu.Lock()
		if rw.seq != seq {
			rw.mu.Unlock()
			unlock()
			return
		}
		rw.unlock = unlock
		rw.mu.Unlock()
		ctx, cancel := context.WithTimeout(a.ctx, 30*time.Second)
		defer cancel()
		busy := time.Since(time.Unix(0, vol.lastWrite.Load())) < time.Second
		if err := a.clog.AckBusy(ctx, set, seq, busy); err != nil && ctx.Err() == nil {
			a.log.Warn().Str("vu", set).Uint64("window", seq).Err(err).Msg("cannot acknowledge a merge window")
		}
	})
}

// claimer returns the walk's Claim for an op on a shared set (nil off a
// cluster): before a chunk, the window covering it must be acknowledged by
// every other host that mounts the set. next, for a bitmap op, finds its
// next chunk with work (nil for a full op).
func (a *Agent) claimer(ctx context.Context, vol *volume, act shadowset.Action, next func(off int64) (int64, bool)) *window.Claim {
	if !a.clustered() {
		return nil
	}
	return window.NewClaim(vol.size, next, func(lo, hi int64) error {
		return a.clog.Announce(ctx, act.Set, act.Op, lo, hi)
	})
}

// errRetryJoin: the set turned out to be held by another host: mount it as
// a joining host instead.
var errRetryJoin = errors.New("agent: set is mounted on another host")

// mountClustered mounts a set in a cluster: a joining mount if another
// host holds it, else a first mount (which may lose a race to another
// host's first mount and then joins).
func (a *Agent) mountClustered(args MountArgs) (*MountResult, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		var sv shadowset.SetView
		var defined bool
		a.elog.View(func(c *shadowset.Core) { sv, defined = c.Set(args.Set) })
		var res *MountResult
		var err error
		switch {
		case defined && len(sv.Mounted) > 0:
			res, err = a.mountJoin(args, sv)
			if errors.Is(err, cluster.ErrNotMounted) {
				err = errRetryJoin
			}
		case defined:
			// Mounted nowhere: what the log remembers of it (ops of hosts
			// that are gone) yields to its members' metadata.
			if ferr := a.elog.Append(shadowset.Event{Kind: shadowset.EvForgetSet, Set: args.Set}); ferr != nil {
				err = errRetryJoin
				break
			}
			res, err = a.mountNew(args)
		default:
			res, err = a.mountNew(args)
		}
		if !errors.Is(err, errRetryJoin) || time.Now().After(deadline) {
			return res, err
		}
		a.log.Info().Str("vu", args.Set).Msg("another host is mounting the set: joining it")
		time.Sleep(200 * time.Millisecond)
	}
}

// mountJoin mounts a set another host holds: the members the log lists,
// opened shared and direct; no metadata is written (the first host made
// the set dirty, and it stays so while any host mounts it).
func (a *Agent) mountJoin(args MountArgs, sv shadowset.SetView) (res *MountResult, err error) {
	for _, p := range args.Members {
		if !slices.ContainsFunc(sv.Members, func(m shadowset.MemberView) bool { return m.Name == p }) {
			return nil, fmt.Errorf("mount %s: %s is not a member of the set as mounted on %v (add members on a mounted set one at a time)", args.Set, p, sv.Mounted)
		}
	}
	var devs []device.Device
	defer func() {
		if err != nil {
			for _, d := range devs {
				d.Close()
			}
		}
	}()
	var md *meta.Metadata
	size := int64(-1)
	vol := &volume{name: args.Set, members: map[string]*memberRT{}, stopCleaner: make(chan struct{}), cleanerDone: make(chan struct{}), stamp: a.stamp, applyHeld: a.applyHeld()}
	var specs []vu.MemberSpec
	for _, mv := range sv.Members {
		dev, err := a.cfg.OpenDevice(mv.Name, a.sharedOptions())
		if err != nil {
			return nil, fmt.Errorf("mount %s: %w", args.Set, err)
		}
		devs = append(devs, dev)
		data, _, err := meta.Layout(dev.Size())
		if err != nil {
			return nil, fmt.Errorf("mount %s: %s: %w", args.Set, mv.Name, err)
		}
		m, _, err := meta.Read(dev)
		if err != nil {
			return nil, fmt.Errorf("mount %s: %s: %w", args.Set, mv.Name, err)
		}
		if m.SetName != args.Set || (md != nil && m.SetUUID != md.SetUUID) {
			return nil, fmt.Errorf("mount %s: %s belongs to %s (set %s), not to the set the cluster mounts", args.Set, mv.Name, m.SetName, m.SetUUID)
		}
		if err := a.heldElsewhere(m, args.Overwrite); err != nil {
			return nil, fmt.Errorf("mount %s: %s: %w", args.Set, mv.Name, err)
		}
		if md == nil || m.Generation.Number > md.Generation.Number {
			md = m
		}
		if size < 0 || data < size {
			size = data
		}
		rt := &memberRT{path: mv.Name, dev: dev, uuid: m.MemberUUID}
		role := vu.Full
		if mv.Role == shadowset.CopyTarget {
			role = vu.CopyTarget
			rt.checkpoint.Store(m.CopyCheckpoint)
		}
		vol.members[mv.Name] = rt
		specs = append(specs, vu.MemberSpec{Dev: dev, Role: role})
	}
	vol.md = *md
	vol.size = size
	if vol.bm, err = newBitmaps(bitmap.DefaultChunkSize); err != nil {
		return nil, err
	}
	if sv.Controller {
		// This host logs its writes in a slot of its own.
		probes := make([]*probe, len(devs))
		for i, d := range devs {
			probes[i] = &probe{dev: d}
		}
		if err := a.attachOwnSlot(args.Set, probes, size); err != nil {
			return nil, fmt.Errorf("mount %s: %w", args.Set, err)
		}
		defer func() {
			if err != nil {
				a.freeOwnSlotAfterFailedMount(args.Set)
			}
		}()
		vol.writeLog = true
		for i, sp := range specs {
			for _, rt := range vol.members {
				if rt.dev == sp.Dev {
					rt.dev = probes[i].dev
				}
			}
			specs[i].Dev = probes[i].dev
			devs[i] = probes[i].dev
		}
	}
	vol.dirty.Store(true)
	v, err := vu.New(vu.Config{Name: args.Set, Size: size, Members: specs, Logger: a.log, Shared: true, Acknowledge: a.acknowledgeFence(),
		Expel: func(path string, cause error) error { return a.expel(vol, path, cause) }, Gate: vol})
	if err != nil {
		return nil, err
	}
	vol.vu = v
	a.mu.Lock()
	if a.sets[args.Set] != nil {
		a.mu.Unlock()
		return nil, fmt.Errorf("mount %s: already mounted here", args.Set)
	}
	a.attachHBMM(vol)
	a.sets[args.Set] = vol
	a.mu.Unlock()
	if err := a.clog.Join(args.Set); err != nil {
		a.mu.Lock()
		delete(a.sets, args.Set)
		a.mu.Unlock()
		a.detachHBMM(vol)
		return nil, err
	}
	// Members added or removed between the view this mount opened and the
	// moment the set was registered here reached no hook: catch up. From
	// here on, the hooks keep the VU in step.
	if now, ok := a.setView(args.Set); ok {
		for _, mv := range now.Members {
			if !slices.ContainsFunc(sv.Members, func(o shadowset.MemberView) bool { return o.Name == mv.Name }) {
				a.remoteAdded(args.Set, mv.Name, false)
			}
		}
		for _, mv := range sv.Members {
			if !slices.ContainsFunc(now.Members, func(o shadowset.MemberView) bool { return o.Name == mv.Name }) {
				a.remoteRemoved(args.Set, mv.Name, true, "")
			}
		}
	}
	if err := a.nbd.AddExport(nbd.Export{Name: args.Set, Description: "shadow set " + args.Set, Backend: v}); err != nil {
		_ = a.dismountSet(args.Set)
		return nil, fmt.Errorf("mount %s: %w", args.Set, err)
	}
	go vol.cleaner(a)
	a.log.Info().Str("vu", args.Set).Int64("size", size).Strs("mounted_on", sv.Mounted).Msg("mounted (joining the hosts that hold it)")
	return &MountResult{Set: args.Set, URI: a.URI(args.Set), Size: size}, nil
}

// mountedElsewhere reports whether another host mounts the set (the
// caller holds the log's lock or reads a fresh view).
func (a *Agent) mountedElsewhere(set string) bool {
	sv, ok := a.setView(set)
	if !ok {
		return false
	}
	return slices.ContainsFunc(sv.Mounted, func(h string) bool { return h != a.host })
}

func (a *Agent) clusterShow() *report.ClusterShow {
	if a.node == nil {
		return nil
	}
	cs := &report.ClusterShow{Leader: a.node.Leader(), Servers: a.node.Servers()}
	defer a.leaseShow(cs)
	alive := a.node.Alive()
	var hosts []shadowset.HostView
	a.elog.View(func(c *shadowset.Core) { hosts = c.Hosts() })
	seen := map[string]bool{}
	voter := func(h string) bool {
		return slices.ContainsFunc(cs.Servers, func(s cluster.Server) bool { return s.Host == h && s.Voter })
	}
	for _, h := range hosts {
		st := "failed"
		g := slices.ContainsFunc(alive, func(p cluster.Peer) bool { return p.Host == h.Name })
		switch {
		case h.Alive && !g && a.clog.LeftCleanly(h.Name):
			st = "left"
		case h.Alive:
			st = "up"
		}
		cs.Hosts = append(cs.Hosts, report.HostShow{Host: h.Name, State: st, Gossip: g, Leader: h.Name == cs.Leader, Voter: voter(h.Name)})
		seen[h.Name] = true
	}
	for _, p := range alive {
		if !seen[p.Host] {
			cs.Hosts = append(cs.Hosts, report.HostShow{Host: p.Host, State: "up", Gossip: true, Witness: p.Witness, Leader: p.Host == cs.Leader, Voter: voter(p.Host)})
		}
	}
	voters, up := 0, 0
	for _, s := range cs.Servers {
		if s.Voter {
			voters++
			if slices.ContainsFunc(alive, func(p cluster.Peer) bool { return p.Host == s.Host }) {
				up++
			}
		}
	}
	if up-1 < voters/2+1 {
		cs.Warnings = append(cs.Warnings, fmt.Sprintf("the cluster cannot survive the loss of one host: %d of %d raft voters up, %d needed for a quorum", up, voters, voters/2+1))
	}
	return cs
}

// One metadata writer per set. On a set several hosts mount, the members'
// metadata is written by one host only: the first, by name, of those the
// log has mounting it (the first to mount writes the dirty flag, the last
// to dismount the clean flag, and they are the writer then). The writer
// makes the metadata say what the log says whenever a change reaches it
// (membership, roles, copy checkpoints), reading the members' newest
// metadata first, because the previous writer may have been another host.
// Since the writer is a function of the log, two hosts never write one
// slot; a host that stops being the writer has applied the entry that
// says so before the next one acts on it, except across a handover where
// the previous writer lags behind the log (the fencing issue's leases
// close that).

// writesMetaLocked reports whether this host writes set's metadata (under
// the log's lock).
func (a *Agent) writesMetaLocked(set string) bool {
	if !a.clustered() {
		return true
	}
	sv, ok := a.elog.Locked().Set(set)
	return ok && len(sv.Mounted) > 0 && sv.Mounted[0] == a.host
}

// metaEvent reports whether an event may change what a set's metadata
// says, or who writes it.
func metaEvent(ev shadowset.Event, sv shadowset.SetView) bool {
	switch ev.Kind {
	case shadowset.EvIOError, shadowset.EvRemoveMember, shadowset.EvAddMember, shadowset.EvComplete,
		shadowset.EvDismount, shadowset.EvHostFailed, shadowset.EvMount:
		return true
	case shadowset.EvProgress:
		// Copy checkpoints live in the target's metadata, so that a copy
		// continues after the whole cluster went down.
		return slices.ContainsFunc(sv.Ops, func(o shadowset.OpView) bool { return o.Kind.IsCopy() && o.State == shadowset.Running })
	}
	// With write logs the metadata says whether a merge is owed (any
	// event may start or end one: ticks, priorities, demands).
	return sv.Controller
}

// syncMetaAll runs after each applied event (under the log's lock): the
// writer of each affected set brings its metadata in line with the log.
func (a *Agent) syncMetaAll(ev shadowset.Event) {
	a.mu.Lock()
	vols := make([]*volume, 0, len(a.sets))
	for name, vol := range a.sets {
		if vol.vu != nil && (ev.Set == "" || ev.Set == name) {
			vols = append(vols, vol)
		}
	}
	a.mu.Unlock()
	for _, vol := range vols {
		sv, ok := a.elog.Locked().Set(vol.name)
		if !ok || !metaEvent(ev, sv) || !a.writesMetaLocked(vol.name) {
			continue
		}
		a.deferred.Do(func(queued bool) {
			if queued {
				// Queued: record the newest view, if this host still
				// writes the set's metadata.
				var writer bool
				a.elog.View(func(c *shadowset.Core) { sv, ok = c.Set(vol.name); writer = a.writesMetaLocked(vol.name) })
				if cur, err := a.volume(vol.name); err != nil || cur != vol || !ok || !writer {
					return
				}
			}
			if err := vol.syncMeta(sv); err != nil {
				a.log.Error().Str("vu", vol.name).Err(err).Msg("cannot record the set's state in its metadata")
			}
		})
	}
}

// reloadLocked replaces the in-memory metadata with the newest the
// members hold (the caller holds mdMu): another host may have written it
// since this one did.
func (vol *volume) reloadLocked(only func(path string) bool) {
	var newest *meta.Metadata
	for _, path := range sortedKeys(vol.members) {
		if only != nil && !only(path) {
			continue
		}
		md, _, err := meta.Read(vol.members[path].dev)
		if err != nil || md.SetUUID != vol.md.SetUUID {
			continue
		}
		if newest == nil || md.Generation.Number > newest.Generation.Number ||
			(md.Generation.Number == newest.Generation.Number && md.Seq > newest.Seq) {
			newest = md
		}
	}
	if newest != nil {
		vol.md = *newest
		vol.md.Members = slices.Clone(newest.Members)
		vol.md.History = slices.Clone(newest.History)
	}
}

// syncMeta writes, on every member the log lists, metadata that says what
// the log says: the member table and roles (a new generation when they
// changed), copy checkpoints, and dirty (the set is mounted).
func (vol *volume) syncMeta(sv shadowset.SetView) error {
	vol.mdMu.Lock()
	defer vol.mdMu.Unlock()
	inView := func(path string) bool {
		return slices.ContainsFunc(sv.Members, func(m shadowset.MemberView) bool { return m.Name == path })
	}
	vol.reloadLocked(inView)
	var table []meta.Member
	for _, mv := range sv.Members {
		rt := vol.members[mv.Name]
		if rt == nil {
			continue
		}
		role := meta.RoleFull
		if mv.Role == shadowset.CopyTarget {
			role = meta.RoleCopyTarget
		}
		table = append(table, meta.Member{UUID: rt.uuid, Role: role, PathHint: mv.Name})
	}
	for _, old := range vol.md.Members {
		if !slices.ContainsFunc(table, func(m meta.Member) bool { return m.UUID == old.UUID }) {
			old.Role = meta.RoleRemoved
			table = append(table, old)
		}
	}
	if !sameMembership(vol.md.Members, table) {
		vol.md.NextGeneration()
	}
	vol.md.Members = table
	vol.md.Dirty = true
	// A merge owed on a set with write logs: a crash before it completes
	// makes the next mount merge in full (Table 8-1's mount row), since
	// the slots it would read may have been emptied or retaken.
	vol.md.MergeUnderway = sv.Controller && slices.ContainsFunc(sv.Ops, func(o shadowset.OpView) bool { return o.Kind.IsMerge() })
	for _, op := range sv.Ops {
		if rt := vol.members[op.Target]; rt != nil && op.Kind.IsCopy() {
			rt.checkpoint.Store(op.LBN)
		}
	}
	var errs []error
	for _, path := range sortedKeys(vol.members) {
		if !inView(path) {
			continue // left the set: it keeps what it had
		}
		if err := vol.writeOneLocked(vol.members[path]); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// stamp is what this host writes into member metadata: its cluster, run
// and log index (zero for a cluster of one).
func (a *Agent) stamp() meta.ClusterStamp {
	if !a.clustered() {
		return meta.ClusterStamp{}
	}
	id, inc, index := a.clog.Stamp()
	return meta.ClusterStamp{UUID: meta.UUID(id), Incarnation: inc, LogIndex: index}
}

// heldElsewhere refuses a member whose set another cluster (or, for a
// single host, any cluster) holds and did not dismount cleanly: that
// cluster's hosts may still write it. Clean, it is free to take; with
// --overwrite the operator says that cluster is gone.
func (a *Agent) heldElsewhere(md *meta.Metadata, overwrite bool) error {
	if md == nil || md.Cluster.IsZero() || !md.Dirty || overwrite {
		return nil
	}
	mine := a.stamp()
	if !mine.IsZero() && mine.UUID == md.Cluster.UUID {
		return nil
	}
	return fmt.Errorf("%w: the set is held by cluster %s (written by incarnation %016x at log index %d) and was not dismounted cleanly; if that cluster is gone for good, --overwrite takes it",
		errHeld, md.Cluster.UUID, md.Cluster.Incarnation, md.Cluster.LogIndex)
}

// errHeld: a member's set belongs to another cluster.
var errHeld = errors.New("held by another cluster")
