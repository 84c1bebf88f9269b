package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
)

// reply sends a simple reply [Simple reply message]; data is the payload
// of a successful READ, or nil. Header and data go out in one write under
// wmu, so a reply is contiguous on the wire whatever the other workers do.
// After a failed write the connection is closed and later replies are
// dropped.
//
// Batching replies of concurrent workers into one writev was tried: under
// fio 4 KiB QD16 on 2 cores it averaged only 1.2-1.4 replies per write,
// too little to measure through the noise, so workers reply one by one.
// The reader's own replies are batched (batchReply): it knows when it is
// about to wait.
func (c *conn) reply(cookie uint64, code uint32, data []byte) error {
	var hdr [replyHeaderSize]byte
	putReplyHeader(hdr[:], cookie, code)
	return c.send(hdr[:], data)
}

const replyHeaderSize = 16

func putReplyHeader(b []byte, cookie uint64, code uint32) {
	binary.BigEndian.PutUint32(b[0:], simpleReplyMagic)
	binary.BigEndian.PutUint32(b[4:], code)
	binary.BigEndian.PutUint64(b[8:], cookie)
}

// send writes head, then tail if not nil, as one contiguous run on the
// wire, under wmu. After a failed write the connection is closed and
// later sends are dropped.
func (c *conn) send(head, tail []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.sendLocked(head, tail)
}

// replyAcknowledged sends a success reply if the backend's Acknowledge
// agrees at the last moment, under wmu, and its error otherwise.
func (c *conn) replyAcknowledged(cookie uint64) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	code := uint32(0)
	if err := c.acker.Acknowledge(); err != nil {
		code = errno(err)
		c.log.Warn().Err(err).Uint64("cookie", cookie).Msg("request done but not acknowledged")
	}
	var hdr [replyHeaderSize]byte
	putReplyHeader(hdr[:], cookie, code)
	_ = c.sendLocked(hdr[:], nil)
}

func (c *conn) sendLocked(head, tail []byte) error {
	if c.writeErr != nil {
		return c.writeErr
	}
	var err error
	if tail == nil {
		_, err = c.nc.Write(head)
	} else {
		bufs := net.Buffers{head, tail}
		_, err = bufs.WriteTo(c.nc)
	}
	if err != nil {
		c.writeErr = fmt.Errorf("write reply: %w", err)
		if !c.stopping.Load() && !errors.Is(err, net.ErrClosed) {
			c.log.Warn().Err(err).Msg("nbd reply failed; closing connection")
		}
		// Wakes the reader, which then waits for the workers and returns.
		c.abort()
		return c.writeErr
	}
	return nil
}

// maxBatch is the size past which the reader writes its batched replies
// without waiting to run out of input.
const maxBatch = 256 << 10

// batchReply appends a reply to the reader's batch and returns the n
// bytes after its header, for a READ's data.
func (c *conn) batchReply(cookie uint64, code uint32, n int) []byte {
	start := len(c.batch)
	c.batch = slices.Grow(c.batch, replyHeaderSize+n)[:start+replyHeaderSize+n]
	putReplyHeader(c.batch[start:], cookie, code)
	return c.batch[start+replyHeaderSize:]
}

// unbatchReply takes back the last batchReply, of n data bytes.
func (c *conn) unbatchReply(n int) {
	c.batch = c.batch[:len(c.batch)-replyHeaderSize-n]
}

// flushBatch writes the batched replies. The reader calls it before
// anything that may block: the client may be waiting for these replies
// before it sends more.
func (c *conn) flushBatch() error {
	if len(c.batch) == 0 {
		return nil
	}
	err := c.send(c.batch, nil)
	c.batch = c.batch[:0]
	return err
}
