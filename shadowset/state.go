package shadowset

import (
	"cmp"
	"slices"
	"time"
)

// OpID identifies an op for its whole life, across cancels and restarts.
type OpID uint64

const (
	// DefaultPriority is SET SHADOW /PRIORITY's default.
	DefaultPriority = 5000
	// MaxPriority is the highest priority a host may give a set.
	MaxPriority = 10000
	// DefaultMaxOps is the default number of ops a host runs at once.
	DefaultMaxOps = 4
	// MaxMaxOps bounds a host's op limit (SHADOW_MAX_COPY is 0–200).
	MaxMaxOps = 200
	// DefaultDelay is the default recovery delay (SHADOW_REC_DLY's default).
	DefaultDelay = 20 * time.Second
	// MaxMembers is the most members a set may have.
	MaxMembers = 6
)

// affinity binds a waiting op to a host.
type affinity uint8

const (
	anyHost affinity = iota
	// preferLast: a Restarted op starts over on the same host when it can.
	preferLast
	// onlyLast: a Suspended op resumes only on its own host.
	onlyLast
)

// state is everything the core knows. Fields are exported for the
// snapshot encoding only; nothing outside the package sees them.
type state struct {
	Version    int           `json:"version"`
	Now        time.Duration `json:"now"`
	Delay      time.Duration `json:"delay"`
	WindowOpen bool          `json:"window_open"`
	WindowEnd  time.Duration `json:"window_end"`
	NextOp     OpID          `json:"next_op"`
	Hosts      []*hostState  `json:"hosts"`
	Sets       []*setState   `json:"sets"`
}

type hostState struct {
	Name   string `json:"name"`
	Alive  bool   `json:"alive"`
	MaxOps int    `json:"max_ops"`
	// Priority per set name; absent means DefaultPriority. Only ever looked
	// up, never iterated, so map order cannot leak into decisions.
	Priority map[string]int `json:"priority,omitempty"`
}

type memberState struct {
	Name string `json:"name"`
	Role Role   `json:"role"`
}

// bitmapState is a minicopy bitmap for a member that left the set.
type bitmapState struct {
	Member string `json:"member"`
	Holder string `json:"holder"`
}

type setState struct {
	Name    string        `json:"name"`
	Members []memberState `json:"members"`
	Mounted []string      `json:"mounted,omitempty"`
	// HBMM are the master candidates (every host of Lists), Lists the
	// policy's master lists in order.
	HBMM  []string     `json:"hbmm,omitempty"`
	Lists []MasterList `json:"hbmm_lists,omitempty"`
	// Reset is the policy's RESET_THRESHOLD (SetSpec.HBMMReset).
	Reset uint64 `json:"hbmm_reset,omitempty"`
	// Write is the policy's write policy (SetSpec.HBMMWrite).
	Write string `json:"hbmm_write,omitempty"`
	// Gaps are the (master, writer) pairs where the master has become one
	// after the writer mounted, and the writer has not yet reported the
	// handshake (EvCovered) that makes the master's bitmap for it whole.
	Gaps       []CoverGap    `json:"gaps,omitempty"`
	Controller bool          `json:"controller,omitempty"`
	Bitmaps    []bitmapState `json:"bitmaps,omitempty"`
	Ops        []*opState    `json:"ops,omitempty"`
}

type opState struct {
	ID       OpID    `json:"id"`
	Kind     OpKind  `json:"kind"`
	State    OpState `json:"state"`
	Host     string  `json:"host,omitempty"`
	LastHost string  `json:"last_host,omitempty"`
	LBN      uint64  `json:"lbn"`
	Target   string  `json:"target,omitempty"`
	// Bitmap is the host holding a minicopy's master bitmap.
	Bitmap string `json:"bitmap,omitempty"`
	// Holders are the hosts whose master bitmaps cover a minimerge's work.
	Holders []string `json:"holders,omitempty"`
	// Writers are the hosts whose chunks a minimerge covers (a failed
	// writer, every writer for a demand merge).
	Writers   []string `json:"writers,omitempty"`
	AddedWork int      `json:"added_work,omitempty"`
	History   []Word   `json:"history,omitempty"`
	// Started: the op has run (or was found underway), so Table 8-1's
	// prior-operation columns apply to it.
	Started bool `json:"started,omitempty"`
	// Resume is the outcome waiting for the delay window to close:
	// WordRestarted or WordContinued, zero for none.
	Resume   Word     `json:"resume,omitempty"`
	Affinity affinity `json:"affinity,omitempty"`
	// StartMode is how the next start is announced (restart or continue).
	StartMode Word `json:"start_mode,omitempty"`
	// Attempt counts the op's starts. Reports name the attempt they come
	// from, so a report from an engine that was stopped (and perhaps
	// restarted on the same host) is recognised as stale.
	Attempt uint64 `json:"attempt,omitempty"`
}

func (s *state) clone() *state {
	c := *s
	c.Hosts = make([]*hostState, len(s.Hosts))
	for i, h := range s.Hosts {
		hc := *h
		if h.Priority != nil {
			hc.Priority = make(map[string]int, len(h.Priority))
			for k, v := range h.Priority {
				hc.Priority[k] = v
			}
		}
		c.Hosts[i] = &hc
	}
	c.Sets = make([]*setState, len(s.Sets))
	for i, st := range s.Sets {
		sc := *st
		sc.Members = slices.Clone(st.Members)
		sc.Mounted = slices.Clone(st.Mounted)
		sc.HBMM = slices.Clone(st.HBMM)
		sc.Gaps = slices.Clone(st.Gaps)
		sc.Lists = cloneLists(st.Lists)
		sc.Bitmaps = slices.Clone(st.Bitmaps)
		sc.Ops = make([]*opState, len(st.Ops))
		for j, op := range st.Ops {
			oc := *op
			oc.Holders = slices.Clone(op.Holders)
			oc.Writers = slices.Clone(op.Writers)
			oc.History = slices.Clone(op.History)
			sc.Ops[j] = &oc
		}
		c.Sets[i] = &sc
	}
	return &c
}

func (s *state) host(name string) *hostState {
	for _, h := range s.Hosts {
		if h.Name == name {
			return h
		}
	}
	return nil
}

func (s *state) set(name string) *setState {
	for _, st := range s.Sets {
		if st.Name == name {
			return st
		}
	}
	return nil
}

func (s *state) alive(name string) bool {
	h := s.host(name)
	return h != nil && h.Alive
}

// setsByName returns the sets in name order: every decision that walks
// sets walks them this way.
func (s *state) setsByName() []*setState {
	out := slices.Clone(s.Sets)
	slices.SortFunc(out, func(a, b *setState) int { return compareNames(a.Name, b.Name) })
	return out
}

func (s *state) priority(host, set string) int {
	h := s.host(host)
	if h == nil {
		return 0
	}
	if p, ok := h.Priority[set]; ok {
		return p
	}
	return DefaultPriority
}

func (s *state) runningOn(host string) int {
	n := 0
	for _, st := range s.Sets {
		for _, op := range st.Ops {
			if op.State == Running && op.Host == host {
				n++
			}
		}
	}
	return n
}

// compareNames orders names in byte order, the host-choice tie-break.
func compareNames(a, b string) int { return cmp.Compare(a, b) }

func (st *setState) mountedOn(host string) bool { return slices.Contains(st.Mounted, host) }

func (st *setState) sortedMounted() []string {
	out := slices.Clone(st.Mounted)
	slices.Sort(out)
	return out
}

func (st *setState) member(name string) *memberState {
	for i := range st.Members {
		if st.Members[i].Name == name {
			return &st.Members[i]
		}
	}
	return nil
}

func (st *setState) fullMembers() int {
	n := 0
	for _, m := range st.Members {
		if m.Role == FullMember {
			n++
		}
	}
	return n
}

func (st *setState) mergeOp() *opState {
	for _, op := range st.Ops {
		if op.Kind.IsMerge() {
			return op
		}
	}
	return nil
}

func (st *setState) copyOpFor(target string) *opState {
	for _, op := range st.Ops {
		if op.Kind.IsCopy() && op.Target == target {
			return op
		}
	}
	return nil
}

func (st *setState) running() *opState {
	for _, op := range st.Ops {
		if op.State == Running {
			return op
		}
	}
	return nil
}

func (st *setState) bitmapFor(member string) (bitmapState, bool) {
	for _, b := range st.Bitmaps {
		if b.Member == member {
			return b, true
		}
	}
	return bitmapState{}, false
}

func (st *setState) dropBitmap(member string) {
	st.Bitmaps = slices.DeleteFunc(st.Bitmaps, func(b bitmapState) bool { return b.Member == member })
}

// opsByID returns the set's ops in the order they became required.
func (st *setState) opsByID() []*opState {
	out := slices.Clone(st.Ops)
	slices.SortFunc(out, func(a, b *opState) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// queueClass orders waiting ops: a pending minimerge runs before pending
// copies, and a full merge after them (Table 8-1: "the merge is done before
// the copy if and only if the merge is a minimerge").
func queueClass(k OpKind) int {
	switch {
	case k.isMini():
		return 0
	case k.IsCopy():
		return 1
	}
	return 2
}

// queue returns the set's ops in the order they will run, the running one
// first, then by class, then in the order they became required.
func (st *setState) queue() []*opState {
	out := st.opsByID()
	slices.SortStableFunc(out, func(a, b *opState) int {
		ra, rb := a.State == Running, b.State == Running
		if ra != rb {
			if ra {
				return -1
			}
			return 1
		}
		return queueClass(a.Kind) - queueClass(b.Kind)
	})
	return out
}

func (st *setState) removeOp(id OpID) {
	st.Ops = slices.DeleteFunc(st.Ops, func(o *opState) bool { return o.ID == id })
}

// stronger merges two pending resume outcomes: a restart wins over a
// continue, because restarting never skips a chunk.
func stronger(a, b Word) Word {
	if a == WordRestarted || b == WordRestarted {
		return WordRestarted
	}
	if a == WordContinued || b == WordContinued {
		return WordContinued
	}
	return 0
}
