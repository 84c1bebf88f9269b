package agent

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/cmd/internal/device"
	"github.com/shadow-project/shadow/cmd/internal/memberlog"
	"github.com/shadow-project/shadow/cmd/internal/meta"
	"github.com/shadow-project/shadow/cmd/internal/nbd"
	"github.com/shadow-project/shadow/cmd/internal/policy"
	"github.com/shadow-project/shadow/cmd/internal/vu"
	"github.com/shadow-project/shadow/shadowset"
)

// volume is one mounted virtual unit on this host.
type volume struct {
	name string
	vu   *vu.VU
	size int64
	// applyHeld: the agent's apply-path work is queued (lease.go);
	// writes wait for it.
	applyHeld *atomic.Bool

	mdMu    sync.Mutex // serialises metadata writes
	md      meta.Metadata
	members map[string]*memberRT // by path

	// copySource is the member copies read from ("" = the first full one).
	copySource atomic.Value

	// The dirty/clean protocol: writers hold cleanMu for reading while in
	// flight; marking clean takes it for writing, so no write is in
	// flight then.
	cleanMu   sync.RWMutex
	dirty     atomic.Bool
	lastWrite atomic.Int64 // unix nanos
	// flushedWrite is the lastWrite an idle flush covered (a cluster's
	// write-log sets, which are never marked clean while shared).
	flushedWrite atomic.Int64

	// mergeFence says what the running merge on this host still owes
	// (nil when no merge runs here).
	mergeFence mergeFence

	// startedMerge is the kind of the first merge started on the set
	// (guarded by Agent.mu): what its mount required.
	startedMerge string

	// bm holds the set's write bitmaps; writeLog: the set keeps write logs
	// on its members (controller minimerge) instead of HBMM.
	bm *bitmaps
	// hbw is the set's remote sink: the other HBMM masters (hbmm.go).
	hbw      *hbmmWriter
	writeLog bool

	stopCleaner chan struct{}
	cleanerDone chan struct{}

	// remote is the window another host's merge or copy holds on the set
	// (a cluster).
	remote remoteWindow
	// mergedSlots are the write-log slots of departed hosts the
	// controller minimerge running here covers (guarded by Agent.mu).
	mergedSlots []int
	// stamp is the cluster stamp written into the metadata (zero for a
	// cluster of one).
	stamp func() meta.ClusterStamp

	retiredMu sync.Mutex
	retired   []device.Device
	// expelMu serialises expulsions: concurrent requests failing on one
	// member expel it once.
	expelMu sync.Mutex
}

func (vol *volume) retire(d device.Device) {
	vol.retiredMu.Lock()
	defer vol.retiredMu.Unlock()
	vol.retired = append(vol.retired, d)
}

// closeRetired closes the retired devices opened by path.
func (vol *volume) closeRetired(path string) {
	vol.retiredMu.Lock()
	defer vol.retiredMu.Unlock()
	vol.retired = slices.DeleteFunc(vol.retired, func(d device.Device) bool {
		if d.Path() != path {
			return false
		}
		_ = d.Close()
		return true
	})
}

// memberRT is one open member.
type memberRT struct {
	path string
	dev  device.Device
	uuid meta.UUID
	// checkpoint is a copy target's durable copy checkpoint (LBN).
	checkpoint atomic.Uint64
}

// progressFence is a full merge's progress: bytes at or above it are still owed.
type progressFence struct{ at atomic.Int64 }

// Pending implements vu.MergeWork.
func (f *progressFence) Pending(off, n int64) bool { return off+n > f.at.Load() }

// advance moves the fence to a checkpoint.
func (f *progressFence) advance(off int64) { f.at.Store(off) }

// mergeFence is a running merge's progress, full or over a bitmap.
type mergeFence interface {
	Pending(off, n int64) bool
	advance(off int64)
}

// MountArgs is the mount verb.
type MountArgs struct {
	Set     string   `json:"set"`
	Members []string `json:"members"`
	// Include mounts the members the newest metadata lists, besides the
	// named ones.
	Include bool `json:"include,omitempty"`
	// Confirm allows a full copy onto a member that holds data.
	Confirm bool `json:"confirm,omitempty"`
	// Overwrite allows using a member that belongs to another set, whose
	// history shows it was written outside the set, or whose metadata is
	// corrupt.
	Overwrite bool `json:"overwrite,omitempty"`
	Direct    bool `json:"direct,omitempty"`
	// DirectMembers are members opened with O_DIRECT (Direct: all).
	DirectMembers []string `json:"direct_members,omitempty"`
	// WriteLog keeps write logs on the members (controller minimerge);
	// a set mounted before keeps what its metadata says.
	WriteLog bool `json:"write_log,omitempty"`
	// Policy is "minicopy" (a returning member must come back by
	// minicopy, else the mount fails), "minicopy=optional" or "".
	Policy string `json:"policy,omitempty"`
	// ChunkSize is the write bitmaps' chunk (a new mount; default 64 KiB).
	ChunkSize int64 `json:"chunk_size,omitempty"`
}

// direct says whether a member is opened with O_DIRECT.
func (m MountArgs) direct(path string) bool {
	return m.Direct || slices.Contains(m.DirectMembers, path)
}

// MountResult answers the mount verb.
type MountResult struct {
	Set     string   `json:"set"`
	URI     string   `json:"nbd_uri"`
	Size    int64    `json:"size_bytes"`
	Created bool     `json:"created"`
	Copies  []string `json:"copies,omitempty"`
	// Minicopies are the members among Copies that come back by minicopy.
	Minicopies []string `json:"minicopies,omitempty"`
	// Merge is the merge the mount requires ("full-merge" after a crash),
	// empty if none.
	Merge    string   `json:"merge,omitempty"`
	Warnings []string `json:"warnings,omitempty"`
}

// probe is what mount learns of one named member.
type probe struct {
	path     string
	dev      device.Device
	data     int64
	md       *meta.Metadata // nil: blank
	warnings []string
	// areaBlank: the reserved area is zero; blank: so is the data
	// region's first MiB.
	areaBlank, blank bool
}

const blankSample = 1 << 20

// role is what mount makes of a named member.
type role struct {
	full       bool
	checkpoint uint64 // for a copy target that was mid-copy
	copy       bool   // needs a (new) full copy
}

func (a *Agent) openProbe(path string, opts device.Options, overwrite bool) (*probe, error) {
	dev, err := a.cfg.OpenDevice(path, opts)
	if err != nil {
		return nil, err
	}
	p := &probe{path: path, dev: dev}
	fail := func(err error) (*probe, error) { dev.Close(); return nil, err }
	if p.data, _, err = meta.Layout(dev.Size()); err != nil {
		return fail(fmt.Errorf("%s: %w", path, err))
	}
	md, warns, err := meta.Read(dev)
	switch {
	case errors.Is(err, meta.ErrBlank):
	case err != nil && overwrite:
		p.warnings = append(p.warnings, fmt.Sprintf("%s: ignoring unreadable metadata (--overwrite): %v", path, err))
	case err != nil:
		return fail(fmt.Errorf("%s: %w (use --overwrite to reuse it)", path, err))
	default:
		p.md = md
	}
	p.warnings = append(p.warnings, warns...)
	dataBlank, err := meta.IsBlank(dev, 0, min(blankSample, p.data))
	if err != nil {
		return fail(err)
	}
	if p.areaBlank, err = meta.AreaIsBlank(dev); err != nil {
		return fail(err)
	}
	p.blank = dataBlank && p.areaBlank
	return p, nil
}

// mount mounts a set, or adds a member to a mounted one.
func (a *Agent) mount(args MountArgs) (*MountResult, error) {
	if err := shadowset.ValidSetName(args.Set); err != nil {
		return nil, err
	}
	if len(args.Members) == 0 {
		return nil, fmt.Errorf("mount %s: no --member given", args.Set)
	}
	for i, p := range args.Members {
		abs, err := filepath.Abs(p)
		if err != nil {
			return nil, err
		}
		args.Members[i] = abs
	}
	a.mu.Lock()
	vol := a.sets[args.Set]
	a.mu.Unlock()
	if vol != nil {
		return a.addMember(vol, args)
	}
	if a.clustered() {
		if a.cfg.Cluster.Witness {
			return nil, fmt.Errorf("mount %s: %s is a witness: it votes in the cluster and mounts nothing", args.Set, a.host)
		}
		return a.mountClustered(args)
	}
	return a.mountNew(args)
}

// memberOptions is how this host opens a member: in a cluster, shared
// with the other agents and with O_DIRECT (hosts on a SAN share no page
// cache, so none may trust its own).
func (a *Agent) memberOptions(args MountArgs, path string) device.Options {
	if a.clustered() {
		return a.sharedOptions()
	}
	return device.Options{Direct: args.direct(path)}
}

func closeProbes(ps []*probe) {
	for _, p := range ps {
		if p != nil && p.dev != nil {
			p.dev.Close()
		}
	}
}

func (a *Agent) mountNew(args MountArgs) (res *MountResult, err error) {
	if len(args.Members) > shadowset.MaxMembers {
		return nil, fmt.Errorf("mount %s: %d members, at most %d", args.Set, len(args.Members), shadowset.MaxMembers)
	}
	var probes []*probe
	defer func() {
		if err != nil {
			closeProbes(probes)
		}
	}()
	for _, path := range args.Members {
		if slices.ContainsFunc(probes, func(p *probe) bool { return p.path == path }) {
			return nil, fmt.Errorf("mount %s: %s named twice", args.Set, path)
		}
		p, err := a.openProbe(path, a.memberOptions(args, path), args.Overwrite)
		if err != nil {
			return nil, fmt.Errorf("mount %s: %w", args.Set, err)
		}
		probes = append(probes, p)
	}
	res = &MountResult{Set: args.Set}
	for _, p := range probes {
		res.Warnings = append(res.Warnings, p.warnings...)
	}

	// The newest metadata among the named members decides the set.
	var newest *probe
	for _, p := range probes {
		if p.md == nil {
			continue
		}
		if p.md.SetName != args.Set && !args.Overwrite {
			return nil, fmt.Errorf("mount %s: %s is a member of %s (set %s); use --overwrite to take it", args.Set, p.path, p.md.SetName, p.md.SetUUID)
		}
		if err := a.heldElsewhere(p.md, args.Overwrite); err != nil {
			return nil, fmt.Errorf("mount %s: %s: %w", args.Set, p.path, err)
		}
		if newest == nil || p.md.Generation.Number > newest.md.Generation.Number {
			newest = p
		}
	}
	if args.Include && newest != nil {
		for _, m := range newest.md.Members {
			if m.Role == meta.RoleRemoved || m.PathHint == "" || slices.ContainsFunc(probes, func(p *probe) bool { return p.path == m.PathHint }) {
				continue
			}
			if !fileExists(m.PathHint) {
				res.Warnings = append(res.Warnings, fmt.Sprintf("%s: member %s listed in the metadata is not present", m.PathHint, m.UUID))
				continue
			}
			p, err := a.openProbe(m.PathHint, a.memberOptions(args, m.PathHint), false)
			if err != nil {
				return nil, fmt.Errorf("mount %s --include: %w", args.Set, err)
			}
			probes = append(probes, p)
		}
	}

	roles := make([]role, len(probes))
	var md meta.Metadata
	wasDirty := false
	if newest == nil {
		// Creating: the first member named is the source; the others must
		// hold nothing we would overwrite.
		res.Created = true
		for i, p := range probes {
			if !p.blank && !args.Overwrite && (i > 0 || !p.areaBlank) {
				what := "data"
				if i == 0 {
					what = "its metadata area"
				}
				return nil, fmt.Errorf("mount %s: %s is not blank (%s); a new set copies the first member onto it: use --overwrite", args.Set, p.path, what)
			}
			roles[i] = role{full: i == 0, copy: i > 0}
		}
		md = meta.Metadata{SetUUID: meta.NewUUID(), SetName: args.Set}
		md.NextGeneration()
	} else {
		md = *newest.md
		md.Members = slices.Clone(newest.md.Members)
		md.History = slices.Clone(newest.md.History)
		wasDirty = md.Dirty
		for i, p := range probes {
			switch {
			case p.md == nil:
				if !p.blank && !args.Confirm && !args.Overwrite {
					return nil, fmt.Errorf("mount %s: %s holds data and would get a full copy: use --confirm", args.Set, p.path)
				}
				roles[i] = role{copy: true}
			case p.md.SetUUID != md.SetUUID:
				roles[i] = role{copy: true} // --overwrite took it
			default:
				switch meta.Relate(newest.md, p.md) {
				case meta.Same:
					me, _ := md.Member(p.md.MemberUUID)
					switch me.Role {
					case meta.RoleFull:
						roles[i] = role{full: true}
					case meta.RoleCopyTarget:
						roles[i] = role{checkpoint: p.md.CopyCheckpoint}
					default:
						roles[i] = role{copy: true}
					}
				case meta.Newer: // p missed membership changes: stale
					roles[i] = role{copy: true}
				default:
					if !args.Overwrite {
						return nil, fmt.Errorf("mount %s: %s has a generation history that does not match the set's (%s): it was written outside the set; use --overwrite", args.Set, p.path, meta.Relate(newest.md, p.md))
					}
					roles[i] = role{copy: true}
				}
			}
		}
		if !slices.ContainsFunc(roles, func(r role) bool { return r.full }) {
			return nil, fmt.Errorf("mount %s: no named member holds the set's current data (generation %s)", args.Set, md.Generation)
		}
	}

	if mcPolicy, err := policy.ParseMinicopyPolicy(args.Policy); err != nil {
		return nil, err
	} else if mcPolicy == policy.MinicopyRequired && slices.ContainsFunc(roles, func(r role) bool { return r.copy }) {
		return nil, fmt.Errorf("mount %s --policy minicopy: the set is not mounted here, so no minicopy bitmap exists: a member would get a full copy (use --policy minicopy=optional)", args.Set)
	}

	// The membership being mounted, as the metadata will say.
	size := int64(-1)
	var members []meta.Member
	for i, p := range probes {
		if size < 0 || p.data < size {
			size = p.data
		}
		u := meta.NewUUID()
		if p.md != nil && p.md.SetUUID == md.SetUUID && !roles[i].copy {
			u = p.md.MemberUUID
		}
		r := meta.RoleFull
		if !roles[i].full {
			r = meta.RoleCopyTarget
		}
		members = append(members, meta.Member{UUID: u, Role: r, PathHint: p.path})
	}
	if !res.Created && !sameMembership(md.Members, members) {
		md.NextGeneration()
	}
	md.Members = members
	md.Dirty = true

	chunk := args.ChunkSize
	if chunk == 0 {
		chunk = bitmap.DefaultChunkSize
	}
	bms, err := newBitmaps(chunk)
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", args.Set, err)
	}
	// Write logs: asked for, or recorded by the set's last mount.
	writeLog := args.WriteLog || md.WriteLog.Length != 0
	wasUnderway := md.MergeUnderway
	logs := memberlog.State{}
	if writeLog && a.clustered() {
		if logs.Logged, err = bitmap.New(chunk); err != nil {
			return nil, err
		}
		if err := a.attachClusterLogs(args.Set, probes, roles, wasDirty, md, size, &logs); err != nil {
			return nil, fmt.Errorf("mount %s: %w", args.Set, err)
		}
		defer func() {
			if err != nil {
				a.freeOwnSlotAfterFailedMount(args.Set)
			}
		}()
		bms.logged = logs.Logged
		// While the merge the logs call for is owed, a crash must make
		// the next mount merge in full: this mount is about to reuse
		// slots whose old content only this host's memory now holds.
		md.MergeUnderway = wasDirty
	} else if writeLog {
		if logs.Logged, err = bitmap.New(chunk); err != nil {
			return nil, err
		}
		for i, p := range probes {
			ld, err := memberlog.Attach(p.dev, size, wasDirty && roles[i].full, &logs)
			if err != nil {
				return nil, fmt.Errorf("mount %s: %w", args.Set, err)
			}
			p.dev = ld
		}
		bms.logged = logs.Logged
	}
	vol := &volume{name: args.Set, size: size, md: md, members: map[string]*memberRT{}, bm: bms, writeLog: writeLog, stamp: a.stamp, applyHeld: a.applyHeld(),
		stopCleaner: make(chan struct{}), cleanerDone: make(chan struct{})}
	var specs []vu.MemberSpec
	for i, p := range probes {
		m := &memberRT{path: p.path, dev: p.dev, uuid: members[i].UUID}
		m.checkpoint.Store(roles[i].checkpoint)
		vol.members[p.path] = m
		r := vu.Full
		if !roles[i].full {
			r = vu.CopyTarget
		}
		specs = append(specs, vu.MemberSpec{Dev: p.dev, Role: r})
	}
	// Tell the core, through the log: the set as the metadata recorded
	// it (dirty: a merge is owed; a copy target mid-copy: its copy), then
	// the mount, then the members that need a fresh copy. The set is
	// defined before any metadata is written: in a cluster, defining it is
	// what makes this host the one that mounts it first (a second host's
	// definition is refused and it joins instead), so two hosts never
	// write one metadata slot.
	spec := &shadowset.SetSpec{Name: args.Set, Dirty: wasDirty, Controller: writeLog}
	var ops []*shadowset.OpSpec
	var adds []string
	if wasDirty && writeLog {
		// The logs decide the merge, except where a merge was already
		// underway (Table 8-1's mount row makes it a full merge) or a log
		// could not be read (only a full merge is safe).
		switch {
		case wasUnderway:
			spec.Dirty = false
			ops = append(ops, &shadowset.OpSpec{Set: args.Set, Kind: shadowset.ControllerMinimerge})
			res.Warnings = append(res.Warnings, "a merge was underway when the set went down: full merge")
		case len(logs.Lost) > 0:
			spec.Dirty = false
			ops = append(ops, &shadowset.OpSpec{Set: args.Set, Kind: shadowset.FullMerge})
			res.Warnings = append(res.Warnings, "write log unusable, full merge: "+strings.Join(logs.Lost, "; "))
		}
	}
	for i, p := range probes {
		switch {
		case roles[i].full:
			spec.Members = append(spec.Members, p.path)
		case roles[i].copy:
			adds = append(adds, p.path)
		default:
			spec.Members = append(spec.Members, p.path)
			ops = append(ops, &shadowset.OpSpec{Set: args.Set, Kind: shadowset.FullCopy, Target: p.path, LBN: roles[i].checkpoint})
		}
	}
	forget := func() { _ = a.elog.Append(shadowset.Event{Kind: shadowset.EvForgetSet, Set: args.Set}) }
	if err := a.elog.Append(shadowset.Event{Kind: shadowset.EvDefineSet, Spec: spec}); err != nil {
		if a.clustered() && errors.Is(err, shadowset.ErrBadEvent) {
			if _, defined := a.setView(args.Set); defined {
				return nil, errRetryJoin
			}
		}
		return nil, fmt.Errorf("mount %s: %w", args.Set, err)
	}
	// The set is not mounted yet, so nothing runs: the view shows the
	// merge its metadata requires.
	if sv, ok := a.setView(args.Set); ok {
		for _, op := range sv.Ops {
			if op.Kind.IsMerge() {
				res.Merge = op.Kind.String()
			}
		}
	}
	for _, op := range ops {
		if err := a.elog.Append(shadowset.Event{Kind: shadowset.EvDefineOp, OpSpec: op}); err != nil {
			forget()
			return nil, fmt.Errorf("mount %s: %w", args.Set, err)
		}
	}
	// The dirty flag is durable on every member before the first write.
	if err := vol.writeAll(); err != nil {
		forget()
		return nil, fmt.Errorf("mount %s: %w", args.Set, err)
	}
	vol.dirty.Store(true)
	v, err := vu.New(vu.Config{Name: args.Set, Size: size, Members: specs, Logger: a.log, Shared: a.clustered(), Acknowledge: a.acknowledgeFence(),
		Expel: func(path string, cause error) error { return a.expel(vol, path, cause) },
		Gate:  vol})
	if err != nil {
		forget()
		return nil, err
	}
	vol.vu = v
	a.mu.Lock()
	a.attachHBMM(vol)
	a.sets[args.Set] = vol
	a.mu.Unlock()
	undo := func() {
		a.mu.Lock()
		delete(a.sets, args.Set)
		a.mu.Unlock()
		a.detachHBMM(vol)
	}
	evs := []shadowset.Event{{Kind: shadowset.EvMount, Set: args.Set, Host: a.host}}
	for _, p := range adds {
		evs = append(evs, shadowset.Event{Kind: shadowset.EvAddMember, Set: args.Set, Member: p})
	}
	for i, ev := range evs {
		err := a.elog.Append(ev)
		if err == nil && ev.Kind == shadowset.EvMount {
			// The mount row may change the merge (a controller minimerge
			// underway becomes a full merge): the merge the core started
			// on the mount is the one required.
			a.mu.Lock()
			if vol.startedMerge != "" {
				res.Merge = vol.startedMerge
			}
			a.mu.Unlock()
		}
		if err != nil {
			if i > 0 {
				_ = a.elog.Append(shadowset.Event{Kind: shadowset.EvDismount, Set: args.Set, Host: a.host})
			}
			forget()
			undo()
			return nil, fmt.Errorf("mount %s: %w", args.Set, err)
		}
	}
	if err := a.nbd.AddExport(nbd.Export{Name: args.Set, Description: "shadow set " + args.Set, Backend: v}); err != nil {
		_ = a.dismountSet(args.Set)
		return nil, fmt.Errorf("mount %s: %w", args.Set, err)
	}
	if _, ok := a.policies.Get(policy.PolicyDefault); ok && !vol.writeLog {
		// OpenVMS applies the policy named DEFAULT to a set mounted
		// without one.
		if err := a.applyHBMM(vol, hbmmSetting{enabled: true}); err != nil {
			res.Warnings = append(res.Warnings, "HBMM policy DEFAULT not applied: "+err.Error())
		}
	}
	go vol.cleaner(a)
	res.URI, res.Size, res.Copies = a.URI(args.Set), size, adds
	for _, w := range res.Warnings {
		a.log.Warn().Str("vu", args.Set).Msg(w)
	}
	a.log.Info().Str("vu", args.Set).Int64("size", size).Strs("members", args.Members).Bool("created", res.Created).Bool("was_dirty", wasDirty).Msg("mounted")
	return res, nil
}

func sameMembership(a, b []meta.Member) bool {
	if len(a) != len(b) {
		return false
	}
	for _, m := range b {
		if !slices.ContainsFunc(a, func(x meta.Member) bool { return x.UUID == m.UUID && x.Role == m.Role }) {
			return false
		}
	}
	return true
}

// addMember adds one member to a mounted set: a full copy.
func (a *Agent) addMember(vol *volume, args MountArgs) (*MountResult, error) {
	if len(args.Members) != 1 {
		return nil, fmt.Errorf("%s is mounted: add one member at a time", vol.name)
	}
	path := args.Members[0]
	vol.mdMu.Lock()
	_, dup := vol.members[path]
	vol.mdMu.Unlock()
	if dup {
		return nil, fmt.Errorf("%s is already a member of %s", path, vol.name)
	}
	// An expelled member's device is kept open until dismount (requests
	// in flight may still hold it); coming back, it is opened afresh.
	vol.closeRetired(path)
	p, err := a.openProbe(path, a.memberOptions(args, path), args.Overwrite)
	if err != nil {
		return nil, err
	}
	if vol.writeLog && p.data >= vol.size {
		ld, err := memberlog.Attach(p.dev, vol.size, false, nil)
		if err != nil {
			p.dev.Close()
			return nil, err
		}
		p.dev = ld
	}
	ok := false
	defer func() {
		if !ok {
			p.dev.Close()
		}
	}()
	if p.data < vol.size {
		return nil, fmt.Errorf("%s holds %d data bytes, %s needs %d", path, p.data, vol.name, vol.size)
	}
	if p.md != nil && p.md.SetUUID != vol.md.SetUUID && !args.Overwrite {
		return nil, fmt.Errorf("%s is a member of %s (set %s); use --overwrite to take it", path, p.md.SetName, p.md.SetUUID)
	}
	if p.md != nil && p.md.SetUUID != vol.md.SetUUID {
		if err := a.heldElsewhere(p.md, args.Overwrite); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	if p.md == nil && !p.blank && !args.Confirm && !args.Overwrite {
		return nil, fmt.Errorf("%s holds data and would get a full copy: use --confirm", path)
	}
	mcPolicy, err := policy.ParseMinicopyPolicy(args.Policy)
	if err != nil {
		return nil, err
	}
	res := &MountResult{Set: vol.name, URI: a.URI(vol.name), Size: vol.size, Copies: []string{path}, Warnings: p.warnings}
	// A returning member comes back by minicopy when this host kept its
	// bitmap and the member still records the generation it left at:
	// anything else means it was written outside the set.
	uuid := meta.NewUUID()
	mc := vol.bm.minicopyFor(path)
	why, remoteWhy := "", ""
	if mc == nil && a.clustered() {
		// Its bitmap may be on the host it left from.
		mc, remoteWhy = a.remoteMinicopyFor(vol, path, p.md)
		why = remoteWhy
	}
	switch {
	case why != "":
	case mc == nil:
		why = "no minicopy bitmap is kept for it"
	case p.md == nil || p.md.SetUUID != vol.md.SetUUID || p.md.MemberUUID != mc.uuid:
		why = "it is not the member that left"
	case len(vol.bm.gathering(mc)) > 0:
		why = fmt.Sprintf("the chunks %s had not flushed to it when it was expelled have not all arrived", strings.Join(vol.bm.gathering(mc), ","))
	case p.md.Generation != mc.gen:
		why = fmt.Sprintf("it was written outside the set (generation %s, it left at %s)", p.md.Generation, mc.gen)
	}
	if why != "" && mcPolicy == policy.MinicopyRequired {
		return nil, fmt.Errorf("%s cannot come back by minicopy: %s (use --policy minicopy=optional for a full copy)", path, why)
	}
	if why == "" {
		uuid = mc.uuid
		res.Minicopies = []string{path}
	} else if mc != nil || remoteWhy != "" {
		if mc != nil {
			vol.bm.dropMinicopy(path)
		}
		res.Warnings = append(res.Warnings, fmt.Sprintf("%s gets a full copy: %s", path, why))
	}
	m := &memberRT{path: path, dev: p.dev, uuid: uuid}
	vol.mdMu.Lock()
	// A returning member keeps its entry (and UUID); a new one is added.
	vol.md.Members = slices.DeleteFunc(vol.md.Members, func(x meta.Member) bool { return x.UUID == m.uuid })
	vol.md.Members = append(vol.md.Members, meta.Member{UUID: m.uuid, Role: meta.RoleCopyTarget, PathHint: path})
	vol.md.NextGeneration()
	vol.members[path] = m
	vol.mdMu.Unlock()
	write := vol.writeAll
	if a.clustered() {
		// Only the new member, which no other host writes yet: the set's
		// metadata writer records it in every member once the log has it.
		write = func() error {
			vol.mdMu.Lock()
			defer vol.mdMu.Unlock()
			vol.reloadLocked(func(p string) bool { return p != path })
			vol.md.Members = slices.DeleteFunc(vol.md.Members, func(x meta.Member) bool { return x.UUID == m.uuid })
			vol.md.Members = append(vol.md.Members, meta.Member{UUID: m.uuid, Role: meta.RoleCopyTarget, PathHint: path})
			return vol.writeOneLocked(m)
		}
	}
	if err := write(); err != nil {
		vol.forget(path)
		return nil, err
	}
	if err := vol.vu.AddMember(vu.MemberSpec{Dev: p.dev, Role: vu.CopyTarget}); err != nil {
		vol.forget(path)
		return nil, err
	}
	if err := a.elog.Append(shadowset.Event{Kind: shadowset.EvAddMember, Set: vol.name, Member: path, FullCopy: why != ""}); err != nil {
		_ = vol.vu.RemoveMember(path)
		vol.forget(path)
		return nil, err
	}
	ok = true
	return res, nil
}

// forget drops a member from the runtime and the metadata table.
func (vol *volume) forget(path string) {
	vol.mdMu.Lock()
	defer vol.mdMu.Unlock()
	m, ok := vol.members[path]
	if !ok {
		return
	}
	delete(vol.members, path)
	vol.md.Members = slices.DeleteFunc(vol.md.Members, func(x meta.Member) bool { return x.UUID == m.uuid })
}

// writeAll writes the set's metadata to every member, each with its own
// member UUID and copy checkpoint.
func (vol *volume) writeAll() error {
	vol.mdMu.Lock()
	defer vol.mdMu.Unlock()
	var errs []error
	for _, path := range sortedKeys(vol.members) {
		if err := vol.writeOneLocked(vol.members[path]); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (vol *volume) writeOneLocked(m *memberRT) error {
	md := vol.md
	md.MemberUUID = m.uuid
	md.CopyCheckpoint = m.checkpoint.Load()
	// Each member records its own log region (members differ in size);
	// a recorded log also tells the next mount the set keeps logs.
	md.WriteLog = meta.WriteLog{}
	if ld, ok := m.dev.(*memberlog.Device); ok {
		md.WriteLog = ld.Descriptor()
	}
	md.Members = slices.Clone(vol.md.Members)
	md.History = slices.Clone(vol.md.History)
	md.Cluster = meta.ClusterStamp{}
	if vol.stamp != nil {
		md.Cluster = vol.stamp()
	}
	if err := meta.Write(m.dev, &md); err != nil {
		return fmt.Errorf("write metadata of %s: %w", m.path, err)
	}
	return nil
}

// setRole records a member's role in the metadata table.
func (vol *volume) setRole(path string, r meta.Role) {
	vol.mdMu.Lock()
	defer vol.mdMu.Unlock()
	m, ok := vol.members[path]
	if !ok {
		return
	}
	for i := range vol.md.Members {
		if vol.md.Members[i].UUID == m.uuid {
			vol.md.Members[i].Role = r
		}
	}
	vol.md.NextGeneration()
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// BeginWrite (vu.Gate) makes the dirty flag durable before the first
// write after the set was marked clean, holds off marking clean while
// writes are in flight, and records the range in the write bitmaps
// before any member sees the data (invariant 2).
func (vol *volume) BeginWrite(off, n int64) error {
	if vol.applyHeld != nil {
		// Changes applied but not yet carried out (no lease): a write
		// now could miss a member another host added.
		for vol.applyHeld.Load() {
			time.Sleep(5 * time.Millisecond)
		}
	}
	vol.cleanMu.RLock()
	if !vol.dirty.Load() {
		vol.cleanMu.RUnlock()
		vol.cleanMu.Lock()
		if !vol.dirty.Load() {
			vol.mdMu.Lock()
			vol.md.Dirty = true
			vol.mdMu.Unlock()
			if err := vol.writeAll(); err != nil {
				vol.cleanMu.Unlock()
				return fmt.Errorf("mark dirty before writing: %w", err)
			}
			vol.dirty.Store(true)
		}
		vol.cleanMu.Unlock()
		vol.cleanMu.RLock()
	}
	if err := vol.admit(off, n); err != nil {
		vol.cleanMu.RUnlock()
		return err
	}
	return nil
}

// TryBeginWrite (vu.Gate) is BeginWrite when the set is already dirty and
// no clean-marking holds the gate, so nothing has to wait.
func (vol *volume) TryBeginWrite(off, n int64) bool {
	if vol.applyHeld != nil && vol.applyHeld.Load() {
		return false
	}
	if !vol.cleanMu.TryRLock() {
		return false
	}
	if !vol.dirty.Load() || !vol.bm.tracker.Cached(off, n) {
		// (A chunk not known set may need a round trip to the masters.)
		vol.cleanMu.RUnlock()
		return false
	}
	if vol.admit(off, n) != nil {
		vol.cleanMu.RUnlock()
		return false
	}
	return true
}

// admit records an admitted write in the bitmaps before any member sees
// its data; an error (the masters could not record it) fails the write.
func (vol *volume) admit(off, n int64) error {
	vol.lastWrite.Store(time.Now().UnixNano())
	if err := vol.bm.tracker.Mark(off, n); err != nil {
		return fmt.Errorf("record the write on the HBMM masters: %w: %w", err, syscall.EIO)
	}
	vol.bm.sinceFlush.Issued(off, n)
	return nil
}

// EndWrite (vu.Gate) ends a write BeginWrite admitted.
func (vol *volume) EndWrite(off, n int64) {
	vol.bm.sinceFlush.Completed(off, n)
	vol.cleanMu.RUnlock()
}

// BeginFlush (vu.Gate) tells the since-flush bitmap what a successful
// flush covers.
func (vol *volume) BeginFlush() func(bool) {
	tok := vol.bm.sinceFlush.FlushBegin()
	return func(ok bool) { _ = vol.bm.sinceFlush.FlushDone(tok, ok) }
}

// markClean flushes the set and records it clean, if no write is in
// flight and no merge is owed. force skips the idle check (dismount).
func (vol *volume) markClean(a *Agent, force bool) error {
	if a.clustered() && (!force || a.mountedElsewhere(vol.name)) {
		// Other hosts may write the set without this host knowing: it is
		// marked clean only by the last host to dismount it. Its write
		// log still needs flushes to clear its idle extents.
		if vol.writeLog && !force && vol.flushedWrite.Load() != vol.lastWrite.Load() &&
			time.Since(time.Unix(0, vol.lastWrite.Load())) >= a.cfg.CleanAfter {
			last := vol.lastWrite.Load()
			if err := vol.vu.Flush(); err != nil {
				return fmt.Errorf("idle flush for the write log: %w", err)
			}
			vol.flushedWrite.Store(last)
		}
		return nil
	}
	idle := func() bool { return force || time.Since(time.Unix(0, vol.lastWrite.Load())) >= a.cfg.CleanAfter }
	// Checked before taking the lock too: taking it stalls every writer.
	if !vol.dirty.Load() || !idle() {
		return nil
	}
	vol.cleanMu.Lock()
	defer vol.cleanMu.Unlock()
	if !vol.dirty.Load() || !idle() {
		return nil
	}
	if a.clustered() {
		// The last host to dismount: the metadata is what the set's
		// previous writers left.
		vol.mdMu.Lock()
		vol.reloadLocked(nil)
		vol.mdMu.Unlock()
	}
	if sv, ok := a.setView(vol.name); ok {
		for _, op := range sv.Ops {
			if op.Kind.IsMerge() {
				return nil // a merge is owed: the set stays dirty
			}
		}
	}
	if err := vol.vu.Flush(); err != nil {
		return fmt.Errorf("flush before marking clean: %w", err)
	}
	vol.mdMu.Lock()
	vol.md.Dirty = false
	vol.mdMu.Unlock()
	if err := vol.writeAll(); err != nil {
		return err
	}
	vol.dirty.Store(false)
	a.log.Debug().Str("vu", vol.name).Msg("marked clean")
	return nil
}

// cleaner marks the set clean after it has been idle for CleanAfter (md's
// safe mode).
func (vol *volume) cleaner(a *Agent) {
	defer close(vol.cleanerDone)
	t := time.NewTicker(max(a.cfg.CleanAfter/4, 100*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-vol.stopCleaner:
			return
		case <-t.C:
			if err := vol.markClean(a, false); err != nil {
				a.log.Warn().Str("vu", vol.name).Err(err).Msg("could not mark the set clean")
			}
			a.maybeReset(vol)
			a.sweepLogs(vol)
		}
	}
}

// expel is the VU's callback when a member fails: the removal goes
// through the log to the core, then is made durable on the survivors'
// metadata, all before the failing request is acknowledged.
func (a *Agent) expel(vol *volume, path string, cause error) error {
	_, role, _ := vol.vu.Device(path)
	return a.expelRole(vol, path, role, cause)
}

// expelRole is expel for a member whose role in the VU was role (the
// operator's forced removal takes it out of the VU first).
func (a *Agent) expelRole(vol *volume, path string, role vu.Role, cause error) error {
	vol.expelMu.Lock()
	defer vol.expelMu.Unlock()
	vol.mdMu.Lock()
	_, present := vol.members[path]
	vol.mdMu.Unlock()
	if !present {
		return nil // a concurrent request expelled it already
	}
	vol.mdMu.Lock()
	gen := vol.md.Generation
	uuid, dev := vol.members[path].uuid, vol.members[path].dev
	vol.mdMu.Unlock()
	if a.clustered() && role == vu.Full {
		// The generation the member carries is the one the set's
		// metadata writer (maybe another host) last gave it; if it cannot
		// be read, this host's is the guess (a wrong one costs a full
		// copy, never a wrong minicopy).
		if md, _, err := meta.Read(dev); err == nil && md.MemberUUID == uuid {
			gen = md.Generation
		}
	}
	// In a cluster the automatic minicopy bitmap's store entries exist
	// before any host applies the expulsion (as for a removal: see
	// dismountMember), so that no host finds them missing.
	remoteKey := ""
	if role == vu.Full && a.clustered() {
		remoteKey = a.openAutomaticMinicopy(vol, path)
	}
	if err := a.elog.Append(shadowset.Event{Kind: shadowset.EvIOError, Set: vol.name, Member: path, Host: a.host}); err != nil {
		a.closeAutomaticMinicopy(remoteKey)
		return err
	}
	if a.clustered() {
		// Every host that mounts the set must stop reading and writing
		// the member before this host acknowledges the write that failed
		// there: until then another host could still read the old data
		// from it.
		ctx, cancel := context.WithTimeout(a.ctx, 30*time.Second)
		err := a.clog.InForce(ctx, vol.name)
		if err == nil {
			err = a.deferred.Settle(ctx)
		}
		cancel()
		if err != nil {
			a.closeAutomaticMinicopy(remoteKey)
			return fmt.Errorf("expel %s: %w", path, err)
		}
	}
	if remoteKey != "" {
		a.keepAutomaticMinicopy(vol, path, uuid, gen, remoteKey)
	}
	if role == vu.Full && !a.clustered() {
		// The automatic minicopy bitmap: every chunk written since the
		// last successful flush (the failing write among them, since it
		// is still in flight), and every write from now on.
		mc := &minicopyBitmap{path: path, uuid: uuid, gen: gen, automatic: true}
		if err := vol.bm.keepMinicopy(mc, vol.bm.sinceFlush.Snapshot); err != nil {
			a.log.Warn().Str("vu", vol.name).Str("member", path).Err(err).Msg("no automatic minicopy bitmap")
		}
	}
	vol.mdMu.Lock()
	m, ok := vol.members[path]
	if ok {
		delete(vol.members, path)
		for i := range vol.md.Members {
			if vol.md.Members[i].UUID == m.uuid {
				vol.md.Members[i].Role = meta.RoleRemoved
			}
		}
		vol.md.NextGeneration()
	}
	vol.mdMu.Unlock()
	if !a.clustered() {
		// (In a cluster the set's metadata writer recorded it as it
		// applied the expulsion, before InForce above returned.)
		if err := vol.writeAll(); err != nil {
			return fmt.Errorf("record the expulsion of %s: %w", path, err)
		}
	}
	if ok {
		vol.retire(m.dev) // closed at dismount: requests in flight may still use it
	}
	a.log.Error().Str("vu", vol.name).Str("member", path).Err(cause).Msg("member expelled")
	return nil
}

// Mount is the mount verb for in-process callers (the agent's --mount).
func (a *Agent) Mount(args MountArgs) (*MountResult, error) { return a.mount(args) }
