package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/rs/zerolog"
)

// ---- nodes over a plain recording state machine (no Log), so that these
// tests exercise the node and its transport only.

// recFSM records what it applied.
type recFSM struct {
	mu   sync.Mutex
	data []string
}

func (f *recFSM) Apply(index uint64, data []byte) error {
	f.mu.Lock()
	f.data = append(f.data, string(data))
	f.mu.Unlock()
	return nil
}

func (f *recFSM) Snapshot() ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return json.Marshal(f.data)
}

func (f *recFSM) Restore(b []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return json.Unmarshal(b, &f.data)
}

func (f *recFSM) has(s string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Contains(f.data, s)
}

// logBuf is a goroutine-safe log sink a test can search.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// tnode is one in-process node over a recFSM.
type tnode struct {
	t      testing.TB
	name   string
	listen string
	dir    string
	key    []byte
	fsm    *recFSM
	logs   *logBuf
	node   *Node
}

func newTNode(t testing.TB, name string, key []byte) *tnode {
	return &tnode{t: t, name: name, listen: freeGossipAddr(t), dir: t.TempDir(), key: key}
}

// start starts (or restarts, with the same state dir and ports) the node.
func (x *tnode) start(join ...string) {
	x.t.Helper()
	x.fsm, x.logs = &recFSM{}, &logBuf{}
	var w io.Writer = x.logs
	lvl := zerolog.InfoLevel
	if env := os.Getenv("CLUSTER_TEST_LOG"); env != "" {
		w = io.MultiWriter(x.logs, zerolog.ConsoleWriter{Out: os.Stderr})
		if l, err := zerolog.ParseLevel(env); err == nil {
			lvl = l
		}
	}
	lg := zerolog.New(w).Level(lvl).With().Timestamp().Str("test", x.t.Name()).Str("host", x.name).Logger()
	n, err := Start(NodeConfig{Host: x.name, Listen: x.listen, Join: join, StateDir: x.dir, GossipKey: x.key,
		Timing: testTiming, Logger: lg, FSM: x.fsm})
	if err != nil {
		x.t.Fatalf("start %s on %s: %v", x.name, x.listen, err)
	}
	x.node = n
	x.t.Cleanup(n.Shutdown)
}

func (x *tnode) raftAddr() string { return x.node.self.Raft }

func (x *tnode) propose(data string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	return x.node.Propose(ctx, []byte(data))
}

// startTNodes starts n nodes named prefix1..prefixn with key: the first
// bootstraps, the others join it; it returns once the first sees them all
// as raft servers and one leader is known to all.
func startTNodes(t testing.TB, prefix string, n int, key []byte) []*tnode {
	t.Helper()
	xs := make([]*tnode, n)
	for i := range xs {
		xs[i] = newTNode(t, fmt.Sprintf("%s%d", prefix, i+1), key)
	}
	xs[0].start()
	for _, x := range xs[1:] {
		x.start(xs[0].listen)
	}
	var names []string
	for _, x := range xs {
		names = append(names, x.name)
	}
	waitForState(t, 30*time.Second, fmt.Sprintf("every node to list %v as raft servers and agree on a leader", names), func() (bool, string) {
		var state []string
		ok := true
		leader := xs[0].node.Leader()
		for _, x := range xs {
			got := serverNames(x.node.Servers())
			state = append(state, fmt.Sprintf("%s: servers %v leader %q", x.name, got, x.node.Leader()))
			if !slices.Equal(got, names) || leader == "" || x.node.Leader() != leader {
				ok = false
			}
		}
		return ok, strings.Join(state, "; ")
	})
	return xs
}

func serverNames(ss []Server) []string {
	var out []string
	for _, s := range ss {
		out = append(out, s.Host)
	}
	slices.Sort(out)
	return out
}

func voterNames(ss []Server) []string {
	var out []string
	for _, s := range ss {
		if s.Voter {
			out = append(out, s.Host)
		}
	}
	slices.Sort(out)
	return out
}

func leaderT(xs []*tnode) *tnode {
	var l *tnode
	for _, x := range xs {
		if x.node != nil && x.node.IsLeader() {
			if l != nil {
				return nil
			}
			l = x
		}
	}
	return l
}

func testKey(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

// ---- the identity

func TestTransportIdentityIsDeterministic(t *testing.T) {
	k := testKey(1)
	p1, c1, err := transportIdentity(k)
	if err != nil {
		t.Fatal(err)
	}
	p2, c2, err := transportIdentity(append([]byte(nil), k...))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p1, p2) || !bytes.Equal(c1.Certificate[0], c2.Certificate[0]) {
		t.Fatal("one key derived two identities: hosts would refuse each other")
	}
	p3, c3, err := transportIdentity(testKey(2))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(p1, p3) || bytes.Equal(c1.Certificate[0], c3.Certificate[0]) {
		t.Fatal("two keys derived one identity")
	}
	if _, _, err := transportIdentity(nil); err == nil {
		t.Fatal("an identity from no key")
	}
	tr, err := newTransport(nil, zerolog.Nop())
	if tr != nil || err != nil {
		t.Fatalf("no key: transport %v, %v; want nil (plaintext)", tr, err)
	}
}

// ---- (a) a keyed cluster works

func TestTransportKeyedClusterCommits(t *testing.T) {
	xs := startTNodes(t, "k", 2, testKey(7))
	for _, x := range xs {
		if !x.node.Authenticated() {
			t.Fatalf("%s has a key but says its cluster port is not authenticated", x.name)
		}
	}
	// Proposals from both: one on the leader, one forwarded to it.
	for i, x := range xs {
		data := fmt.Sprintf("keyed-%d", i)
		if err := x.propose(data); err != nil {
			t.Fatalf("%s: propose: %v", x.name, err)
		}
		waitFor(t, 10*time.Second, "every node to apply "+data, func() bool {
			return xs[0].fsm.has(data) && xs[1].fsm.has(data)
		})
	}
	// The applied-index question and window acks go over TLS too.
	idx := xs[0].node.AppliedIndex()
	if err := xs[0].node.askApplied(xs[1].raftAddr(), idx); err != nil {
		t.Fatalf("applied-index question over TLS: %v", err)
	}
	err := xs[0].node.sendAck(xs[1].name, ackRequest{Set: "s", Seq: 1, Host: xs[0].name})
	if err == nil || !strings.Contains(err.Error(), "no window here") {
		t.Fatalf("an ack over TLS: %v, want the receiver's answer %q", err, "no window here")
	}

	// Without a key: plaintext, and the node says so.
	plain := startTNodes(t, "p", 1, nil)
	if plain[0].node.Authenticated() {
		t.Fatal("a node without a key says its cluster port is authenticated")
	}
	if err := plain[0].node.askApplied(plain[0].raftAddr(), 0); err != nil {
		t.Fatalf("plaintext applied-index question: %v", err)
	}
}

// ---- (b) plaintext is refused by a keyed node

func TestTransportRefusesPlaintext(t *testing.T) {
	xs := startTNodes(t, "b", 2, testKey(3))
	leader := leaderT(xs)
	if leader == nil {
		t.Fatal("no single leader")
	}
	// A forwarded proposal in plaintext, as a host without the key would
	// send it.
	// send writes kind and payload in plaintext and reads until the
	// node closes the connection (or 7 s pass).
	send := func(what string, kind byte, payload []byte) {
		t.Helper()
		c, err := dialStream(leader.raftAddr(), kind, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_, _ = c.Write(payload)
		_ = c.SetReadDeadline(time.Now().Add(7 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil {
			t.Fatalf("%s in plaintext: the connection stayed open (%v)", what, err)
		}
		if bytes.Contains(got, []byte(`"index"`)) || bytes.Contains(got, []byte(`"err"`)) {
			t.Fatalf("%s in plaintext: answered %q", what, got)
		}
	}
	req, _ := json.Marshal(forwardRequest{Data: []byte("plaintext-forward")})
	send("a forwarded proposal", streamForward, append(req, '\n'))
	rm, _ := json.Marshal(forwardRequest{Remove: xs[0].name})
	send("a forwarded removal", streamForward, append(rm, '\n'))
	// A raft RPC in plaintext (the transport's framing: type byte, then
	// msgpack; any bytes do: they never get past the handshake).
	send("a raft RPC", streamRaft, []byte{0, 0x80})
	// Over TLS with the key the very same forward is applied: the request
	// was a valid one.
	c, err := leader.node.dial(leader.raftAddr(), streamForward, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	ok, _ := json.Marshal(forwardRequest{Data: []byte("tls-forward")})
	if _, err := c.Write(append(ok, '\n')); err != nil {
		t.Fatal(err)
	}
	var fr forwardReply
	if err := json.NewDecoder(c).Decode(&fr); err != nil || fr.Err != "" {
		t.Fatalf("forward over TLS: %+v, %v", fr, err)
	}
	c.Close()
	waitFor(t, 10*time.Second, "both nodes to apply the forward sent over TLS", func() bool {
		return xs[0].fsm.has("tls-forward") && xs[1].fsm.has("tls-forward")
	})
	for _, x := range xs {
		if x.fsm.has("plaintext-forward") {
			t.Fatalf("%s applied a proposal forwarded in plaintext", x.name)
		}
		if got := serverNames(x.node.Servers()); len(got) != 2 {
			t.Fatalf("%s: servers %v after a plaintext removal request", x.name, got)
		}
	}
	if !strings.Contains(leader.logs.String(), "refused a connection") {
		t.Fatalf("the leader logged no refusal:\n%s", leader.logs.String())
	}
}

// ---- (c) a TLS client with another key is refused

func TestTransportRefusesAnotherKey(t *testing.T) {
	xs := startTNodes(t, "c", 2, testKey(4))
	leader := leaderT(xs)
	if leader == nil {
		t.Fatal("no single leader")
	}
	// A client that presents the certificate another key derives and
	// does not check the server's (so that only the server refuses).
	_, cert, err := transportIdentity(testKey(5))
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }}
	tryForward := func(req forwardRequest) (string, error) {
		raw, err := net.DialTimeout("tcp", leader.raftAddr(), time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		_ = raw.SetDeadline(time.Now().Add(7 * time.Second))
		c := tls.Client(raw, cfg)
		if err := c.Handshake(); err != nil {
			return raw.LocalAddr().String(), err
		}
		b, _ := json.Marshal(req)
		if _, err := c.Write(append([]byte{streamForward}, append(b, '\n')...)); err != nil {
			return raw.LocalAddr().String(), err
		}
		var rep forwardReply
		return raw.LocalAddr().String(), json.NewDecoder(c).Decode(&rep)
	}
	from, err := tryForward(forwardRequest{Data: []byte("other-key-forward")})
	if err == nil {
		t.Fatal("the leader answered a forward from a client with another key")
	}
	from2, err := tryForward(forwardRequest{Remove: followerT(xs, leader).name})
	if err == nil {
		t.Fatal("the leader answered a removal from a client with another key")
	}
	// Either attempt's refusal may be the one logged: the server refuses
	// after the client's side of the TLS 1.3 handshake has finished, and
	// its log is rate-limited per reason.
	waitForState(t, 5*time.Second, "the leader to log the refusal naming "+from+" or "+from2, func() (bool, string) {
		var refusals []string
		for _, line := range strings.Split(leader.logs.String(), "\n") {
			if strings.Contains(line, "refused") {
				refusals = append(refusals, line)
			}
		}
		for _, line := range refusals {
			if strings.Contains(line, "does not hold the cluster key") && (strings.Contains(line, from) || strings.Contains(line, from2)) {
				return true, ""
			}
		}
		return false, strings.Join(refusals, "\n")
	})
	// And the client side: a node refuses a server with another key.
	rogue, err := newTransport(testKey(5), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	addr := freeGossipAddr(t)
	served := make(chan struct{}, 4)
	m, err := newMuxTransport(addr, rogue, func(c net.Conn) { c.Close(); served <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	defer m.close()
	if c, err := leader.node.dial(addr, streamForward, time.Second); err == nil {
		c.Close()
		t.Fatal("a node completed a handshake with a server holding another key")
	} else if !errors.Is(err, errWrongKey) {
		t.Fatalf("dial to another key's server: %v, want %v", err, errWrongKey)
	}
	time.Sleep(200 * time.Millisecond)
	for _, x := range xs {
		if x.fsm.has("other-key-forward") {
			t.Fatalf("%s applied a proposal from a client with another key", x.name)
		}
		if got := serverNames(x.node.Servers()); len(got) != 2 {
			t.Fatalf("%s: servers %v after a removal request with another key", x.name, got)
		}
	}
	select {
	case <-served:
		t.Fatal("a server with another key got a stream from the node")
	default:
	}
}

func followerT(xs []*tnode, leader *tnode) *tnode {
	for _, x := range xs {
		if x != leader {
			return x
		}
	}
	return nil
}

// ---- (d) a host with another key never joins

func TestTransportAnotherKeyNeverJoins(t *testing.T) {
	xs := startTNodes(t, "d", 3, testKey(6))
	leader := leaderT(xs)
	if leader == nil {
		t.Fatal("no single leader")
	}
	follower := followerT(xs, leader)
	// A host with another key forms a cluster of its own, then tries
	// every door: gossip, raft (taking the follower as its voter, which
	// would replicate its log over the follower's), and a forwarded
	// removal of the follower to the leader.
	rogue := newTNode(t, "rogue", testKey(9))
	rogue.start()
	waitFor(t, 10*time.Second, "the rogue to lead its own cluster", rogue.node.IsLeader)
	if _, err := rogue.node.ml.Join([]string{leader.listen}); err == nil {
		t.Log("gossip let the rogue join (memberlist accepted it): raft must still refuse it")
	}
	addFuture := rogue.node.raft.AddVoter(raft.ServerID(follower.name), raft.ServerAddress(follower.raftAddr()), 0, 2*time.Second)
	if _, err := callForward(rogue.node.tr, leader.raftAddr(), forwardRequest{Remove: follower.name}, 2*time.Second); err == nil {
		t.Fatal("the leader answered a removal forwarded by a host with another key")
	}
	_ = addFuture.Error()
	// For several election timeouts and reconciles: the cluster is
	// untouched.
	until := time.Now().Add(4 * time.Second)
	for time.Now().Before(until) {
		for _, x := range xs {
			got := serverNames(x.node.Servers())
			if !slices.Equal(got, []string{"d1", "d2", "d3"}) {
				t.Fatalf("%s: raft servers %v, want [d1 d2 d3] (rogue %s)", x.name, got, rogue.name)
			}
			if l := x.node.Leader(); l != leader.name {
				t.Fatalf("%s follows %q, want %s", x.name, l, leader.name)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := follower.propose("after-rogue"); err != nil {
		t.Fatalf("the cluster no longer commits: %v", err)
	}
	if !strings.Contains(follower.logs.String(), "does not hold the cluster key") {
		t.Fatalf("the follower did not log refusing the rogue's raft RPCs:\n%s", follower.logs.String())
	}
}

// ---- cost

// BenchmarkTransportForward measures a forward-shaped round trip on a
// fresh connection each time (as forwards, applied-index questions and
// acks are), plaintext and over TLS.
func BenchmarkTransportForward(b *testing.B) {
	for _, keyed := range []bool{false, true} {
		b.Run("tls="+strconv.FormatBool(keyed), func(b *testing.B) {
			var tr *transport
			if keyed {
				var err error
				if tr, err = newTransport(testKey(1), zerolog.Nop()); err != nil {
					b.Fatal(err)
				}
			}
			addr := freeGossipAddr(b)
			m, err := newMuxTransport(addr, tr, func(c net.Conn) {
				defer c.Close()
				var req forwardRequest
				if json.NewDecoder(c).Decode(&req) == nil {
					_ = json.NewEncoder(c).Encode(forwardReply{Index: 1})
				}
			})
			if err != nil {
				b.Fatal(err)
			}
			defer m.close()
			b.ResetTimer()
			for range b.N {
				if _, err := callForward(tr, addr, forwardRequest{Data: []byte("x")}, time.Second); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
