package masters

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"unicode/utf8"

	"github.com/rs/zerolog"
	"github.com/shadow-project/shadow/bitmap/wire"
)

// errProtocol reports a well-formed frame that has no business on the
// stream at that point: a second Hello, a reply sent to a master, a reply
// to a request never made.
var errProtocol = errors.New("masters: protocol violation")

// errShutdown is the cause of a stream closed because its context ended.
var errShutdown = errors.New("masters: stream closed by shutdown")

// replyQueue bounds the replies waiting for the connection; a peer that
// stops reading stalls its own requests, not the master.
const replyQueue = 256

// Serve runs the master side of one stream until the peer hangs up, ctx
// ends, or the peer sends something it should not. It exchanges Hello
// frames, then answers each BitSet and Rollback with an Ack and each Fetch
// with a Bitmap, in the order they arrived. A frame that does not decode,
// or of a kind a master does not serve, closes the stream and is not
// applied: guessing at what a confused peer meant could set or clear the
// wrong chunks. Every end of the stream is logged once, with its cause.
func Serve(ctx context.Context, c net.Conn, self string, inc uint64, st *Store, log zerolog.Logger) {
	log = log.With().Str("component", "masters").Str("remote", remoteAddr(c)).Logger()
	sc := &serveConn{conn: c, failed: make(chan struct{})}
	stop := context.AfterFunc(ctx, func() { sc.fail(fmt.Errorf("%w: %w", errShutdown, context.Cause(ctx))) })
	defer stop()

	replies := make(chan *wire.Frame, replyQueue)
	written := make(chan struct{})
	go func() {
		defer close(written)
		sc.writeReplies(replies)
	}()

	replies <- &wire.Frame{Kind: wire.KindHello, Host: self, Inc: inc}
	br := bufio.NewReader(c)
	peer := "?"
	var peerInc uint64
	hello, err := wire.ReadFrame(br)
	switch {
	case err != nil:
		sc.end(fmt.Errorf("masters: read hello: %w", err))
	case hello.Kind != wire.KindHello:
		sc.end(fmt.Errorf("%w: first frame is %v, want hello", errProtocol, hello.Kind))
	default:
		peer, peerInc = hello.Host, hello.Inc
		log.Debug().Str("peer", peer).Uint64("peer_inc", peerInc).Msg("writer stream open")
		sc.serve(br, st, replies, peer, peerInc, self)
	}

	// Unless writing failed, replies to the frames already applied still go
	// out before the close, so the writer learns of every bit-set this
	// master recorded.
	close(replies)
	<-written
	sc.fail(io.EOF)
	cause := sc.firstCause()
	ev := log.Warn()
	msg := "writer stream failed; closed"
	switch {
	case errors.Is(cause, io.EOF):
		ev, msg = log.Debug(), "writer stream closed by the peer"
	case errors.Is(cause, errShutdown):
		ev, msg = log.Debug(), "writer stream closed: shutting down"
	case errors.Is(cause, wire.ErrMalformed), errors.Is(cause, wire.ErrVersion), errors.Is(cause, errProtocol):
		ev, msg = log.Error(), "bad frame from the peer; stream closed, frame not applied"
	}
	ev.Str("peer", peer).Uint64("peer_inc", peerInc).Err(cause).Msg(msg)
}

// serveConn is one master-side stream. Whatever ends it records its cause
// through end or fail, and the first cause, not the "use of closed
// connection" it provokes in the other goroutine, is the one logged.
type serveConn struct {
	conn net.Conn

	mu    sync.Mutex
	cause error

	closeOnce sync.Once
	// failed is closed by fail; the reply writer stops writing, but keeps
	// draining so the reader never blocks on a dead stream.
	failed chan struct{}
}

// end records why the stream ends, if nothing did before. The reader ends
// the stream this way, leaving the connection open until the replies
// already due are written.
func (sc *serveConn) end(err error) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.cause == nil {
		sc.cause = err
	}
}

func (sc *serveConn) firstCause() error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.cause
}

// fail ends the stream at once: nothing more is written.
func (sc *serveConn) fail(err error) {
	sc.end(err)
	sc.closeOnce.Do(func() {
		close(sc.failed)
		sc.conn.Close()
	})
}

// serve reads and answers frames until the stream fails.
//
// A writer sets and rolls back bits in its own bitmaps only (peer, the
// host its Hello named and the cluster's transport authenticated), and
// never in this master's own-writes bitmap, which its tracker fills
// directly: anything else is refused.
func (sc *serveConn) serve(br *bufio.Reader, st *Store, replies chan<- *wire.Frame, peer string, peerInc uint64, self string) {
	for {
		f, err := wire.ReadFrame(br)
		if err != nil {
			sc.end(err)
			return
		}
		var reply *wire.Frame
		switch f.Kind {
		case wire.KindBitSet, wire.KindRollback, wire.KindReset:
			if f.Writer != peer || f.Writer == self {
				reply = &wire.Frame{Kind: wire.KindAck, Seq: f.Seq, Err: errText(fmt.Errorf("%w: %s may not change %s's bitmap", ErrRefused, peer, f.Writer))}
				break
			}
			if f.Kind == wire.KindRollback {
				reply = &wire.Frame{Kind: wire.KindAck, Seq: f.Seq, Err: errText(st.Rollback(f.Set, f.Writer, f.Seq))}
				break
			}
			if f.Kind == wire.KindReset {
				reply = &wire.Frame{Kind: wire.KindAck, Seq: f.Seq, Err: errText(st.Reset(f.Set, f.Writer, peerInc, f.Seq))}
				break
			}
			reply = &wire.Frame{Kind: wire.KindAck, Seq: f.Seq, Err: errText(st.Apply(f.Set, f.Writer, peerInc, f.Seq, f.Ranges))}
		case wire.KindFetch:
			reply = fetchReply(st, f)
		default:
			sc.end(fmt.Errorf("%w: %v frame (seq %d) sent to a master", errProtocol, f.Kind, f.Seq))
			return
		}
		select {
		case replies <- reply:
		case <-sc.failed:
			return
		}
	}
}

func fetchReply(st *Store, f *wire.Frame) *wire.Frame {
	reply := &wire.Frame{Kind: wire.KindBitmap, Seq: f.Seq}
	b, ok := st.Snapshot(f.Set, f.Writer)
	if !ok {
		if st.Writers(f.Set) == nil {
			reply.Err = errText(fmt.Errorf("masters: fetch bitmap of %s: %w: %s", f.Writer, ErrNotOpen, f.Set))
		} else {
			// Not an empty bitmap: a dropped or never-seen writer must not
			// pass for one that wrote nothing, or a merge would skip its
			// chunks.
			reply.Err = errText(fmt.Errorf("%w %s in %s", ErrNoWriter, f.Writer, f.Set))
		}
		return reply
	}
	enc, err := b.MarshalBinary()
	switch {
	case err != nil:
		reply.Err = errText(fmt.Errorf("masters: encode bitmap of %s in %s: %w", f.Writer, f.Set, err))
	case len(enc) > wire.MaxFrame-64:
		// The frame's other fields take well under 64 bytes.
		reply.Err = errText(fmt.Errorf("masters: bitmap of %s in %s is %d bytes, too large for a frame", f.Writer, f.Set, len(enc)))
	default:
		reply.Bitmap = enc
	}
	return reply
}

// errText is err's text as an Ack carries it: empty for nil, never empty
// otherwise (an empty Err reads as success), and cut to what a frame allows
// without splitting a UTF-8 sequence.
func errText(err error) string {
	if err == nil {
		return ""
	}
	s := err.Error()
	if len(s) > wire.MaxString {
		s = s[:wire.MaxString]
		for i := 1; i < utf8.UTFMax && i <= len(s); i++ {
			if utf8.RuneStart(s[len(s)-i]) {
				if !utf8.FullRuneInString(s[len(s)-i:]) {
					s = s[:len(s)-i]
				}
				break
			}
		}
	}
	if s == "" {
		return "masters: error without text"
	}
	return s
}

// writeReplies writes replies as they come, flushing only when none is
// waiting, so that a burst of acks leaves in one write.
func (sc *serveConn) writeReplies(replies <-chan *wire.Frame) {
	bw := bufio.NewWriterSize(sc.conn, 64<<10)
	var buf []byte
	write := func(f *wire.Frame) {
		select {
		case <-sc.failed:
			return // drain only
		default:
		}
		var err error
		if buf, err = wire.AppendFrame(buf[:0], f); err != nil {
			sc.fail(fmt.Errorf("masters: encode %v reply: %w", f.Kind, err))
			return
		}
		if _, err := bw.Write(buf); err != nil {
			sc.fail(fmt.Errorf("masters: write reply: %w", err))
		}
	}
	flush := func() {
		select {
		case <-sc.failed:
			return
		default:
		}
		if err := bw.Flush(); err != nil {
			sc.fail(fmt.Errorf("masters: write reply: %w", err))
		}
	}
	for f := range replies {
		write(f)
	more:
		for {
			select {
			case f, ok := <-replies:
				if !ok {
					break more
				}
				write(f)
			default:
				break more
			}
		}
		flush()
	}
}

func remoteAddr(c net.Conn) string {
	if a := c.RemoteAddr(); a != nil {
		return a.String()
	}
	return ""
}
