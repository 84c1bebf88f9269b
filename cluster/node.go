package cluster

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/rs/zerolog"
)

// Errors callers test for.
var (
	// ErrNoLeader: no leader could take a proposal before the deadline.
	ErrNoLeader = errors.New("cluster: no leader")
	// ErrRefused: the state machine refused the entry (the wrapped text
	// says why); nothing changed.
	ErrRefused = errors.New("cluster: refused")
	// ErrClosed: the node is shut down.
	ErrClosed = errors.New("cluster: node closed")
)

// MaxVoters is how many hosts vote in raft; the rest replicate the log as
// non-voters. Five voters survive two failures; more only slow commits.
const MaxVoters = 5

// MinVoters: the leader removes a failed voter without a replacement only
// while this many voters remain; three survive one failure.
const MinVoters = 3

// Timing is failure detection and election, as flags. The defaults suit
// loopback and a quiet LAN: a SIGKILLed host is declared failed within
// about 2 s. On a real LAN with busy hosts, multiply them (memberlist's
// LAN defaults are ProbeInterval 1 s, ProbeTimeout 500 ms, SuspicionMult
// 4), or expect false failures.
type Timing struct {
	// ProbeInterval: how often each host probes a random peer.
	ProbeInterval time.Duration
	// ProbeTimeout: how long a probe waits for its ack before asking
	// others to probe indirectly.
	ProbeTimeout time.Duration
	// SuspicionMult scales how long a suspected host may refute before it
	// is declared dead (× ProbeInterval × log10(hosts)).
	SuspicionMult int
	// RaftHeartbeat: raft's heartbeat and election timeout.
	RaftHeartbeat time.Duration
}

// DefaultTiming is the timing the agent uses unless told otherwise.
var DefaultTiming = Timing{ProbeInterval: 250 * time.Millisecond, ProbeTimeout: 150 * time.Millisecond, SuspicionMult: 3, RaftHeartbeat: 500 * time.Millisecond}

// NodeConfig configures a Node.
type NodeConfig struct {
	// Host is this host's name: memberlist node name and raft server ID.
	Host string
	// Listen is the memberlist address (UDP and TCP); raft and forwarding
	// listen on the next TCP port.
	Listen string
	// Join lists memberlist addresses of hosts already in the cluster.
	Join []string
	// StateDir holds raft's log, stable store and snapshots.
	StateDir string
	// Witness: a voter that mounts nothing.
	Witness bool
	// GossipKey encrypts gossip (16, 24 or 32 bytes) and authenticates
	// the cluster port (mutual TLS keyed by it: transport.go); nil: gossip
	// in the clear and the cluster port plaintext, open to any local
	// process.
	GossipKey []byte
	Timing    Timing
	Logger    zerolog.Logger
	// FSM is the state machine every host applies the log to.
	FSM StateMachine
	// Reconciler turns the leader's view of membership into log entries.
	Reconciler Reconciler
	// Bitmaps serves a stream of bit-set requests another host opened
	// with DialBitmaps (nil: such streams are closed). It owns the
	// connection.
	Bitmaps func(net.Conn)
}

// StateMachine is what the log is applied to, in order, on every host.
type StateMachine interface {
	// Apply applies one entry and returns its verdict (nil: accepted).
	Apply(index uint64, data []byte) error
	Snapshot() ([]byte, error)
	Restore(data []byte) error
}

// Reconciler is the leader's link from gossip to the log: memberlist only
// observes; the leader proposes, through the log, what the state machine
// must hear (Consul's reconcile loop).
type Reconciler interface {
	// Reconcile is called on the leader, after its state machine has
	// applied everything committed before it led, with the hosts gossip
	// sees alive; it proposes entries for the differences (idempotent).
	Reconcile(alive []Peer)
	// LeaderChanged tells this host it became (or stopped being) leader.
	LeaderChanged(leader bool)
}

// Peer is one host as gossip sees it.
type Peer struct {
	Host    string `json:"host"`
	Gossip  string `json:"gossip"`
	Raft    string `json:"raft"`
	Witness bool   `json:"witness,omitempty"`
	// Inc is the run (incarnation) of the host's agent gossip speaks of;
	// zero if its state machine does not say.
	Inc uint64 `json:"inc,omitempty"`
}

// nodeMeta is what each host gossips about itself (memberlist NodeMeta).
type nodeMeta struct {
	Raft    string `json:"r"`
	Witness bool   `json:"w,omitempty"`
	Version int    `json:"v"`
	Inc     uint64 `json:"i,omitempty"`
}

// incarnated is a state machine that knows which run of this host's agent
// it belongs to (Log does): gossip then names the run, so that the leader
// can tell the death of a previous run from the death of the current one.
type incarnated interface{ Incarnation() uint64 }

// Node is this host's membership in the cluster: gossip, raft, and the
// forwarding of proposals to the leader.
type Node struct {
	cfg NodeConfig
	log zerolog.Logger
	// settle: see SetSettle.
	settle atomic.Pointer[func(ctx context.Context) error]
	ml     *memberlist.Memberlist
	raft   *raft.Raft
	mux    *mux
	// tr authenticates the cluster port (nil: no key, plaintext).
	tr    *transport
	store *raftboltdb.BoltStore
	meta  []byte
	self  Peer

	applied struct {
		sync.Mutex
		index uint64
		cond  chan struct{}
	}
	events chan struct{}
	stop   chan struct{}
	done   sync.WaitGroup
	closed sync.Once

	// voterGone: since when each voter the leader's reconcile found not
	// alive has been gone (only the leaderLoop goroutine touches it).
	voterGone map[string]time.Time

	// members is gossip's view, kept from its events (which memberlist
	// delivers under its own lock): memberlist's Members() hands out
	// pointers to nodes it keeps updating, which cannot be read safely.
	members struct {
		sync.Mutex
		alive map[string]Peer
		// gone: the last departure gossip reported for each host not
		// alive now (which run it was, when).
		gone map[string]departure
	}
}

// departure is a host gossip saw fail or leave.
type departure struct {
	peer Peer
	at   time.Time
}

// Start joins (or forms) the cluster.
func Start(cfg NodeConfig) (*Node, error) {
	if cfg.Timing == (Timing{}) {
		cfg.Timing = DefaultTiming
	}
	if err := CheckLoopback(cfg.Listen); err != nil {
		return nil, err
	}
	host, portS, _ := net.SplitHostPort(cfg.Listen)
	port, err := strconv.Atoi(portS)
	if err != nil || port <= 0 || port >= 65535 {
		return nil, fmt.Errorf("cluster: listen %q: need a fixed port below 65535 (raft takes the next one)", cfg.Listen)
	}
	for _, j := range cfg.Join {
		if err := CheckLoopback(j); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("cluster: state dir: %w", err)
	}
	n := &Node{cfg: cfg, log: cfg.Logger.With().Str("component", "cluster").Logger(), events: make(chan struct{}, 1), stop: make(chan struct{})}
	n.applied.cond = make(chan struct{})
	n.members.alive, n.members.gone = map[string]Peer{}, map[string]departure{}
	n.voterGone = map[string]time.Time{}
	if k := len(cfg.GossipKey); k != 0 && k != 16 && k != 24 && k != 32 {
		return nil, fmt.Errorf("cluster: gossip key of %d bytes: need 16, 24 or 32", k)
	}
	if n.tr, err = newTransport(cfg.GossipKey, n.log); err != nil {
		return nil, err
	}
	raftAddr := net.JoinHostPort(host, strconv.Itoa(port+1))
	var inc uint64
	if ic, ok := cfg.FSM.(incarnated); ok {
		inc = ic.Incarnation()
	}
	n.self = Peer{Host: cfg.Host, Gossip: cfg.Listen, Raft: raftAddr, Witness: cfg.Witness, Inc: inc}
	n.meta, _ = json.Marshal(nodeMeta{Raft: raftAddr, Witness: cfg.Witness, Version: 1, Inc: inc})

	if n.mux, err = newMuxTransport(raftAddr, n.tr, n.serveForward, n.serveApplied, n.serveAck, cfg.Bitmaps); err != nil {
		return nil, err
	}
	fail := func(err error) (*Node, error) { n.shutdownAll(); return nil, err }
	if err := n.startRaft(); err != nil {
		return fail(err)
	}
	if err := n.startGossip(host, port); err != nil {
		return fail(err)
	}
	n.done.Add(1)
	go n.leaderLoop()
	return n, nil
}

func (n *Node) startRaft() error {
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(n.cfg.Host)
	hb := n.cfg.Timing.RaftHeartbeat
	rc.HeartbeatTimeout, rc.ElectionTimeout, rc.LeaderLeaseTimeout = hb, hb, hb/2
	rc.CommitTimeout = 5 * time.Millisecond
	rc.SnapshotThreshold = 4096
	rc.Logger = hclog.New(&hclog.LoggerOptions{Name: "raft", Level: hclog.Warn, Output: zlogWriter{n.log}})
	store, err := raftboltdb.NewBoltStore(filepath.Join(n.cfg.StateDir, "raft.db"))
	if err != nil {
		return fmt.Errorf("cluster: raft store: %w", err)
	}
	n.store = store
	snaps, err := raft.NewFileSnapshotStore(n.cfg.StateDir, 2, zlogWriter{n.log})
	if err != nil {
		return fmt.Errorf("cluster: snapshot store: %w", err)
	}
	trans := raft.NewNetworkTransport(raftLayer{n.mux}, 3, 2*time.Second, zlogWriter{n.log})
	existing, err := raft.HasExistingState(store, store, snaps)
	if err != nil {
		return fmt.Errorf("cluster: raft state: %w", err)
	}
	r, err := raft.NewRaft(rc, fsmAdapter{n}, store, store, snaps, trans)
	if err != nil {
		return fmt.Errorf("cluster: raft: %w", err)
	}
	n.raft = r
	if !existing && len(n.cfg.Join) == 0 {
		// The first host forms the cluster; the others are added by the
		// leader when gossip reports them.
		f := r.BootstrapCluster(raft.Configuration{Servers: []raft.Server{{ID: rc.LocalID, Address: raft.ServerAddress(n.self.Raft), Suffrage: raft.Voter}}})
		if err := f.Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
			return fmt.Errorf("cluster: bootstrap: %w", err)
		}
	}
	return nil
}

func (n *Node) startGossip(host string, port int) error {
	mc := memberlist.DefaultLocalConfig()
	mc.Name = n.cfg.Host
	mc.BindAddr, mc.BindPort = host, port
	mc.AdvertiseAddr, mc.AdvertisePort = host, port
	mc.ProbeInterval = n.cfg.Timing.ProbeInterval
	mc.ProbeTimeout = n.cfg.Timing.ProbeTimeout
	mc.SuspicionMult = n.cfg.Timing.SuspicionMult
	// A suspect may refute for SuspicionMult × ProbeInterval (× log10 of
	// the hosts, at least 1), not stretched while too few peers confirm
	// the suspicion: memberlist's default stretch (6×) would let a dead
	// host linger for seconds in a three-host cluster, and even 2× put
	// one failure in ten past the recovery delay plus 2 s.
	mc.SuspicionMaxTimeoutMult = 1
	mc.GossipInterval = 100 * time.Millisecond
	// memberlist's local profile sends each piece of news only
	// 2×⌈log10(n+1)⌉ times, piggybacked on pings and acks too: in a small
	// cluster a join or a refutation can miss a host entirely, which then
	// learns of it only at the next push/pull (15 s), and a leader that
	// missed a host's join would record it failed. Send news as often as
	// the LAN profile does, and push/pull often: with few hosts it is cheap.
	mc.RetransmitMult = 4
	mc.PushPullInterval = 10 * n.cfg.Timing.ProbeInterval
	mc.Delegate = delegate{n}
	mc.Events = events{n}
	mc.Logger = log.New(zlogWriter{n.log}, "", 0)
	if n.cfg.GossipKey != nil {
		mc.SecretKey = n.cfg.GossipKey
	}
	ml, err := memberlist.Create(mc)
	if err != nil {
		return fmt.Errorf("cluster: gossip on %s: %w", n.cfg.Listen, err)
	}
	n.ml = ml
	if len(n.cfg.Join) > 0 {
		// Peers may still be starting: keep trying for a while.
		deadline := time.Now().Add(15 * time.Second)
		for {
			_, err := ml.Join(n.cfg.Join)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("cluster: join %v: %w", n.cfg.Join, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	return nil
}

// zlogWriter turns raft's and memberlist's log lines into zerolog events.
type zlogWriter struct{ l zerolog.Logger }

func (w zlogWriter) Write(p []byte) (int, error) {
	s := string(p)
	for len(s) > 0 && (s[len(s)-1] == '\n' || s[len(s)-1] == '\r') {
		s = s[:len(s)-1]
	}
	lvl := zerolog.DebugLevel
	switch {
	case containsAny(s, "connection refused", "i/o timeout", "failed to contact", "heartbeat timeout reached"):
		// A dead peer: gossip reports it once; raft would repeat it
		// every few milliseconds.
	case containsAny(s, "[ERR]", "[ERROR]", "error"):
		lvl = zerolog.WarnLevel
	case containsAny(s, "[WARN]"):
		lvl = zerolog.InfoLevel
	}
	w.l.WithLevel(lvl).Msg(s)
	return len(p), nil
}

func containsAny(s string, subs ...string) bool {
	for _, x := range subs {
		for i := 0; i+len(x) <= len(s); i++ {
			if s[i:i+len(x)] == x {
				return true
			}
		}
	}
	return false
}

type delegate struct{ n *Node }

func (d delegate) NodeMeta(limit int) []byte                  { return d.n.meta }
func (d delegate) NotifyMsg([]byte)                           {}
func (d delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (d delegate) LocalState(join bool) []byte                { return nil }
func (d delegate) MergeRemoteState(buf []byte, join bool)     {}

type events struct{ n *Node }

func (e events) NotifyJoin(nd *memberlist.Node) {
	e.n.log.Info().Str("peer", nd.Name).Str("addr", nd.Address()).Msg("gossip: host joined")
	e.n.members.Lock()
	e.n.members.alive[nd.Name] = peerOf(nd)
	delete(e.n.members.gone, nd.Name)
	e.n.members.Unlock()
	e.n.poke()
}
func (e events) NotifyLeave(nd *memberlist.Node) {
	e.n.log.Warn().Str("peer", nd.Name).Str("addr", nd.Address()).Msg("gossip: host failed or left")
	e.n.members.Lock()
	delete(e.n.members.alive, nd.Name)
	e.n.members.gone[nd.Name] = departure{peer: peerOf(nd), at: time.Now()}
	e.n.members.Unlock()
	e.n.poke()
}
func (e events) NotifyUpdate(nd *memberlist.Node) {
	e.n.members.Lock()
	if _, ok := e.n.members.alive[nd.Name]; ok {
		e.n.members.alive[nd.Name] = peerOf(nd)
	}
	e.n.members.Unlock()
	e.n.poke()
}

func (n *Node) poke() {
	select {
	case n.events <- struct{}{}:
	default:
	}
}

// Alive returns the hosts gossip sees alive (this one included).
func (n *Node) Alive() []Peer {
	n.members.Lock()
	out := make([]Peer, 0, len(n.members.alive))
	for _, p := range n.members.alive {
		out = append(out, p)
	}
	n.members.Unlock()
	slices.SortFunc(out, func(a, b Peer) int { return cmpString(a.Host, b.Host) })
	return out
}

// peerOf reads a memberlist node: only inside memberlist's event
// callbacks, which run under its lock.
func peerOf(m *memberlist.Node) Peer {
	var md nodeMeta
	_ = json.Unmarshal(m.Meta, &md)
	return Peer{Host: m.Name, Gossip: m.Address(), Raft: md.Raft, Witness: md.Witness, Inc: md.Inc}
}

// departed returns gossip's last report of a host's failure or departure,
// if it is not alive since.
func (n *Node) departed(host string) (departure, bool) {
	n.members.Lock()
	defer n.members.Unlock()
	d, ok := n.members.gone[host]
	return d, ok
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Authenticated reports whether the cluster port is mutual TLS keyed by
// the cluster key (a key is configured); false: plaintext, and any local
// process can speak raft, forward proposals and ack windows.
func (n *Node) Authenticated() bool { return n.tr != nil }

// dial opens a stream of the given kind to a host's cluster port, over
// TLS when the cluster has a key.
func (n *Node) dial(addr string, kind byte, timeout time.Duration) (net.Conn, error) {
	return n.tr.dial(addr, kind, timeout)
}

// DialBitmaps opens a bit-set stream to host's cluster port (over TLS
// when the cluster has a key), if gossip sees host alive.
func (n *Node) DialBitmaps(host string, timeout time.Duration) (net.Conn, error) {
	for _, p := range n.Alive() {
		if p.Host == host {
			return n.dial(p.Raft, streamBitmaps, timeout)
		}
	}
	return nil, fmt.Errorf("cluster: %s is not alive", host)
}

// Leader returns the leader's host name ("" if none is known).
func (n *Node) Leader() string {
	_, id := n.raft.LeaderWithID()
	return string(id)
}

// IsLeader reports whether this host leads.
func (n *Node) IsLeader() bool { return n.raft.State() == raft.Leader }

// Server is one raft server.
type Server struct {
	Host  string `json:"host"`
	Voter bool   `json:"voter"`
}

// Servers returns the raft configuration.
func (n *Node) Servers() []Server {
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return nil
	}
	var out []Server
	for _, s := range f.Configuration().Servers {
		out = append(out, Server{Host: string(s.ID), Voter: s.Suffrage == raft.Voter})
	}
	return out
}

// leaderLoop runs the leader's duties: voters follow gossip, and the
// reconciler turns gossip into log entries, after a barrier so the state
// machine has applied everything committed before this host led.
func (n *Node) leaderLoop() {
	defer n.done.Done()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	leading := false
	for {
		select {
		case <-n.stop:
			return
		case isLeader := <-n.raft.LeaderCh():
			if isLeader {
				// Until the barrier passes, this leader's state machine may
				// lack entries committed before it led: it acts on nothing.
				var err error
				for try := 0; try < 30 && n.IsLeader(); try++ {
					if err = n.raft.Barrier(10 * time.Second).Error(); err == nil {
						break
					}
					n.log.Warn().Err(err).Msg("leader barrier failed; retrying")
				}
				if err != nil || !n.IsLeader() {
					continue
				}
			}
			leading = isLeader
			n.log.Info().Bool("leader", isLeader).Msg("raft leadership changed")
			if n.cfg.Reconciler != nil {
				n.cfg.Reconciler.LeaderChanged(isLeader)
			}
		case <-n.events:
		case <-tick.C:
		}
		if leading && n.IsLeader() {
			n.reconcile()
		}
	}
}

func (n *Node) reconcile() {
	alive := n.Alive()
	servers := n.Servers()
	voters := 0
	for _, s := range servers {
		if s.Voter {
			voters++
		}
	}
	for _, p := range alive {
		if p.Raft == "" || slices.ContainsFunc(servers, func(s Server) bool { return s.Host == p.Host }) {
			continue
		}
		var f raft.IndexFuture
		if voters < MaxVoters {
			f = n.raft.AddVoter(raft.ServerID(p.Host), raft.ServerAddress(p.Raft), 0, 5*time.Second)
			voters++
		} else {
			f = n.raft.AddNonvoter(raft.ServerID(p.Host), raft.ServerAddress(p.Raft), 0, 5*time.Second)
		}
		if err := f.Error(); err != nil {
			n.log.Warn().Err(err).Str("peer", p.Host).Msg("cannot add the host to raft")
		} else {
			n.log.Info().Str("peer", p.Host).Msg("host added to raft")
		}
	}
	n.removeFailedVoters(alive)
	if n.cfg.Reconciler != nil {
		n.cfg.Reconciler.Reconcile(alive)
	}
}

// voterGrace is how long gossip must have reported a voter gone before
// the leader takes it out of raft: long enough that a quick restart is
// not churned.
func (n *Node) voterGrace() time.Duration { return 10 * n.cfg.Timing.ProbeInterval }

// removeFailedVoters takes out of raft the voters gossip has reported
// gone for longer than voterGrace: a dead voter still counts toward the
// quorum, so a cluster of five with two dead ones could not lose a third.
// A live non-voter is promoted in its place first; without one, the
// voter is removed only if MinVoters voters remain. The leader itself is
// never removed. A removed host that comes back is added again by the
// join path (server IDs are host names).
func (n *Node) removeFailedVoters(alive []Peer) {
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return
	}
	servers := f.Configuration().Servers
	isAlive := func(host string) bool {
		return slices.ContainsFunc(alive, func(p Peer) bool { return p.Host == host })
	}
	voters := 0
	for _, s := range servers {
		if s.Suffrage == raft.Voter {
			voters++
		}
	}
	// Forget voters that are back or no longer voters.
	for h := range n.voterGone {
		if isAlive(h) || !slices.ContainsFunc(servers, func(s raft.Server) bool { return string(s.ID) == h && s.Suffrage == raft.Voter }) {
			delete(n.voterGone, h)
		}
	}
	now := time.Now()
	for _, s := range servers {
		host := string(s.ID)
		if s.Suffrage != raft.Voter || host == n.cfg.Host || isAlive(host) {
			continue
		}
		since, seen := n.voterGone[host]
		if !seen {
			// Gossip's report if this host saw it go, otherwise now: a new
			// leader that never saw the voter alive counts from its own
			// first look.
			since = now
			if d, ok := n.departed(host); ok && d.at.Before(now) {
				since = d.at
			}
			n.voterGone[host] = since
		}
		if now.Sub(since) < n.voterGrace() {
			continue
		}
		// A replacement: a live non-voter (by name, so every leader picks
		// the same one).
		var repl *Peer
		for _, p := range alive {
			if p.Raft != "" && slices.ContainsFunc(servers, func(x raft.Server) bool { return string(x.ID) == p.Host && x.Suffrage != raft.Voter }) {
				repl = &p
				break
			}
		}
		if repl != nil {
			if err := n.raft.AddVoter(raft.ServerID(repl.Host), raft.ServerAddress(repl.Raft), 0, 5*time.Second).Error(); err != nil {
				n.log.Warn().Err(err).Str("peer", repl.Host).Str("failed", host).Msg("cannot promote a non-voter to replace a failed voter")
				continue
			}
			n.log.Info().Str("peer", repl.Host).Str("failed", host).Msg("non-voter promoted to replace a failed voter")
			voters++
		} else if voters-1 < MinVoters {
			continue
		}
		if err := n.raft.RemoveServer(s.ID, 0, 5*time.Second).Error(); err != nil {
			n.log.Warn().Err(err).Str("peer", host).Msg("cannot remove a failed voter from raft")
			continue
		}
		voters--
		delete(n.voterGone, host)
		ev := n.log.Warn().Str("peer", host).Dur("gone_for", now.Sub(since).Round(time.Millisecond)).Int("voters", voters)
		if repl != nil {
			ev = ev.Str("replaced_by", repl.Host)
		}
		ev.Msg("failed voter removed from raft")
		// The configuration changed: the next reconcile looks again.
		return
	}
}

// verifyLeader confirms, with a round of heartbeats, that this host still
// leads (a leader that was stopped learns of its successor only then).
func (n *Node) verifyLeader() bool {
	if n == nil || n.raft == nil {
		return true // tests without a node
	}
	return n.raft.VerifyLeader().Error() == nil
}

// Propose appends data to the log and waits until this host has applied
// it; the error is the state machine's verdict (wrapping ErrRefused) or a
// failure to commit.
func (n *Node) Propose(ctx context.Context, data []byte) error {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(30 * time.Second)
	}
	var lastErr error
	for time.Now().Before(deadline) {
		select {
		case <-n.stop:
			return ErrClosed
		default:
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rep, err := n.propose(forwardRequest{Data: data}, time.Until(deadline))
		if err == nil {
			if err := n.WaitApplied(ctx, rep.Index); err != nil {
				return err
			}
			if rep.Err != "" {
				return fmt.Errorf("%w: %s", ErrRefused, rep.Err)
			}
			return nil
		}
		lastErr = err
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%w: %v", ErrNoLeader, lastErr)
}

// propose applies on the leader, or forwards to it (or, not knowing it,
// to any peer, which forwards once more).
func (n *Node) propose(req forwardRequest, timeout time.Duration) (forwardReply, error) {
	timeout = min(timeout, 10*time.Second)
	if n.raft.State() == raft.Leader && req.Remove != "" {
		f := n.raft.RemoveServer(raft.ServerID(req.Remove), 0, timeout)
		if err := f.Error(); err != nil {
			return forwardReply{}, err
		}
		return forwardReply{Index: f.Index()}, nil
	}
	if n.raft.State() == raft.Leader {
		f := n.raft.Apply(req.Data, timeout)
		if err := f.Error(); err != nil {
			return forwardReply{}, err
		}
		rep := forwardReply{Index: f.Index()}
		if resp, ok := f.Response().(error); ok && resp != nil {
			rep.Err, rep.Refused = resp.Error(), true
		}
		return rep, nil
	}
	if req.Hops > 1 {
		return forwardReply{}, ErrNoLeader
	}
	req.Hops++
	addr, _ := n.raft.LeaderWithID()
	targets := []string{string(addr)}
	if addr == "" {
		targets = nil
		for _, p := range n.Alive() {
			if p.Host != n.cfg.Host && p.Raft != "" {
				targets = append(targets, p.Raft)
			}
		}
	}
	var lastErr error = ErrNoLeader
	for _, t := range targets {
		rep, err := callForward(n.tr, t, req, timeout)
		if err != nil {
			lastErr = err
			continue
		}
		if !rep.Refused && rep.Err != "" {
			lastErr = errors.New(rep.Err)
			continue
		}
		return rep, nil
	}
	return forwardReply{}, lastErr
}

func (n *Node) serveForward(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(15 * time.Second))
	var req forwardRequest
	if err := json.NewDecoder(bufio.NewReader(c)).Decode(&req); err != nil {
		return
	}
	rep, err := n.propose(req, 10*time.Second)
	if err != nil {
		rep = forwardReply{Err: err.Error()}
	}
	_ = json.NewEncoder(c).Encode(rep)
}

// WaitApplied waits until this host's state machine has applied index.
func (n *Node) WaitApplied(ctx context.Context, index uint64) error {
	for {
		n.applied.Lock()
		at, ch := n.applied.index, n.applied.cond
		n.applied.Unlock()
		// Not raft's AppliedIndex: raft counts an entry applied once it
		// has handed it to the state machine's goroutine, before the state
		// machine has applied it.
		if at >= index {
			return nil
		}
		t := time.NewTimer(30 * time.Second)
		select {
		case <-ch:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-n.stop:
			t.Stop()
			return ErrClosed
		case <-t.C:
			return fmt.Errorf("cluster: entry %d not applied here after 30 s (applied %d)", index, at)
		}
		t.Stop()
	}
}

func (n *Node) markApplied(index uint64) {
	n.applied.Lock()
	if index > n.applied.index {
		n.applied.index = index
		close(n.applied.cond)
		n.applied.cond = make(chan struct{})
	}
	n.applied.Unlock()
}

// Leave is the graceful stop: hand leadership over, leave gossip (the
// leader then removes this host from raft), stop.
func (n *Node) Leave() {
	left := false
	if len(n.Servers()) > 1 {
		if n.IsLeader() {
			if err := n.raft.LeadershipTransfer().Error(); err != nil {
				n.log.Warn().Err(err).Msg("leadership transfer failed")
			}
		}
		if n.ml != nil {
			_ = n.ml.Leave(2 * time.Second)
			left = true
		}
		// Gossip first, so that the leader's reconcile does not add it
		// back. Then out of the raft configuration, as Consul's leave
		// does: a host that left must not count against the quorum the
		// others need (four voters, one of them dead, survive a graceful
		// stop only if the stopped one stops counting).
		deadline := time.Now().Add(5 * time.Second)
		for {
			_, err := n.propose(forwardRequest{Remove: n.cfg.Host}, time.Until(deadline))
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				n.log.Warn().Err(err).Msg("could not leave the raft configuration: the others count this host until they remove it")
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	if n.ml != nil && !left {
		_ = n.ml.Leave(2 * time.Second)
	}
	n.Shutdown()
}

// Shutdown stops the node without telling anyone (as a crash would,
// except that the files are closed cleanly).
func (n *Node) Shutdown() { n.closed.Do(n.shutdownAll) }

func (n *Node) shutdownAll() {
	select {
	case <-n.stop:
	default:
		close(n.stop)
	}
	if n.ml != nil {
		_ = n.ml.Shutdown()
	}
	if n.raft != nil {
		_ = n.raft.Shutdown().Error()
	}
	if n.mux != nil {
		n.mux.close()
	}
	if n.store != nil {
		_ = n.store.Close()
	}
	n.done.Wait()
}

// fsmAdapter is raft's FSM over our StateMachine.
type fsmAdapter struct{ n *Node }

func (f fsmAdapter) Apply(l *raft.Log) any {
	var err error
	if l.Type == raft.LogCommand {
		err = f.n.cfg.FSM.Apply(l.Index, l.Data)
	}
	f.n.markApplied(l.Index)
	return err
}

// A snapshot is the index of the last entry the state machine applied
// (8 bytes, big-endian), then the state machine's snapshot: restoring it
// tells WaitApplied how far the state machine got (raft does not tell the
// state machine which index a snapshot ends at).
func (f fsmAdapter) Snapshot() (raft.FSMSnapshot, error) {
	b, err := f.n.cfg.FSM.Snapshot()
	if err != nil {
		return nil, err
	}
	f.n.applied.Lock()
	at := f.n.applied.index
	f.n.applied.Unlock()
	return snapshot(append(binary.BigEndian.AppendUint64(make([]byte, 0, 8+len(b)), at), b...)), nil
}

func (f fsmAdapter) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return err
	}
	if len(b) < 8 {
		return fmt.Errorf("cluster: snapshot of %d bytes has no index", len(b))
	}
	if err := f.n.cfg.FSM.Restore(b[8:]); err != nil {
		return err
	}
	f.n.markApplied(binary.BigEndian.Uint64(b[:8]))
	return nil
}

type snapshot []byte

func (s snapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s); err != nil {
		_ = sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s snapshot) Release() {}
