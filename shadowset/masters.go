package shadowset

import (
	"slices"
	"strings"
)

// HBMM masters across hosts. Every host that mounts a set writes to it;
// each writer records its chunks on the set's masters before its writes
// reach a member, and each master keeps one bitmap per writer. The core
// decides who the masters are and which of them cover which writer, so
// that every host computes the same minimerge from the same log:
//
//   - The masters are chosen by the policy's master lists (OpenVMS's
//     MASTER_LIST and COUNT) among the hosts that are up and mount the
//     set. A lone master is also a writer, and its failure would take its
//     own chunks' only bitmap down with it: when the lists leave one
//     master and another candidate is eligible, that one is a master too.
//   - A master that was one when a writer mounted covers that writer: the
//     writer's first write already goes to it.
//   - A master that becomes one later (a replacement, a policy change, a
//     candidate that mounts) has missed the writer's earlier chunks and may
//     be absent from the writer's cache of known-set chunks. It covers the
//     writer only after the writer has emptied that cache, drained the
//     writes it issued before, flushed every member (so nothing written
//     before can still differ) and said so with EvCovered. Until then the
//     pair is a gap.
//   - A master covers its own writes (its own bitmap is local), but never
//     survives its own failure: a failed writer is covered only by the
//     other masters.

// Write policies (the seed's replica write policies): under WriteAll
// every master acknowledges a writer's bit-set before its write; under
// WriteActive one active master on another host does, and the others
// (standbys) are brought up to date asynchronously. A standby may have
// missed bit-sets, so the core counts it as covering the writer only once
// the writer has made it its active master (EvCovered): after confirming
// that it holds every bit the writer had acknowledged, or after the
// handshake's flush. Each writer has at most one covering master on
// another host under WriteActive; when that one fails, the writer's chunks
// need a full merge until the writer's EvCovered names another.
const (
	WriteAll    = "all"
	WriteActive = "active"
)

// MaxHBMMCount is OpenVMS's limit on a policy's COUNT; MaxMasters on the
// masters of one set.
const (
	MaxHBMMCount = 12
	MaxMasters   = 6
)

// MasterList is one of a policy's master lists: up to Count of Hosts ("*":
// any host) hold master bitmaps; Count 0: min(len(Hosts), MaxMasters).
type MasterList struct {
	Hosts []string `json:"hosts"`
	Count int      `json:"count,omitempty"`
}

func cloneLists(ls []MasterList) []MasterList {
	out := slices.Clone(ls)
	for i := range out {
		out[i].Hosts = slices.Clone(ls[i].Hosts)
	}
	return out
}

// listsOf is a spec's master lists: HBMMLists, or one list of HBMM.
func listsOf(spec *SetSpec) []MasterList {
	if spec == nil {
		return nil
	}
	if len(spec.HBMMLists) > 0 {
		return cloneLists(spec.HBMMLists)
	}
	if len(spec.HBMM) == 0 {
		return nil
	}
	return []MasterList{{Hosts: slices.Clone(spec.HBMM), Count: spec.HBMMCount}}
}

// checkLists validates master lists and returns their hosts.
func (c *Core) checkLists(ls []MasterList) ([]string, error) {
	var hosts []string
	for _, l := range ls {
		if len(l.Hosts) == 0 {
			return nil, badf("an HBMM master list names no host")
		}
		if l.Count < 0 || l.Count > MaxHBMMCount {
			return nil, badf("HBMM count %d out of range 0–%d", l.Count, MaxHBMMCount)
		}
		for _, h := range l.Hosts {
			if h == "*" {
				continue
			}
			if slices.Contains(hosts, h) {
				return nil, badf("hbmm host %s named twice", h)
			}
			hosts = append(hosts, h)
		}
	}
	if err := c.checkHBMMHosts(hosts); err != nil {
		return nil, err
	}
	if len(ls) > 0 && len(hosts) == 0 {
		hosts = []string{"*"}
	}
	return hosts, nil
}

// masters are the hosts holding the set's master bitmaps now, sorted:
// from each list in turn, up to its count of its hosts (in the list's
// order; any host, by name, for "*") that are up and mount the set, at
// most MaxMasters in all.
func (c *Core) masters(st *setState) []string {
	eligible := func(h string) bool { return c.s.alive(h) && st.mountedOn(h) }
	var out []string
	for _, l := range st.Lists {
		count := l.Count
		if count <= 0 {
			count = min(len(l.Hosts), MaxMasters)
		}
		hosts := l.Hosts
		if slices.Contains(hosts, "*") {
			hosts = st.sortedMounted()
			if l.Count <= 0 {
				count = MaxMasters
			}
		}
		took := 0
		for _, h := range hosts {
			if took >= count || len(out) >= MaxMasters {
				break
			}
			if eligible(h) && !slices.Contains(out, h) {
				out = append(out, h)
				took++
			}
		}
	}
	if len(out) == 1 {
		// A lone master is a writer too: add the next eligible candidate.
		for _, l := range st.Lists {
			hosts := l.Hosts
			if slices.Contains(hosts, "*") {
				hosts = st.sortedMounted()
			}
			for _, h := range hosts {
				if len(out) == 1 && eligible(h) && h != out[0] {
					out = append(out, h)
				}
			}
		}
	}
	slices.SortFunc(out, compareNames)
	return out
}

func (st *setState) gap(master, writer string) bool {
	return slices.Contains(st.Gaps, CoverGap{Master: master, Writer: writer})
}

// refreshMasters records the gaps a change of masters opens and drops the
// ones it closes. before are the masters before the change; fresh, a host
// that has just mounted (its writes all come after, so every master
// covers it).
func (c *Core) refreshMasters(st *setState, before []string, fresh string) {
	after := c.masters(st)
	for _, m := range after {
		if slices.Contains(before, m) {
			continue
		}
		var waits []string
		for _, w := range st.sortedMounted() {
			if w == m || w == fresh || st.gap(m, w) {
				continue
			}
			st.Gaps = append(st.Gaps, CoverGap{Master: m, Writer: w})
			waits = append(waits, w)
		}
		if len(waits) > 0 {
			c.notef("%s: %s becomes an HBMM master; it covers %s after their handshake", st.Name, m, strings.Join(waits, ","))
		}
	}
	st.Gaps = slices.DeleteFunc(st.Gaps, func(g CoverGap) bool {
		return !slices.Contains(after, g.Master) || !st.mountedOn(g.Writer)
	})
	c.oneActive(st, after)
}

// oneActive keeps, under WriteActive, at most one master on another host
// covering each writer (its active master, the first in sorted order):
// the others are standbys, which the core does not count on.
func (c *Core) oneActive(st *setState, masters []string) {
	if st.Write != WriteActive {
		return
	}
	for _, w := range st.sortedMounted() {
		active := ""
		for _, m := range masters {
			if m == w || st.gap(m, w) {
				continue
			}
			if active == "" {
				active = m
				continue
			}
			st.Gaps = append(st.Gaps, CoverGap{Master: m, Writer: w})
		}
	}
}

// coverers are the masters, other than gone, whose bitmaps cover every
// one of writers.
func (c *Core) coverers(st *setState, writers []string, gone string) []string {
	var out []string
	for _, m := range c.masters(st) {
		if m == gone {
			continue
		}
		whole := true
		for _, w := range writers {
			if w != m && st.gap(m, w) {
				whole = false
			}
		}
		if whole {
			out = append(out, m)
		}
	}
	return out
}

// covered applies EvCovered.
func (c *Core) covered(ev Event) error {
	st, err := c.knownSet(ev.Set)
	if err != nil {
		return err
	}
	if _, err := c.liveHost(ev.Host); err != nil {
		return err
	}
	if !st.mountedOn(ev.Host) {
		return badf("%s is not mounted on %s", st.Name, ev.Host)
	}
	if ev.Spec == nil || len(ev.Spec.HBMM) == 0 {
		return badf("covered %s: name the masters %s drained its writes for", st.Name, ev.Host)
	}
	named := ev.Spec.HBMM
	if st.Write == WriteActive {
		// One active master per writer: the first named that is a gap.
		if i := slices.IndexFunc(named, func(m string) bool { return st.gap(m, ev.Host) }); i >= 0 {
			named = named[i : i+1]
		}
	}
	var closed []string
	st.Gaps = slices.DeleteFunc(st.Gaps, func(g CoverGap) bool {
		if g.Writer == ev.Host && slices.Contains(named, g.Master) {
			closed = append(closed, g.Master)
			return true
		}
		return false
	})
	if len(closed) > 0 {
		slices.SortFunc(closed, compareNames)
		c.notef("%s: %s covered by %s", st.Name, ev.Host, strings.Join(closed, ","))
	}
	c.oneActive(st, c.masters(st))
	return nil
}

func sortedGaps(gs []CoverGap) []CoverGap {
	out := slices.Clone(gs)
	slices.SortFunc(out, func(a, b CoverGap) int {
		if d := compareNames(a.Master, b.Master); d != 0 {
			return d
		}
		return compareNames(a.Writer, b.Writer)
	})
	return out
}
