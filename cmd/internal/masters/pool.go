package masters

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/bitmap/wire"
)

// Errors returned by the Pool, wrapped with the detail. Callers test them
// with errors.Is.
var (
	// ErrStream reports a transport failure: the dial, the handshake or the
	// stream failed, or the pool is closed. Whether the master applied a
	// request that was sent is unknown.
	ErrStream = errors.New("masters: stream to master failed")
	// ErrRefused reports that the master answered and did not apply the
	// request; the error carries the master's text.
	ErrRefused = errors.New("masters: master refused")
)

// Dialer returns an authenticated connection to host's master service.
type Dialer func(ctx context.Context, host string) (net.Conn, error)

// PoolStats counts what a Pool did since it was made.
type PoolStats struct {
	// BitSets is the number of bit-set requests queued on a stream.
	BitSets uint64
	// Frames and Flushes count request frames written and the flushes that
	// carried them (handshakes excluded): Frames/Flushes above 1 means
	// requests shared writes.
	Frames  uint64
	Flushes uint64
	// Failures counts requests that ended in ErrStream or ErrRefused, or
	// fetched a bitmap that did not decode.
	Failures uint64
	// BitSetLatencyNanos sums the round trips, queued to answered, of the
	// BitSetLatencyCount bit-sets that got an answer.
	BitSetLatencyNanos uint64
	BitSetLatencyCount uint64
}

// Pool is the writer side of cross-host HBMM: it keeps one persistent
// stream per master host, dialed on first use and redialed on the first use
// after it breaks. Each stream has one sender, which writes every queued
// request before a single flush, so concurrent writers share network writes,
// and one reader, which hands each reply to the call waiting for its seq.
// It is safe for concurrent use.
type Pool struct {
	self string
	inc  uint64
	dial Dialer
	log  zerolog.Logger

	// seq numbers requests across all streams, so a seq names one request
	// of this pool's life whichever master it went to.
	seq atomic.Uint64

	mu     sync.Mutex
	closed bool
	peers  map[string]*peer

	bitSets, frames, flushes, failures atomic.Uint64
	latencyNanos, latencyCount         atomic.Uint64
}

type peer struct {
	// dialing admits one dial at a time, so that a burst of calls to a
	// master that is down costs one dial, not one per call. A channel and
	// not a mutex, so that waiting for it honours the caller's context.
	dialing chan struct{}
	cur     *stream // guarded by Pool.mu; nil or broken means redial
	// lastInc is the master's incarnation at the last handshake, guarded
	// by dialing.
	lastInc uint64
}

// NewPool returns a pool that introduces itself to masters as host self,
// incarnation inc, and reaches them through dial.
func NewPool(self string, inc uint64, dial Dialer, log zerolog.Logger) *Pool {
	return &Pool{
		self:  self,
		inc:   inc,
		dial:  dial,
		log:   log.With().Str("component", "masters").Logger(),
		peers: make(map[string]*peer),
	}
}

// BitSet asks host to set rs in writer's bitmap of set, and waits for its
// answer. It returns the request's seq whenever the request may have reached
// the master, errors included, so that the caller can roll it back; seq is 0
// if nothing was sent. The error wraps ErrStream, ErrRefused, or the
// context's error.
func (p *Pool) BitSet(ctx context.Context, host, set, writer string, rs []wire.Range) (seq uint64, err error) {
	start := time.Now()
	seq, reply, err := p.call(ctx, host, &wire.Frame{Kind: wire.KindBitSet, Set: set, Writer: writer, Ranges: rs}, wire.KindAck)
	if reply != nil {
		p.latencyNanos.Add(uint64(time.Since(start)))
		p.latencyCount.Add(1)
	}
	if err != nil {
		return seq, fmt.Errorf("masters: bit-set %d of %s in %s on %s: %w", seq, writer, set, host, err)
	}
	return seq, nil
}

// Rollback asks host to clear the chunks that bit-set seq newly set, and
// waits for its answer.
func (p *Pool) Rollback(ctx context.Context, host, set, writer string, seq uint64) error {
	_, _, err := p.call(ctx, host, &wire.Frame{Kind: wire.KindRollback, Seq: seq, Set: set, Writer: writer}, wire.KindAck)
	if err != nil {
		return fmt.Errorf("masters: roll back bit-set %d of %s in %s on %s: %w", seq, writer, set, host, err)
	}
	return nil
}

// Reset asks host to clear writer's bitmap of set (wire.KindReset), and
// waits for its answer. The caller must have drained its writes, flushed
// every member and emptied its cache of known-set chunks before calling:
// the reset's number, taken here, must be above every bit-set whose chunks
// the flush covered and below every later one. An error leaves the
// bitmap as it was or cleared; both are safe, and a reset is never sent
// again (a late copy is refused by the master: ErrStaleReset).
func (p *Pool) Reset(ctx context.Context, host, set, writer string) error {
	seq, _, err := p.call(ctx, host, &wire.Frame{Kind: wire.KindReset, Set: set, Writer: writer}, wire.KindAck)
	if err != nil {
		return fmt.Errorf("masters: reset %d of %s in %s on %s: %w", seq, writer, set, host, err)
	}
	return nil
}

// Fetch returns a copy of host's bitmap of writer in set.
func (p *Pool) Fetch(ctx context.Context, host, set, writer string) (*bitmap.Bitmap, error) {
	_, reply, err := p.call(ctx, host, &wire.Frame{Kind: wire.KindFetch, Set: set, Writer: writer}, wire.KindBitmap)
	if err != nil {
		return nil, fmt.Errorf("masters: fetch bitmap of %s in %s from %s: %w", writer, set, host, err)
	}
	b, err := bitmap.Decode(reply.Bitmap)
	if err != nil {
		p.failures.Add(1)
		return nil, fmt.Errorf("masters: fetch bitmap of %s in %s from %s: %w", writer, set, host, err)
	}
	return b, nil
}

// Stats returns the pool's counters.
func (p *Pool) Stats() PoolStats {
	return PoolStats{
		BitSets:            p.bitSets.Load(),
		Frames:             p.frames.Load(),
		Flushes:            p.flushes.Load(),
		Failures:           p.failures.Load(),
		BitSetLatencyNanos: p.latencyNanos.Load(),
		BitSetLatencyCount: p.latencyCount.Load(),
	}
}

// Close breaks every stream, failing their waiting calls with ErrStream,
// and makes later calls fail the same way.
func (p *Pool) Close() {
	p.mu.Lock()
	p.closed = true
	var open []*stream
	for _, pe := range p.peers {
		if pe.cur != nil {
			open = append(open, pe.cur)
		}
	}
	p.mu.Unlock()
	for _, s := range open {
		s.fail(errPoolClosed, false)
	}
}

var errPoolClosed = fmt.Errorf("%w: pool closed", ErrStream)

// call sends f and waits for the reply of kind want, which carries the
// seq f carries. reply is non-nil only when the master answered.
func (p *Pool) call(ctx context.Context, host string, f *wire.Frame, want wire.Kind) (seq uint64, reply *wire.Frame, err error) {
	if f.Kind == wire.KindRollback {
		// A rollback is numbered by the bit-set it undoes, and the
		// master's Ack echoes that number.
		seq = f.Seq
	} else {
		seq = p.seq.Add(1)
		f.Seq = seq
	}
	enc, err := wire.AppendFrame(nil, f)
	if err != nil {
		return 0, nil, err
	}
	s, err := p.stream(ctx, host)
	if err != nil {
		if errors.Is(err, ErrStream) {
			p.failures.Add(1)
		}
		return 0, nil, err
	}
	w := &waiter{want: want, ch: make(chan result, 1)}
	if err := s.enqueue(seq, enc, w); err != nil {
		p.failures.Add(1)
		return 0, nil, err
	}
	if f.Kind == wire.KindBitSet {
		p.bitSets.Add(1)
	}
	select {
	case r := <-w.ch:
		if r.err != nil {
			p.failures.Add(1)
			return seq, nil, r.err
		}
		if r.f.Err != "" {
			p.failures.Add(1)
			// (Frames carry text: the master's sentinels, recognised.)
			for _, known := range []error{ErrNotOpen, ErrNoWriter} {
				if strings.Contains(r.f.Err, known.Error()) {
					return seq, r.f, fmt.Errorf("%w (%w): %s", ErrRefused, known, r.f.Err)
				}
			}
			return seq, r.f, fmt.Errorf("%w: %s", ErrRefused, r.f.Err)
		}
		return seq, r.f, nil
	case <-ctx.Done():
		// The waiter stays registered: the reply, if it comes, lands in its
		// buffer instead of looking like a reply to nothing.
		return seq, nil, context.Cause(ctx)
	}
}

// stream returns host's open stream, dialing one if there is none or the
// last one broke.
func (p *Pool) stream(ctx context.Context, host string) (*stream, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, errPoolClosed
	}
	pe, ok := p.peers[host]
	if !ok {
		pe = &peer{dialing: make(chan struct{}, 1)}
		p.peers[host] = pe
	}
	s := pe.cur
	p.mu.Unlock()
	if s != nil && !s.broken() {
		return s, nil
	}

	select {
	case pe.dialing <- struct{}{}:
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
	defer func() { <-pe.dialing }()
	p.mu.Lock()
	s = pe.cur
	p.mu.Unlock()
	if s != nil && !s.broken() {
		return s, nil // dialed by whoever held the slot before us
	}

	conn, br, hello, err := p.connect(ctx, host)
	if err != nil {
		return nil, err
	}
	if pe.lastInc != 0 && pe.lastInc != hello.Inc {
		// A master that restarted lost its in-memory bitmaps; say so where
		// an operator will look.
		p.log.Warn().Str("peer", host).Uint64("peer_inc", hello.Inc).Uint64("previous_inc", pe.lastInc).
			Msg("master restarted since the last stream")
	}
	pe.lastInc = hello.Inc
	s = &stream{
		pool:    p,
		host:    host,
		conn:    conn,
		kick:    make(chan struct{}, 1),
		waiters: make(map[uint64][]*waiter),
		done:    make(chan struct{}),
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		conn.Close()
		return nil, errPoolClosed
	}
	pe.cur = s
	p.mu.Unlock()
	p.log.Debug().Str("peer", host).Uint64("peer_inc", hello.Inc).Msg("master stream open")
	go s.send()
	go s.receive(br)
	return s, nil
}

// connect dials host and exchanges Hello frames. The two Hellos travel
// concurrently, since a connection without buffering (net.Pipe) would
// deadlock two peers that both write first.
func (p *Pool) connect(ctx context.Context, host string) (net.Conn, *bufio.Reader, *wire.Frame, error) {
	hello, err := wire.AppendFrame(nil, &wire.Frame{Kind: wire.KindHello, Host: p.self, Inc: p.inc})
	if err != nil {
		return nil, nil, nil, fmt.Errorf("masters: introduce %q: %w", p.self, err)
	}
	conn, err := p.dial(ctx, host)
	if err != nil {
		if ctx.Err() != nil {
			return nil, nil, nil, context.Cause(ctx)
		}
		p.log.Warn().Str("peer", host).Err(err).Msg("cannot dial master")
		return nil, nil, nil, fmt.Errorf("%w: dial %s: %w", ErrStream, host, err)
	}
	fail := func(err error) (net.Conn, *bufio.Reader, *wire.Frame, error) {
		conn.Close()
		if ctx.Err() != nil {
			return nil, nil, nil, context.Cause(ctx)
		}
		p.log.Warn().Str("peer", host).Err(err).Msg("handshake with master failed; stream closed")
		return nil, nil, nil, fmt.Errorf("%w: handshake with %s: %w", ErrStream, host, err)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })

	sent := make(chan error, 1)
	go func() {
		_, err := conn.Write(hello)
		sent <- err
	}()
	br := bufio.NewReader(conn)
	theirs, rerr := wire.ReadFrame(br)
	if rerr != nil {
		conn.Close() // unblocks the write
	}
	werr := <-sent
	if !stop() {
		return fail(context.Cause(ctx))
	}
	switch {
	case rerr != nil:
		return fail(rerr)
	case werr != nil:
		return fail(werr)
	case theirs.Kind != wire.KindHello:
		return fail(fmt.Errorf("%w: first frame is %v, want hello", errProtocol, theirs.Kind))
	case theirs.Host != host:
		return fail(fmt.Errorf("%w: dialed %s, peer says it is %s", errProtocol, host, theirs.Host))
	}
	return conn, br, theirs, nil
}

type waiter struct {
	want wire.Kind
	ch   chan result // buffered: the reader never waits for a caller
}

type result struct {
	f   *wire.Frame
	err error
}

// stream is one open connection to a master.
type stream struct {
	pool *Pool
	host string
	conn net.Conn
	kick chan struct{} // buffered 1: wakes the sender

	mu    sync.Mutex
	queue [][]byte // encoded frames not yet handed to the sender
	// waiters holds, by seq, the calls waiting for a reply, in the order
	// their frames were queued, which is the order the master answers in.
	// Usually one per seq; a bit-set whose caller gave up and its rollback
	// share one. Nil once broken.
	waiters map[uint64][]*waiter
	err     error         // why the stream broke
	done    chan struct{} // closed when it breaks
}

func (s *stream) broken() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// enqueue registers w for seq's reply and queues the frame. The waiter is
// registered first, so that a reply cannot arrive before anyone waits.
func (s *stream) enqueue(seq uint64, enc []byte, w *waiter) error {
	s.mu.Lock()
	if s.err != nil {
		err := s.err
		s.mu.Unlock()
		return err
	}
	s.waiters[seq] = append(s.waiters[seq], w)
	s.queue = append(s.queue, enc)
	s.mu.Unlock()
	select {
	case s.kick <- struct{}{}:
	default: // the sender is already due to look
	}
	return nil
}

// send writes whatever is queued, then flushes once: requests queued while
// a flush is on the wire go out together in the next.
func (s *stream) send() {
	bw := bufio.NewWriterSize(s.conn, 64<<10)
	var batch [][]byte
	for {
		select {
		case <-s.kick:
		case <-s.done:
			return
		}
		s.mu.Lock()
		batch, s.queue = s.queue, batch[:0]
		s.mu.Unlock()
		if len(batch) == 0 {
			continue
		}
		// Counted before the flush, so that a caller woken by the reply
		// already sees its frame counted.
		s.pool.frames.Add(uint64(len(batch)))
		s.pool.flushes.Add(1)
		for _, enc := range batch {
			bw.Write(enc) // an error sticks in bw and is returned by Flush
		}
		err := bw.Flush()
		clear(batch)
		if err != nil {
			s.fail(fmt.Errorf("%w: write to %s: %v", ErrStream, s.host, err), true)
			return
		}
	}
}

// receive hands each reply to its waiter. A reply nobody asked for means
// the two ends disagree about the stream, so nothing more on it can be
// trusted.
func (s *stream) receive(br *bufio.Reader) {
	for {
		f, err := wire.ReadFrame(br)
		if err != nil {
			s.fail(fmt.Errorf("%w: read from %s: %w", ErrStream, s.host, err), true)
			return
		}
		s.mu.Lock()
		var w *waiter
		ws := s.waiters[f.Seq]
		if len(ws) > 0 {
			w = ws[0]
			if w.want == f.Kind {
				if len(ws) == 1 {
					delete(s.waiters, f.Seq)
				} else {
					s.waiters[f.Seq] = ws[1:]
				}
			}
		}
		s.mu.Unlock()
		switch {
		case w == nil:
			s.fail(fmt.Errorf("%w: %w: %v for seq %d, which is not waiting", ErrStream, errProtocol, f.Kind, f.Seq), true)
			return
		case w.want != f.Kind:
			s.fail(fmt.Errorf("%w: %w: %v for seq %d, which waits for %v", ErrStream, errProtocol, f.Kind, f.Seq, w.want), true)
			return
		}
		w.ch <- result{f: f}
	}
}

// fail breaks the stream once: every waiter gets err at once, and the
// pool forgets the stream so that the next call redials.
func (s *stream) fail(err error, logIt bool) {
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return
	}
	s.err = err
	waiters := s.waiters
	s.waiters = nil
	s.queue = nil
	close(s.done)
	s.mu.Unlock()

	s.conn.Close()
	p := s.pool
	p.mu.Lock()
	if pe := p.peers[s.host]; pe != nil && pe.cur == s {
		pe.cur = nil
	}
	p.mu.Unlock()
	n := 0
	for _, ws := range waiters {
		n += len(ws)
	}
	// Logged before the waiters hear of it, so that the line comes before
	// whatever they log in turn.
	if logIt {
		p.log.Warn().Str("peer", s.host).Int("waiting", n).Err(err).Msg("master stream broken; waiting requests failed")
	}
	for _, ws := range waiters {
		for _, w := range ws {
			w.ch <- result{err: err}
		}
	}
}
