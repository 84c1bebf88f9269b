// Package nbdtest is a minimal NBD client for tests: fixed-newstyle
// handshake with NBD_OPT_GO, then simple replies only. Several goroutines
// may issue requests on one Client at once; a reader goroutine hands each
// reply to the request with its cookie. It is derived from the raw client
// of the nbd package's own tests (cmd/internal/nbd/client_test.go), made
// importable for the end-to-end tests of the agent.
package nbdtest

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Wire constants, named as in the NBD specification.
const (
	nbdMagic         = 0x4e42444d41474943 // "NBDMAGIC"
	ihaveoptMagic    = 0x49484156454F5054 // "IHAVEOPT"
	optReplyMagic    = 0x0003e889045565a9
	requestMagic     = 0x25609513
	simpleReplyMagic = 0x67446698

	flagCFixedNewstyle = 1 << 0
	flagCNoZeroes      = 1 << 1

	optGo = 7

	repAck  = 1
	repInfo = 3

	infoExport = 0

	cmdRead  = 0
	cmdWrite = 1
	cmdDisc  = 2
	cmdFlush = 3

	// CmdFlagFUA is NBD_CMD_FLAG_FUA.
	CmdFlagFUA = 1 << 0
)

// ErrClosed: the connection ended before the reply came.
var ErrClosed = errors.New("nbdtest: connection closed")

// ReplyError is an NBD error reply (an errno value, e.g. 5 = EIO).
type ReplyError struct{ Errno uint32 }

func (e *ReplyError) Error() string { return fmt.Sprintf("nbdtest: error reply, errno %d", e.Errno) }

// Client is one NBD connection in the transmission phase.
type Client struct {
	// Size and Flags are what NBD_OPT_GO reported for the export.
	Size  uint64
	Flags uint16

	nc net.Conn
	br *bufio.Reader

	wmu sync.Mutex // one request on the wire at a time

	mu      sync.Mutex
	cookie  uint64
	pending map[uint64]*call
	err     error // set once the reader stops: every later call fails
	done    chan struct{}
}

type call struct {
	read  []byte // READ: where the payload goes
	reply chan error
}

// Dial connects to an NBD server (network "unix" or "tcp") and selects
// export with NBD_OPT_GO. The handshake must finish within timeout.
func Dial(network, addr, export string, timeout time.Duration) (*Client, error) {
	nc, err := net.DialTimeout(network, addr, timeout)
	if err != nil {
		return nil, err
	}
	c := &Client{nc: nc, br: bufio.NewReader(nc), pending: map[uint64]*call{}, done: make(chan struct{})}
	_ = nc.SetDeadline(time.Now().Add(timeout))
	if err := c.handshake(export); err != nil {
		nc.Close()
		return nil, err
	}
	_ = nc.SetDeadline(time.Time{})
	go c.readLoop()
	return c, nil
}

func (c *Client) handshake(export string) error {
	var g [18]byte
	if _, err := io.ReadFull(c.br, g[:]); err != nil {
		return fmt.Errorf("nbdtest: read greeting: %w", err)
	}
	if binary.BigEndian.Uint64(g[0:]) != nbdMagic || binary.BigEndian.Uint64(g[8:]) != ihaveoptMagic {
		return fmt.Errorf("nbdtest: bad greeting % x", g)
	}
	b := binary.BigEndian.AppendUint32(nil, flagCFixedNewstyle|flagCNoZeroes)
	data := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = binary.BigEndian.AppendUint16(data, 0) // no info requests
	b = binary.BigEndian.AppendUint64(b, ihaveoptMagic)
	b = binary.BigEndian.AppendUint32(b, optGo)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	if _, err := c.nc.Write(append(b, data...)); err != nil {
		return fmt.Errorf("nbdtest: send NBD_OPT_GO: %w", err)
	}
	for {
		var h [20]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return fmt.Errorf("nbdtest: read option reply: %w", err)
		}
		if m := binary.BigEndian.Uint64(h[0:]); m != optReplyMagic {
			return fmt.Errorf("nbdtest: bad option reply magic %#x", m)
		}
		typ := binary.BigEndian.Uint32(h[12:])
		body := make([]byte, binary.BigEndian.Uint32(h[16:]))
		if _, err := io.ReadFull(c.br, body); err != nil {
			return fmt.Errorf("nbdtest: read option reply data: %w", err)
		}
		switch {
		case typ == repAck:
			return nil
		case typ == repInfo:
			if len(body) == 12 && binary.BigEndian.Uint16(body) == infoExport {
				c.Size = binary.BigEndian.Uint64(body[2:])
				c.Flags = binary.BigEndian.Uint16(body[10:])
			}
		case typ&0x80000000 != 0:
			return fmt.Errorf("nbdtest: NBD_OPT_GO %q refused (%#x): %s", export, typ, body)
		}
	}
}

// readLoop hands each reply to its request until the connection ends.
func (c *Client) readLoop() {
	err := c.readReplies()
	c.mu.Lock()
	c.err = fmt.Errorf("%w: %w", ErrClosed, err)
	for k, p := range c.pending {
		p.reply <- c.err
		delete(c.pending, k)
	}
	c.mu.Unlock()
	close(c.done)
}

func (c *Client) readReplies() error {
	for {
		var h [16]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return err
		}
		if m := binary.BigEndian.Uint32(h[0:]); m != simpleReplyMagic {
			return fmt.Errorf("nbdtest: bad reply magic %#x", m)
		}
		errno, cookie := binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
		c.mu.Lock()
		p, ok := c.pending[cookie]
		delete(c.pending, cookie)
		c.mu.Unlock()
		if !ok {
			return fmt.Errorf("nbdtest: reply to unknown cookie %#x", cookie)
		}
		if errno != 0 {
			p.reply <- &ReplyError{Errno: errno}
			continue
		}
		if p.read != nil {
			if _, err := io.ReadFull(c.br, p.read); err != nil {
				p.reply <- fmt.Errorf("%w: read payload: %w", ErrClosed, err)
				return err
			}
		}
		p.reply <- nil
	}
}

// do sends one request and waits for its reply.
func (c *Client) do(flags, typ uint16, off uint64, length uint32, payload, read []byte) error {
	p := &call{read: read, reply: make(chan error, 1)}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.cookie++
	cookie := c.cookie
	c.pending[cookie] = p
	c.mu.Unlock()
	b := binary.BigEndian.AppendUint32(make([]byte, 0, 28+len(payload)), requestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	c.wmu.Lock()
	_, err := c.nc.Write(append(b, payload...))
	c.wmu.Unlock()
	if err != nil {
		// The reader fails the call when the connection ends; a write
		// error may come first.
		c.mu.Lock()
		if _, still := c.pending[cookie]; still {
			delete(c.pending, cookie)
			c.mu.Unlock()
			return fmt.Errorf("%w: send: %w", ErrClosed, err)
		}
		c.mu.Unlock()
	}
	return <-p.reply
}

// WriteAt writes p at off and returns once the server replied (nil: the
// write was acknowledged). flags may hold CmdFlagFUA.
func (c *Client) WriteAt(p []byte, off int64, flags uint16) error {
	return c.do(flags, cmdWrite, uint64(off), uint32(len(p)), p, nil)
}

// ReadAt fills p from off.
func (c *Client) ReadAt(p []byte, off int64) error {
	return c.do(0, cmdRead, uint64(off), uint32(len(p)), nil, p)
}

// Flush sends NBD_CMD_FLUSH.
func (c *Client) Flush() error { return c.do(0, cmdFlush, 0, 0, nil, nil) }

// Close sends NBD_CMD_DISC (best effort) and closes the connection; calls
// still waiting fail with ErrClosed.
func (c *Client) Close() error {
	b := binary.BigEndian.AppendUint32(nil, requestMagic)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, cmdDisc)
	b = append(b, make([]byte, 16)...)
	_ = c.nc.SetWriteDeadline(time.Now().Add(time.Second))
	c.wmu.Lock()
	_, _ = c.nc.Write(b)
	c.wmu.Unlock()
	err := c.nc.Close()
	<-c.done
	return err
}

// Abort closes the connection at once, without NBD_CMD_DISC.
func (c *Client) Abort() {
	_ = c.nc.Close()
	<-c.done
}
