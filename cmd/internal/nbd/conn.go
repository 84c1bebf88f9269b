package nbd

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
)

// Reasons a connection ends without an error on the client's part; they
// are logged, not treated as failures.
var (
	errAborted     = errors.New("client sent NBD_OPT_ABORT")
	errDisconnect  = errors.New("client sent NBD_CMD_DISC")
	errClientGone  = errors.New("client closed the connection")
	errServerClose = errors.New("server closed the connection")
)

// conn is one client connection, from greeting to close.
type conn struct {
	srv *Server
	nc  net.Conn
	br  *bufio.Reader
	log zerolog.Logger

	// stopping asks the reader to finish: it is set before the read
	// deadline is moved to the past, and the reader checks it after every
	// deadline change of its own, so one of the two always wins.
	stopping  atomic.Bool
	closeOnce sync.Once
	done      chan struct{} // closed when the connection is fully closed

	// Set by negotiation, read-only afterwards.
	exp      *export
	quick    QuickBackend // nil: every request goes to a worker
	acker    Acknowledger // nil: successes are acknowledged as they are
	size     uint64
	readOnly bool

	// batch holds the replies to requests the reader served itself (see
	// QuickBackend), written together when the reader would otherwise
	// block. Only the reader touches it.
	batch []byte

	wmu      sync.Mutex // serialises replies; guards writeErr
	writeErr error

	inflight sync.WaitGroup // requests handed to worker goroutines
	budget   budget

	requests    atomic.Uint64 // counters for the close log line
	failures    atomic.Uint64
	quickServed atomic.Uint64 // requests the reader served itself
}

func newConn(s *Server, nc net.Conn, id uint64) *conn {
	c := &conn{
		srv:  s,
		nc:   nc,
		br:   bufio.NewReaderSize(nc, 64<<10),
		done: make(chan struct{}),
		log: s.log.With().Uint64("conn", id).
			Str("remote", remoteName(nc)).Logger(),
	}
	c.budget.init(s.maxInFlight, s.maxInFlightBytes)
	return c
}

// remoteName is the peer address, or for unix-socket peers, which are
// unnamed ("@" or ""), the socket path they connected to.
func remoteName(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" && a.String() != "@" {
		return a.String()
	}
	if a := nc.LocalAddr(); a != nil {
		return a.Network() + ":" + a.String()
	}
	return "unknown"
}

// stop asks the connection to stop reading requests, finish those in
// flight and close. It does not wait.
func (c *conn) stop() {
	c.stopping.Store(true)
	c.nc.SetReadDeadline(time.Now())
}

// abort closes the socket at once; replies not yet written are lost.
func (c *conn) abort() {
	c.closeOnce.Do(func() { c.nc.Close() })
}

// run is the connection's goroutine.
func (c *conn) run() {
	defer close(c.done)
	defer c.abort()
	c.log.Info().Msg("nbd connection open")

	e, err := c.negotiate()
	if err != nil {
		c.logClose(err, "negotiation")
		return
	}
	defer c.srv.unbind(e, c)
	c.log = c.log.With().Str("export", e.Name).Logger()
	c.log.Info().Uint64("size", c.size).Bool("read_only", c.readOnly).Msg("nbd transmission started")

	err = c.transmit()
	// Replies to requests already read are still owed, even after DISC.
	c.inflight.Wait()
	c.logClose(err, "transmission")
}

func (c *conn) logClose(err error, phase string) {
	if c.stopping.Load() && !errors.Is(err, errDisconnect) && !errors.Is(err, errClientGone) {
		err = errServerClose
	}
	ev := c.log.Info()
	switch {
	case errors.Is(err, errAborted), errors.Is(err, errDisconnect),
		errors.Is(err, errClientGone), errors.Is(err, errServerClose):
	default:
		ev = c.log.Warn()
	}
	ev.Str("phase", phase).Str("reason", err.Error()).
		Uint64("requests", c.requests.Load()).Uint64("failed", c.failures.Load()).
		Uint64("quick", c.quickServed.Load()).
		Msg("nbd connection closed")
}

// readErr turns a read failure into the reason the connection ends.
func (c *conn) readErr(err error, what string) error {
	if c.stopping.Load() {
		return errServerClose
	}
	c.wmu.Lock()
	writeErr := c.writeErr
	c.wmu.Unlock()
	if writeErr != nil {
		return writeErr // the read failed because reply closed the socket
	}
	if errors.Is(err, io.EOF) {
		return errClientGone
	}
	return fmt.Errorf("read %s: %w", what, err)
}
