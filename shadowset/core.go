package shadowset

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Core is the deterministic state machine of the whole cluster's shadow
// sets. It is not safe for concurrent use: one goroutine owns it, as with
// etcd-io/raft's RawNode.
type Core struct {
	s     *state
	ready Ready
	rules Rules
}

// Rules switch off decisions a cluster may take only once every host
// runs a build that has them (rolling upgrades: cluster/level.go). Their
// zero value is this build's rules; a cluster sets them before each event
// from its level, the same on every host.
type Rules struct {
	// MinicopyAnyHost: a minicopy runs on any eligible host, not first
	// on the host that holds its bitmap (core levels below 3).
	MinicopyAnyHost bool
}

// SetRules sets the rules the next events are decided by.
func (c *Core) SetRules(r Rules) { c.rules = r }

// New returns a core with no hosts and no sets.
func New() *Core {
	return &Core{s: &state{Version: snapshotVersion, Delay: DefaultDelay, NextOp: 1}}
}

// Ready returns the actions and notes accumulated since the last Advance.
func (c *Core) Ready() Ready { return c.ready }

// Advance acknowledges everything Ready returned.
func (c *Core) Advance() { c.ready = Ready{} }

// Now is the core's virtual time.
func (c *Core) Now() time.Duration { return c.s.Now }

// Window reports whether the cluster-wide delay window is open and when it
// closes.
func (c *Core) Window() (open bool, end time.Duration) { return c.s.WindowOpen, c.s.WindowEnd }

// Step applies one event. On error the core is unchanged and nothing is
// added to Ready.
func (c *Core) Step(ev Event) error {
	saved, savedReady := c.s.clone(), c.ready
	savedReady.Actions = slices.Clone(savedReady.Actions)
	savedReady.Notes = slices.Clone(savedReady.Notes)
	if err := c.step(ev); err != nil {
		c.s, c.ready = saved, savedReady
		return fmt.Errorf("%s: %w", ev.Kind, err)
	}
	c.schedule()
	return nil
}

func (c *Core) step(ev Event) error {
	switch ev.Kind {
	case EvHostUp:
		return c.hostUp(ev.Host)
	case EvHostFailed:
		return c.hostFailed(ev.Host)
	case EvSetDelay:
		if ev.Duration < 0 {
			return badf("negative delay %s", ev.Duration)
		}
		c.s.Delay = ev.Duration
		return nil
	case EvDefineSet:
		return c.defineSet(ev.Spec)
	case EvDefineOp:
		return c.defineOp(ev.OpSpec)
	case EvPriority:
		return c.setPriority(ev.Set, ev.Host, ev.N)
	case EvMaxOps:
		h, err := c.liveOrDeadHost(ev.Host)
		if err != nil {
			return err
		}
		if ev.N < 0 || ev.N > MaxMaxOps {
			return badf("op limit %d out of range 0–%d", ev.N, MaxMaxOps)
		}
		h.MaxOps = ev.N
		return nil
	case EvAbort:
		return c.abort(ev.Set, ev.Host)
	case EvDismount:
		return c.dismount(ev.Set, ev.Host)
	case EvMount:
		return c.mount(ev.Set, ev.Host)
	case EvRemoveMember:
		return c.removeMember(ev.Set, ev.Member, ev.Minicopy, ev.Host, false)
	case EvIOError:
		return c.removeMember(ev.Set, ev.Member, true, ev.Host, true)
	case EvAddMember:
		return c.addMember(ev.Set, ev.Member, ev.FullCopy)
	case EvDemandMerge:
		return c.demandMerge(ev.Set)
	case EvEvalResources:
		return c.evalResources(ev.Host)
	case EvTick:
		if ev.Duration < 0 {
			return badf("time cannot go backwards (%s)", ev.Duration)
		}
		c.s.Now += ev.Duration
		if c.s.WindowOpen && c.s.Now >= c.s.WindowEnd {
			c.s.WindowOpen = false
			c.notef("delay window closed at %s", c.s.WindowEnd)
		}
		return nil
	case EvProgress:
		return c.progress(ev)
	case EvComplete:
		return c.complete(ev)
	case EvForgetSet:
		st, err := c.knownSet(ev.Set)
		if err != nil {
			return err
		}
		if len(st.Mounted) > 0 {
			return badf("%s is still mounted on %s", st.Name, strings.Join(st.sortedMounted(), ","))
		}
		c.s.Sets = slices.DeleteFunc(c.s.Sets, func(x *setState) bool { return x == st })
		c.notef("%s forgotten", st.Name)
		return nil
	case EvHBMM:
		return c.setHBMM(ev)
	case EvCovered:
		return c.covered(ev)
	}
	return badf("unknown event kind %d", ev.Kind)
}

func (c *Core) emit(a Action) { c.ready.Actions = append(c.ready.Actions, a) }

func (c *Core) notef(format string, args ...any) {
	c.ready.Notes = append(c.ready.Notes, fmt.Sprintf(format, args...))
}

// openWindow opens the cluster-wide delay window for an event whose rows
// say Delay Yes, unless one is open: an event with delay during an earlier
// delay adds none.
func (c *Core) openWindow(ev TableEvent, why string) {
	if !rowDelay(ev) || c.s.WindowOpen || c.s.Delay <= 0 {
		return
	}
	c.s.WindowOpen = true
	c.s.WindowEnd = c.s.Now + c.s.Delay
	c.notef("delay window opened by %s until %s", why, c.s.WindowEnd)
	c.emit(Action{Kind: ActTimer, At: c.s.WindowEnd})
}

// ---- validation helpers

func validName(kind, s string) error {
	if s == "" {
		return badf("missing %s name", kind)
	}
	if strings.ContainsAny(s, " \t\n,=#()") {
		return badf("%s name %q contains a space, comma, '=', '#' or parenthesis", kind, s)
	}
	return nil
}

// ValidSetName checks the DSAn form (n = 0–9999).
func ValidSetName(s string) error {
	n, ok := strings.CutPrefix(s, "DSA")
	if !ok || n == "" || len(n) > 4 {
		return badf("set name %q is not DSAn (n = 0–9999)", s)
	}
	if _, err := strconv.ParseUint(n, 10, 16); err != nil {
		return badf("set name %q is not DSAn (n = 0–9999)", s)
	}
	return nil
}

func (c *Core) liveOrDeadHost(name string) (*hostState, error) {
	if err := validName("host", name); err != nil {
		return nil, err
	}
	h := c.s.host(name)
	if h == nil {
		return nil, fmt.Errorf("%w %q", ErrUnknownHost, name)
	}
	return h, nil
}

func (c *Core) liveHost(name string) (*hostState, error) {
	h, err := c.liveOrDeadHost(name)
	if err != nil {
		return nil, err
	}
	if !h.Alive {
		return nil, badf("host %s has failed", name)
	}
	return h, nil
}

func (c *Core) knownSet(name string) (*setState, error) {
	if name == "" {
		return nil, badf("missing set name")
	}
	st := c.s.set(name)
	if st == nil {
		return nil, fmt.Errorf("%w %q", ErrUnknownSet, name)
	}
	return st, nil
}

// ---- hosts

func (c *Core) hostUp(name string) error {
	if err := validName("host", name); err != nil {
		return err
	}
	h := c.s.host(name)
	switch {
	case h == nil:
		c.s.Hosts = append(c.s.Hosts, &hostState{Name: name, Alive: true, MaxOps: DefaultMaxOps})
		c.notef("host %s joined", name)
	case h.Alive:
		return badf("host %s is already up", name)
	default:
		// Priorities are system-local and do not survive a reboot.
		h.Alive, h.Priority = true, nil
		c.notef("host %s rejoined", name)
	}
	return nil
}

func (c *Core) setPriority(set, host string, n int) error {
	st, err := c.knownSet(set)
	if err != nil {
		return err
	}
	h, err := c.liveHost(host)
	if err != nil {
		return err
	}
	if n < 0 || n > MaxPriority {
		return badf("priority %d out of range 0–%d", n, MaxPriority)
	}
	if h.Priority == nil {
		h.Priority = map[string]int{}
	}
	h.Priority[st.Name] = n
	return nil
}

// sharesSet reports whether two hosts have a set mounted in common.
func (c *Core) sharesSet(a, b string) bool {
	for _, st := range c.s.Sets {
		if st.mountedOn(a) && st.mountedOn(b) {
			return true
		}
	}
	return false
}

func (c *Core) hostFailed(name string) error {
	h, err := c.liveHost(name)
	if err != nil {
		return err
	}
	// Decide every op's row while the failed host's mounts are still known.
	type plan struct {
		st      *setState
		op      *opState
		e       Entry
		focused bool
	}
	var plans []plan
	var focused []*setState
	for _, st := range c.s.setsByName() {
		if st.mountedOn(name) {
			focused = append(focused, st)
			for _, op := range st.opsByID() {
				plans = append(plans, plan{st, op, lookup(RowFailureCommon, FocusMountedOnFailed, op.Kind), true})
			}
			continue
		}
		for _, op := range st.opsByID() {
			if op.Host == "" {
				continue // not underway on any host: nothing to cancel
			}
			row := RowFailureNoCommon
			if c.sharesSet(op.Host, name) {
				row = RowFailureCommon
			}
			plans = append(plans, plan{st, op, lookup(row, FocusOthers, op.Kind), false})
		}
	}
	// The failed host's chunks are covered by the other masters that
	// covered it before the failure (gaps and masters change with it).
	works := make([]mergeWork, len(focused))
	befores := make([][]string, len(focused))
	for i, st := range focused {
		works[i] = c.requiredMerge(st, []string{name}, name)
		befores[i] = c.masters(st)
	}
	h.Alive = false
	c.notef("host %s failed", name)
	for _, st := range focused {
		c.unmount(st, name)
	}
	ctx := outcomeCtx{lostHost: name, reason: "host " + name + " failed"}
	for _, p := range plans {
		if p.focused && len(p.st.Mounted) == 0 {
			continue // orphaned below
		}
		c.apply(p.st, p.op, p.e, ctx)
	}
	for i, st := range focused {
		if len(st.Mounted) == 0 {
			c.orphan(st, ctx.reason)
		}
		c.foldMerge(st, works[i])
		c.refreshMasters(st, befores[i], "")
	}
	c.loseBitmaps(name)
	c.openWindow(RowFailureCommon, "failure of "+name)
	return nil
}

// loseBitmaps drops every bitmap held in a failed host's memory.
func (c *Core) loseBitmaps(host string) {
	for _, st := range c.s.setsByName() {
		for _, b := range slices.Clone(st.Bitmaps) {
			if b.Holder == host {
				st.dropBitmap(b.Member)
				c.notef("%s: minicopy bitmap for %s lost with %s", st.Name, b.Member, host)
			}
		}
		for _, op := range st.opsByID() {
			if op.Kind == Minicopy && op.Bitmap == host {
				op.Kind, op.Bitmap = FullCopy, ""
				c.notef("%s: op%d continues as full-copy: its master bitmap was on %s", st.Name, op.ID, host)
			}
		}
	}
}

// unmount takes a host out of a set's mounted list, with the master bitmap
// it held for the set.
func (c *Core) unmount(st *setState, host string) {
	st.Mounted = slices.DeleteFunc(st.Mounted, func(h string) bool { return h == host })
	for _, op := range st.opsByID() {
		if op.Kind != Minimerge || !slices.Contains(op.Holders, host) {
			continue
		}
		op.Holders = slices.DeleteFunc(op.Holders, func(h string) bool { return h == host })
		if len(op.Holders) == 0 {
			op.Kind = FullMerge
			c.notef("%s: op%d becomes full-merge: no master bitmap survives", st.Name, op.ID)
		}
	}
}

// orphan stops every op of a set that no host has mounted any more. The
// ops stay recorded in the set's metadata; Table 8-1's mount row decides
// their fate when a host mounts the set again.
func (c *Core) orphan(st *setState, reason string) {
	for _, op := range st.opsByID() {
		if op.State == Running {
			c.emit(Action{Kind: ActStop, Op: op.ID, Set: st.Name, OpKind: op.Kind, Host: op.Host, LBN: op.LBN, Target: op.Target, Reason: reason})
		}
		if op.Host != "" {
			op.LastHost = op.Host
		}
		op.State, op.Host, op.Resume, op.Affinity, op.StartMode = Pending, "", 0, anyHost, 0
	}
	c.notef("%s is mounted nowhere; its ops wait in its metadata", st.Name)
}

// ---- sets

func (c *Core) defineSet(spec *SetSpec) error {
	if spec == nil {
		return badf("missing set spec")
	}
	if err := ValidSetName(spec.Name); err != nil {
		return err
	}
	if c.s.set(spec.Name) != nil {
		return badf("set %s is already defined", spec.Name)
	}
	if len(spec.Members) == 0 || len(spec.Members) > MaxMembers {
		return badf("set %s needs 1–%d members, got %d", spec.Name, MaxMembers, len(spec.Members))
	}
	if spec.Controller && len(spec.HBMM) > 0 {
		return badf("set %s cannot use both HBMM and controller minimerge", spec.Name)
	}
	if err := uniqueNames("member", spec.Members); err != nil {
		return err
	}
	for _, m := range spec.Members {
		for _, other := range c.s.Sets {
			if other.member(m) != nil {
				return badf("member %s already belongs to %s", m, other.Name)
			}
		}
	}
	if err := uniqueNames("mounted host", spec.Mounted); err != nil {
		return err
	}
	for _, h := range spec.Mounted {
		if _, err := c.liveHost(h); err != nil {
			return err
		}
	}
	lists := listsOf(spec)
	hosts, err := c.checkLists(lists)
	if err != nil {
		return err
	}
	st := &setState{Name: spec.Name, Mounted: slices.Clone(spec.Mounted), HBMM: hosts, Lists: lists, Controller: spec.Controller}
	for _, m := range spec.Members {
		st.Members = append(st.Members, memberState{Name: m, Role: FullMember})
	}
	c.s.Sets = append(c.s.Sets, st)
	if spec.Dirty {
		c.foldMerge(st, c.requiredMerge(st, st.sortedMounted(), ""))
	}
	return nil
}

func uniqueNames(kind string, names []string) error {
	seen := map[string]bool{}
	for _, n := range names {
		if err := validName(kind, n); err != nil {
			return err
		}
		if seen[n] {
			return badf("%s %s named twice", kind, n)
		}
		seen[n] = true
	}
	return nil
}

func (c *Core) defineOp(spec *OpSpec) error {
	if spec == nil {
		return badf("missing op spec")
	}
	st, err := c.knownSet(spec.Set)
	if err != nil {
		return err
	}
	op := &opState{Kind: spec.Kind, State: Pending, LBN: spec.LBN, Started: true}
	switch spec.Kind {
	case FullMerge, Minimerge, ControllerMinimerge:
		if st.mergeOp() != nil {
			return badf("%s already has a merge op", st.Name)
		}
		if spec.Target != "" || spec.Bitmap != "" {
			return badf("a merge has no target= or bitmap=")
		}
		if spec.Kind == ControllerMinimerge && !st.Controller {
			return badf("%s does not use controller minimerge", st.Name)
		}
		if spec.Kind == Minimerge {
			if len(st.HBMM) == 0 {
				return badf("%s does not use HBMM (no hbmm= hosts)", st.Name)
			}
			op.Holders, op.Writers = c.masters(st), st.sortedMounted()
			if len(st.Mounted) > 0 && len(op.Holders) == 0 {
				return badf("no mounted host of %s holds a master bitmap", st.Name)
			}
		}
	case FullCopy, Minicopy:
		target := spec.Target
		if target == "" {
			target = st.Members[len(st.Members)-1].Name
		}
		m := st.member(target)
		if m == nil {
			return badf("%s is not a member of %s", target, st.Name)
		}
		if st.copyOpFor(target) != nil {
			return badf("%s already has a copy op for %s", st.Name, target)
		}
		if m.Role == FullMember && st.fullMembers() == 1 {
			return badf("%s is the only full member of %s; a copy needs a source", target, st.Name)
		}
		op.Target = target
		if spec.Kind == Minicopy {
			op.Bitmap = spec.Bitmap
			if op.Bitmap == "" {
				op.Bitmap = spec.Host
			}
			if op.Bitmap == "" && len(st.Mounted) > 0 {
				op.Bitmap = st.sortedMounted()[0]
			}
			if op.Bitmap != "" {
				if _, err := c.liveHost(op.Bitmap); err != nil {
					return err
				}
			}
		} else if spec.Bitmap != "" {
			return badf("a full copy has no bitmap=")
		}
	default:
		return badf("unknown op kind %d", spec.Kind)
	}
	if spec.Host != "" {
		h, err := c.liveHost(spec.Host)
		if err != nil {
			return err
		}
		if !st.mountedOn(h.Name) {
			return badf("%s is not mounted on %s", st.Name, h.Name)
		}
		if r := st.running(); r != nil {
			return badf("%s already runs op%d (%s) on %s", st.Name, r.ID, r.Kind, r.Host)
		}
		if c.s.runningOn(h.Name) >= h.MaxOps {
			return badf("%s is at its op limit (%d)", h.Name, h.MaxOps)
		}
		if spec.Kind == Minimerge && !slices.Contains(op.Holders, h.Name) {
			return badf("a minimerge runs only on a master-bitmap host (%s)", strings.Join(op.Holders, ","))
		}
		op.State, op.Host, op.LastHost = Running, h.Name, h.Name
	}
	if op.Target != "" {
		st.member(op.Target).Role = CopyTarget
	}
	op.ID = c.s.NextOp
	c.s.NextOp++
	if op.LBN > 0 {
		op.StartMode = WordContinued
	}
	st.Ops = append(st.Ops, op)
	return nil
}

// mergeWork is a merge a set requires: its kind and, for a minimerge, the
// hosts whose bitmaps cover it and the writers whose chunks it covers.
type mergeWork struct {
	kind    OpKind
	holders []string
	writers []string
}

// requiredMerge is the merge that the chunks of writers need: a minimerge
// when some master other than gone (a host that failed or aborted) covers
// all of them.
func (c *Core) requiredMerge(st *setState, writers []string, gone string) mergeWork {
	if st.Controller {
		return mergeWork{kind: ControllerMinimerge}
	}
	if len(st.HBMM) > 0 {
		if hs := c.coverers(st, writers, gone); len(hs) > 0 {
			return mergeWork{kind: Minimerge, holders: hs, writers: slices.Clone(writers)}
		}
	}
	return mergeWork{kind: FullMerge}
}

// foldMerge adds merge work to the set's one merge op, creating it if
// needed. The kind becomes full merge if either is full, never downgraded.
func (c *Core) foldMerge(st *setState, w mergeWork) {
	op := st.mergeOp()
	if op == nil {
		op = &opState{ID: c.s.NextOp, Kind: w.kind, State: Pending, Holders: slices.Clone(w.holders), Writers: slices.Clone(w.writers)}
		c.s.NextOp++
		st.Ops = append(st.Ops, op)
		c.notef("%s: %s required (op%d)", st.Name, w.kind, op.ID)
		return
	}
	op.AddedWork++
	kind := op.Kind
	switch {
	case op.Kind == FullMerge || w.kind == FullMerge:
		kind = FullMerge
	case op.Kind == Minimerge && w.kind == Minimerge:
		var both []string
		for _, h := range op.Holders {
			if slices.Contains(w.holders, h) {
				both = append(both, h)
			}
		}
		op.Holders = both
		if len(both) == 0 {
			kind = FullMerge
		}
		for _, w := range w.writers {
			if !slices.Contains(op.Writers, w) {
				op.Writers = append(op.Writers, w)
			}
		}
		slices.SortFunc(op.Writers, compareNames)
	case op.Kind != w.kind:
		kind = FullMerge
	}
	if kind != op.Kind {
		c.notef("%s: op%d becomes %s with the added work", st.Name, op.ID, kind)
		op.Kind = kind
	}
	if kind != Minimerge {
		op.Holders, op.Writers = nil, nil
	}
}

func (c *Core) mount(set, host string) error {
	st, err := c.knownSet(set)
	if err != nil {
		return err
	}
	if _, err := c.liveHost(host); err != nil {
		return err
	}
	if st.mountedOn(host) {
		return badf("%s is already mounted on %s", set, host)
	}
	first := len(st.Mounted) == 0
	before := c.masters(st)
	st.Mounted = append(st.Mounted, host)
	c.refreshMasters(st, before, host)
	if !first {
		return nil
	}
	for _, op := range st.opsByID() {
		if !op.Started {
			continue // newly required work, never underway: nothing to restart
		}
		c.apply(st, op, lookup(RowMount, FocusSpecified, op.Kind), outcomeCtx{reason: "mounted on " + host})
	}
	return nil
}

func (c *Core) dismount(set, host string) error {
	st, err := c.knownSet(set)
	if err != nil {
		return err
	}
	if _, err := c.liveOrDeadHost(host); err != nil {
		return err
	}
	if !st.mountedOn(host) {
		return badf("%s is not mounted on %s", set, host)
	}
	before := c.masters(st)
	c.unmount(st, host)
	c.refreshMasters(st, before, "")
	if len(st.Mounted) == 0 {
		c.orphan(st, "dismounted on "+host)
		return nil
	}
	ctx := outcomeCtx{reason: "dismounted on " + host}
	for _, op := range st.opsByID() {
		if op.Host == host { // in progress (or suspended) on the departing host
			c.apply(st, op, lookup(RowDismount, FocusDismounted, op.Kind), ctx)
		}
	}
	c.applyOthers(st, RowDismount, st.sortedMounted(), ctx)
	return nil
}

func (c *Core) abort(set, host string) error {
	st, err := c.knownSet(set)
	if err != nil {
		return err
	}
	if _, err := c.liveHost(host); err != nil {
		return err
	}
	if !st.mountedOn(host) {
		return badf("%s is not mounted on %s", set, host)
	}
	var sharers []string // "this system": the other hosts that have the set mounted
	for _, h := range st.sortedMounted() {
		if h != host {
			sharers = append(sharers, h)
		}
	}
	ctx := outcomeCtx{lostHost: host, reason: set + " aborted on " + host}
	work, before := c.requiredMerge(st, []string{host}, host), c.masters(st)
	c.unmount(st, host)
	c.refreshMasters(st, before, "")
	c.notef("%s aborted on %s", set, host)
	if len(st.Mounted) == 0 {
		c.orphan(st, ctx.reason)
	} else {
		for _, op := range st.opsByID() {
			c.apply(st, op, lookup(RowAbort, FocusAborted, op.Kind), ctx)
		}
	}
	c.foldMerge(st, work)
	c.applyOthers(st, RowAbort, sharers, ctx)
	c.openWindow(RowAbort, set+" abort on "+host)
	return nil
}

// applyOthers applies an event's "All other SSs" cells to the ops of the
// other sets that are underway on one of the given hosts ("this system":
// a host that sees the event because it has the focused set mounted).
func (c *Core) applyOthers(focused *setState, ev TableEvent, hosts []string, ctx outcomeCtx) {
	for _, other := range c.s.setsByName() {
		if other == focused {
			continue
		}
		for _, op := range other.opsByID() {
			if op.Host != "" && slices.Contains(hosts, op.Host) {
				c.apply(other, op, lookup(ev, FocusOthers, op.Kind), ctx)
			}
		}
	}
}

// ---- members

// checkHBMMHosts: HBMM masters are distinct hosts the cluster knows.
func (c *Core) checkHBMMHosts(hosts []string) error {
	if err := uniqueNames("hbmm host", hosts); err != nil {
		return err
	}
	for _, h := range hosts {
		if _, err := c.liveOrDeadHost(h); err != nil {
			return err
		}
	}
	return nil
}

// setHBMM changes a set's HBMM master hosts.
func (c *Core) setHBMM(ev Event) error {
	st, err := c.knownSet(ev.Set)
	if err != nil {
		return err
	}
	lists := listsOf(ev.Spec)
	if st.Controller && len(lists) > 0 {
		return badf("%s uses write logs (controller minimerge); a set uses HBMM or write logs, not both", st.Name)
	}
	hosts, err := c.checkLists(lists)
	if err != nil {
		return err
	}
	if op := st.mergeOp(); op != nil && op.Kind == Minimerge {
		return badf("%s has op%d minimerge %s; change its HBMM policy when it completes", st.Name, op.ID, op.State)
	}
	before := c.masters(st)
	st.HBMM, st.Lists, st.Reset, st.Write = hosts, lists, 0, ""
	if ev.Spec != nil && len(hosts) > 0 {
		switch ev.Spec.HBMMWrite {
		case "", WriteAll:
		case WriteActive:
			st.Write = WriteActive
		default:
			return badf("hbmm write policy %q: want %s or %s", ev.Spec.HBMMWrite, WriteAll, WriteActive)
		}
		st.Reset = ev.Spec.HBMMReset
	}
	switch {
	case len(hosts) == 0:
		c.notef("%s: HBMM disabled", st.Name)
	case len(lists) == 1 && lists[0].Count > 0:
		c.notef("%s: HBMM masters %s (count %d)", st.Name, strings.Join(hosts, ","), lists[0].Count)
	default:
		c.notef("%s: HBMM masters %s", st.Name, strings.Join(hosts, ","))
	}
	c.refreshMasters(st, before, "")
	return nil
}

func (c *Core) addMember(set, member string, fullCopy bool) error {
	st, err := c.knownSet(set)
	if err != nil {
		return err
	}
	if err := validName("member", member); err != nil {
		return err
	}
	if len(st.Mounted) == 0 {
		return badf("%s is not mounted on any host", set)
	}
	if st.member(member) != nil {
		return badf("%s is already a member of %s", member, set)
	}
	for _, other := range c.s.Sets {
		if other.member(member) != nil {
			return badf("%s is a member of %s", member, other.Name)
		}
	}
	if len(st.Members) >= MaxMembers {
		return badf("%s already has %d members", set, MaxMembers)
	}
	if fullCopy {
		st.dropBitmap(member)
	}
	op := &opState{ID: c.s.NextOp, Kind: FullCopy, State: Pending, Target: member}
	if b, ok := st.bitmapFor(member); ok {
		op.Kind, op.Bitmap = Minicopy, b.Holder
	}
	for _, prior := range st.opsByID() {
		c.apply(st, prior, lookup(RowMemberAdded, FocusSpecified, prior.Kind), outcomeCtx{reason: member + " added"})
	}
	c.applyOthers(st, RowMemberAdded, st.sortedMounted(), outcomeCtx{reason: member + " added"})
	c.s.NextOp++
	st.Members = append(st.Members, memberState{Name: member, Role: CopyTarget})
	st.Ops = append(st.Ops, op)
	c.notef("%s: %s required for %s (op%d)", set, op.Kind, member, op.ID)
	return nil
}

// removeMember takes a member out of a set: by an operator, or expelled
// after a write error (automatic, with a minicopy bitmap).
func (c *Core) removeMember(set, member string, minicopy bool, host string, ioError bool) error {
	st, err := c.knownSet(set)
	if err != nil {
		return err
	}
	if err := validName("member", member); err != nil {
		return err
	}
	m := st.member(member)
	if m == nil {
		return badf("%s is not a member of %s", member, set)
	}
	if m.Role == FullMember && st.fullMembers() == 1 {
		if ioError {
			// The last full member is never expelled: the request fails.
			c.notef("%s: %s is the last full member; not expelled, the failing request fails", set, member)
			return nil
		}
		return badf("%s is the last full member of %s", member, set)
	}
	if minicopy && m.Role != FullMember {
		if !ioError {
			return badf("%s is a copy target; only a full member can leave with a minicopy bitmap", member)
		}
		minicopy = false
	}
	if minicopy {
		if host == "" {
			if len(st.Mounted) == 0 {
				return badf("%s is not mounted on any host to hold the minicopy bitmap", set)
			}
			host = st.sortedMounted()[0]
		}
		if _, err := c.liveHost(host); err != nil {
			return err
		}
		if !st.mountedOn(host) {
			return badf("%s is not mounted on %s", set, host)
		}
	} else if host != "" {
		if _, err := c.liveHost(host); err != nil {
			return err
		}
	}
	if op := st.copyOpFor(member); op != nil {
		if op.State == Running {
			c.emit(Action{Kind: ActStop, Op: op.ID, Set: set, OpKind: op.Kind, Host: op.Host, LBN: op.LBN, Target: member, Reason: "target removed"})
		}
		st.removeOp(op.ID)
		c.notef("%s: op%d dropped: its target %s left the set", set, op.ID, member)
	}
	st.Members = slices.DeleteFunc(st.Members, func(x memberState) bool { return x.Name == member })
	st.dropBitmap(member)
	what := "removed"
	if ioError {
		what = "expelled after a write error"
	}
	if minicopy {
		st.Bitmaps = append(st.Bitmaps, bitmapState{Member: member, Holder: host})
		c.notef("%s: %s %s; minicopy bitmap on %s", set, member, what, host)
	} else {
		c.notef("%s: %s %s", set, member, what)
	}
	return nil
}

// ---- commands

func (c *Core) demandMerge(set string) error {
	st, err := c.knownSet(set)
	if err != nil {
		return err
	}
	if len(st.Mounted) == 0 {
		return badf("%s is not mounted on any host", set)
	}
	focus, work := FocusNoController, c.requiredMerge(st, st.sortedMounted(), "")
	if st.Controller {
		focus, work = FocusController, mergeWork{kind: FullMerge}
	}
	for _, op := range st.opsByID() {
		c.apply(st, op, lookup(RowDemandMerge, focus, op.Kind), outcomeCtx{reason: "demand merge"})
	}
	c.foldMerge(st, work)
	c.applyOthers(st, RowDemandMerge, st.sortedMounted(), outcomeCtx{reason: "demand merge of " + set})
	return nil
}

func (c *Core) evalResources(host string) error {
	if _, err := c.liveHost(host); err != nil {
		return err
	}
	for _, st := range c.s.setsByName() {
		if !st.mountedOn(host) {
			continue
		}
		for _, op := range st.opsByID() {
			if op.State == Running && op.Host == host {
				c.apply(st, op, lookup(RowEvalResources, FocusMountedHere, op.Kind), outcomeCtx{reason: "evaluate resources on " + host})
			}
		}
	}
	c.openWindow(RowEvalResources, "evaluate resources on "+host)
	return nil
}

// findRunning resolves the op a progress or completion report is about. A
// report naming an op that no longer runs on the reporting host is stale.
func (c *Core) findRunning(ev Event) (*setState, *opState, bool, error) {
	st, err := c.knownSet(ev.Set)
	if err != nil {
		return nil, nil, false, err
	}
	if ev.Op == 0 {
		op := st.running()
		if op == nil {
			return nil, nil, false, badf("%s has no running op", st.Name)
		}
		return st, op, false, nil
	}
	for _, op := range st.Ops {
		if op.ID == ev.Op {
			if op.State != Running || (ev.Host != "" && op.Host != ev.Host) || (ev.Attempt != 0 && ev.Attempt != op.Attempt) {
				return st, op, true, nil
			}
			return st, op, false, nil
		}
	}
	return st, nil, true, nil
}

func (c *Core) progress(ev Event) error {
	st, op, stale, err := c.findRunning(ev)
	if err != nil || stale {
		return err
	}
	if ev.LBN < op.LBN {
		return badf("%s op%d checkpoint cannot move backwards from %d to %d", st.Name, op.ID, op.LBN, ev.LBN)
	}
	op.LBN = ev.LBN
	return nil
}

func (c *Core) complete(ev Event) error {
	st, op, stale, err := c.findRunning(ev)
	if err != nil || stale {
		return err
	}
	st.removeOp(op.ID)
	if op.Kind.IsCopy() {
		if m := st.member(op.Target); m != nil {
			m.Role = FullMember
		}
		if op.Kind == Minicopy {
			st.dropBitmap(op.Target)
		}
	}
	c.emit(Action{Kind: ActDone, Op: op.ID, Set: st.Name, OpKind: op.Kind, Host: op.Host, LBN: op.LBN, Target: op.Target})
	c.notef("%s: op%d %s completed on %s", st.Name, op.ID, op.Kind, op.Host)
	return nil
}
