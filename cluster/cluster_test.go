package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/rs/zerolog"

	"github.com/shadow-project/shadow/shadowset"
)

// testTiming is failure detection and election fast enough for a test:
// a crashed host is declared failed in about a second.
var testTiming = Timing{ProbeInterval: 200 * time.Millisecond, ProbeTimeout: 100 * time.Millisecond, SuspicionMult: 2, RaftHeartbeat: 300 * time.Millisecond}

// waitFor polls cond until it holds, or fails the test saying what it was
// waiting for.
func waitFor(t testing.TB, deadline time.Duration, what string, cond func() bool) {
	t.Helper()
	waitForState(t, deadline, what, func() (bool, string) { return cond(), "" })
}

// waitForState is waitFor where cond also describes what it saw, for the
// failure message.
func waitForState(t testing.TB, deadline time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	start := time.Now()
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Since(start) > deadline {
			if state != "" {
				state = " (last seen: " + state + ")"
			}
			t.Fatalf("after %v, still waiting for %s%s", deadline, what, state)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// aliveState describes each host's gossip view.
func aliveState(hs []*host) string {
	var b strings.Builder
	for _, h := range hs {
		fmt.Fprintf(&b, "%s sees", h.name)
		for _, p := range h.node.Alive() {
			fmt.Fprintf(&b, " %s/%x", p.Host, p.Inc)
		}
		b.WriteString("; ")
	}
	return b.String()
}

// ---- ports

var ports struct {
	sync.Mutex
	used map[int]bool
}

// freeGossipAddr returns 127.0.0.1:P where TCP P, UDP P and TCP P+1 could
// all be bound a moment ago and no other test of this process got P or
// P+1.
func freeGossipAddr(t testing.TB) string {
	t.Helper()
	ports.Lock()
	defer ports.Unlock()
	if ports.used == nil {
		ports.used = map[int]bool{}
	}
	for range 500 {
		p := 20000 + rand.IntN(40000)
		if ports.used[p] || ports.used[p+1] || ports.used[p-1] {
			continue
		}
		if portsFree(p) {
			ports.used[p], ports.used[p+1] = true, true
			return net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
		}
	}
	t.Fatal("no free port pair in 20000–60000 after 500 tries")
	return ""
}

func portsFree(p int) bool {
	tcp, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
	if err != nil {
		return false
	}
	defer tcp.Close()
	udp, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
	if err != nil {
		return false
	}
	defer udp.Close()
	next, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p+1)))
	if err != nil {
		return false
	}
	next.Close()
	return true
}

// ---- hosts

// recorder keeps what a Log's hooks saw.
type recorder struct {
	mu      sync.Mutex
	applied []appliedCall
	windows []windowCall
	// onWindow, if set, runs in the hook (under the log's lock: it must
	// not call the log, only start goroutines that do).
	onWindow func(set string, w *Window)
}

type appliedCall struct {
	ev     shadowset.Event
	origin string
	rd     shadowset.Ready
}

type windowCall struct {
	set string
	w   *Window // a copy; nil: closed
}

func (r *recorder) hooks() Hooks {
	return Hooks{
		Applied: func(ev shadowset.Event, origin string, rd shadowset.Ready) {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.applied = append(r.applied, appliedCall{ev, origin, rd})
		},
		Window: func(set string, w *Window) {
			r.mu.Lock()
			var c *Window
			if w != nil {
				cp := *w
				cp.Acked = slices.Clone(w.Acked)
				c = &cp
			}
			r.windows = append(r.windows, windowCall{set, c})
			f := r.onWindow
			r.mu.Unlock()
			if f != nil {
				f(set, w)
			}
		},
	}
}

func (r *recorder) setOnWindow(f func(set string, w *Window)) {
	r.mu.Lock()
	r.onWindow = f
	r.mu.Unlock()
}

// actions returns the actions of one kind the hook saw.
func (r *recorder) actions(kind shadowset.ActionKind) []shadowset.Action {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []shadowset.Action
	for _, c := range r.applied {
		for _, a := range c.rd.Actions {
			if a.Kind == kind {
				out = append(out, a)
			}
		}
	}
	return out
}

func (r *recorder) windowCalls() []windowCall {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.windows)
}

// host is one in-process cluster member: a Node and its Log.
type host struct {
	t      testing.TB
	name   string
	listen string
	dir    string
	inc    uint64
	rec    *recorder
	node   *Node
	log    *Log
}

// testLogger logs to stderr when CLUSTER_TEST_LOG is set (to a zerolog
// level: debug shows memberlist's and raft's chatter).
func testLogger(t testing.TB, name string) zerolog.Logger {
	lvl, err := zerolog.ParseLevel(os.Getenv("CLUSTER_TEST_LOG"))
	if os.Getenv("CLUSTER_TEST_LOG") == "" || err != nil {
		return zerolog.Nop()
	}
	return zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr}).Level(lvl).With().Timestamp().Str("test", t.Name()).Str("host", name).Logger()
}

var incs struct {
	sync.Mutex
	next uint64
}

func newInc() uint64 {
	incs.Lock()
	defer incs.Unlock()
	incs.next++
	return incs.next<<8 | 1
}

// newHost makes a host with its own state dir and ports; start starts it.
func newHost(t testing.TB, name string) *host {
	return &host{t: t, name: name, listen: freeGossipAddr(t), dir: t.TempDir()}
}

// start starts the host's node (joining join, if any) with a new
// incarnation, attaches a fresh Log and registers it.
func (h *host) start(join ...string) {
	t := h.t
	t.Helper()
	h.inc = newInc()
	h.rec = &recorder{}
	h.log = NewLog(h.name, h.inc, h.rec.hooks())
	n, err := Start(NodeConfig{Host: h.name, Listen: h.listen, Join: join, StateDir: h.dir, Timing: testTiming,
		Logger: testLogger(t, h.name), FSM: h.log, Reconciler: h.log})
	if err != nil {
		t.Fatalf("start %s on %s: %v", h.name, h.listen, err)
	}
	h.node = n
	t.Cleanup(n.Shutdown)
	t.Cleanup(h.log.Close)
	h.log.Attach(n)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := h.log.Register(ctx, false); err != nil {
		t.Fatalf("register %s: %v", h.name, err)
	}
}

// crash stops the host without leaving (files closed cleanly).
func (h *host) crash() {
	h.log.Close()
	h.node.Shutdown()
}

func (h *host) append(ev shadowset.Event) error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	return h.log.AppendFrom(ctx, ev)
}

func (h *host) mustAppend(ev shadowset.Event) {
	h.t.Helper()
	if err := h.append(ev); err != nil {
		h.t.Fatalf("%s: append %s: %v", h.name, evString(ev), err)
	}
}

func (h *host) hostView(name string) (shadowset.HostView, bool) {
	var hv shadowset.HostView
	var ok bool
	h.log.View(func(c *shadowset.Core) {
		for _, x := range c.Hosts() {
			if x.Name == name {
				hv, ok = x, true
			}
		}
	})
	return hv, ok
}

func (h *host) setView(name string) (shadowset.SetView, bool) {
	var sv shadowset.SetView
	var ok bool
	h.log.View(func(c *shadowset.Core) { sv, ok = c.Set(name) })
	return sv, ok
}

func (h *host) leading() bool {
	h.log.mu.Lock()
	defer h.log.mu.Unlock()
	return h.log.leading
}

func evString(ev shadowset.Event) string {
	b, _ := json.Marshal(ev)
	return ev.Kind.String() + string(b)
}

func historyString(hs []shadowset.Event) string {
	var b strings.Builder
	for i, ev := range hs {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(ev.Kind.String())
		if ev.Host != "" {
			b.WriteString(" " + ev.Host)
		}
		if ev.Set != "" {
			b.WriteString(" " + ev.Set)
		}
		if ev.Spec != nil {
			b.WriteString(" " + ev.Spec.Name)
		}
		if ev.Duration != 0 {
			b.WriteString(" " + ev.Duration.String())
		}
	}
	return "[" + b.String() + "]"
}

// startCluster starts n hosts h1..hn: h1 bootstraps, the others join it.
// It returns once every host is a raft server on every host, one leader
// is known to all and leads its Log, and every registration is applied
// everywhere.
func startCluster(t testing.TB, n int) []*host {
	t.Helper()
	hs := make([]*host, n)
	for i := range hs {
		hs[i] = newHost(t, fmt.Sprintf("h%d", i+1))
	}
	hs[0].start()
	for _, h := range hs[1:] {
		h.start(hs[0].listen)
	}
	waitStable(t, hs)
	return hs
}

// waitStable waits until the live hosts agree on the raft servers and the
// leader, the leader's Log leads, and their histories are equal.
func waitStable(t testing.TB, hs []*host) {
	t.Helper()
	var want []string
	for _, h := range hs {
		want = append(want, h.name)
	}
	waitFor(t, 20*time.Second, fmt.Sprintf("every host to list %v as raft servers", want), func() bool {
		for _, h := range hs {
			var got []string
			for _, s := range h.node.Servers() {
				got = append(got, s.Host)
			}
			slices.Sort(got)
			for _, w := range want {
				if !slices.Contains(got, w) {
					return false
				}
			}
		}
		return true
	})
	waitFor(t, 20*time.Second, "one leader known to every host, leading its Log", func() bool {
		l := leaderOf(hs)
		if l == nil || !l.leading() {
			return false
		}
		for _, h := range hs {
			if h.node.Leader() != l.name {
				return false
			}
		}
		return true
	})
	waitSameHistory(t, hs)
}

// leaderOf returns the one host that leads, or nil if none or several do.
func leaderOf(hs []*host) *host {
	var l *host
	for _, h := range hs {
		if h.node.IsLeader() {
			if l != nil {
				return nil
			}
			l = h
		}
	}
	return l
}

func followersOf(hs []*host, leader *host) []*host {
	var out []*host
	for _, h := range hs {
		if h != leader {
			out = append(out, h)
		}
	}
	return out
}

// waitSameHistory waits until every host's Log has applied the same
// events in the same order.
func waitSameHistory(t testing.TB, hs []*host) {
	t.Helper()
	waitForState(t, 10*time.Second, "every host to apply the same history", func() (bool, string) {
		ref := hs[0].log.History()
		var last []string
		same := true
		for _, h := range hs {
			got := h.log.History()
			last = append(last, h.name+": "+historyString(got))
			if !reflect.DeepEqual(got, ref) {
				same = false
			}
		}
		return same, strings.Join(last, "; ")
	})
}

func indexOf(hs []shadowset.Event, from int, match func(shadowset.Event) bool) int {
	for i := from; i < len(hs); i++ {
		if match(hs[i]) {
			return i
		}
	}
	return -1
}

func isEvent(kind shadowset.EventKind, hostName string) func(shadowset.Event) bool {
	return func(ev shadowset.Event) bool { return ev.Kind == kind && ev.Host == hostName }
}

// ---- 1, 2: ordering, forwarding, refusals

func TestThreeHostsOrderEvents(t *testing.T) {
	hs := startCluster(t, 3)
	leader := leaderOf(hs)
	if leader != hs[0] {
		t.Logf("leader is %s (not the bootstrapping host)", leader.name)
	}
	for _, h := range hs {
		servers := h.node.Servers()
		if len(servers) != 3 {
			t.Fatalf("%s: raft servers %+v, want 3", h.name, servers)
		}
		for _, s := range servers {
			if !s.Voter {
				t.Fatalf("%s: %s is not a voter (%+v)", h.name, s.Host, servers)
			}
		}
	}
	waitForState(t, 10*time.Second, "every host's gossip to see 3 hosts alive", func() (bool, string) {
		for _, h := range hs {
			if len(h.node.Alive()) != 3 {
				return false, aliveState(hs)
			}
		}
		return true, ""
	})
	// Each registration brought its host up, in the same order everywhere.
	for _, h := range hs {
		for _, x := range hs {
			if hv, ok := h.hostView(x.name); !ok || !hv.Alive {
				t.Fatalf("%s: core has %s as %+v (found %v), want up", h.name, x.name, hv, ok)
			}
		}
	}

	f := followersOf(hs, leader)[0]
	define := shadowset.Event{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA1", Members: []string{"/m1", "/m2"}}}
	mount := shadowset.Event{Kind: shadowset.EvMount, Set: "DSA1", Host: f.name}
	f.mustAppend(define)
	// Append returns once this host has applied the entry.
	if _, ok := f.setView("DSA1"); !ok {
		t.Fatalf("%s: DSA1 not in its own core right after its Append returned", f.name)
	}
	f.mustAppend(mount)
	// Every Append returns only once its host has applied it.
	for i := range 20 {
		d := time.Duration(i+1) * time.Second
		f.mustAppend(shadowset.Event{Kind: shadowset.EvSetDelay, Duration: d})
		var got time.Duration
		f.log.View(func(c *shadowset.Core) { got = c.Delay() })
		if got != d {
			t.Fatalf("%s: delay %v right after its Append of %v returned", f.name, got, d)
		}
	}
	// A proposal that reaches the log twice (retried after an unknown
	// outcome) applies once; the copy is accepted.
	n := len(f.log.History())
	dup, _ := json.Marshal(entry{V: entryVersion, Type: entryEvent, Host: f.name, Inc: f.inc, ID: 1 << 40,
		Ev: &shadowset.Event{Kind: shadowset.EvSetDelay, Duration: time.Minute}})
	for i := range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := f.node.Propose(ctx, dup)
		cancel()
		if err != nil {
			t.Fatalf("proposal %d of the same entry: %v", i+1, err)
		}
	}
	if got := f.log.History()[n:]; len(got) != 1 {
		t.Fatalf("one entry proposed twice applied as %s", historyString(got))
	}
	// A mount appended by another host (the leader) for a third host.
	other := followersOf(hs, leader)[1]
	leader.mustAppend(shadowset.Event{Kind: shadowset.EvMount, Set: "DSA1", Host: other.name})
	waitSameHistory(t, hs)

	hist := hs[0].log.History()
	d := indexOf(hist, 0, func(ev shadowset.Event) bool { return ev.Kind == shadowset.EvDefineSet })
	m := indexOf(hist, 0, isEvent(shadowset.EvMount, f.name))
	m2 := indexOf(hist, 0, isEvent(shadowset.EvMount, other.name))
	if d < 0 || m < 0 || m2 < 0 || !(d < m && m < m2) {
		t.Fatalf("history %s: want define DSA1, mount on %s, mount on %s in that order", historyString(hist), f.name, other.name)
	}
	for _, h := range hs {
		sv, ok := h.setView("DSA1")
		if !ok {
			t.Fatalf("%s: DSA1 unknown", h.name)
		}
		got := slices.Sorted(slices.Values(sv.Mounted))
		want := slices.Sorted(slices.Values([]string{f.name, other.name}))
		if !slices.Equal(got, want) {
			t.Fatalf("%s: DSA1 mounted on %v, want %v", h.name, got, want)
		}
		if len(sv.Members) != 2 || sv.Members[0].Name != "/m1" || sv.Members[1].Name != "/m2" {
			t.Fatalf("%s: DSA1 members %+v", h.name, sv.Members)
		}
	}
	// Every host's hook saw every event once, with its origin.
	for _, h := range hs {
		h.rec.mu.Lock()
		var origins []string
		for _, c := range h.rec.applied {
			if c.ev.Kind == shadowset.EvMount {
				origins = append(origins, c.origin)
			}
		}
		h.rec.mu.Unlock()
		if !slices.Equal(origins, []string{f.name, leader.name}) {
			t.Fatalf("%s: Applied hook saw mounts from %v, want [%s %s]", h.name, origins, f.name, leader.name)
		}
	}
}

func TestRefusedEventsChangeNothing(t *testing.T) {
	hs := startCluster(t, 3)
	leader := leaderOf(hs)
	f := followersOf(hs, leader)[0]
	f.mustAppend(shadowset.Event{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA1", Members: []string{"/m1", "/m2"}}})
	f.mustAppend(shadowset.Event{Kind: shadowset.EvMount, Set: "DSA1", Host: f.name})
	waitSameHistory(t, hs)
	before := hs[0].log.History()
	snaps := map[string][]byte{}
	for _, h := range hs {
		b, err := h.log.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		snaps[h.name] = b
	}

	cases := []struct {
		name string
		ev   shadowset.Event
		join bool
		want error
	}{
		{"mount of an unknown set", shadowset.Event{Kind: shadowset.EvMount, Set: "DSA9", Host: f.name}, false, shadowset.ErrUnknownSet},
		{"second mount on the same host", shadowset.Event{Kind: shadowset.EvMount, Set: "DSA1", Host: f.name}, false, shadowset.ErrBadEvent},
		{"mount on an unknown host", shadowset.Event{Kind: shadowset.EvMount, Set: "DSA1", Host: "nosuch"}, false, shadowset.ErrUnknownHost},
		{"bad set name", shadowset.Event{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "nope", Members: []string{"/x"}}}, false, shadowset.ErrBadEvent},
		{"negative delay", shadowset.Event{Kind: shadowset.EvSetDelay, Duration: -time.Second}, false, shadowset.ErrBadEvent},
		{"unknown event kind", shadowset.Event{Kind: 200}, false, shadowset.ErrBadEvent},
	}
	for _, c := range cases {
		for _, h := range []*host{f, leader} {
			// What the core itself says of the event.
			var coreErr error
			h.log.View(func(core *shadowset.Core) {
				snap, err := core.Snapshot()
				if err != nil {
					t.Fatal(err)
				}
				clone, err := shadowset.Restore(snap)
				if err != nil {
					t.Fatal(err)
				}
				coreErr = clone.Step(c.ev)
			})
			if !errors.Is(coreErr, c.want) {
				t.Fatalf("%s: the core says %v, the test expects %v", c.name, coreErr, c.want)
			}
			err := h.append(c.ev)
			if !errors.Is(err, c.want) {
				t.Fatalf("%s from %s (leader %v): Append = %v, want %v", c.name, h.name, h == leader, err, c.want)
			}
			if !errors.Is(err, ErrRefused) {
				t.Errorf("%s from %s: Append = %v, which does not wrap ErrRefused", c.name, h.name, err)
			}
		}
	}
	// A joining mount of a set mounted nowhere.
	f.mustAppend(shadowset.Event{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA2", Members: []string{"/n1"}}})
	if err := f.log.Join("DSA2"); !errors.Is(err, ErrNotMounted) {
		t.Fatalf("Join of a set mounted nowhere = %v, want ErrNotMounted", err)
	}
	waitSameHistory(t, hs)
	after := hs[0].log.History()
	if len(after) != len(before)+1 || !reflect.DeepEqual(after[:len(before)], before) {
		t.Fatalf("history after the refusals %s, want %s plus the definition of DSA2", historyString(after), historyString(before))
	}
	// Only DSA2 changed: take it away again and compare the snapshots.
	f.mustAppend(shadowset.Event{Kind: shadowset.EvForgetSet, Set: "DSA2"})
	waitSameHistory(t, hs)
	for _, h := range hs {
		var sets []string
		h.log.View(func(c *shadowset.Core) {
			for _, s := range c.Sets() {
				sets = append(sets, s.Name)
			}
		})
		if !slices.Equal(sets, []string{"DSA1"}) {
			t.Fatalf("%s: sets %v, want [DSA1]", h.name, sets)
		}
		var a, b logSnapshot
		snap, _ := h.log.Snapshot()
		if err := json.Unmarshal(snaps[h.name], &a); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(snap, &b); err != nil {
			t.Fatal(err)
		}
		if string(a.Core) != string(b.Core) || !reflect.DeepEqual(a.Incs, b.Incs) {
			t.Fatalf("%s: core or incarnations changed by refused entries:\n%s\n%s", h.name, a.Core, b.Core)
		}
	}
}

// ---- 3: incarnations

func TestRestartIsANewIncarnation(t *testing.T) {
	hs := startCluster(t, 3)
	leader := leaderOf(hs)
	x := followersOf(hs, leader)[0]
	x.mustAppend(shadowset.Event{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA1", Members: []string{"/m1", "/m2"}}})
	x.mustAppend(shadowset.Event{Kind: shadowset.EvMount, Set: "DSA1", Host: x.name})
	// A raft snapshot before the restart: the new run restores it, then
	// replays what follows.
	if err := x.node.raft.Snapshot().Error(); err != nil {
		t.Fatalf("raft snapshot on %s: %v", x.name, err)
	}
	waitSameHistory(t, hs)
	oldLog, oldInc := x.log, x.inc

	// Restart at once: the cluster has not noticed; the new registration
	// fails the old run and brings the host up again.
	x.crash()
	mark := len(hs[0].log.History())
	x.start(hs[0].listen)
	if x.inc == oldInc {
		t.Fatal("same incarnation twice")
	}
	waitSameHistory(t, hs)
	for _, h := range hs {
		hist := h.log.History()
		f := indexOf(hist, mark, isEvent(shadowset.EvHostFailed, x.name))
		u := indexOf(hist, max(f, mark), isEvent(shadowset.EvHostUp, x.name))
		if f < 0 || u < 0 {
			t.Fatalf("%s: history after the restart %s, want host-failed then host-up of %s", h.name, historyString(hist[mark:]), x.name)
		}
		if hv, _ := h.hostView(x.name); !hv.Alive {
			t.Fatalf("%s: %s is %+v after its new registration", h.name, x.name, hv)
		}
		// Its failure unmounted DSA1.
		if sv, _ := h.setView("DSA1"); len(sv.Mounted) != 0 {
			t.Fatalf("%s: DSA1 still mounted on %v after %s failed", h.name, sv.Mounted, x.name)
		}
		h.log.mu.Lock()
		got := h.log.incs[x.name]
		h.log.mu.Unlock()
		if got != x.inc {
			t.Fatalf("%s: incarnation of %s is %x, want %x", h.name, x.name, got, x.inc)
		}
	}
	// The restarted Log replayed the earlier runs (the snapshot, then the
	// log) but its hooks heard nothing before its own registration.
	x.rec.mu.Lock()
	first := x.rec.applied
	x.rec.mu.Unlock()
	if len(first) == 0 || first[0].ev.Kind != shadowset.EvHostFailed || first[0].ev.Host != x.name {
		var kinds []string
		for _, c := range first {
			kinds = append(kinds, evString(c.ev))
		}
		t.Fatalf("restarted %s: hooks saw %v first, want its own registration (host-failed, host-up)", x.name, kinds)
	}

	// An entry of the old run is stale: refused, nothing changes.
	oldLog.Attach(leader.node)
	oldLog.mu.Lock()
	oldLog.closed = false
	oldLog.mu.Unlock()
	before := hs[0].log.History()
	err := oldLog.Append(shadowset.Event{Kind: shadowset.EvMount, Set: "DSA1", Host: x.name})
	if !errors.Is(err, ErrStaleIncarnation) {
		t.Fatalf("append through the old run's Log (incarnation %x) = %v, want ErrStaleIncarnation", oldInc, err)
	}
	// The new run may.
	x.mustAppend(shadowset.Event{Kind: shadowset.EvMount, Set: "DSA1", Host: x.name})
	waitSameHistory(t, hs)
	after := hs[0].log.History()
	if len(after) != len(before)+1 || after[len(after)-1].Kind != shadowset.EvMount {
		t.Fatalf("history %s, want only the new run's mount after %s", historyString(after), historyString(before))
	}

	// Restart after the cluster noticed: the leader records the failure,
	// the new registration only brings the host up. Gossip names the run
	// it speaks of: let it learn of this one first.
	waitGossipRun(t, hs, x)
	x.crash()
	start := time.Now()
	waitFor(t, 10*time.Second, "the leader to record the crashed "+x.name+" as failed", func() bool {
		hv, _ := leader.hostView(x.name)
		return !hv.Alive
	})
	t.Logf("%s failed in the log %v after its crash", x.name, time.Since(start).Round(time.Millisecond))
	mark = len(leader.log.History())
	x.start(hs[0].listen)
	waitSameHistory(t, hs)
	hist := hs[0].log.History()
	if indexOf(hist, mark, isEvent(shadowset.EvHostFailed, x.name)) >= 0 || indexOf(hist, mark, isEvent(shadowset.EvHostUp, x.name)) < 0 {
		t.Fatalf("history after the second restart %s, want host-up of %s only", historyString(hist[mark:]), x.name)
	}
	// Gossip catches up with the new run; the leader must not take the
	// stale view for a new failure.
	waitGossipRun(t, hs, x)
	time.Sleep(4 * testTiming.ProbeInterval)
	for _, h := range hs {
		if hv, _ := h.hostView(x.name); !hv.Alive {
			t.Fatalf("%s: the restarted %s was recorded failed again: %s", h.name, x.name, historyString(h.log.History()[mark:]))
		}
	}

	// A run that dies just after registering, before gossip has heard of
	// it, is failed all the same once its grace is over.
	x.crash()
	x.start(hs[0].listen)
	x.crash()
	start = time.Now()
	waitFor(t, 15*time.Second, "the leader to record the third run of "+x.name+" failed", func() bool {
		hv, _ := leader.hostView(x.name)
		return !hv.Alive
	})
	t.Logf("%s failed in the log %v after its crash", x.name, time.Since(start).Round(time.Millisecond))
}

// waitGossipRun waits until every other host's gossip sees x's current
// run alive.
func waitGossipRun(t testing.TB, hs []*host, x *host) {
	t.Helper()
	waitForState(t, 10*time.Second, fmt.Sprintf("every host's gossip to see run %x of %s alive", x.inc, x.name), func() (bool, string) {
		for _, h := range hs {
			if h != x && !slices.ContainsFunc(h.node.Alive(), func(p Peer) bool { return p.Host == x.name && p.Inc == x.inc }) {
				return false, aliveState(hs)
			}
		}
		return true, ""
	})
}

// ---- 4: failure detection

func TestCrashedFollowerIsRecordedFailed(t *testing.T) {
	hs := startCluster(t, 3)
	leader := leaderOf(hs)
	dead := followersOf(hs, leader)[0]
	survivors := followersOf(hs, dead)
	dead.crash()
	start := time.Now()
	waitFor(t, 10*time.Second, "every surviving core to record "+dead.name+" failed", func() bool {
		for _, h := range survivors {
			if hv, _ := h.hostView(dead.name); hv.Alive {
				return false
			}
		}
		return true
	})
	t.Logf("crashed follower %s recorded failed after %v", dead.name, time.Since(start).Round(time.Millisecond))
	waitSameHistory(t, survivors)
	hist := leader.log.History()
	if n := countEvents(hist, isEvent(shadowset.EvHostFailed, dead.name)); n != 1 {
		t.Fatalf("history %s: %d failures of %s, want 1", historyString(hist), n, dead.name)
	}
	// The leader keeps it in raft (it may come back); both survivors still
	// commit.
	survivors[1].mustAppend(shadowset.Event{Kind: shadowset.EvSetDelay, Duration: time.Second})
}

func TestCrashedLeaderIsReplacedAndRecordedFailed(t *testing.T) {
	hs := startCluster(t, 3)
	old := leaderOf(hs)
	survivors := followersOf(hs, old)
	old.crash()
	start := time.Now()
	var next *host
	waitFor(t, 10*time.Second, "a new leader among "+survivors[0].name+", "+survivors[1].name, func() bool {
		next = leaderOf(survivors)
		return next != nil && survivors[0].node.Leader() == next.name && survivors[1].node.Leader() == next.name
	})
	elected := time.Since(start)
	waitFor(t, 10*time.Second, "every surviving core to record the old leader "+old.name+" failed", func() bool {
		for _, h := range survivors {
			if hv, _ := h.hostView(old.name); hv.Alive {
				return false
			}
		}
		return true
	})
	t.Logf("new leader %s elected %v after %s crashed; failure recorded after %v", next.name, elected.Round(time.Millisecond), old.name, time.Since(start).Round(time.Millisecond))
	waitSameHistory(t, survivors)
	if !next.leading() {
		t.Fatalf("%s leads raft but its Log was not told", next.name)
	}
	// Proposals from the other survivor reach the new leader.
	followersOf(survivors, next)[0].mustAppend(shadowset.Event{Kind: shadowset.EvSetDelay, Duration: time.Second})
}

func countEvents(hs []shadowset.Event, match func(shadowset.Event) bool) int {
	n := 0
	for _, ev := range hs {
		if match(ev) {
			n++
		}
	}
	return n
}

// ---- 6: the delay window's timer

func TestLeaderDeliversTheDelayTick(t *testing.T) {
	hs := startCluster(t, 3)
	leader := leaderOf(hs)
	a, b, c := hs[0], hs[1], hs[2]
	const delay = 300 * time.Millisecond
	a.mustAppend(shadowset.Event{Kind: shadowset.EvSetDelay, Duration: delay})
	a.mustAppend(shadowset.Event{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA1", Members: []string{"/m1", "/m2"}}})
	for _, h := range hs {
		h.mustAppend(shadowset.Event{Kind: shadowset.EvMount, Set: "DSA1", Host: h.name})
	}
	start := time.Now()
	b.mustAppend(shadowset.Event{Kind: shadowset.EvHostFailed, Host: c.name})
	// The failure opened the window and required a merge.
	for _, h := range hs {
		timers := h.rec.actions(shadowset.ActTimer)
		if len(timers) != 0 && h == b && timers[0].At != delay {
			t.Fatalf("%s: timer action %+v, want At %v", h.name, timers[0], delay)
		}
	}
	waitFor(t, 10*time.Second, "every core's delay window to close and a merge of DSA1 to start", func() bool {
		for _, h := range hs {
			var open bool
			h.log.View(func(c *shadowset.Core) { open, _ = c.Window() })
			if open || len(h.rec.actions(shadowset.ActStart)) == 0 {
				return false
			}
		}
		return true
	})
	elapsed := time.Since(start)
	t.Logf("merge started %v after the failure (delay %v, leader %s)", elapsed.Round(time.Millisecond), delay, leader.name)
	if elapsed < delay {
		t.Fatalf("merge started %v after the failure, before the %v delay", elapsed, delay)
	}
	waitSameHistory(t, hs)
	hist := hs[0].log.History()
	fi := indexOf(hist, 0, isEvent(shadowset.EvHostFailed, c.name))
	ti := indexOf(hist, max(fi, 0), func(ev shadowset.Event) bool { return ev.Kind == shadowset.EvTick })
	if fi < 0 || ti < 0 || hist[ti].Duration != delay {
		t.Fatalf("history %s: want the failure of %s, then one tick of %v", historyString(hist), c.name, delay)
	}
	if n := countEvents(hist, func(ev shadowset.Event) bool { return ev.Kind == shadowset.EvTick }); n != 1 {
		t.Fatalf("history %s: %d ticks, want 1", historyString(hist), n)
	}
	for _, h := range hs {
		timers := h.rec.actions(shadowset.ActTimer)
		if len(timers) != 1 || timers[0].At != delay {
			t.Fatalf("%s: timer actions %+v, want one at %v", h.name, timers, delay)
		}
		starts := h.rec.actions(shadowset.ActStart)
		if len(starts) != 1 || starts[0].Set != "DSA1" || !starts[0].OpKind.IsMerge() || starts[0].Host != a.name {
			t.Fatalf("%s: start actions %+v, want one merge of DSA1 on %s", h.name, starts, a.name)
		}
		sv, _ := h.setView("DSA1")
		if len(sv.Ops) != 1 || sv.Ops[0].State != shadowset.Running || sv.Ops[0].Host != a.name {
			t.Fatalf("%s: DSA1 ops %+v, want one running on %s", h.name, sv.Ops, a.name)
		}
	}
}

// ---- 7: windows

func TestAnnounceWaitsForTheOtherHostsAcks(t *testing.T) {
	hs := startCluster(t, 3)
	a, b, c := hs[0], hs[1], hs[2]
	const set = "DSA2"
	a.mustAppend(shadowset.Event{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: set, Members: []string{"/w1", "/w2"}, Dirty: true}})
	a.mustAppend(shadowset.Event{Kind: shadowset.EvMount, Set: set, Host: a.name})
	if err := b.log.Join(set); err != nil {
		t.Fatalf("%s joins %s: %v", b.name, set, err)
	}
	waitSameHistory(t, hs)
	var op shadowset.OpView
	for _, h := range hs {
		sv, _ := h.setView(set)
		if len(sv.Ops) != 1 || sv.Ops[0].State != shadowset.Running {
			t.Fatalf("%s: %s ops %+v, want one running merge", h.name, set, sv.Ops)
		}
		op = sv.Ops[0]
	}
	if op.Host != a.name {
		t.Fatalf("the merge runs on %s, want %s (it mounted first)", op.Host, a.name)
	}

	// b acks each window once the test lets it.
	release := make(chan struct{})
	acked := make(chan error, 4)
	var ackers sync.WaitGroup
	t.Cleanup(ackers.Wait)
	ackOn := func(h *host) {
		h.rec.setOnWindow(func(s string, w *Window) {
			if w == nil || w.Host == h.name || s != set {
				return
			}
			// Only a host that mounts the set holds writes back (the hook
			// runs under the log's lock: Locked is the core).
			if sv, ok := h.log.Locked().Set(s); !ok || !slices.Contains(sv.Mounted, h.name) {
				return
			}
			seq := w.Seq
			ackers.Go(func() {
				<-release
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				acked <- h.log.Ack(ctx, s, seq)
			})
		})
	}
	ackOn(b)
	ackOn(c)

	announce := func(h *host, lo, hi int64) chan error {
		done := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			done <- h.log.Announce(ctx, set, op.ID, lo, hi)
		}()
		return done
	}
	done := announce(a, 0, 1<<20)
	waitFor(t, 10*time.Second, b.name+"'s window hook to hear of "+a.name+"'s window", func() bool {
		return slices.ContainsFunc(b.rec.windowCalls(), func(c windowCall) bool { return c.w != nil && c.w.Host == a.name })
	})
	select {
	case err := <-done:
		t.Fatalf("Announce returned (%v) before %s acknowledged", err, b.name)
	case <-time.After(300 * time.Millisecond):
	}
	for _, h := range hs {
		w := h.log.WindowOf(set)
		if w == nil || w.Host != a.name || w.Op != op.ID || w.Lo != 0 || w.Hi != 1<<20 || len(w.Acked) != 0 {
			t.Fatalf("%s: window %+v, want op%d on %s [0, 1MiB) acked by none", h.name, w, op.ID, a.name)
		}
	}
	close(release)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Announce: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("Announce still waiting 10 s after %s acknowledged", b.name)
	}
	if err := <-acked; err != nil {
		t.Fatalf("%s's Ack: %v", b.name, err)
	}
	if w := a.log.WindowOf(set); w == nil || !slices.Equal(w.Acked, []string{b.name}) {
		t.Fatalf("window on %s after Announce: %+v, want acked by %s", a.name, w, b.name)
	}

	// Hosts whose op is not running, or an op that does not exist, may not
	// announce.
	for _, bad := range []struct {
		h  *host
		op shadowset.OpID
	}{{b, op.ID}, {c, op.ID}, {a, op.ID + 7}} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := bad.h.log.Announce(ctx, set, bad.op, 0, 10)
		cancel()
		if !errors.Is(err, shadowset.ErrBadEvent) {
			t.Fatalf("Announce of op%d from %s = %v, want ErrBadEvent", bad.op, bad.h.name, err)
		}
	}
	if w := a.log.WindowOf(set); w == nil || w.Lo != 0 {
		t.Fatalf("a refused announce changed the window: %+v", w)
	}

	// A host that mounts the set while a window is open hears of it at
	// once, and the next window waits for it too.
	if err := c.log.Join(set); err != nil {
		t.Fatalf("%s joins %s: %v", c.name, set, err)
	}
	if !slices.ContainsFunc(c.rec.windowCalls(), func(wc windowCall) bool { return wc.w != nil && wc.w.Host == a.name }) {
		t.Fatalf("%s mounted %s during a window and its hook did not hear of it", c.name, set)
	}
	if err := <-acked; err != nil { // c acks the window it joined into
		t.Fatalf("%s's Ack: %v", c.name, err)
	}
	done = announce(a, 1<<20, 2<<20)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("second Announce: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("second Announce still waiting after 10 s")
	}
	for range 2 {
		if err := <-acked; err != nil {
			t.Fatalf("Ack of the second window: %v", err)
		}
	}
	if w := a.log.WindowOf(set); w == nil || !slices.Equal(w.Acked, []string{b.name, c.name}) || w.Lo != 1<<20 {
		t.Fatalf("second window: %+v, want [1MiB, 2MiB) acked by %s and %s", w, b.name, c.name)
	}

	// The window closes with its op.
	a.mustAppend(shadowset.Event{Kind: shadowset.EvComplete, Set: set, Host: a.name, Op: op.ID})
	waitSameHistory(t, hs)
	for _, h := range hs {
		if w := h.log.WindowOf(set); w != nil {
			t.Fatalf("%s: window %+v after its op completed", h.name, w)
		}
		calls := h.rec.windowCalls()
		if len(calls) == 0 || calls[len(calls)-1].w != nil {
			t.Fatalf("%s: window hook calls %+v, want the last to close the window", h.name, calls)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.log.Announce(ctx, set, op.ID, 2<<20, 3<<20); !errors.Is(err, shadowset.ErrBadEvent) {
		t.Fatalf("Announce of a completed op = %v, want ErrBadEvent", err)
	}
}

// ---- 5 and the state machine alone: entries applied by hand

// applier feeds hand-made entries to a Log without a node.
type applier struct {
	t     testing.TB
	l     *Log
	index uint64
}

func (a *applier) apply(e entry) error {
	a.t.Helper()
	if e.V == 0 {
		e.V = entryVersion
	}
	b, err := json.Marshal(e)
	if err != nil {
		a.t.Fatal(err)
	}
	a.index++
	return a.l.Apply(a.index, b)
}

func (a *applier) must(e entry) {
	a.t.Helper()
	if err := a.apply(e); err != nil {
		a.t.Fatalf("apply %+v: %v", e, err)
	}
}

func evEntry(h string, inc uint64, ev shadowset.Event) entry {
	return entry{Type: entryEvent, Host: h, Inc: inc, Ev: &ev}
}

// populated returns a Log (as host A, incarnation 2) that has seen hosts
// A, B, C register, A restart, a set defined, mounted and being merged, a
// window and an ack.
func populated(t testing.TB, hooks Hooks) (*Log, *applier) {
	l := NewLog("A", 2, hooks)
	ap := &applier{t: t, l: l}
	ap.must(entry{Type: entryIncarnation, Host: "A", Inc: 1})
	ap.must(entry{Type: entryIncarnation, Host: "B", Inc: 5})
	ap.must(entry{Type: entryIncarnation, Host: "C", Inc: 7})
	ap.must(entry{Type: entryIncarnation, Host: "W", Inc: 9, Witness: true})
	ap.must(evEntry("A", 1, shadowset.Event{Kind: shadowset.EvSetDelay, Duration: time.Second}))
	ap.must(entry{Type: entryIncarnation, Host: "A", Inc: 2})
	// A's previous run failed: the delay window opened; time closes it.
	ap.must(evEntry("A", 2, shadowset.Event{Kind: shadowset.EvTick, Duration: time.Second}))
	ap.must(evEntry("B", 5, shadowset.Event{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA1", Members: []string{"/m1", "/m2"}, Dirty: true}}))
	mount := evEntry("B", 5, shadowset.Event{Kind: shadowset.EvMount, Set: "DSA1", Host: "B"})
	mount.ID = 3
	ap.must(mount)
	ap.must(entry{Type: entryEvent, Host: "A", Inc: 2, Ev: &shadowset.Event{Kind: shadowset.EvMount, Set: "DSA1", Host: "A"}, Join: true})
	ap.must(evEntry("C", 7, shadowset.Event{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA2", Members: []string{"/n1"}}}))
	ap.must(evEntry("C", 7, shadowset.Event{Kind: shadowset.EvMount, Set: "DSA2", Host: "C"}))
	progress := evEntry("C", 7, shadowset.Event{Kind: shadowset.EvProgress, Set: "DSA1", Host: "B", LBN: 4096})
	progress.ID = 9
	ap.must(progress)
	sv, _ := l.core.Set("DSA1")
	ap.must(entry{Type: entryWindow, Host: "B", Inc: 5, Win: &Window{Set: "DSA1", Op: sv.Ops[0].ID, Lo: 4096, Hi: 8192}})
	ap.must(entry{Type: entryAck, Host: "A", Inc: 2, Win: &Window{Set: "DSA1", Seq: 1}})
	return l, ap
}

func TestApplyIncarnations(t *testing.T) {
	rec := &recorder{}
	l, ap := populated(t, rec.hooks())
	hist := l.History()
	want := []shadowset.Event{
		{Kind: shadowset.EvHostUp, Host: "A"},
		{Kind: shadowset.EvHostUp, Host: "B"},
		{Kind: shadowset.EvHostUp, Host: "C"},
		{Kind: shadowset.EvSetDelay, Duration: time.Second},
		{Kind: shadowset.EvHostFailed, Host: "A"},
		{Kind: shadowset.EvHostUp, Host: "A"},
	}
	if !reflect.DeepEqual(hist[:len(want)], want) {
		t.Fatalf("history %s, want it to start %s (the witness never reaches the core)", historyString(hist), historyString(want))
	}
	// Hooks hear only what this incarnation's registration and later
	// entries did.
	rec.mu.Lock()
	first := rec.applied[0].ev
	rec.mu.Unlock()
	if first != (shadowset.Event{Kind: shadowset.EvHostFailed, Host: "A"}) {
		t.Fatalf("first event the hooks heard: %s, want the failure of the previous run", evString(first))
	}
	if wc := rec.windowCalls(); len(wc) != 1 || wc[0].w == nil || wc[0].w.Seq != 1 || wc[0].w.Host != "B" {
		t.Fatalf("window hook calls %+v, want B's window 1", wc)
	}
	if w := l.WindowOf("DSA1"); w == nil || !slices.Equal(w.Acked, []string{"A"}) {
		t.Fatalf("window %+v, want acked by A", w)
	}

	snap, _ := l.Snapshot()
	n := len(l.History())
	for _, c := range []struct {
		name string
		e    entry
	}{
		{"the previous run of A", evEntry("A", 1, shadowset.Event{Kind: shadowset.EvSetDelay, Duration: 0})},
		{"a host never registered", evEntry("Z", 1, shadowset.Event{Kind: shadowset.EvSetDelay, Duration: 0})},
		{"an incarnation never registered", evEntry("B", 6, shadowset.Event{Kind: shadowset.EvSetDelay, Duration: 0})},
		{"a window of the previous run", entry{Type: entryWindow, Host: "A", Inc: 1, Win: &Window{Set: "DSA1", Op: 1}}},
		{"an ack of the previous run", entry{Type: entryAck, Host: "A", Inc: 1, Win: &Window{Set: "DSA1", Seq: 1}}},
	} {
		if err := ap.apply(c.e); !errors.Is(err, ErrStaleIncarnation) {
			t.Fatalf("entry of %s: %v, want ErrStaleIncarnation", c.name, err)
		}
	}
	if got, _ := l.Snapshot(); string(got) != string(snap) || len(l.History()) != n {
		t.Fatal("stale entries changed the log")
	}
	// The witness may append (it is registered), though the core does not
	// know it as a host.
	ap.must(evEntry("W", 9, shadowset.Event{Kind: shadowset.EvSetDelay, Duration: 2 * time.Second}))
	// Registering the same incarnation again changes nothing in the core.
	n = len(l.History())
	ap.must(entry{Type: entryIncarnation, Host: "B", Inc: 5})
	if len(l.History()) != n {
		t.Fatalf("a repeated registration added %s", historyString(l.History()[n:]))
	}
	// A failed host's next run only comes up again.
	ap.must(evEntry("B", 5, shadowset.Event{Kind: shadowset.EvHostFailed, Host: "C"}))
	ap.must(entry{Type: entryIncarnation, Host: "C", Inc: 8})
	if got := l.History()[n+1:]; !reflect.DeepEqual(got, []shadowset.Event{{Kind: shadowset.EvHostUp, Host: "C"}}) {
		t.Fatalf("after C's new run: %s, want only host-up of C", historyString(got))
	}
	if err := ap.apply(evEntry("C", 7, shadowset.Event{Kind: shadowset.EvMount, Set: "DSA2", Host: "C"})); !errors.Is(err, ErrStaleIncarnation) {
		t.Fatalf("C's old run after its new one: %v, want ErrStaleIncarnation", err)
	}
	// The leader's record of a failure names the run it saw fail: stale
	// once the host has registered again.
	n = len(l.History())
	fail := evEntry("A", 2, shadowset.Event{Kind: shadowset.EvHostFailed, Host: "C"})
	fail.HostInc = 7
	if err := ap.apply(fail); !errors.Is(err, ErrStaleIncarnation) {
		t.Fatalf("failure of C's previous run: %v, want ErrStaleIncarnation", err)
	}
	fail.HostInc = 8
	ap.must(fail)
	if got := l.History()[n:]; !reflect.DeepEqual(got, []shadowset.Event{{Kind: shadowset.EvHostFailed, Host: "C"}}) {
		t.Fatalf("after the failure of C's current run: %s", historyString(got))
	}
}

func TestRetriedProposalsApplyOnce(t *testing.T) {
	l, ap := populated(t, Hooks{})
	// A copy of an accepted proposal is accepted and does nothing.
	for _, e := range []entry{
		func() entry {
			e := evEntry("B", 5, shadowset.Event{Kind: shadowset.EvMount, Set: "DSA1", Host: "B"})
			e.ID = 3
			return e
		}(),
		func() entry {
			e := evEntry("C", 7, shadowset.Event{Kind: shadowset.EvProgress, Set: "DSA1", Host: "B", LBN: 4096})
			e.ID = 9
			return e
		}(),
	} {
		snap, _ := l.Snapshot()
		if err := ap.apply(e); err != nil {
			t.Fatalf("copy of accepted proposal %d of %s: %v", e.ID, e.Host, err)
		}
		if got, _ := l.Snapshot(); string(got) != string(snap) {
			t.Fatalf("copy of proposal %d changed the log", e.ID)
		}
	}
	tick := evEntry("C", 7, shadowset.Event{Kind: shadowset.EvTick, Duration: time.Second})
	tick.ID = 10
	ap.must(tick)
	ap.must(tick)
	var now time.Duration
	l.View(func(c *shadowset.Core) { now = c.Now() })
	if now != 2*time.Second {
		t.Fatalf("a tick proposed twice moved time to %v, want 2s", now)
	}
	// A refused proposal is not remembered: its copy is judged afresh.
	mount := evEntry("C", 7, shadowset.Event{Kind: shadowset.EvMount, Set: "DSA9", Host: "C"})
	mount.ID = 11
	if err := ap.apply(mount); !errors.Is(err, shadowset.ErrUnknownSet) {
		t.Fatalf("mount of an unknown set: %v", err)
	}
	ap.must(evEntry("C", 7, shadowset.Event{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA9", Members: []string{"/z"}}}))
	ap.must(mount)
	if sv, _ := l.core.Set("DSA9"); !slices.Equal(sv.Mounted, []string{"C"}) {
		t.Fatalf("DSA9 mounted on %v, want [C]", sv.Mounted)
	}
	// IDs belong to a run: the next run's numbers start again.
	ap.must(entry{Type: entryIncarnation, Host: "C", Inc: 8, ID: 1})
	again := evEntry("C", 8, shadowset.Event{Kind: shadowset.EvTick, Duration: time.Second})
	again.ID = 10
	ap.must(again)
	l.View(func(c *shadowset.Core) { now = c.Now() })
	if now != 3*time.Second {
		t.Fatalf("the new run's proposal 10 was taken for the old run's: time %v, want 3s", now)
	}
	if err := ap.apply(tick); !errors.Is(err, ErrStaleIncarnation) {
		t.Fatalf("the old run's proposal after the new run registered: %v, want ErrStaleIncarnation", err)
	}
	// The record is bounded.
	for i := range 2 * maxDoneIDs {
		e := evEntry("B", 5, shadowset.Event{Kind: shadowset.EvSetDelay, Duration: time.Duration(i)})
		e.ID = uint64(100 + i)
		ap.must(e)
	}
	if d := l.done["B"]; len(d.IDs) != maxDoneIDs || d.IDs[0] != uint64(100+maxDoneIDs) {
		t.Fatalf("B's record keeps %d IDs from %d, want the last %d", len(d.IDs), d.IDs[0], maxDoneIDs)
	}
}

// memSink is a raft.SnapshotSink in memory.
type memSink struct {
	bytes.Buffer
	canceled bool
}

func (s *memSink) ID() string    { return "mem" }
func (s *memSink) Close() error  { return nil }
func (s *memSink) Cancel() error { s.canceled = true; return nil }

func TestRaftSnapshotCarriesTheAppliedIndex(t *testing.T) {
	l, _ := populated(t, Hooks{})
	n := &Node{cfg: NodeConfig{FSM: l}, stop: make(chan struct{})}
	n.applied.cond = make(chan struct{})
	e := evEntry("A", 2, shadowset.Event{Kind: shadowset.EvSetDelay, Duration: time.Minute})
	e.V = entryVersion
	data, _ := json.Marshal(e)
	if err, _ := (fsmAdapter{n}).Apply(&raft.Log{Index: 41, Type: raft.LogCommand, Data: data}).(error); err != nil {
		t.Fatal(err)
	}
	snap, err := fsmAdapter{n}.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var sink memSink
	if err := snap.Persist(&sink); err != nil || sink.canceled {
		t.Fatalf("persist: %v (canceled %v)", err, sink.canceled)
	}
	r := NewLog("A", 2, Hooks{})
	m := &Node{cfg: NodeConfig{FSM: r}, stop: make(chan struct{})}
	m.applied.cond = make(chan struct{})
	if err := (fsmAdapter{m}).Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatalf("restore: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := m.WaitApplied(ctx, 41); err != nil {
		t.Fatalf("index 41 is in the restored snapshot, yet WaitApplied: %v", err)
	}
	short, cancel2 := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel2()
	if err := m.WaitApplied(short, 42); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitApplied of an index past the snapshot: %v, want a timeout", err)
	}
	s1, _ := l.Snapshot()
	s2, _ := r.Snapshot()
	if string(s1) != string(s2) {
		t.Fatalf("restored state differs:\n%s\n%s", s1, s2)
	}
	if err := (fsmAdapter{m}).Restore(io.NopCloser(bytes.NewReader([]byte{1, 2}))); err == nil {
		t.Fatal("a snapshot without its index restored")
	}
}

// refusals are entries every Log must refuse, leaving itself unchanged.
func refusals() map[string][]byte {
	enc := func(e entry) []byte {
		if e.V == 0 {
			e.V = entryVersion
		}
		b, _ := json.Marshal(e)
		return b
	}
	return map[string][]byte{
		"not JSON":                    []byte("not json"),
		"empty":                       nil,
		"JSON null":                   []byte("null"),
		"a JSON array":                []byte("[1,2]"),
		"version 0":                   []byte(`{"t":"ev","h":"A","i":2,"ev":{"kind":3}}`),
		"version 2":                   []byte(`{"v":2,"t":"ev","h":"A","i":2,"ev":{"kind":3}}`),
		"unknown type":                enc(entry{Type: "zap", Host: "A", Inc: 2}),
		"event without event":         enc(entry{Type: entryEvent, Host: "A", Inc: 2}),
		"window without window":       enc(entry{Type: entryWindow, Host: "A", Inc: 2}),
		"ack without window":          enc(entry{Type: entryAck, Host: "A", Inc: 2}),
		"window of no op":             enc(entry{Type: entryWindow, Host: "A", Inc: 2, Win: &Window{Set: "DSA1", Op: 99}}),
		"window of a set":             enc(entry{Type: entryWindow, Host: "A", Inc: 2, Win: &Window{Set: "DSA7", Op: 1}}),
		"bad event":                   enc(evEntry("A", 2, shadowset.Event{Kind: shadowset.EvMount, Set: "DSA1", Host: "A"})),
		"join of no set":              enc(entry{Type: entryEvent, Host: "A", Inc: 2, Ev: &shadowset.Event{Kind: shadowset.EvMount, Set: "DSA5", Host: "A"}, Join: true}),
		"incarnation of no name":      enc(entry{Type: entryIncarnation, Host: "", Inc: 3}),
		"incarnation of a bad name":   enc(entry{Type: entryIncarnation, Host: "a b", Inc: 3}),
		"new run of a host, bad name": enc(entry{Type: entryIncarnation, Host: "x,y", Inc: 4}),
		"event kind out of range":     enc(evEntry("A", 2, shadowset.Event{Kind: 255})),
		"define with no spec":         enc(evEntry("A", 2, shadowset.Event{Kind: shadowset.EvDefineSet})),
		"slot claim without a slot":   enc(entry{Type: entrySlotClaim, Host: "A", Inc: 2}),
		"slot free without a slot":    enc(entry{Type: entrySlotFree, Host: "A", Inc: 2}),
		"slot free out of range":      enc(entry{Type: entrySlotFree, Host: "A", Inc: 2, Slot: &SlotEntry{Set: "DSA8", Index: 99}}),
		"slot free, negative":         enc(entry{Type: entrySlotFree, Host: "A", Inc: 2, Slot: &SlotEntry{Set: "DSA1", Index: -1}}),
	}
}

func TestRefusedEntriesChangeNothing(t *testing.T) {
	l, ap := populated(t, Hooks{})
	for name, data := range refusals() {
		snap, _ := l.Snapshot()
		hist := l.History()
		ap.index++
		if err := l.Apply(ap.index, data); err == nil {
			t.Errorf("%s (%q) accepted", name, data)
			continue
		}
		if got, _ := l.Snapshot(); string(got) != string(snap) || !reflect.DeepEqual(l.History(), hist) {
			t.Errorf("%s (%q) refused, but changed the log:\n%s\n%s", name, data, snap, got)
		}
	}
}

func TestSnapshotRestoreRoundTrip(t *testing.T) {
	l, ap := populated(t, Hooks{})
	snap, err := l.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	r := NewLog("A", 2, rec.hooks())
	if err := r.Restore(snap); err != nil {
		t.Fatalf("restore: %v", err)
	}
	same := func(when string) {
		t.Helper()
		var sets1, sets2 []shadowset.SetView
		var hosts1, hosts2 []shadowset.HostView
		var now1, now2 time.Duration
		l.View(func(c *shadowset.Core) { sets1, hosts1, now1 = c.Sets(), c.Hosts(), c.Now() })
		r.View(func(c *shadowset.Core) { sets2, hosts2, now2 = c.Sets(), c.Hosts(), c.Now() })
		if !reflect.DeepEqual(sets1, sets2) || !reflect.DeepEqual(hosts1, hosts2) || now1 != now2 {
			t.Fatalf("%s: restored core differs:\n%+v %+v\n%+v %+v", when, sets1, hosts1, sets2, hosts2)
		}
		if !reflect.DeepEqual(l.History(), r.History()) {
			t.Fatalf("%s: history %s, restored %s", when, historyString(l.History()), historyString(r.History()))
		}
		if !reflect.DeepEqual(l.incs, r.incs) || l.seq != r.seq || !reflect.DeepEqual(l.WindowOf("DSA1"), r.WindowOf("DSA1")) {
			t.Fatalf("%s: incarnations %v/%v, seq %d/%d, window %+v/%+v", when, l.incs, r.incs, l.seq, r.seq, l.WindowOf("DSA1"), r.WindowOf("DSA1"))
		}
		s1, _ := l.Snapshot()
		s2, _ := r.Snapshot()
		if string(s1) != string(s2) {
			t.Fatalf("%s: snapshots differ:\n%s\n%s", when, s1, s2)
		}
	}
	same("after restore")
	if len(l.History()) == 0 || len(l.incs) != 4 || l.seq != 1 {
		t.Fatalf("the populated log is not what the test expects: %d events, incarnations %v, seq %d", len(l.History()), l.incs, l.seq)
	}
	// Both go on alike: stale entries are refused by both, the rest
	// accepted by both.
	rap := &applier{t: t, l: r, index: ap.index}
	sv, _ := l.core.Set("DSA1")
	for _, e := range []entry{
		evEntry("A", 1, shadowset.Event{Kind: shadowset.EvSetDelay}),
		entry{Type: entryWindow, Host: "B", Inc: 5, Win: &Window{Set: "DSA1", Op: sv.Ops[0].ID, Lo: 8192, Hi: 16384}},
		entry{Type: entryAck, Host: "C", Inc: 7, Win: &Window{Set: "DSA1", Seq: 2}},
		evEntry("C", 7, shadowset.Event{Kind: shadowset.EvHostFailed, Host: "B"}),
		evEntry("C", 7, shadowset.Event{Kind: shadowset.EvTick, Duration: time.Second}),
		entry{Type: entryIncarnation, Host: "B", Inc: 6},
	} {
		err1, err2 := ap.apply(e), rap.apply(e)
		if (err1 == nil) != (err2 == nil) {
			t.Fatalf("entry %+v: %v on the original, %v on the restored log", e, err1, err2)
		}
	}
	same("after more entries")
	// The restored Log is this incarnation's, registered: its hooks fire.
	if len(rec.actions(shadowset.ActStart)) == 0 || len(rec.windowCalls()) == 0 {
		t.Fatalf("hooks of a Log restored after its own registration heard nothing: starts %+v, windows %+v", rec.actions(shadowset.ActStart), rec.windowCalls())
	}

	// Bad snapshots are refused and change nothing.
	before, _ := r.Snapshot()
	var raw map[string]any
	_ = json.Unmarshal(snap, &raw)
	raw["v"] = 2
	v2, _ := json.Marshal(raw)
	for name, b := range map[string][]byte{"garbage": []byte("{"), "version 2": v2, "bad core": []byte(`{"v":1,"core":{"version":99}}`)} {
		if err := r.Restore(b); err == nil {
			t.Fatalf("restore of %s accepted", name)
		}
	}
	if after, _ := r.Snapshot(); string(after) != string(before) {
		t.Fatal("a refused restore changed the log")
	}
}

// ---- small things

func TestCheckLoopback(t *testing.T) {
	for _, a := range []string{"127.0.0.1:1", "127.3.4.5:80", "[::1]:9"} {
		if err := CheckLoopback(a); err != nil {
			t.Errorf("%s: %v", a, err)
		}
	}
	for _, a := range []string{"10.0.0.1:1", "0.0.0.0:5", ":5", "localhost:5", "[::]:3", "127.0.0.1", "example.com:80"} {
		if err := CheckLoopback(a); err == nil {
			t.Errorf("%s accepted", a)
		}
	}
	dir := t.TempDir()
	for _, cfg := range []NodeConfig{
		{Host: "x", Listen: "0.0.0.0:40000", StateDir: dir},
		{Host: "x", Listen: "127.0.0.1:0", StateDir: dir},
		{Host: "x", Listen: "127.0.0.1:65535", StateDir: dir},
		{Host: "x", Listen: "127.0.0.1:40000", Join: []string{"192.168.1.1:7946"}, StateDir: dir},
	} {
		if n, err := Start(cfg); err == nil {
			n.Shutdown()
			t.Errorf("Start(%+v) accepted", cfg)
		}
	}
}

func TestMuxDropsUnknownStreams(t *testing.T) {
	addr := freeGossipAddr(t)
	forwarded := make(chan struct{}, 1)
	m, err := newMux(addr, func(c net.Conn) { c.Close(); forwarded <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	defer m.close()
	c, err := dialStream(addr, 'X', time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("a stream of unknown kind was kept open")
	}
	f, err := dialStream(addr, streamForward, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	select {
	case <-forwarded:
	case <-time.After(5 * time.Second):
		t.Fatal("a forward stream did not reach the forward handler")
	}
	if _, err := dialStream("10.1.1.1:5", streamRaft, time.Second); err == nil {
		t.Fatal("dial outside loopback allowed")
	}
}
