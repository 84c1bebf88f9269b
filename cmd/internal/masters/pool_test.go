package masters

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"
	"github.com/shadow-project/shadow/bitmap/wire"
)

// testCluster runs a Store per master host and serves each dial with Serve
// over net.Pipe.
type testCluster struct {
	ctx    context.Context
	logs   *logBuffer
	stores map[string]*Store
	dials  atomic.Int32
	served sync.WaitGroup
}

func newCluster(t *testing.T, hosts ...string) *testCluster {
	ctx, cancel := context.WithCancel(context.Background())
	c := &testCluster{ctx: ctx, logs: &logBuffer{}, stores: make(map[string]*Store)}
	for _, h := range hosts {
		c.stores[h] = openStore(t, "DSA1")
	}
	t.Cleanup(func() {
		cancel()
		c.served.Wait()
	})
	return c
}

func (c *testCluster) dial(ctx context.Context, host string) (net.Conn, error) {
	c.dials.Add(1)
	st, ok := c.stores[host]
	if !ok {
		return nil, fmt.Errorf("no host %s", host)
	}
	cli, srv := net.Pipe()
	cli.SetDeadline(time.Now().Add(pipeDeadline))
	c.served.Go(func() { Serve(c.ctx, srv, host, 1, st, c.logs.logger()) })
	return cli, nil
}

func newTestPool(t *testing.T, dial Dialer) (*Pool, *logBuffer) {
	logs := &logBuffer{}
	p := NewPool("w1", 1, dial, logs.logger())
	t.Cleanup(p.Close)
	return p, logs
}

func TestPoolBitSetRollbackFetch(t *testing.T) {
	c := newCluster(t, "m1", "m2")
	p, _ := newTestPool(t, c.dial)
	ctx := t.Context()

	for _, m := range []string{"m1", "m2"} {
		if _, err := p.BitSet(ctx, m, "DSA1", "w1", []wire.Range{chunkSpan(3, 3)}); err != nil {
			t.Fatal(err)
		}
	}
	seq, err := p.BitSet(ctx, "m1", "DSA1", "w1", []wire.Range{chunkSpan(0, 5), chunkSpan(100, 101)})
	if err != nil {
		t.Fatal(err)
	}
	wantChunks(t, c.stores["m1"], "DSA1", "w1", append(span(0, 5), 100, 101))
	wantChunks(t, c.stores["m2"], "DSA1", "w1", []uint64{3})

	if err := p.Rollback(ctx, "m1", "DSA1", "w1", seq); err != nil {
		t.Fatal(err)
	}
	wantChunks(t, c.stores["m1"], "DSA1", "w1", []uint64{3})

	b, err := p.Fetch(ctx, "m1", "DSA1", "w1")
	if err != nil {
		t.Fatal(err)
	}
	if got := slices.Collect(b.Chunks()); !slices.Equal(got, []uint64{3}) {
		t.Fatalf("fetched %v, want [3]", got)
	}
	b.Add(77)
	wantChunks(t, c.stores["m1"], "DSA1", "w1", []uint64{3})

	if n := c.dials.Load(); n != 2 {
		t.Fatalf("%d dials for two masters, want 2", n)
	}
	s := p.Stats()
	if s.BitSets != 3 || s.Failures != 0 || s.BitSetLatencyCount != 3 || s.BitSetLatencyNanos == 0 {
		t.Fatalf("stats %+v", s)
	}
}

func TestPoolRefusalReachesTheWriter(t *testing.T) {
	c := newCluster(t, "m1")
	p, _ := newTestPool(t, c.dial)
	ctx := t.Context()

	seq, err := p.BitSet(ctx, "m1", "DSA9", "w1", []wire.Range{chunkSpan(1, 1)})
	if !errors.Is(err, ErrRefused) || !errors.Is(err, ErrNotOpen) || !strings.Contains(err.Error(), "DSA9") {
		t.Fatalf("bit-set on a set the master lacks: %v, want ErrRefused and ErrNotOpen naming DSA9", err)
	}
	if errors.Is(err, ErrStream) {
		t.Fatalf("a refusal reported as a transport failure: %v", err)
	}
	if seq == 0 {
		t.Fatal("refused bit-set returned no seq")
	}
	if err := p.Rollback(ctx, "m1", "DSA9", "w1", seq); !errors.Is(err, ErrRefused) {
		t.Fatalf("rollback on a set the master lacks: %v, want ErrRefused", err)
	}
	if _, err := p.Fetch(ctx, "m1", "DSA1", "nobody"); !errors.Is(err, ErrRefused) {
		t.Fatalf("fetch of an unknown writer: %v, want ErrRefused", err)
	}
	// Refusals leave the stream up.
	if _, err := p.BitSet(ctx, "m1", "DSA1", "w1", []wire.Range{chunkSpan(1, 1)}); err != nil {
		t.Fatal(err)
	}
	if n := c.dials.Load(); n != 1 {
		t.Fatalf("%d dials, want 1", n)
	}
	if s := p.Stats(); s.Failures != 3 {
		t.Fatalf("%d failures counted, want 3", s.Failures)
	}
}

func TestPoolRefusesBadRequestsLocally(t *testing.T) {
	c := newCluster(t, "m1")
	p, _ := newTestPool(t, c.dial)
	seq, err := p.BitSet(t.Context(), "m1", "DSA1", "w1", nil)
	if !errors.Is(err, wire.ErrMalformed) || seq != 0 {
		t.Fatalf("empty bit-set: seq %d, %v; want seq 0 and wire.ErrMalformed", seq, err)
	}
	if n := c.dials.Load(); n != 0 {
		t.Fatalf("a request that cannot be encoded dialed %d times", n)
	}
}

// TestPoolBatchesUnderLoad drives real loopback TCP with many writers at
// once: every bit-set must be acknowledged, and some must share a write.
func TestPoolBatchesUnderLoad(t *testing.T) {
	st := openStore(t, "DSA1")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var served sync.WaitGroup
	served.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			served.Go(func() { Serve(ctx, conn, "m1", 1, st, zerolog.Nop()) })
		}
	})
	t.Cleanup(func() {
		cancel()
		ln.Close()
		served.Wait()
	})
	var d net.Dialer
	p, _ := newTestPool(t, func(ctx context.Context, host string) (net.Conn, error) {
		return d.DialContext(ctx, "tcp", ln.Addr().String())
	})

	const writers, each = 64, 50
	var wg sync.WaitGroup
	for g := range uint64(writers) {
		wg.Go(func() {
			for i := range uint64(each) {
				c := g*1000 + i
				if _, err := p.BitSet(t.Context(), "m1", "DSA1", "w1", []wire.Range{chunkSpan(c, c)}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if got := st.Writers("DSA1")["w1"]; got != writers*each {
		t.Fatalf("master holds %d chunks, want %d", got, writers*each)
	}
	s := p.Stats()
	if s.BitSets != writers*each || s.Frames != writers*each || s.BitSetLatencyCount != writers*each || s.Failures != 0 {
		t.Fatalf("stats %+v", s)
	}
	if s.Frames <= s.Flushes {
		t.Fatalf("%d frames in %d flushes: no batching under load", s.Frames, s.Flushes)
	}
	t.Logf("%d frames in %d flushes, mean round trip %v", s.Frames, s.Flushes,
		time.Duration(s.BitSetLatencyNanos/s.BitSetLatencyCount))
}

// gatedConn holds the second write (the first flush after the Hello) until
// gate closes.
type gatedConn struct {
	net.Conn
	writes atomic.Int32
	gate   chan struct{}
}

func (g *gatedConn) Write(p []byte) (int, error) {
	if g.writes.Add(1) == 2 {
		<-g.gate
	}
	return g.Conn.Write(p)
}

// TestPoolBatchesQueuedRequests makes batching certain: while the first
// flush is held, every other bit-set queues, and they must all leave in one
// more flush.
func TestPoolBatchesQueuedRequests(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		st := openStore(t, "DSA1")
		gate := make(chan struct{})
		var served sync.WaitGroup
		p := NewPool("w1", 1, func(_ context.Context, host string) (net.Conn, error) {
			cli, srv := net.Pipe()
			served.Go(func() { Serve(ctx, srv, host, 1, st, zerolog.Nop()) })
			return &gatedConn{Conn: cli, gate: gate}, nil
		}, zerolog.Nop())
		openGate := sync.OnceFunc(func() { close(gate) })
		var wg sync.WaitGroup
		// Deferred, so that a failing check still leaves no goroutine
		// behind in the bubble.
		defer func() {
			openGate()
			p.Close()
			cancel()
			wg.Wait()
			served.Wait()
		}()

		const n = 50
		errs := make([]error, n)
		for i := range n {
			wg.Go(func() {
				c := uint64(i)
				_, errs[i] = p.BitSet(ctx, "m1", "DSA1", "w1", []wire.Range{chunkSpan(c, c)})
			})
		}
		synctest.Wait() // every caller is waiting for an ack; the sender, at the gate
		if s := p.Stats(); s.Flushes != 1 {
			t.Fatalf("%d flushes begun while the first is held, want 1", s.Flushes)
		}
		openGate()
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Errorf("bit-set %d: %v", i, err)
			}
		}
		s := p.Stats()
		if s.Frames != n || s.Flushes > 2 {
			t.Fatalf("%d frames in %d flushes, want %d in at most 2", s.Frames, s.Flushes, n)
		}
		if got := st.Writers("DSA1")["w1"]; got != n {
			t.Fatalf("master holds %d chunks, want %d", got, n)
		}
	})
}

// fakeMaster is the master end of a stream scripted by a test.
type fakeMaster struct {
	conn  net.Conn
	br    *bufio.Reader
	hello *wire.Frame // the pool's
}

// newFakeMaster returns the pool's end of a pipe whose other end introduces
// itself as name, and delivers that end once the Hellos are exchanged.
func newFakeMaster(t *testing.T, name string) (net.Conn, <-chan *fakeMaster) {
	cli, srv := net.Pipe()
	cli.SetDeadline(time.Now().Add(pipeDeadline))
	srv.SetDeadline(time.Now().Add(pipeDeadline))
	ready := make(chan *fakeMaster, 1)
	go func() {
		defer close(ready)
		if _, err := srv.Write(encode(t, &wire.Frame{Kind: wire.KindHello, Host: name, Inc: 5})); err != nil {
			t.Errorf("fake master %s: write hello: %v", name, err)
			return
		}
		br := bufio.NewReader(srv)
		h, err := wire.ReadFrame(br)
		if err != nil {
			t.Errorf("fake master %s: read hello: %v", name, err)
			return
		}
		ready <- &fakeMaster{conn: srv, br: br, hello: h}
	}()
	t.Cleanup(func() { srv.Close() })
	return cli, ready
}

func (f *fakeMaster) read(t *testing.T) *wire.Frame {
	t.Helper()
	fr, err := wire.ReadFrame(f.br)
	if err != nil {
		t.Errorf("fake master: read: %v", err)
		return &wire.Frame{}
	}
	return fr
}

func (f *fakeMaster) write(t *testing.T, b []byte) {
	t.Helper()
	if _, err := f.conn.Write(b); err != nil {
		t.Errorf("fake master: write: %v", err)
	}
}

// fakeThenReal dials a fake master first, with script running on it, and
// real ones afterwards.
func fakeThenReal(t *testing.T, c *testCluster, name string, script func(*fakeMaster)) (Dialer, <-chan struct{}) {
	var fakeDialed atomic.Bool
	scripted := make(chan struct{})
	return func(ctx context.Context, host string) (net.Conn, error) {
		if fakeDialed.Swap(true) {
			return c.dial(ctx, host)
		}
		conn, ready := newFakeMaster(t, name)
		go func() {
			defer close(scripted)
			if f, ok := <-ready; ok {
				script(f)
			}
		}()
		return conn, nil
	}, scripted
}

func TestPoolStreamBrokenMidWait(t *testing.T) {
	c := newCluster(t, "m1")
	const waiting = 3
	dial, scripted := fakeThenReal(t, c, "m1", func(f *fakeMaster) {
		for range waiting {
			if fr := f.read(t); fr.Kind != wire.KindBitSet {
				t.Errorf("fake master got %v, want a bit-set", fr.Kind)
			}
		}
		f.conn.Close() // with every bit-set sent and none answered
	})
	p, logs := newTestPool(t, dial)

	errs := make(chan error, waiting)
	for i := range uint64(waiting) {
		go func() {
			seq, err := p.BitSet(t.Context(), "m1", "DSA1", "w1", []wire.Range{chunkSpan(i, i)})
			if err != nil && seq == 0 {
				err = fmt.Errorf("no seq with %w", err)
			}
			errs <- err
		}()
	}
	for range waiting {
		if err := <-errs; !errors.Is(err, ErrStream) || strings.HasPrefix(err.Error(), "no seq") {
			t.Errorf("waiter on a broken stream: %v, want ErrStream and a seq", err)
		}
	}
	<-scripted

	if _, err := p.BitSet(t.Context(), "m1", "DSA1", "w1", []wire.Range{chunkSpan(9, 9)}); err != nil {
		t.Fatalf("bit-set after the break: %v", err)
	}
	wantChunks(t, c.stores["m1"], "DSA1", "w1", []uint64{9})
	if n := c.dials.Load(); n != 1 {
		t.Fatalf("%d dials to the real master, want 1 redial", n)
	}
	if s := p.Stats(); s.Failures != waiting {
		t.Fatalf("%d failures counted, want %d", s.Failures, waiting)
	}
	var broken, restarted []map[string]any
	for _, e := range logs.entries(t, zerolog.WarnLevel) {
		switch msg := e["message"].(string); {
		case strings.Contains(msg, "broken"):
			broken = append(broken, e)
		case strings.Contains(msg, "restarted"):
			restarted = append(restarted, e) // the fake said incarnation 5, the real master 1
		default:
			t.Errorf("unexpected log line %v", e)
		}
	}
	if len(broken) != 1 || broken[0]["peer"] != "m1" || broken[0]["waiting"] != float64(waiting) {
		t.Fatalf("log: %v, want one line for m1 with %d waiting", broken, waiting)
	}
	if len(restarted) != 1 || restarted[0]["previous_inc"] != float64(5) || restarted[0]["peer_inc"] != float64(1) {
		t.Fatalf("log: %v, want one line saying m1 went from incarnation 5 to 1", restarted)
	}
}

func TestPoolBadReplyBreaksStream(t *testing.T) {
	cases := []struct {
		name  string
		reply func(t *testing.T, req *wire.Frame) []byte
		want  string
	}{
		{"unknown seq", func(t *testing.T, req *wire.Frame) []byte {
			return encode(t, &wire.Frame{Kind: wire.KindAck, Seq: req.Seq + 1000})
		}, "not waiting"},
		{"wrong kind", func(t *testing.T, req *wire.Frame) []byte {
			return encode(t, &wire.Frame{Kind: wire.KindBitmap, Seq: req.Seq, Err: "x"})
		}, "waits for ack"},
		{"request kind", func(t *testing.T, req *wire.Frame) []byte {
			return encode(t, &wire.Frame{Kind: wire.KindFetch, Seq: req.Seq, Set: "DSA1", Writer: "w1"})
		}, "protocol"},
		{"malformed", func(t *testing.T, req *wire.Frame) []byte {
			return withPrefix([]byte{wire.Version, byte(wire.KindAck), 0x80, 0x00, 0})
		}, "malformed"},
		{"wrong version", func(t *testing.T, req *wire.Frame) []byte {
			b := encode(t, &wire.Frame{Kind: wire.KindAck, Seq: req.Seq})
			b[4] = wire.Version + 1
			return b
		}, "version"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, "m1")
			dial, scripted := fakeThenReal(t, c, "m1", func(f *fakeMaster) {
				req := f.read(t)
				f.write(t, tc.reply(t, req))
			})
			p, logs := newTestPool(t, dial)
			_, err := p.BitSet(t.Context(), "m1", "DSA1", "w1", []wire.Range{chunkSpan(1, 1)})
			if !errors.Is(err, ErrStream) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("bit-set answered badly: %v, want ErrStream mentioning %q", err, tc.want)
			}
			<-scripted
			if lines := logs.entries(t, zerolog.WarnLevel); len(lines) != 1 {
				t.Fatalf("log: %v, want one line", lines)
			}
			if _, err := p.BitSet(t.Context(), "m1", "DSA1", "w1", []wire.Range{chunkSpan(2, 2)}); err != nil {
				t.Fatalf("bit-set after redial: %v", err)
			}
			wantChunks(t, c.stores["m1"], "DSA1", "w1", []uint64{2})
		})
	}
}

func TestPoolRefusesImpostor(t *testing.T) {
	c := newCluster(t, "m1")
	dial, _ := fakeThenReal(t, c, "m2", func(*fakeMaster) {})
	p, _ := newTestPool(t, dial)
	_, err := p.BitSet(t.Context(), "m1", "DSA1", "w1", []wire.Range{chunkSpan(1, 1)})
	if !errors.Is(err, ErrStream) || !strings.Contains(err.Error(), "m2") {
		t.Fatalf("master answering as m2: %v, want ErrStream naming m2", err)
	}
	if _, err := p.BitSet(t.Context(), "m1", "DSA1", "w1", []wire.Range{chunkSpan(2, 2)}); err != nil {
		t.Fatalf("bit-set after redial: %v", err)
	}
}

func TestPoolDialFailure(t *testing.T) {
	p, _ := newTestPool(t, func(context.Context, string) (net.Conn, error) {
		return nil, errors.New("connection refused")
	})
	_, err := p.BitSet(t.Context(), "m1", "DSA1", "w1", []wire.Range{chunkSpan(1, 1)})
	if !errors.Is(err, ErrStream) || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("dial failure: %v, want ErrStream with the cause", err)
	}
	if s := p.Stats(); s.Failures != 1 {
		t.Fatalf("%d failures counted, want 1", s.Failures)
	}
}

// TestPoolLateReplyAfterCancel: a caller that gives up leaves its reply
// expected, so the late Ack neither breaks the stream nor reaches anyone
// else; a rollback of that bit-set, on the same seq, gets its own Ack.
func TestPoolLateReplyAfterCancel(t *testing.T) {
	c := newCluster(t, "m1")
	received := make(chan *wire.Frame)
	proceed := make(chan struct{})
	dial, scripted := fakeThenReal(t, c, "m1", func(f *fakeMaster) {
		bitSet := f.read(t)
		received <- bitSet
		<-proceed
		rollback := f.read(t)
		if rollback.Kind != wire.KindRollback || rollback.Seq != bitSet.Seq {
			t.Errorf("fake master got %+v, want a rollback of seq %d", rollback, bitSet.Seq)
		}
		f.write(t, encode(t, &wire.Frame{Kind: wire.KindAck, Seq: bitSet.Seq}))   // the late bit-set ack
		f.write(t, encode(t, &wire.Frame{Kind: wire.KindAck, Seq: rollback.Seq})) // the rollback's
		next := f.read(t)
		f.write(t, encode(t, &wire.Frame{Kind: wire.KindAck, Seq: next.Seq, Err: "masters: set not open: DSA1"}))
	})
	p, logs := newTestPool(t, dial)

	ctx, cancel := context.WithCancel(t.Context())
	type res struct {
		seq uint64
		err error
	}
	done := make(chan res, 1)
	go func() {
		seq, err := p.BitSet(ctx, "m1", "DSA1", "w1", []wire.Range{chunkSpan(1, 1)})
		done <- res{seq, err}
	}()
	sent := <-received
	cancel()
	r := <-done
	if !errors.Is(r.err, context.Canceled) || r.seq != sent.Seq {
		t.Fatalf("canceled bit-set: seq %d, %v; want seq %d and context.Canceled", r.seq, r.err, sent.Seq)
	}
	close(proceed)
	if err := p.Rollback(t.Context(), "m1", "DSA1", "w1", r.seq); err != nil {
		t.Fatalf("rollback: %v", err)
	}
	if _, err := p.BitSet(t.Context(), "m1", "DSA1", "w1", []wire.Range{chunkSpan(2, 2)}); !errors.Is(err, ErrRefused) {
		t.Fatalf("bit-set on the same stream: %v, want the fake's refusal", err)
	}
	<-scripted
	if c.dials.Load() != 0 {
		t.Fatal("the stream was redialed")
	}
	if lines := logs.entries(t, zerolog.WarnLevel); len(lines) != 0 {
		t.Fatalf("log: %v, want nothing", lines)
	}
}

func TestPoolClose(t *testing.T) {
	c := newCluster(t, "m1")
	received := make(chan struct{})
	dial, _ := fakeThenReal(t, c, "m1", func(f *fakeMaster) {
		f.read(t)
		close(received)
	})
	p, _ := newTestPool(t, dial)
	errs := make(chan error, 1)
	go func() {
		_, err := p.BitSet(t.Context(), "m1", "DSA1", "w1", []wire.Range{chunkSpan(1, 1)})
		errs <- err
	}()
	<-received
	p.Close()
	if err := <-errs; !errors.Is(err, ErrStream) {
		t.Fatalf("waiter at Close: %v, want ErrStream", err)
	}
	if _, err := p.BitSet(t.Context(), "m1", "DSA1", "w1", []wire.Range{chunkSpan(1, 1)}); !errors.Is(err, ErrStream) {
		t.Fatalf("bit-set after Close: %v, want ErrStream", err)
	}
	if c.dials.Load() != 0 {
		t.Fatal("dialed after Close")
	}
}
