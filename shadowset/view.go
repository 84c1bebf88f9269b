package shadowset

import (
	"encoding/json"
	"fmt"
	"slices"
	"time"
)

const snapshotVersion = 1

// Snapshot encodes the core's whole state, versioned. Pending Ready work is
// not part of it: take a snapshot after Advance.
func (c *Core) Snapshot() ([]byte, error) {
	b, err := json.Marshal(c.s)
	if err != nil {
		return nil, fmt.Errorf("shadowset: encode snapshot: %w", err)
	}
	return b, nil
}

// Restore builds a core from a Snapshot. A snapshot of another version, or
// one that breaks the core's invariants, is refused.
func Restore(b []byte) (*Core, error) {
	var probe struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(b, &probe); err != nil {
		return nil, fmt.Errorf("shadowset: decode snapshot: %w", err)
	}
	if probe.Version != snapshotVersion {
		return nil, fmt.Errorf("%w %d (this core reads %d)", ErrSnapshotVersion, probe.Version, snapshotVersion)
	}
	s := &state{}
	if err := json.Unmarshal(b, s); err != nil {
		return nil, fmt.Errorf("shadowset: decode snapshot: %w", err)
	}
	c := &Core{s: s}
	if err := c.CheckInvariants(); err != nil {
		return nil, fmt.Errorf("shadowset: snapshot is inconsistent: %w", err)
	}
	return c, nil
}

// OpView is a read-only copy of an op.
type OpView struct {
	ID        OpID
	Set       string
	Kind      OpKind
	State     OpState
	Host      string // running or suspended on
	LastHost  string
	LBN       uint64
	Target    string
	Bitmap    string
	Holders   []string
	Writers   []string
	AddedWork int
	History   []Word
	// Attempt counts the op's starts (a report of another attempt is
	// stale).
	Attempt uint64
}

// MemberView is a read-only copy of a member.
type MemberView struct {
	Name string
	Role Role
	// Bitmap is the host holding its minicopy bitmap, if it left with one.
	Bitmap string
}

// SetView is a read-only copy of a set, its ops in queue order.
type SetView struct {
	Name    string
	Members []MemberView
	Removed []MemberView // former members with a minicopy bitmap
	Mounted []string
	// HBMM are the master candidates, sorted; Masters those holding
	// master bitmaps now; Gaps the masters that do not yet cover a writer.
	HBMM  []string
	Lists []MasterList
	// HBMMReset is the policy's RESET_THRESHOLD in 512-byte blocks (0:
	// never).
	HBMMReset uint64
	// HBMMWrite is the write policy: WriteActive, or "" for all.
	HBMMWrite  string
	Masters    []string
	Gaps       []CoverGap
	Controller bool
	Ops        []OpView
}

// CoverGap: Master holds master bitmaps of the set but does not yet cover
// Writer (Writer has not reported its handshake for it).
type CoverGap struct {
	Master string `json:"master"`
	Writer string `json:"writer"`
}

// Active is writer's active master under write policy active: the one
// master on another host that covers it ("" when none does yet: the
// writer's next handshake picks one, ActiveCandidate).
func (v SetView) Active(writer string) string {
	for _, m := range v.Masters {
		if m != writer && v.Covers(m, writer) {
			return m
		}
	}
	return ""
}

// ActiveCandidate is the master writer records its bit-sets on
// synchronously under write policy active: its active master, or, while
// it has none, the first master on another host (the one its handshake
// will make active); "" when there is no master on another host.
func (v SetView) ActiveCandidate(writer string) string {
	if a := v.Active(writer); a != "" {
		return a
	}
	for _, m := range v.Masters {
		if m != writer {
			return m
		}
	}
	return ""
}

// Covers reports whether master's bitmap for writer is whole.
func (v SetView) Covers(master, writer string) bool {
	return slices.Contains(v.Masters, master) && !slices.Contains(v.Gaps, CoverGap{Master: master, Writer: writer})
}

// HostView is a read-only copy of a host.
type HostView struct {
	Name    string
	Alive   bool
	MaxOps  int
	Running int
}

// Sets returns every set, in name order.
func (c *Core) Sets() []SetView {
	var out []SetView
	for _, st := range c.s.setsByName() {
		out = append(out, c.setView(st))
	}
	return out
}

// Set returns one set.
func (c *Core) Set(name string) (SetView, bool) {
	st := c.s.set(name)
	if st == nil {
		return SetView{}, false
	}
	return c.setView(st), true
}

// Hosts returns every host, in name order.
func (c *Core) Hosts() []HostView {
	var out []HostView
	for _, h := range c.s.Hosts {
		out = append(out, HostView{Name: h.Name, Alive: h.Alive, MaxOps: h.MaxOps, Running: c.s.runningOn(h.Name)})
	}
	slices.SortFunc(out, func(a, b HostView) int { return compareNames(a.Name, b.Name) })
	return out
}

// Priority returns a host's priority for a set.
func (c *Core) Priority(host, set string) int { return c.s.priority(host, set) }

// Delay is the recovery delay.
func (c *Core) Delay() time.Duration { return c.s.Delay }

func (c *Core) setView(st *setState) SetView {
	v := SetView{Name: st.Name, Mounted: st.sortedMounted(), HBMM: slices.Sorted(slices.Values(st.HBMM)), Lists: cloneLists(st.Lists), HBMMReset: st.Reset, HBMMWrite: st.Write,
		Masters: c.masters(st), Gaps: sortedGaps(st.Gaps), Controller: st.Controller}
	for _, m := range st.Members {
		v.Members = append(v.Members, MemberView{Name: m.Name, Role: m.Role})
	}
	bs := slices.Clone(st.Bitmaps)
	slices.SortFunc(bs, func(a, b bitmapState) int { return compareNames(a.Member, b.Member) })
	for _, b := range bs {
		v.Removed = append(v.Removed, MemberView{Name: b.Member, Bitmap: b.Holder})
	}
	for _, op := range st.queue() {
		v.Ops = append(v.Ops, OpView{
			ID: op.ID, Set: st.Name, Kind: op.Kind, State: op.State, Host: op.Host, LastHost: op.LastHost,
			LBN: op.LBN, Target: op.Target, Bitmap: op.Bitmap, Holders: slices.Clone(op.Holders), Writers: slices.Clone(op.Writers),
			AddedWork: op.AddedWork, History: slices.Clone(op.History), Attempt: op.Attempt,
		})
	}
	return v
}

// ShuffleInternal permutes the core's internal orders (hosts, sets, ops,
// mounted and master lists) with the given shuffle, which has
// rand.Shuffle's signature. Decisions must not change: tests use it to
// prove that no decision depends on storage or map order.
func (c *Core) ShuffleInternal(shuffle func(n int, swap func(i, j int))) {
	shuffleSlice(shuffle, c.s.Hosts)
	shuffleSlice(shuffle, c.s.Sets)
	for _, st := range c.s.Sets {
		shuffleSlice(shuffle, st.Mounted)
		// (st.HBMM is not shuffled: it is the policy's order of
		// preference, which decides the masters under a COUNT.)
		shuffleSlice(shuffle, st.Gaps)
		shuffleSlice(shuffle, st.Bitmaps)
		shuffleSlice(shuffle, st.Ops)
		for _, op := range st.Ops {
			shuffleSlice(shuffle, op.Holders)
			shuffleSlice(shuffle, op.Writers)
		}
	}
}

func shuffleSlice[T any](shuffle func(n int, swap func(i, j int)), s []T) {
	shuffle(len(s), func(i, j int) { s[i], s[j] = s[j], s[i] })
}

// CheckInvariants verifies the structural rules every state must keep. The
// fuzzer calls it after every step.
func (c *Core) CheckInvariants() error {
	if c.s.NextOp == 0 {
		return fmt.Errorf("next op id is zero")
	}
	hosts := map[string]bool{}
	for _, h := range c.s.Hosts {
		if hosts[h.Name] {
			return fmt.Errorf("host %s listed twice", h.Name)
		}
		hosts[h.Name] = true
	}
	seenSet := map[string]bool{}
	seenOp := map[OpID]bool{}
	for _, st := range c.s.Sets {
		if seenSet[st.Name] {
			return fmt.Errorf("set %s listed twice", st.Name)
		}
		seenSet[st.Name] = true
		if st.Controller && len(st.HBMM) > 0 {
			return fmt.Errorf("%s uses both HBMM and controller minimerge", st.Name)
		}
		if st.fullMembers() == 0 {
			return fmt.Errorf("%s has no full member", st.Name)
		}
		masters := c.masters(st)
		for _, g := range st.Gaps {
			if !slices.Contains(masters, g.Master) || !st.mountedOn(g.Writer) || g.Master == g.Writer {
				return fmt.Errorf("%s has a stale cover gap %s→%s", st.Name, g.Master, g.Writer)
			}
		}
		for _, h := range st.Mounted {
			if !c.s.alive(h) {
				return fmt.Errorf("%s is mounted on %s, which is not up", st.Name, h)
			}
		}
		running, merges := 0, 0
		targets := map[string]bool{}
		for _, op := range st.Ops {
			if op.ID == 0 || op.ID >= c.s.NextOp || seenOp[op.ID] {
				return fmt.Errorf("%s op%d has a bad or duplicate id", st.Name, op.ID)
			}
			seenOp[op.ID] = true
			switch op.State {
			case Running:
				running++
				if !c.s.alive(op.Host) {
					return fmt.Errorf("%s op%d runs on %q, which is not up", st.Name, op.ID, op.Host)
				}
				if !st.mountedOn(op.Host) {
					return fmt.Errorf("%s op%d runs on %s, which does not mount it", st.Name, op.ID, op.Host)
				}
				if op.Kind == Minimerge && !slices.Contains(op.Holders, op.Host) {
					return fmt.Errorf("%s op%d minimerge runs on %s, which holds no master bitmap", st.Name, op.ID, op.Host)
				}
			case Suspended:
				if op.Host == "" {
					return fmt.Errorf("%s op%d is suspended on no host", st.Name, op.ID)
				}
			case Pending, Canceled:
				if op.Host != "" {
					return fmt.Errorf("%s op%d is %s but names host %s", st.Name, op.ID, op.State, op.Host)
				}
			default:
				return fmt.Errorf("%s op%d has bad state %d", st.Name, op.ID, op.State)
			}
			if op.Kind.IsMerge() {
				merges++
			} else if op.Kind.IsCopy() {
				if targets[op.Target] {
					return fmt.Errorf("%s has two copies to %s", st.Name, op.Target)
				}
				targets[op.Target] = true
				if m := st.member(op.Target); m == nil || m.Role != CopyTarget {
					return fmt.Errorf("%s op%d copies to %s, which is not a copy target", st.Name, op.ID, op.Target)
				}
			} else {
				return fmt.Errorf("%s op%d has bad kind %d", st.Name, op.ID, op.Kind)
			}
		}
		if running > 1 {
			return fmt.Errorf("%s runs %d ops at once", st.Name, running)
		}
		if merges > 1 {
			return fmt.Errorf("%s has %d merge ops", st.Name, merges)
		}
		if !c.s.WindowOpen && len(st.Mounted) > 0 {
			for _, op := range st.Ops {
				if op.State == Canceled || op.State == Suspended || op.Resume != 0 {
					return fmt.Errorf("%s op%d still waits for a closed delay window", st.Name, op.ID)
				}
			}
		}
	}
	return nil
}
