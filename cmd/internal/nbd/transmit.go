package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"sync"
	"time"
)

// request is one decoded request header [Request message], plus the WRITE
// payload once read.
type request struct {
	flags   uint16
	typ     uint16
	cookie  uint64
	offset  uint64
	length  uint32
	payload *[]byte // WRITE only; from getBuffer
}

// transmit reads requests until the client disconnects, the stream becomes
// unusable, or the server stops the connection. Valid requests run in
// their own goroutines; transmit does not wait for them.
//
// Requests the backend can complete without waiting (QuickBackend) are
// served by transmit itself, their replies batched until it would block.
func (c *conn) transmit() (err error) {
	// Replies to requests already read are owed even after DISC; after a
	// read error, sending them is harmless.
	defer func() {
		if ferr := c.flushBatch(); err == nil || errors.Is(err, errDisconnect) {
			if ferr != nil {
				err = ferr
			}
		}
	}()
	var hdr [28]byte
	for {
		if err := c.wouldBlock(len(hdr)); err != nil {
			return err
		}
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			return c.readErr(err, "request header")
		}
		if magic := binary.BigEndian.Uint32(hdr[0:]); magic != requestMagic {
			// The framing is lost; nothing after this can be trusted.
			return fmt.Errorf("bad request magic %#x", magic)
		}
		r := request{
			flags:  binary.BigEndian.Uint16(hdr[4:]),
			typ:    binary.BigEndian.Uint16(hdr[6:]),
			cookie: binary.BigEndian.Uint64(hdr[8:]),
			offset: binary.BigEndian.Uint64(hdr[16:]),
			length: binary.BigEndian.Uint32(hdr[24:]),
		}
		c.requests.Add(1)
		if r.typ == cmdDisc {
			return errDisconnect
		}

		code := c.validate(&r)
		if code != 0 {
			c.failures.Add(1)
			c.log.Warn().Str("cmd", commandName(r.typ)).Uint16("type", r.typ).
				Uint16("flags", r.flags).Uint64("offset", r.offset).Uint32("length", r.length).
				Uint32("error", code).Msg("nbd request rejected")
			if r.typ == cmdWrite {
				// The payload follows regardless; skip it or it would be
				// parsed as requests [Malformed vs invalid].
				if int64(r.length) > max(drainLimit, int64(c.srv.maxRequest)) {
					return fmt.Errorf("rejected write payload of %d bytes too large to discard", r.length)
				}
				if err := c.wouldBlock(int(r.length)); err != nil {
					return err
				}
				if _, err := io.CopyN(io.Discard, c.br, int64(r.length)); err != nil {
					return c.readErr(err, "rejected write payload")
				}
			}
			c.batchReply(r.cookie, code, 0)
			continue
		}

		var payloadBytes int64
		if r.typ == cmdRead || r.typ == cmdWrite {
			payloadBytes = int64(r.length)
		}
		if !c.budget.tryAcquire(payloadBytes) {
			if err := c.flushBatch(); err != nil {
				return err
			}
			c.budget.acquire(payloadBytes)
		}
		if r.typ == cmdWrite {
			r.payload = getBuffer(int(r.length))
			err := c.wouldBlock(int(r.length))
			if err == nil {
				if _, rerr := io.ReadFull(c.br, *r.payload); rerr != nil {
					err = c.readErr(rerr, "write payload")
				}
			}
			if err != nil {
				putBuffer(r.payload)
				c.budget.release(payloadBytes)
				return err
			}
		}
		if c.serveQuick(&r) {
			c.quickServed.Add(1)
			c.budget.release(payloadBytes)
			if len(c.batch) >= maxBatch {
				if err := c.flushBatch(); err != nil {
					return err
				}
			}
			continue
		}
		c.inflight.Add(1)
		go c.handle(r, payloadBytes)
	}
}

// wouldBlock writes the batched replies if reading n more bytes may
// block, that is if fewer are buffered.
func (c *conn) wouldBlock(n int) error {
	if c.br.Buffered() >= n {
		return nil
	}
	return c.flushBatch()
}

// quickMax bounds the requests the reader serves itself: a larger one
// would hold up the requests behind it for longer than a handoff costs.
const quickMax = 128 << 10

// serveQuick serves r on the reader, batching its reply, if the backend
// can complete it without waiting; it reports whether it did. A WRITE's
// payload goes back to the pool then.
func (c *conn) serveQuick(r *request) bool {
	if c.quick == nil || r.length > quickMax || r.flags&cmdFlagFUA != 0 {
		return false
	}
	off := int64(r.offset)
	var began time.Time
	if c.srv.observe != nil {
		began = time.Now()
	}
	switch r.typ {
	case cmdWrite:
		done, err := c.quick.TryWriteAt(*r.payload, off)
		if !done {
			return false
		}
		if c.srv.observe != nil {
			c.srv.observe("write", time.Since(began).Seconds(), err != nil)
		}
		putBuffer(r.payload)
		c.batchReply(r.cookie, c.backendResult(r, err), 0)
		return true
	case cmdRead:
		// The data lands right after its reply header: no copy.
		data := c.batchReply(r.cookie, 0, int(r.length))
		if !c.quick.TryReadAt(data, off) {
			c.unbatchReply(int(r.length))
			return false
		}
		if c.srv.observe != nil {
			c.srv.observe("read", time.Since(began).Seconds(), false)
		}
		return true
	}
	return false
}

// backendResult is the NBD error for a backend error (0 for nil); a
// failure is counted and logged.
func (c *conn) backendResult(r *request, err error) uint32 {
	if err == nil {
		return 0
	}
	code := errno(err)
	c.failures.Add(1)
	c.log.Error().Err(err).Str("cmd", commandName(r.typ)).Uint64("offset", r.offset).
		Uint32("length", r.length).Uint32("error", code).Msg("nbd backend error")
	return code
}

// validate returns the error a request must be rejected with before it
// reaches the backend, or 0. The order matters only for which of several
// problems is reported.
func (c *conn) validate(r *request) uint32 {
	switch r.typ {
	case cmdRead, cmdWrite, cmdFlush, cmdTrim, cmdWriteZeroes:
	default:
		// Unknown, or known but not advertised (CACHE, BLOCK_STATUS, ...).
		return errInval
	}
	// FUA is valid on every command once SEND_FUA is advertised (ignored
	// on READ and FLUSH); NO_HOLE only on WRITE_ZEROES. DF, FAST_ZERO
	// and the rest are not advertised.
	allowed := uint16(cmdFlagFUA)
	if r.typ == cmdWriteZeroes {
		allowed |= cmdFlagNoHole
	}
	if r.flags&^allowed != 0 {
		return errInval
	}
	modifies := r.typ == cmdWrite || r.typ == cmdTrim || r.typ == cmdWriteZeroes
	if modifies && c.readOnly {
		return errPerm
	}
	if r.typ == cmdFlush {
		if r.offset != 0 || r.length != 0 {
			return errInval
		}
		return 0
	}
	if r.length == 0 {
		// Unspecified by the protocol; nbdkit also answers EINVAL.
		return errInval
	}
	if (r.typ == cmdRead || r.typ == cmdWrite) && r.length > uint32(c.srv.maxRequest) {
		return errInval
	}
	if length := uint64(r.length); length > c.size || r.offset > c.size-length {
		if r.typ == cmdWrite || r.typ == cmdWriteZeroes {
			return errNoSpc
		}
		return errInval
	}
	return 0
}

// handle runs one validated request against the backend and replies.
func (c *conn) handle(r request, payloadBytes int64) {
	defer c.inflight.Done()
	defer c.budget.release(payloadBytes)
	var err error
	if obs := c.srv.observe; obs != nil {
		began := time.Now()
		defer func() { obs(commandName(r.typ), time.Since(began).Seconds(), err != nil) }()
	}

	b := c.exp.Backend
	off, length := int64(r.offset), int64(r.length)
	fua := r.flags&cmdFlagFUA != 0
	switch r.typ {
	case cmdRead:
		buf := getBuffer(int(r.length))
		defer putBuffer(buf)
		if err = b.ReadAt(*buf, off); err == nil {
			// A READ reply is all or nothing, so the data is complete
			// before the header goes out.
			c.reply(r.cookie, 0, *buf)
			return
		}
	case cmdWrite:
		err = b.WriteAt(*r.payload, off, fua)
		putBuffer(r.payload)
	case cmdFlush:
		err = b.Flush()
	case cmdTrim:
		// Backend.Trim has no FUA of its own.
		if err = b.Trim(off, length); err == nil && fua {
			err = b.Flush()
		}
	case cmdWriteZeroes:
		if r.flags&cmdFlagNoHole != 0 {
			err = writeZeroBlocks(b, off, length, fua)
		} else {
			err = b.Zero(off, length, fua)
		}
	}
	code := c.backendResult(&r, err)
	if c.acker != nil && code == 0 && r.typ != cmdRead {
		c.replyAcknowledged(r.cookie)
		return
	}
	c.reply(r.cookie, code, nil)
}

// zeroBlock is the source of writes for WRITE_ZEROES with NO_HOLE.
var zeroBlock = sync.OnceValue(func() []byte { return make([]byte, 1<<20) })

// writeZeroBlocks zeroes a range by writing zero bytes. NO_HOLE asks that
// the range stay allocated, and Backend.Zero may deallocate with no way to
// ask it not to; WriteAt always allocates.
func writeZeroBlocks(b Backend, off, length int64, fua bool) error {
	z := zeroBlock()
	single := length <= int64(len(z))
	for length > 0 {
		n := min(length, int64(len(z)))
		if err := b.WriteAt(z[:n], off, fua && single); err != nil {
			return err
		}
		off += n
		length -= n
	}
	if fua && !single {
		return b.Flush()
	}
	return nil
}

// budget bounds the requests a connection runs at once, by count and by
// payload bytes. Only the connection's reader acquires; workers release.
type budget struct {
	mu       sync.Mutex
	freed    sync.Cond
	count    int
	bytes    int64
	maxCount int
	maxBytes int64
}

func (b *budget) init(maxCount int, maxBytes int64) {
	b.freed.L = &b.mu
	b.maxCount = maxCount
	b.maxBytes = maxBytes
}

// acquire waits for room for one request of n payload bytes. A request
// larger than the byte budget still runs, alone.
func (b *budget) acquire(n int64) {
	b.mu.Lock()
	for b.count >= b.maxCount || (b.count > 0 && b.bytes+n > b.maxBytes) {
		b.freed.Wait()
	}
	b.count++
	b.bytes += n
	b.mu.Unlock()
}

// tryAcquire is acquire when there is room now; false: nothing taken.
func (b *budget) tryAcquire(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.count >= b.maxCount || (b.count > 0 && b.bytes+n > b.maxBytes) {
		return false
	}
	b.count++
	b.bytes += n
	return true
}

func (b *budget) release(n int64) {
	b.mu.Lock()
	b.count--
	b.bytes -= n
	b.mu.Unlock()
	b.freed.Signal()
}

// Payload buffers are pooled by power-of-two size class (4 KiB and up), so
// a steady stream of 4 KiB requests allocates nothing.
const minBufferClass = 12

var bufferPools [bits.UintSize]sync.Pool

func bufferClass(n int) int {
	return max(bits.Len(uint(n-1)), minBufferClass)
}

// getBuffer returns a buffer of length n > 0. Its contents are stale.
func getBuffer(n int) *[]byte {
	class := bufferClass(n)
	if p, ok := bufferPools[class].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<class)
	return &b
}

func putBuffer(p *[]byte) {
	bufferPools[bufferClass(cap(*p))].Put(p)
}
