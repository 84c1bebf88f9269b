package cluster

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// One TCP port carries both raft's RPCs and the forwarding of proposals to
// the leader: the first byte of each connection says which. A port per
// protocol would double what tests and firewalls must allocate for no gain.
const (
	streamRaft    byte = 'R'
	streamForward byte = 'F'
	// streamApplied asks a host to answer once it has applied an index.
	streamApplied byte = 'W'
	// streamAck carries a window's acknowledgement to the engine's host.
	streamAck byte = 'K'
	// streamBitmaps is a persistent stream of bit-set requests from a
	// writer to a master (NodeConfig.Bitmaps serves it).
	streamBitmaps byte = 'B'
)

// mux accepts connections on the cluster's TCP port and sorts them by
// their first byte.
type mux struct {
	ln net.Listener
	// tr authenticates every connection (nil: plaintext).
	tr      *transport
	raftCh  chan net.Conn
	forward func(net.Conn)
	// applied serves streamApplied, ack streamAck (nil closes such
	// connections).
	applied func(net.Conn)
	ack     func(net.Conn)
	bitmaps func(net.Conn)
	closed  chan struct{}
	once    sync.Once
}

func newMux(addr string, forward func(net.Conn), applied ...func(net.Conn)) (*mux, error) {
	return newMuxTransport(addr, nil, forward, applied...)
}

// newMuxTransport is newMux whose connections are authenticated by tr
// (nil: plaintext).
func newMuxTransport(addr string, tr *transport, forward func(net.Conn), applied ...func(net.Conn)) (*mux, error) {
	if err := CheckLoopback(addr); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("cluster: listen %s: %w", addr, err)
	}
	m := &mux{ln: ln, tr: tr, raftCh: make(chan net.Conn, 16), forward: forward, closed: make(chan struct{})}
	if len(applied) > 0 {
		m.applied = applied[0]
	}
	if len(applied) > 1 {
		m.ack = applied[1]
	}
	if len(applied) > 2 {
		m.bitmaps = applied[2]
	}
	go m.accept()
	return m, nil
}

func (m *mux) accept() {
	for {
		c, err := m.ln.Accept()
		if err != nil {
			return
		}
		go func() {
			// The handshake (with a key) and the kind byte within 5 s: a
			// silent peer cannot hold this goroutine.
			c, kind, err := m.tr.accept(c)
			if err != nil {
				return
			}
			switch kind {
			case streamRaft:
				select {
				case m.raftCh <- c:
				case <-m.closed:
					c.Close()
				}
			case streamForward:
				m.forward(c)
			case streamApplied:
				if m.applied == nil {
					c.Close()
					return
				}
				m.applied(c)
			case streamAck:
				if m.ack == nil {
					c.Close()
					return
				}
				m.ack(c)
			case streamBitmaps:
				if m.bitmaps == nil {
					c.Close()
					return
				}
				m.bitmaps(c)
			default:
				c.Close()
			}
		}()
	}
}

func (m *mux) close() {
	m.once.Do(func() {
		close(m.closed)
		m.ln.Close()
	})
}

// raftLayer is the mux's raft side: raft.StreamLayer.
type raftLayer struct{ m *mux }

func (l raftLayer) Accept() (net.Conn, error) {
	select {
	case c := <-l.m.raftCh:
		return c, nil
	case <-l.m.closed:
		return nil, errors.New("cluster: transport closed")
	}
}

func (l raftLayer) Close() error   { l.m.close(); return nil }
func (l raftLayer) Addr() net.Addr { return l.m.ln.Addr() }

// Dial returns the connection raft's transport pools: with a key, the TLS
// connection, its 'R' already written inside it.
func (l raftLayer) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	return l.m.tr.dial(string(addr), streamRaft, timeout)
}

// dialStream opens a plaintext stream (a cluster without a key); a Node
// dials through Node.dial, which uses its key.
func dialStream(addr string, kind byte, timeout time.Duration) (net.Conn, error) {
	return (*transport)(nil).dial(addr, kind, timeout)
}

// forwardRequest is a proposal a host sends to the leader (or to a peer
// that passes it on: a host not yet in the raft configuration does not
// know the leader).
type forwardRequest struct {
	Data []byte `json:"data"`
	Hops int    `json:"hops"`
	// Remove, instead of Data: take this host out of the raft
	// configuration (it is leaving gracefully).
	Remove string `json:"remove,omitempty"`
}

// forwardReply is the leader's answer: the entry's index and the FSM's
// verdict (empty: accepted).
type forwardReply struct {
	Index uint64 `json:"index"`
	Err   string `json:"err,omitempty"`
	// Refused: the FSM refused the entry (Err is its verdict); otherwise
	// Err is a failure to commit.
	Refused bool `json:"refused,omitempty"`
}

func callForward(tr *transport, addr string, req forwardRequest, timeout time.Duration) (forwardReply, error) {
	c, err := tr.dial(addr, streamForward, timeout)
	if err != nil {
		return forwardReply{}, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return forwardReply{}, err
	}
	var rep forwardReply
	if err := json.NewDecoder(bufio.NewReader(c)).Decode(&rep); err != nil {
		return forwardReply{}, fmt.Errorf("cluster: forward to %s: %w", addr, err)
	}
	return rep, nil
}

// CheckLoopback refuses any address outside 127.0.0.0/8 and ::1: this
// project's hosts are processes on one machine, and nothing here may
// reach another one.
func CheckLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("cluster: address %q: %w", addr, err)
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("cluster: address %q is not loopback (127.0.0.0/8 or ::1)", addr)
	}
	return nil
}
