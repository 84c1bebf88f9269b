package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// testClient is a deliberately minimal NBD client speaking the raw
// protocol, so tests can send what libnbd refuses to (bad magic, unknown
// options and commands, out-of-range requests) and check every byte of the
// answer. Methods return errors rather than failing the test so they can
// be used from any goroutine.
type testClient struct {
	nc net.Conn
	br *bufio.Reader

	wmu sync.Mutex // requests may be sent from several goroutines

	mu      sync.Mutex
	readLen map[uint64]uint32 // cookie → READ length, to frame the reply
}

func newTestClient(nc net.Conn) *testClient {
	return &testClient{nc: nc, br: bufio.NewReader(nc), readLen: make(map[uint64]uint32)}
}

// dialTest connects to addr with a generous overall deadline, so a server
// bug shows up as a test failure rather than a hung test binary.
func dialTest(t testing.TB, network, addr string) *testClient {
	t.Helper()
	nc, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s %s: %v", network, addr, err)
	}
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	t.Cleanup(func() { nc.Close() })
	return newTestClient(nc)
}

func (c *testClient) readGreeting() (handshakeFlags uint16, err error) {
	var b [18]byte
	if _, err := io.ReadFull(c.br, b[:]); err != nil {
		return 0, fmt.Errorf("read greeting: %w", err)
	}
	if binary.BigEndian.Uint64(b[0:]) != nbdMagic || binary.BigEndian.Uint64(b[8:]) != ihaveoptMagic {
		return 0, fmt.Errorf("bad greeting % x", b)
	}
	return binary.BigEndian.Uint16(b[16:]), nil
}

func (c *testClient) write(b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err := c.nc.Write(b)
	return err
}

func (c *testClient) sendClientFlags(flags uint32) error {
	return c.write(binary.BigEndian.AppendUint32(nil, flags))
}

// handshake reads the greeting and sends the client flags.
func (c *testClient) handshake(clientFlags uint32) error {
	if _, err := c.readGreeting(); err != nil {
		return err
	}
	return c.sendClientFlags(clientFlags)
}

func (c *testClient) sendOption(opt uint32, data []byte) error {
	b := binary.BigEndian.AppendUint64(nil, ihaveoptMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return c.write(append(b, data...))
}

type optReply struct {
	Opt, Type uint32
	Data      []byte
}

func (c *testClient) readOptReply() (optReply, error) {
	var h [20]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return optReply{}, fmt.Errorf("read option reply: %w", err)
	}
	if m := binary.BigEndian.Uint64(h[0:]); m != optReplyMagic {
		return optReply{}, fmt.Errorf("bad option reply magic %#x", m)
	}
	r := optReply{Opt: binary.BigEndian.Uint32(h[8:]), Type: binary.BigEndian.Uint32(h[12:])}
	r.Data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	if _, err := io.ReadFull(c.br, r.Data); err != nil {
		return optReply{}, fmt.Errorf("read option reply data: %w", err)
	}
	return r, nil
}

// readOptReplies reads replies up to and including the final one (ACK or
// an error).
func (c *testClient) readOptReplies() ([]optReply, error) {
	var out []optReply
	for {
		r, err := c.readOptReply()
		if err != nil {
			return out, err
		}
		out = append(out, r)
		if r.Type != repServer && r.Type != repInfo {
			return out, nil
		}
	}
}

func infoRequestData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, t := range infos {
		b = binary.BigEndian.AppendUint16(b, t)
	}
	return b
}

// exportInfo is what NBD_OPT_INFO/GO reported.
type exportInfo struct {
	Size                            uint64
	Flags                           uint16
	Name, Description               string
	HaveName, HaveDescription       bool
	MinBlock, PrefBlock, MaxPayload uint32
	HaveBlockSize                   bool
}

// infoOrGo sends NBD_OPT_INFO or NBD_OPT_GO and decodes the answer; a
// final error reply is returned as *optError.
func (c *testClient) infoOrGo(opt uint32, name string, infos ...uint16) (exportInfo, error) {
	if err := c.sendOption(opt, infoRequestData(name, infos...)); err != nil {
		return exportInfo{}, err
	}
	replies, err := c.readOptReplies()
	if err != nil {
		return exportInfo{}, err
	}
	var info exportInfo
	for _, r := range replies {
		if r.Opt != opt {
			return info, fmt.Errorf("reply echoes option %d, want %d", r.Opt, opt)
		}
		switch r.Type {
		case repAck:
			return info, nil
		case repInfo:
			if len(r.Data) < 2 {
				return info, fmt.Errorf("short NBD_REP_INFO % x", r.Data)
			}
			body := r.Data[2:]
			switch t := binary.BigEndian.Uint16(r.Data); t {
			case infoExport:
				if len(body) != 10 {
					return info, fmt.Errorf("NBD_INFO_EXPORT of %d bytes", len(r.Data))
				}
				info.Size = binary.BigEndian.Uint64(body)
				info.Flags = binary.BigEndian.Uint16(body[8:])
			case infoName:
				info.Name, info.HaveName = string(body), true
			case infoDescription:
				info.Description, info.HaveDescription = string(body), true
			case infoBlockSize:
				if len(body) != 12 {
					return info, fmt.Errorf("NBD_INFO_BLOCK_SIZE of %d bytes", len(r.Data))
				}
				info.MinBlock = binary.BigEndian.Uint32(body)
				info.PrefBlock = binary.BigEndian.Uint32(body[4:])
				info.MaxPayload = binary.BigEndian.Uint32(body[8:])
				info.HaveBlockSize = true
			}
		default:
			return info, &optError{Type: r.Type, Message: string(r.Data)}
		}
	}
	return info, errors.New("no final option reply")
}

type optError struct {
	Type    uint32
	Message string
}

func (e *optError) Error() string { return fmt.Sprintf("option error %#x: %s", e.Type, e.Message) }

func optErrorType(err error) uint32 {
	var oe *optError
	if errors.As(err, &oe) {
		return oe.Type
	}
	return 0
}

// connectGo runs a fixed-newstyle handshake with NO_ZEROES and NBD_OPT_GO.
func (c *testClient) connectGo(name string) (exportInfo, error) {
	if err := c.handshake(flagCFixedNewstyle | flagCNoZeroes); err != nil {
		return exportInfo{}, err
	}
	return c.infoOrGo(optGo, name, infoBlockSize)
}

// sendRequest sends one request header and, for WRITE, its payload.
func (c *testClient) sendRequest(flags, typ uint16, cookie, offset uint64, length uint32, payload []byte) error {
	if typ == cmdRead {
		c.mu.Lock()
		c.readLen[cookie] = length
		c.mu.Unlock()
	}
	b := binary.BigEndian.AppendUint32(make([]byte, 0, 28+len(payload)), requestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, offset)
	b = binary.BigEndian.AppendUint32(b, length)
	return c.write(append(b, payload...))
}

type simpleReply struct {
	Cookie uint64
	Error  uint32
	Data   []byte // successful READ only
}

// readReply reads one simple reply; the cookie tells whether a READ
// payload follows.
func (c *testClient) readReply() (simpleReply, error) {
	var h [16]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return simpleReply{}, fmt.Errorf("read reply: %w", err)
	}
	if m := binary.BigEndian.Uint32(h[0:]); m != simpleReplyMagic {
		return simpleReply{}, fmt.Errorf("bad reply magic %#x", m)
	}
	r := simpleReply{Error: binary.BigEndian.Uint32(h[4:]), Cookie: binary.BigEndian.Uint64(h[8:])}
	c.mu.Lock()
	n, isRead := c.readLen[r.Cookie]
	delete(c.readLen, r.Cookie)
	c.mu.Unlock()
	if isRead && r.Error == 0 {
		r.Data = make([]byte, n)
		if _, err := io.ReadFull(c.br, r.Data); err != nil {
			return r, fmt.Errorf("read reply payload: %w", err)
		}
	}
	return r, nil
}

// do sends one request and waits for its reply; only for tests with
// nothing else in flight.
func (c *testClient) do(flags, typ uint16, offset uint64, length uint32, payload []byte) (simpleReply, error) {
	const cookie = 0xc0ffee
	if err := c.sendRequest(flags, typ, cookie, offset, length, payload); err != nil {
		return simpleReply{}, err
	}
	r, err := c.readReply()
	if err == nil && r.Cookie != cookie {
		err = fmt.Errorf("reply cookie %#x, want %#x", r.Cookie, cookie)
	}
	return r, err
}

// expectClosed checks that the server closed the connection: the next read
// ends in EOF (or a reset) rather than data or a timeout.
func (c *testClient) expectClosed() error {
	c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c.br)
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		return errors.New("connection still open after 5s")
	case len(b) > 0:
		return fmt.Errorf("got %d more bytes (% x...) instead of a close", len(b), b[:min(len(b), 16)])
	}
	return nil
}

// testServer runs a Server on 127.0.0.1 with an ephemeral port and shuts it
// down when the test ends.
type testServer struct {
	*Server
	addr string
}

func startTestServer(t testing.TB, opts Options, exports ...Export) *testServer {
	t.Helper()
	s := NewServer(opts)
	for _, e := range exports {
		if err := s.AddExport(e); err != nil {
			t.Fatal(err)
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- s.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-serveErr; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return &testServer{Server: s, addr: l.Addr().String()}
}

// goClient connects to the test server and selects an export with OPT_GO.
func (ts *testServer) goClient(t testing.TB, name string) (*testClient, exportInfo) {
	t.Helper()
	c := dialTest(t, "tcp", ts.addr)
	info, err := c.connectGo(name)
	if err != nil {
		t.Fatalf("OPT_GO %q: %v", name, err)
	}
	return c, info
}

// must(f())(t) returns f's value and fails t if f failed; Go passes a
// multi-value call only as a sole argument, hence the two steps.
func must[T any](v T, err error) func(testing.TB) T {
	return func(t testing.TB) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

func check(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
