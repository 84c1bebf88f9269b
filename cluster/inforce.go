package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"
)

// A change committed at log index k is in force on a host once that host
// has applied k: raft commits on a majority, so a lagging host may still
// act on the old state. Whatever depends on a change (the acknowledgement
// of a write that expelled a member, a copy that needs every host's writes
// to reach its target) waits until every host that mounts the set has
// applied it or has been declared failed. Hosts answer directly over the
// cluster port: asking is a read of their progress, not a decision, so it
// need not be ordered by the log.

type appliedRequest struct {
	Index uint64 `json:"index"`
}

type appliedReply struct {
	Applied uint64 `json:"applied"`
	Err     string `json:"err,omitempty"`
}

// serveApplied answers once this host has applied the asked index (or
// after a few seconds, with where it is).
func (n *Node) serveApplied(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	var req appliedRequest
	if err := json.NewDecoder(bufio.NewReader(c)).Decode(&req); err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rep := appliedReply{}
	if err := n.WaitApplied(ctx, req.Index); err != nil {
		rep.Err = err.Error()
	} else if settle := n.settle.Load(); settle != nil {
		// Applied is not enough while the state machine's host still
		// owes work for what it applied (member I/O waiting for a lease).
		if err := (*settle)(ctx); err != nil {
			rep.Err = err.Error()
		}
	}
	rep.Applied = n.AppliedIndex()
	_ = json.NewEncoder(c).Encode(rep)
}

// SetSettle makes this host's answer to "have you applied index k?" wait,
// once k is applied, for f: the work the host owes for what it applied.
func (n *Node) SetSettle(f func(ctx context.Context) error) { n.settle.Store(&f) }

// AppliedIndex is the last log index this host's state machine applied.
func (n *Node) AppliedIndex() uint64 {
	// The state machine's own count: raft's AppliedIndex moves before
	// the state machine has applied the entry.
	n.applied.Lock()
	defer n.applied.Unlock()
	return n.applied.index
}

// askApplied asks one host to confirm it has applied index.
func (n *Node) askApplied(addr string, index uint64) error {
	c, err := n.dial(addr, streamApplied, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(8 * time.Second))
	if err := json.NewEncoder(c).Encode(appliedRequest{Index: index}); err != nil {
		return err
	}
	var rep appliedReply
	if err := json.NewDecoder(bufio.NewReader(c)).Decode(&rep); err != nil {
		return err
	}
	if rep.Applied < index {
		return fmt.Errorf("applied %d of %d: %s", rep.Applied, index, rep.Err)
	}
	return nil
}

// ErrNotInForce: some host that mounts the set neither confirmed it
// applied the change nor was declared failed before the deadline.
var ErrNotInForce = errors.New("cluster: change not in force on every host")

// InForce waits until every other host that mounts set has applied
// everything this host has applied so far, or has been declared failed
// (it then no longer mounts the set).
func (l *Log) InForce(ctx context.Context, set string) error {
	if l.node == nil {
		return ErrClosed
	}
	index := l.node.AppliedIndex()
	for {
		var pending []string
		l.mu.Lock()
		if sv, ok := l.core.Set(set); ok {
			for _, h := range sv.Mounted {
				if h != l.host {
					pending = append(pending, h)
				}
			}
		}
		ch := l.changed
		l.mu.Unlock()
		alive := l.node.Alive()
		var failed []string
		for _, h := range pending {
			i := slices.IndexFunc(alive, func(p Peer) bool { return p.Host == h })
			if i < 0 {
				failed = append(failed, h)
				continue
			}
			if err := l.node.askApplied(alive[i].Raft, index); err != nil {
				failed = append(failed, fmt.Sprintf("%s (%v)", h, err))
			}
		}
		if len(failed) == 0 {
			return nil
		}
		// Someone did not answer: it answers later, or the cluster
		// declares it failed and it leaves the set's mounts.
		t := time.NewTimer(200 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w: %s at index %d: waiting for %v", ErrNotInForce, set, index, failed)
		case <-ch:
		case <-t.C:
		}
		t.Stop()
	}
}

// Window acknowledgements go straight to the engine's host over the
// cluster port rather than through the log: one per host per window, and
// each log entry costs an fsync on every voter, which on a disk shared
// with the members took most of the writers' IOPS during a merge (make
// bench). Nothing else needs them: the engine's host is the only one that
// waits for them, and a lost one is sent again.

type ackRequest struct {
	Set  string `json:"set"`
	Seq  uint64 `json:"seq"`
	Host string `json:"host"`
	Busy bool   `json:"busy,omitempty"`
}

type ackReply struct {
	OK  bool   `json:"ok"`
	Err string `json:"err,omitempty"`
}

// AckReceiver is the node's state machine's side of window acks.
type ackReceiver interface {
	receiveAck(set string, seq uint64, host string, busy bool) error
}

func (n *Node) serveAck(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	var req ackRequest
	if err := json.NewDecoder(bufio.NewReader(c)).Decode(&req); err != nil {
		return
	}
	rep := ackReply{OK: true}
	if r, ok := n.cfg.FSM.(ackReceiver); !ok {
		rep = ackReply{Err: "no window here"}
	} else if err := r.receiveAck(req.Set, req.Seq, req.Host, req.Busy); err != nil {
		rep = ackReply{Err: err.Error()}
	}
	_ = json.NewEncoder(c).Encode(rep)
}

// sendAck delivers an ack to host's cluster port.
func (n *Node) sendAck(host string, req ackRequest) error {
	var addr string
	for _, p := range n.Alive() {
		if p.Host == host {
			addr = p.Raft
		}
	}
	if addr == "" {
		return fmt.Errorf("cluster: %s is not alive", host)
	}
	c, err := n.dial(addr, streamAck, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return err
	}
	var rep ackReply
	if err := json.NewDecoder(bufio.NewReader(c)).Decode(&rep); err != nil {
		return err
	}
	if !rep.OK {
		return errors.New(rep.Err)
	}
	return nil
}
