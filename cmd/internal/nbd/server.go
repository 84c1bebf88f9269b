package nbd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/rs/zerolog"
)

// Backend is a block device served over NBD. Methods may be called
// concurrently, from any number of connections.
type Backend interface {
	// Size is the device size in bytes. It is read once per connection,
	// when the client selects the export.
	Size() int64
	// ReadAt fills p from offset off; a nil error means all of p was
	// filled (p comes from a pool: unfilled bytes would leak old data).
	ReadAt(p []byte, off int64) error
	// WriteAt writes p at off. With fua set the data must be durable
	// before it returns. It must not retain or modify p.
	WriteAt(p []byte, off int64, fua bool) error
	// Flush makes every write that completed before the call durable,
	// whichever connection issued it.
	Flush() error
	// Trim discards a range; afterwards the range reads as zeroes.
	Trim(off, length int64) error
	// Zero makes a range read as zeroes (NBD_CMD_WRITE_ZEROES). It may
	// deallocate the range. With fua set it is durable before it returns.
	Zero(off, length int64, fua bool) error
}

// Acknowledger is an optional Backend interface. Acknowledge runs under
// the connection's write lock right before a worker's successful WRITE,
// WRITE_ZEROES, TRIM or FLUSH reply goes on the wire; an error replaces
// the success with its errno. A fenced cluster host uses it: stopped
// between its member I/O and its reply and declared failed meanwhile, it
// must not acknowledge on resuming (the window left is the write system
// call itself).
type Acknowledger interface {
	Acknowledge() error
}

// QuickBackend is the optional fast path of a Backend. The connection's
// reader tries it for READ and WRITE (without FUA) before handing a
// request to a worker goroutine: a request the backend completes from
// memory then costs no goroutine, no wake-up and, with the replies of the
// other requests it read in the same batch, one reply write. A backend
// that would have to wait (for a disk, a lock, metadata) declines and the
// request takes the usual path, so a slow request never holds up the
// reader for long.
type QuickBackend interface {
	// TryWriteAt writes p at off if it can without waiting. done false:
	// nothing was written. When done, err is the write's result, as
	// WriteAt's.
	TryWriteAt(p []byte, off int64) (done bool, err error)
	// TryReadAt fills all of p if it can without waiting; false: p holds
	// nothing usable (errors are for ReadAt to report).
	TryReadAt(p []byte, off int64) bool
}

// Export is one named block device.
type Export struct {
	Name        string // the VU name, e.g. "DSA1"; what clients ask for
	Description string // shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION
	Backend     Backend
	ReadOnly    bool
}

// Options configures a Server. The zero value is usable.
type Options struct {
	// Logger receives one event per connection open and close, and one per
	// protocol violation or backend error. The zero Logger discards.
	Logger zerolog.Logger
	// MaxRequest is the largest READ/WRITE payload accepted and the
	// maximum advertised in NBD_INFO_BLOCK_SIZE. Default 32 MiB; values
	// below 4096 are raised to 4096 and values above 1 GiB lowered to it.
	MaxRequest int
	// MaxInFlight bounds the requests a connection runs concurrently;
	// when reached, the connection stops reading until one completes.
	// Default 64.
	MaxInFlight int
	// HandshakeTimeout bounds the whole negotiation phase of a
	// connection, so an idle or trickling client cannot hold a slot
	// forever. Default 30 s. The transmission phase has no timeout:
	// clients legitimately idle for hours.
	HandshakeTimeout time.Duration
	// Observe, if set, hears of every request served: its command
	// ("read", "write", "flush", "trim", "write_zeroes"), how long serving
	// it took (from its handling's start to its reply), and whether it
	// failed. It runs on
	// the request's path, so it must be quick (a histogram observation).
	Observe func(command string, seconds float64, failed bool)
}

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("nbd: server closed")

// Server serves exports over any number of listeners.
type Server struct {
	log              zerolog.Logger
	observe          func(command string, seconds float64, failed bool)
	maxRequest       int
	maxInFlight      int
	maxInFlightBytes int64
	handshakeTimeout time.Duration

	mu           sync.Mutex
	exports      map[string]*export
	listeners    map[net.Listener]struct{}
	conns        map[*conn]struct{}
	shuttingDown bool
	nextConnID   uint64
	connsDone    sync.WaitGroup
}

// export is a registered Export plus the connections bound to it, so that
// RemoveExport can wait until its backend is no longer used.
type export struct {
	Export
	conns map[*conn]struct{}
}

// NewServer returns a server with no exports.
func NewServer(opts Options) *Server {
	maxRequest := opts.MaxRequest
	switch {
	case maxRequest <= 0:
		maxRequest = defaultMaxRequest
	case maxRequest < preferredBlockSize:
		maxRequest = preferredBlockSize
	case maxRequest > largestMaxRequest:
		maxRequest = largestMaxRequest
	}
	maxInFlight := opts.MaxInFlight
	if maxInFlight <= 0 {
		maxInFlight = defaultMaxInFlight
	}
	handshakeTimeout := opts.HandshakeTimeout
	if handshakeTimeout <= 0 {
		handshakeTimeout = 30 * time.Second
	}
	return &Server{
		log:        opts.Logger,
		observe:    opts.Observe,
		maxRequest: maxRequest,
		// Enough for any normal client (nbdcopy keeps 64 × 256 KiB in
		// flight), yet a client queueing 64 maximal READs cannot make one
		// connection allocate 2 GiB.
		maxInFlightBytes: max(64<<20, 2*int64(maxRequest)),
		maxInFlight:      maxInFlight,
		handshakeTimeout: handshakeTimeout,
		exports:          make(map[string]*export),
		listeners:        make(map[net.Listener]struct{}),
		conns:            make(map[*conn]struct{}),
	}
}

// AddExport registers an export. Names are unique and non-empty; the empty
// name is how a client asks for the default export.
func (s *Server) AddExport(e Export) error {
	if err := validateExport(e); err != nil {
		return fmt.Errorf("nbd: add export %q: %w", e.Name, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.exports[e.Name]; ok {
		return fmt.Errorf("nbd: add export %q: name already exported", e.Name)
	}
	s.exports[e.Name] = &export{Export: e, conns: make(map[*conn]struct{})}
	s.log.Info().Str("export", e.Name).Int64("size", e.Backend.Size()).
		Bool("read_only", e.ReadOnly).Msg("nbd export added")
	return nil
}

func validateExport(e Export) error {
	switch {
	case e.Name == "":
		return errors.New("empty name")
	case len(e.Name) > maxStringLength:
		return fmt.Errorf("name longer than %d bytes", maxStringLength)
	case len(e.Description) > maxStringLength:
		return fmt.Errorf("description longer than %d bytes", maxStringLength)
	case !validString(e.Name), !validString(e.Description):
		return errors.New("name and description must be UTF-8 without NUL")
	case e.Backend == nil:
		return errors.New("nil backend")
	case e.Backend.Size() < 0:
		return fmt.Errorf("negative size %d", e.Backend.Size())
	}
	return nil
}

// validString reports whether s may appear in the protocol [Conventions].
func validString(s string) bool {
	return utf8.ValidString(s) && !strings.ContainsRune(s, 0)
}

// RemoveExport unregisters an export and closes its connections: each stops
// reading requests, finishes the ones in flight, and closes. It returns once
// they are all closed, so the caller may then tear the backend down. It must
// not be called from a Backend method of that export (it would wait for
// itself). Removing an unknown name does nothing.
func (s *Server) RemoveExport(name string) {
	s.mu.Lock()
	e, ok := s.exports[name]
	if ok {
		delete(s.exports, name)
	}
	var bound []*conn
	if ok {
		for c := range e.conns {
			bound = append(bound, c)
		}
	}
	s.mu.Unlock()
	if !ok {
		return
	}
	for _, c := range bound {
		c.stop()
	}
	for _, c := range bound {
		<-c.done
	}
	s.log.Info().Str("export", name).Int("connections_closed", len(bound)).Msg("nbd export removed")
}

// lookupAndBind finds the export a client asked for and, when bind is set,
// registers c as using it, atomically with the lookup, so RemoveExport
// cannot miss a connection that is just entering transmission.
func (s *Server) lookupAndBind(name string, c *conn, bind bool) (*export, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.lookupLocked(name)
	if e == nil {
		return nil, false
	}
	if bind {
		e.conns[c] = struct{}{}
	}
	return e, true
}

func (s *Server) lookupLocked(name string) *export {
	if name == "" {
		if len(s.exports) != 1 {
			return nil
		}
		for _, e := range s.exports {
			return e
		}
	}
	return s.exports[name]
}

func (s *Server) unbind(e *export, c *conn) {
	s.mu.Lock()
	delete(e.conns, c)
	s.mu.Unlock()
}

// exportList is a snapshot for NBD_OPT_LIST, sorted for a stable answer.
func (s *Server) exportList() []Export {
	s.mu.Lock()
	list := make([]Export, 0, len(s.exports))
	for _, e := range s.exports {
		list = append(list, e.Export)
	}
	s.mu.Unlock()
	sort.Slice(list, func(i, j int) bool { return list[i].Name < list[j].Name })
	return list
}

func (s *Server) isShuttingDown() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.shuttingDown
}

// Serve accepts connections on l until l is closed or Shutdown is called,
// and closes l before returning. It returns ErrServerClosed after Shutdown,
// otherwise the accept error (errors.Is(err, net.ErrClosed) when l was
// closed by the caller). Connections already accepted keep running; use
// Shutdown to end them.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.shuttingDown {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	s.log.Info().Str("addr", l.Addr().String()).Msg("nbd serving")

	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if s.isShuttingDown() {
				return ErrServerClosed
			}
			if transientAcceptError(err) {
				// Out of file descriptors or a connection reset before
				// accept: back off like net/http rather than spin or quit.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn().Err(err).Dur("retry_in", backoff).Msg("nbd accept failed")
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("nbd: accept on %s: %w", l.Addr(), err)
		}
		backoff = 0
		s.startConn(nc)
	}
}

func transientAcceptError(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.ENOBUFS) ||
		errors.Is(err, syscall.ENOMEM)
}

// startConn registers nc and runs it in its own goroutine.
func (s *Server) startConn(nc net.Conn) *conn {
	s.mu.Lock()
	if s.shuttingDown {
		s.mu.Unlock()
		nc.Close()
		return nil
	}
	s.nextConnID++
	c := newConn(s, nc, s.nextConnID)
	s.conns[c] = struct{}{}
	s.connsDone.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.connsDone.Done()
		c.run()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
	return c
}

// Shutdown stops accepting, lets every connection finish the requests it
// has in flight, and closes the connections; connections still negotiating
// are closed at once. If ctx ends first, the remaining connections are
// closed forcibly (their in-flight backend calls still run to completion in
// the background) and ctx's error is returned.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.shuttingDown = true
	for l := range s.listeners {
		l.Close()
	}
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()

	for _, c := range conns {
		c.stop()
	}
	done := make(chan struct{})
	go func() {
		s.connsDone.Wait()
		close(done)
	}()
	select {
	case <-done:
		s.log.Info().Int("connections_closed", len(conns)).Msg("nbd server shut down")
		return nil
	case <-ctx.Done():
		for _, c := range conns {
			c.abort()
		}
		s.log.Warn().Err(ctx.Err()).Msg("nbd shutdown cut short; connections closed forcibly")
		return fmt.Errorf("nbd: shutdown: %w", ctx.Err())
	}
}
