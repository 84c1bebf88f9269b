package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"time"

	"github.com/shadow-project/shadow/cluster"
	"github.com/shadow-project/shadow/cmd/internal/control"
	"github.com/shadow-project/shadow/cmd/internal/meta"
	"github.com/shadow-project/shadow/cmd/internal/policy"
	"github.com/shadow-project/shadow/cmd/internal/report"
	"github.com/shadow-project/shadow/cmd/internal/vu"
	"github.com/shadow-project/shadow/shadowset"
)

// DismountArgs is the dismount verb: the whole set, or one member.
type DismountArgs struct {
	Set    string `json:"set"`
	Member string `json:"member,omitempty"`
	// Policy, with Member: "minicopy" keeps a minicopy bitmap or fails,
	// "minicopy=optional" keeps one if it can.
	Policy string `json:"policy,omitempty"`
	// Abort: DISMOUNT/ABORT: stop serving at once, without waiting for
	// writes in flight or marking the set clean; the set needs a merge
	// (Table 8-1 row 3).
	Abort bool `json:"abort,omitempty"`
}

// SetArgs is the set verb; exactly one action per call.
type SetArgs struct {
	Set          string `json:"set"`
	DemandMerge  bool   `json:"demand_merge,omitempty"`
	Priority     *int   `json:"priority,omitempty"`
	ReadCost     *int   `json:"read_cost,omitempty"`
	Member       string `json:"member,omitempty"`
	CopySource   string `json:"copy_source,omitempty"`
	ForceRemoval string `json:"force_removal,omitempty"`
	// HBMM policy qualifiers: Policy is hbmm=(…) or hbmm=NAME; Name
	// defines (or, with Delete, deletes) a named policy when Set is
	// empty; Delete on a set drops its own policy; Enable and Disable
	// take "hbmm".
	Policy  string `json:"policy,omitempty"`
	Name    string `json:"name,omitempty"`
	Delete  bool   `json:"delete,omitempty"`
	Enable  string `json:"enable,omitempty"`
	Disable string `json:"disable,omitempty"`
	// EvaluateResources: SET SHADOW /EVALUATE=RESOURCES on this host
	// (Table 8-1 row 8): its ops are canceled and rescheduled by priority
	// and op limits. MaxOps: how many ops this host runs at once.
	EvaluateResources bool `json:"evaluate_resources,omitempty"`
	MaxOps            *int `json:"max_ops,omitempty"`
}

func (s SetArgs) isPolicy() bool {
	return s.Policy != "" || s.Name != "" || s.Delete || s.Enable != "" || s.Disable != ""
}

// Check refuses a malformed set command before it reaches the agent's
// state (the CLI calls it to answer with a usage error; setVerb calls it
// too). names is how many set names were given.
func (s SetArgs) Check(names int) error {
	if s.isPolicy() {
		if s.DemandMerge || s.Priority != nil || s.ReadCost != nil || s.CopySource != "" || s.ForceRemoval != "" {
			return fmt.Errorf("%w: HBMM qualifiers (--policy, --name, --delete, --enable, --disable) cannot be mixed with others", policy.ErrPolicy)
		}
		if names > 1 {
			return errors.New("give at most one set name (DSAn)")
		}
		if s.Set == "" && s.Name == "" {
			return errors.New("give a set name (DSAn), or --name to define a named policy")
		}
		if s.Policy != "" {
			if _, err := policy.ParseHBMMPolicy(s.Policy); err != nil {
				return err
			}
		}
		return nil
	}
	n := 0
	for _, given := range []bool{s.DemandMerge, s.Priority != nil, s.ReadCost != nil, s.CopySource != "", s.ForceRemoval != "", s.EvaluateResources, s.MaxOps != nil} {
		if given {
			n++
		}
	}
	if n != 1 {
		return errors.New("give exactly one of --demand-merge, --priority, --read-cost, --copy-source, --force-removal, --evaluate-resources, --max-ops, or HBMM qualifiers")
	}
	if s.EvaluateResources || s.MaxOps != nil {
		// Host-wide: a set name is not needed (and not used).
		if names > 1 {
			return errors.New("give at most one set name (DSAn)")
		}
		return nil
	}
	if names != 1 || s.Set == "" {
		return errors.New("give one set name (DSAn)")
	}
	return nil
}

// ShowArgs is the show verb.
type ShowArgs struct {
	Set string `json:"set,omitempty"`
}

func decode[T any](raw json.RawMessage) (T, error) {
	var v T
	if len(raw) == 0 {
		return v, errors.New("missing arguments")
	}
	if err := json.Unmarshal(raw, &v); err != nil {
		return v, fmt.Errorf("bad arguments: %w", err)
	}
	return v, nil
}

func (a *Agent) handlers() map[string]control.Handler {
	return map[string]control.Handler{
		"mount": func(_ context.Context, raw json.RawMessage) (any, error) {
			args, err := decode[MountArgs](raw)
			if err != nil {
				return nil, err
			}
			return a.mount(args)
		},
		"dismount": func(_ context.Context, raw json.RawMessage) (any, error) {
			args, err := decode[DismountArgs](raw)
			if err != nil {
				return nil, err
			}
			if args.Member != "" {
				return nil, a.dismountMember(args.Set, args.Member, args.Policy)
			}
			if args.Policy != "" {
				return nil, errors.New("--policy minicopy applies to one member: give --member PATH")
			}
			if args.Abort {
				return nil, a.abortSet(args.Set)
			}
			return nil, a.dismountSet(args.Set)
		},
		"set": func(_ context.Context, raw json.RawMessage) (any, error) {
			args, err := decode[SetArgs](raw)
			if err != nil {
				return nil, err
			}
			return nil, a.setVerb(args)
		},
		"show": func(_ context.Context, raw json.RawMessage) (any, error) {
			args, _ := decode[ShowArgs](raw)
			return a.Show(args.Set)
		},
		"verify": func(ctx context.Context, raw json.RawMessage) (any, error) {
			args, err := decode[VerifyArgs](raw)
			if err != nil {
				return nil, err
			}
			return a.verify(ctx, args.Set)
		},
		"policies": func(context.Context, json.RawMessage) (any, error) {
			return a.Policies(), nil
		},
		"events": func(context.Context, json.RawMessage) (any, error) {
			return a.elog.History(), nil
		},
	}
}

// dismountSet is the final dismount on this host: the core stops the
// set's ops (their checkpoints stay in the metadata), the export goes, the
// members are flushed and marked clean unless a merge is still owed.
func (a *Agent) dismountSet(name string) error {
	vol, err := a.volume(name)
	if err != nil {
		return err
	}
	old := a.runsNow()
	if err := a.elog.Append(shadowset.Event{Kind: shadowset.EvDismount, Set: name, Host: a.host}); err != nil {
		return fmt.Errorf("dismount %s: %w", name, err)
	}
	a.waitStopped(old)
	a.nbd.RemoveExport(name)
	vol.remote.release()
	close(vol.stopCleaner)
	<-vol.cleanerDone
	var errs []error
	if err := vol.markClean(a, true); err != nil {
		errs = append(errs, err)
	}
	a.releaseOwnSlot(vol)
	if !a.mountedElsewhere(name) {
		if err := a.elog.Append(shadowset.Event{Kind: shadowset.EvForgetSet, Set: name}); err != nil && !a.clustered() {
			errs = append(errs, err)
		}
	}
	errs = append(errs, a.forgetVolume(vol))
	a.log.Info().Str("vu", name).Msg("dismounted")
	return errors.Join(errs...)
}

// forgetVolume is the end of a dismount: the set leaves this host and its
// members, retired ones included, are closed.
func (a *Agent) forgetVolume(vol *volume) error {
	a.mu.Lock()
	delete(a.sets, vol.name)
	a.mu.Unlock()
	a.detachHBMM(vol)
	var errs []error
	vol.mdMu.Lock()
	for _, m := range vol.members {
		if err := m.dev.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	vol.mdMu.Unlock()
	vol.retiredMu.Lock()
	for _, d := range vol.retired {
		d.Close()
	}
	vol.retiredMu.Unlock()
	return errors.Join(errs...)
}

// abortSet is DISMOUNT/ABORT: the export goes at once, writes in flight
// may have reached some members only, so the set is left dirty and the
// core records an abort with writes in flight (Table 8-1 row 3): the hosts
// that still mount it merge after the delay; mounted nowhere, its next
// mount merges.
func (a *Agent) abortSet(name string) error {
	vol, err := a.volume(name)
	if err != nil {
		return err
	}
	a.nbd.RemoveExport(name)
	old := a.runsNow()
	if err := a.elog.Append(shadowset.Event{Kind: shadowset.EvAbort, Set: name, Host: a.host}); err != nil {
		return fmt.Errorf("dismount %s --abort: %w", name, err)
	}
	a.waitStopped(old)
	vol.remote.release()
	close(vol.stopCleaner)
	<-vol.cleanerDone
	if !a.mountedElsewhere(name) {
		_ = a.elog.Append(shadowset.Event{Kind: shadowset.EvForgetSet, Set: name})
	}
	err = a.forgetVolume(vol)
	a.log.Warn().Str("vu", name).Msg("aborted: the set needs a merge")
	return err
}

// dismountMember removes one member from a mounted set. With a minicopy
// policy the member keeps a bitmap of the writes it misses, so that it can
// come back by minicopy; OpenVMS refuses one (or, with =optional, goes on
// without) when the bitmap could not be trusted: the set owes a merge, or
// the member is not a full member.
func (a *Agent) dismountMember(name, path, policyText string) error {
	mc, err := policy.ParseMinicopyPolicy(policyText)
	if err != nil {
		return err
	}
	vol, err := a.volume(name)
	if err != nil {
		return err
	}
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	vol.mdMu.Lock()
	m, ok := vol.members[path]
	gen := vol.md.Generation
	vol.mdMu.Unlock()
	if !ok {
		return fmt.Errorf("%s is not a member of %s", path, name)
	}
	keep := mc != policy.NoMinicopy
	if keep {
		why := ""
		if a.clustered() && a.mountedElsewhere(name) && a.clog.Level() < cluster.LevelHBMM {
			why = fmt.Sprintf("other hosts write the set, and they record their writes in a minicopy bitmap here only once every host runs core level %d (a rolling upgrade is under way)", cluster.LevelHBMM)
		} else if _, role, _ := vol.vu.Device(path); role != vu.Full {
			why = "it is a copy target, not a full member"
		} else if sv, ok := a.setView(name); ok {
			for _, op := range sv.Ops {
				if op.Kind.IsMerge() {
					why = fmt.Sprintf("%s owes a %s (op%d)", name, op.Kind, op.ID)
				}
			}
		}
		if why != "" {
			if mc == policy.MinicopyRequired {
				return fmt.Errorf("dismount %s --member %s --policy minicopy: no minicopy bitmap can start: %s (use --policy minicopy=optional to remove it without one)", name, path, why)
			}
			a.log.Warn().Str("vu", name).Str("member", path).Str("why", why).Msg("member removed without a minicopy bitmap")
			keep = false
		}
	}
	// In a cluster, the other hosts record the chunks they write while the
	// member is away in this host's master store: the entry exists before
	// any host can apply the removal, so that none finds it missing. It
	// also holds the proof a host where the member returns checks.
	remoteKey := ""
	if keep && a.clustered() {
		remoteKey = minicopyKey(name, path)
		a.mstore.Close(remoteKey) // (what an earlier absence left)
		if err := a.mstore.Open(remoteKey, vol.bm.chunkSize); err != nil {
			return fmt.Errorf("dismount %s --member %s: %w", name, path, err)
		}
	}
	old := a.runsNow()
	if err := a.elog.Append(shadowset.Event{Kind: shadowset.EvRemoveMember, Set: name, Member: path, Host: a.host, Minicopy: keep}); err != nil {
		if remoteKey != "" {
			a.mstore.Close(remoteKey)
		}
		return err
	}
	// A copy to the member is dropped by the core; wait for its engine
	// before the member leaves the I/O path.
	a.waitStopped(old)
	if a.clustered() {
		// Every other host has stopped writing it too.
		ctx, cancel := context.WithTimeout(a.ctx, 30*time.Second)
		err := a.clog.InForce(ctx, name)
		cancel()
		if err != nil {
			return fmt.Errorf("dismount %s --member %s: %w", name, path, err)
		}
	}
	// With no write in flight, the member leaves the I/O path and its
	// bitmap starts: it holds every write before, the bitmap every write
	// after.
	away := &minicopyBitmap{path: path, uuid: m.uuid, gen: gen, remoteKey: remoteKey}
	vol.quiesce(func() {
		err = vol.vu.RemoveMember(path)
		if err == nil && keep {
			err = vol.bm.keepMinicopy(away, nil)
		}
	})
	if err != nil {
		if remoteKey != "" {
			a.mstore.Close(remoteKey)
		}
		return err
	}
	// Its own metadata stays at gen; flushed, it is a consistent image of
	// the set at the moment it left.
	flushErr := m.dev.Flush()
	if remoteKey != "" && flushErr == nil {
		// The generation the member carries is the one the set's metadata
		// writer (maybe another host) last gave it: the proof a host where
		// it returns checks (minicopyProof).
		if md, _, err := meta.Read(m.dev); err == nil {
			away.gen = md.Generation
		}
		if _, err := a.mstore.Bitmap(remoteKey, minicopyProof(away.uuid, away.gen)); err != nil {
			a.log.Warn().Str("vu", name).Str("member", path).Err(err).Msg("no proof of the minicopy bitmap: the member will get a full copy")
		}
	}
	vol.setRole(path, meta.RoleRemoved)
	vol.forgetKeepTable(path)
	if !a.clustered() { // (a cluster's metadata writer recorded it from the log)
		if err := vol.writeAll(); err != nil {
			return err
		}
	}
	if flushErr != nil {
		vol.bm.dropMinicopy(path)
		return errors.Join(fmt.Errorf("flush %s as it left (it will need a full copy): %w", path, flushErr), m.dev.Close())
	}
	return m.dev.Close()
}

// forgetKeepTable drops a member from the runtime, keeping its (removed)
// entry in the metadata table.
func (vol *volume) forgetKeepTable(path string) {
	vol.mdMu.Lock()
	defer vol.mdMu.Unlock()
	delete(vol.members, path)
}

func (a *Agent) setVerb(args SetArgs) error {
	names := 0
	if args.Set != "" {
		names = 1
	}
	if err := args.Check(names); err != nil {
		return err
	}
	if args.isPolicy() {
		return a.policyVerb(args)
	}
	switch {
	case args.EvaluateResources:
		return a.elog.Append(shadowset.Event{Kind: shadowset.EvEvalResources, Host: a.host})
	case args.MaxOps != nil:
		return a.elog.Append(shadowset.Event{Kind: shadowset.EvMaxOps, Host: a.host, N: *args.MaxOps})
	}
	vol, err := a.volume(args.Set)
	if err != nil {
		return err
	}
	switch {
	case args.DemandMerge:
		return a.elog.Append(shadowset.Event{Kind: shadowset.EvDemandMerge, Set: args.Set})
	case args.Priority != nil:
		return a.elog.Append(shadowset.Event{Kind: shadowset.EvPriority, Set: args.Set, Host: a.host, N: *args.Priority})
	case args.ReadCost != nil:
		if args.Member == "" {
			return errors.New("--read-cost needs --member PATH")
		}
		p, _ := filepath.Abs(args.Member)
		if *args.ReadCost < 0 || *args.ReadCost > 65535 {
			return fmt.Errorf("read cost %d out of range 0–65535 (0 restores the default)", *args.ReadCost)
		}
		return vol.vu.SetReadCost(p, *args.ReadCost)
	case args.CopySource != "":
		p, _ := filepath.Abs(args.CopySource)
		if _, role, ok := vol.vu.Device(p); !ok || role != vu.Full {
			return fmt.Errorf("%s is not a full member of %s", args.CopySource, args.Set)
		}
		vol.copySource.Store(p)
		return nil
	case args.ForceRemoval != "":
		p, _ := filepath.Abs(args.ForceRemoval)
		_, role, _ := vol.vu.Device(p)
		if err := vol.vu.RemoveMember(p); err != nil {
			return err
		}
		return a.expelRole(vol, p, role, errors.New("forced removal by the operator"))
	}
	return errors.New("set: nothing to do") // Check refused this already
}

// Show builds the report for one set, or all.
func (a *Agent) Show(set string) (report.ShowReport, error) {
	r := report.ShowReport{Host: a.host, Sets: []report.SetShow{}, Cluster: a.clusterShow()}
	a.elog.View(func(c *shadowset.Core) {
		if open, end := c.Window(); open {
			left := (end - c.Now()).Milliseconds()
			r.DelayLeftMs = &left
		}
	})
	names := a.setNames()
	if set != "" {
		if !slices.Contains(names, set) {
			return r, fmt.Errorf("%s is not mounted on %s", set, a.host)
		}
		names = []string{set}
	}
	for _, name := range names {
		vol, err := a.volume(name)
		if err != nil {
			continue
		}
		sv, ok := a.setView(name)
		if !ok {
			continue
		}
		var prio int
		a.elog.View(func(c *shadowset.Core) { prio = c.Priority(a.host, name) })
		s := report.SetShow{Name: name, SizeBytes: vol.size, NBDURI: a.URI(name), Mounted: sv.Mounted, Priority: prio, Members: []report.MemberShow{}, Ops: []report.OpShow{}}
		if vol.vu != nil {
			s.MemberIOErrors, s.Expulsions = vol.vu.Faults()
		}
		master := a.masterFor(vol)
		mergePct := -1
		copyPct := map[string]int{}
		for _, op := range sv.Ops {
			o := report.OpShow{ID: uint64(op.ID), Kind: op.Kind.String(), State: op.State.String(), Host: op.Host, LBN: op.LBN, Target: op.Target, ProgressPct: report.Pct(op.LBN, vol.size), History: []string{}}
			for _, w := range op.History {
				o.History = append(o.History, w.String())
			}
			s.Ops = append(s.Ops, o)
			if op.Kind.IsMerge() {
				mergePct = o.ProgressPct
			} else {
				copyPct[op.Target] = o.ProgressPct
			}
		}
		for _, m := range vol.vu.Members() {
			ms := report.MemberShow{Path: m.Path, Role: m.Role.String(), ReadCost: m.ReadCost, ProgressPct: -1, Master: m.Path == master}
			if p, ok := copyPct[m.Path]; ok {
				ms.ProgressPct = p
			} else if ms.Master {
				ms.ProgressPct = mergePct
			}
			s.Members = append(s.Members, ms)
		}
		a.showBitmaps(vol, sv, &s)
		s.State = report.VUState(s)
		r.Sets = append(r.Sets, s)
	}
	return r, nil
}
