package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
)

// copyLimit is the largest READ payload copied into the reply batch;
// larger ones are written from their own buffer, saving the copy.
var simpleReplies = os.Getenv("NBD_SIMPLE_REPLY") != ""

const copyLimit = 32 << 10

// replyQueue batches the replies of one connection. Whichever goroutine
// queues a reply while no write is in progress becomes the flusher and
// writes everything queued, one writev per round, until the queue is
// empty; the others only queue. A lone reply is thus written at once by
// its own goroutine, and under load many replies share one system call,
// which is what a 4 KiB random workload at queue depth 16 needs.
type replyQueue struct {
	mu       sync.Mutex
	batch    replyBatch // queued, not yet written
	flushing bool
	err      error // first write error; the connection is dead afterwards
	free     [][]byte
}

// replyBatch is a run of replies in wire order.
type replyBatch struct {
	segs  net.Buffers // written in order; ends before small
	small []byte      // headers and small payloads, after segs
	// Buffers owned by the batch: payloads referenced from segs, to
	// return to the pool, and copy buffers, to reuse, once written.
	payloads []*[]byte
	smalls   [][]byte
}

func (b *replyBatch) empty() bool { return len(b.segs) == 0 && len(b.small) == 0 }

// reply queues a simple reply [Simple reply message] and, unless another
// goroutine is already writing, writes the queue. data is the payload of a
// successful READ, or nil; reply takes ownership of it. The header and data
// of a reply are contiguous on the wire. After a failed write the
// connection is closed and later replies are dropped.
func (c *conn) reply(cookie uint64, code uint32, data *[]byte) error {
	q := &c.replies
	q.mu.Lock()
	if q.err != nil {
		q.mu.Unlock()
		if data != nil {
			putBuffer(data)
		}
		return q.err
	}
	if simpleReplies {
		q.add(cookie, code, data)
		batch := q.take()
		bufs := batch.segs
		_, err := bufs.WriteTo(c.nc)
		q.recycle(batch)
		q.mu.Unlock()
		return err
	}
	q.add(cookie, code, data)
	if q.flushing {
		q.mu.Unlock()
		return nil
	}
	q.flushing = true
	for !q.batch.empty() {
		batch := q.take()
		q.mu.Unlock()
		bufs := batch.segs // WriteTo consumes its receiver
		_, err := bufs.WriteTo(c.nc)
		q.mu.Lock()
		q.recycle(batch)
		if err != nil {
			q.err = fmt.Errorf("write reply: %w", err)
			q.recycle(q.take())
			if !c.stopping.Load() && !errors.Is(err, net.ErrClosed) {
				c.log.Warn().Err(err).Msg("nbd reply failed; closing connection")
			}
			// Wakes the reader, which then drains the workers and returns.
			c.abort()
		}
	}
	q.flushing = false
	err := q.err
	q.mu.Unlock()
	return err
}

// add appends one reply to the queued batch. Called with mu held.
func (q *replyQueue) add(cookie uint64, code uint32, data *[]byte) {
	b := &q.batch
	if b.small == nil {
		b.small = q.newSmall()
	}
	b.small = binary.BigEndian.AppendUint32(b.small, simpleReplyMagic)
	b.small = binary.BigEndian.AppendUint32(b.small, code)
	b.small = binary.BigEndian.AppendUint64(b.small, cookie)
	if data == nil {
		return
	}
	if len(*data) <= copyLimit {
		b.small = append(b.small, *data...)
		putBuffer(data)
		return
	}
	b.segs = append(b.segs, b.small, *data)
	b.smalls = append(b.smalls, b.small)
	b.small = nil
	b.payloads = append(b.payloads, data)
}

// take removes the queued batch, closing its small tail into segs.
func (q *replyQueue) take() replyBatch {
	b := q.batch
	if len(b.small) > 0 {
		b.segs = append(b.segs, b.small)
		b.smalls = append(b.smalls, b.small)
	}
	b.small = nil
	q.batch = replyBatch{}
	return b
}

// recycle releases a written (or abandoned) batch's buffers.
func (q *replyQueue) recycle(b replyBatch) {
	for _, p := range b.payloads {
		putBuffer(p)
	}
	for _, s := range b.smalls {
		if len(q.free) < 4 && cap(s) <= 4*copyLimit {
			q.free = append(q.free, s[:0])
		}
	}
}

func (q *replyQueue) newSmall() []byte {
	if n := len(q.free); n > 0 {
		s := q.free[n-1]
		q.free = q.free[:n-1]
		return s
	}
	return make([]byte, 0, 16<<10)
}
