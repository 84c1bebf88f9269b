package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

const testExportSize = 1 << 20

func testOptions(t testing.TB) Options {
	return Options{Logger: zerolog.New(zerolog.NewTestWriter(t)).With().Timestamp().Logger()}
}

func oneExport(t testing.TB, opts Options) (*testServer, *memBackend) {
	t.Helper()
	b := newMemBackend(testExportSize)
	return startTestServer(t, opts, Export{Name: "DSA1", Description: "shadow set DSA1", Backend: b}), b
}

func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed + byte(i*7)
	}
	return p
}

func expectCode(t testing.TB, what string, r simpleReply, err error, want uint32) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if r.Error != want {
		t.Fatalf("%s: error %d, want %d", what, r.Error, want)
	}
}

// expectReply(c.do(...))(t, what, want) checks a reply's error code; Go
// passes a multi-value call only as a sole argument.
func expectReply(r simpleReply, err error) func(t testing.TB, what string, want uint32) simpleReply {
	return func(t testing.TB, what string, want uint32) simpleReply {
		t.Helper()
		expectCode(t, what, r, err, want)
		return r
	}
}

// gate holds backend calls until opened; it opens itself when the test
// ends so a failing test cannot leave Shutdown waiting on a held call.
type gate struct {
	ch      chan struct{}
	once    sync.Once
	reached chan struct{} // one token per call that reached the gate
}

func newGate() *gate {
	return &gate{ch: make(chan struct{}), reached: make(chan struct{}, 1024)}
}

// hold is a memBackend readGate/writeGate that holds every call.
func (g *gate) hold(int64) <-chan struct{} {
	g.reached <- struct{}{}
	return g.ch
}

// waitHeld waits until n more calls have reached the gate.
func (g *gate) waitHeld(t testing.TB, n int) {
	t.Helper()
	for i := range n {
		select {
		case <-g.reached:
		case <-time.After(5 * time.Second):
			t.Fatalf("only %d of %d backend calls reached the gate", i, n)
		}
	}
}

// expectReplies reads one successful reply per entry of want (cookie →
// the data a READ must return, nil for other requests), in any order.
// The held request, whose cookie is not in want, must not be among them.
func expectReplies(t *testing.T, c *testClient, want map[uint64][]byte) {
	t.Helper()
	for range len(want) {
		r := must(c.readReply())(t)
		w, ok := want[r.Cookie]
		if !ok {
			t.Fatalf("unexpected or duplicate reply cookie %d (the held request?)", r.Cookie)
		}
		delete(want, r.Cookie)
		if r.Error != 0 || !bytes.Equal(r.Data, w) {
			t.Fatalf("reply %d: error %d, data right: %v", r.Cookie, r.Error, bytes.Equal(r.Data, w))
		}
	}
}

// holdOffsetZero is a gate that holds only the calls at offset 0.
func (g *gate) holdOffsetZero(off int64) <-chan struct{} {
	if off == 0 {
		return g.hold(off)
	}
	return nil
}

func (g *gate) open() { g.once.Do(func() { close(g.ch) }) }

// openOnCleanup must be called after startTestServer, so that it runs
// before the server's shutdown (cleanups run last-in first-out).
func (g *gate) openOnCleanup(t testing.TB) { t.Cleanup(g.open) }

func TestGreetingAndGo(t *testing.T) {
	ts, _ := oneExport(t, testOptions(t))
	c := dialTest(t, "tcp", ts.addr)
	flags := must(c.readGreeting())(t)
	if flags != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("handshake flags %#x", flags)
	}
	check(t, c.sendClientFlags(flagCFixedNewstyle|flagCNoZeroes))
	info := must(c.infoOrGo(optGo, "DSA1"))(t)
	want := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagCanMultiConn)
	if info.Size != testExportSize || info.Flags != want {
		t.Fatalf("size %d flags %#x, want %d %#x", info.Size, info.Flags, testExportSize, want)
	}
	if !info.HaveBlockSize || info.MinBlock != 1 || info.PrefBlock != 4096 || info.MaxPayload != 32<<20 {
		t.Fatalf("block size %+v", info)
	}
	if info.HaveName || info.HaveDescription {
		t.Fatalf("name/description sent unasked: %+v", info)
	}
	r := must(c.do(0, cmdRead, 0, 4096, nil))(t)
	if r.Error != 0 || len(r.Data) != 4096 {
		t.Fatalf("read: %+v", r)
	}
}

func TestOptList(t *testing.T) {
	opts := testOptions(t)
	ts := startTestServer(t, opts,
		Export{Name: "DSA2", Backend: newMemBackend(4096)},
		Export{Name: "DSA1", Description: "first", Backend: newMemBackend(4096)})
	c := dialTest(t, "tcp", ts.addr)
	check(t, c.handshake(flagCFixedNewstyle))

	check(t, c.sendOption(optList, nil))
	replies := must(c.readOptReplies())(t)
	var got []string
	for _, r := range replies {
		if r.Opt != optList {
			t.Fatalf("reply for option %d", r.Opt)
		}
		if r.Type == repServer {
			n := binary.BigEndian.Uint32(r.Data)
			got = append(got, fmt.Sprintf("%s|%s", r.Data[4:4+n], r.Data[4+n:]))
		}
	}
	if fmt.Sprint(got) != "[DSA1|first DSA2|]" || replies[len(replies)-1].Type != repAck {
		t.Fatalf("list %q, final %#x", got, replies[len(replies)-1].Type)
	}

	// LIST takes no data: ERR_INVALID, and negotiation goes on.
	check(t, c.sendOption(optList, []byte("junk")))
	if r := must(c.readOptReply())(t); r.Type != repErrInvalid {
		t.Fatalf("LIST with data: reply %#x", r.Type)
	}
	must(c.infoOrGo(optGo, "DSA2"))(t)
	expectReply(c.do(0, cmdRead, 0, 512, nil))(t, "read after LIST", 0)
}

func TestOptInfoThenGo(t *testing.T) {
	ts, _ := oneExport(t, testOptions(t))
	c := dialTest(t, "tcp", ts.addr)
	check(t, c.handshake(flagCFixedNewstyle|flagCNoZeroes))

	all := []uint16{infoName, infoDescription, infoBlockSize, 0x7777 /* unknown: ignored */}
	info := must(c.infoOrGo(optInfo, "", all...))(t) // "" = the only export
	if !info.HaveName || info.Name != "DSA1" || !info.HaveDescription || info.Description != "shadow set DSA1" {
		t.Fatalf("INFO: %+v", info)
	}
	// INFO leaves us negotiating; an identical GO must report the same.
	goInfo := must(c.infoOrGo(optGo, "", all...))(t)
	if goInfo != info {
		t.Fatalf("GO reported %+v, INFO %+v", goInfo, info)
	}
	expectReply(c.do(0, cmdRead, 4096, 4096, nil))(t, "read after GO", 0)
}

func TestOptAbort(t *testing.T) {
	ts, b := oneExport(t, testOptions(t))
	c := dialTest(t, "tcp", ts.addr)
	check(t, c.handshake(flagCFixedNewstyle))
	check(t, c.sendOption(optAbort, []byte("ignored")))
	if r := must(c.readOptReply())(t); r.Opt != optAbort || r.Type != repAck {
		t.Fatalf("ABORT reply %+v", r)
	}
	check(t, c.expectClosed())
	if calls := b.Calls(); len(calls) != 0 {
		t.Fatalf("backend touched: %v", calls)
	}
}

func TestExportName(t *testing.T) {
	for _, tc := range []struct {
		name        string
		clientFlags uint32
		replyLen    int
	}{
		{"no_zeroes", flagCFixedNewstyle | flagCNoZeroes, 10},
		{"zeroes", flagCFixedNewstyle, 10 + 124},
		{"plain_newstyle", 0, 10 + 124}, // oldest clients: EXPORT_NAME only
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts, b := oneExport(t, testOptions(t))
			b.Fill(0, []byte("hello"))
			c := dialTest(t, "tcp", ts.addr)
			check(t, c.handshake(tc.clientFlags))
			check(t, c.sendOption(optExportName, []byte("DSA1")))
			reply := make([]byte, tc.replyLen)
			must(io.ReadFull(c.br, reply))(t)
			if size := binary.BigEndian.Uint64(reply); size != testExportSize {
				t.Fatalf("size %d", size)
			}
			if flags := binary.BigEndian.Uint16(reply[8:]); flags&tflagHasFlags == 0 {
				t.Fatalf("flags %#x", flags)
			}
			if !bytes.Equal(reply[10:], make([]byte, tc.replyLen-10)) {
				t.Fatalf("padding not zero")
			}
			r := must(c.do(0, cmdRead, 0, 5, nil))(t)
			if r.Error != 0 || string(r.Data) != "hello" {
				t.Fatalf("read after EXPORT_NAME: %+v", r)
			}
		})
	}
}

func TestExportNameUnknownCloses(t *testing.T) {
	ts, _ := oneExport(t, testOptions(t))
	c := dialTest(t, "tcp", ts.addr)
	check(t, c.handshake(flagCFixedNewstyle|flagCNoZeroes))
	check(t, c.sendOption(optExportName, []byte("nope")))
	check(t, c.expectClosed())
}

func TestPlainNewstyleOtherOptionCloses(t *testing.T) {
	ts, _ := oneExport(t, testOptions(t))
	c := dialTest(t, "tcp", ts.addr)
	check(t, c.handshake(0))
	check(t, c.sendOption(optList, nil))
	check(t, c.expectClosed())
}

func TestUnsupportedOptions(t *testing.T) {
	ts, _ := oneExport(t, testOptions(t))
	c := dialTest(t, "tcp", ts.addr)
	check(t, c.handshake(flagCFixedNewstyle|flagCNoZeroes))
	// Unknown option with data, STARTTLS, STRUCTURED_REPLY, SET_META_CONTEXT:
	// each gets ERR_UNSUP after its data is consumed.
	for _, opt := range []uint32{0x1234, optStartTLS, 8, 10, 11} {
		check(t, c.sendOption(opt, bytes.Repeat([]byte{0xee}, 300)))
		r := must(c.readOptReply())(t)
		if r.Opt != opt || r.Type != repErrUnsup {
			t.Fatalf("option %#x: reply %+v", opt, r)
		}
	}
	must(c.infoOrGo(optGo, "DSA1"))(t)
	expectReply(c.do(0, cmdRead, 0, 512, nil))(t, "read after ERR_UNSUP", 0)
}

func TestUnknownExportThenRetry(t *testing.T) {
	ts, _ := oneExport(t, testOptions(t))
	c := dialTest(t, "tcp", ts.addr)
	check(t, c.handshake(flagCFixedNewstyle|flagCNoZeroes))
	for _, opt := range []uint32{optInfo, optGo} {
		_, err := c.infoOrGo(opt, "DSA9")
		if optErrorType(err) != repErrUnknown {
			t.Fatalf("option %d for unknown export: %v", opt, err)
		}
	}
	must(c.infoOrGo(optGo, "DSA1"))(t)
	expectReply(c.do(0, cmdRead, 0, 512, nil))(t, "read after retry", 0)
}

func TestDefaultExportNeedsExactlyOne(t *testing.T) {
	ts := startTestServer(t, testOptions(t),
		Export{Name: "DSA1", Backend: newMemBackend(4096)},
		Export{Name: "DSA2", Backend: newMemBackend(8192)})
	c := dialTest(t, "tcp", ts.addr)
	check(t, c.handshake(flagCFixedNewstyle))
	if _, err := c.infoOrGo(optGo, ""); optErrorType(err) != repErrUnknown {
		t.Fatalf("default export with two exports: %v", err)
	}
	ts.RemoveExport("DSA1")
	info := must(c.infoOrGo(optGo, "", infoName))(t)
	if info.Name != "DSA2" || info.Size != 8192 {
		t.Fatalf("default export: %+v", info)
	}
}

func TestMalformedInfoRequests(t *testing.T) {
	ts, _ := oneExport(t, testOptions(t))
	c := dialTest(t, "tcp", ts.addr)
	check(t, c.handshake(flagCFixedNewstyle))
	good := infoRequestData("DSA1", infoName)
	for name, data := range map[string][]byte{
		"empty":           nil,
		"short name":      good[:6],
		"missing count":   good[:8],
		"extra byte":      append(append([]byte(nil), good...), 0),
		"missing info":    good[:len(good)-1],
		"name overflows":  {0xff, 0xff, 0xff, 0xff, 0, 0},
		"count too large": infoRequestData("DSA1", infoName)[:len(good)-2],
	} {
		for _, opt := range []uint32{optInfo, optGo} {
			check(t, c.sendOption(opt, data))
			if r := must(c.readOptReply())(t); r.Type != repErrInvalid {
				t.Fatalf("%s (option %d): reply %#x, want ERR_INVALID", name, opt, r.Type)
			}
		}
	}
	must(c.infoOrGo(optGo, "DSA1"))(t)
}

func TestHandshakeViolationsClose(t *testing.T) {
	ts, b := oneExport(t, testOptions(t))
	t.Run("unknown client flag", func(t *testing.T) {
		c := dialTest(t, "tcp", ts.addr)
		check(t, c.handshake(flagCFixedNewstyle|1<<5))
		check(t, c.expectClosed())
	})
	t.Run("bad option magic", func(t *testing.T) {
		c := dialTest(t, "tcp", ts.addr)
		check(t, c.handshake(flagCFixedNewstyle))
		check(t, c.write(make([]byte, 16)))
		check(t, c.expectClosed())
	})
	t.Run("option too long", func(t *testing.T) {
		c := dialTest(t, "tcp", ts.addr)
		check(t, c.handshake(flagCFixedNewstyle))
		h := binary.BigEndian.AppendUint64(nil, ihaveoptMagic)
		h = binary.BigEndian.AppendUint32(h, 0x1234)
		h = binary.BigEndian.AppendUint32(h, math.MaxUint32)
		check(t, c.write(h))
		check(t, c.expectClosed())
	})
	t.Run("bad request magic", func(t *testing.T) {
		c, _ := ts.goClient(t, "DSA1")
		check(t, c.write(make([]byte, 28)))
		check(t, c.expectClosed())
	})
	if calls := b.Calls(); len(calls) != 0 {
		t.Fatalf("backend touched: %v", calls)
	}
}

func TestHandshakeTimeout(t *testing.T) {
	opts := testOptions(t)
	opts.HandshakeTimeout = 200 * time.Millisecond
	ts, _ := oneExport(t, opts)
	c := dialTest(t, "tcp", ts.addr)
	must(c.readGreeting())(t)
	check(t, c.expectClosed()) // never sent the client flags
}

// TestRejectedRequests covers the errors the protocol prescribes for
// well-formed but invalid requests: each gets its error, a rejected WRITE's
// payload is consumed, the connection keeps working, and the backend is
// never called.
func TestRejectedRequests(t *testing.T) {
	opts := testOptions(t)
	opts.MaxRequest = 64 << 10
	ts, b := oneExport(t, opts)
	c, _ := ts.goClient(t, "DSA1")
	const size = testExportSize
	payload := func(n int) []byte { return bytes.Repeat([]byte{0xab}, n) }

	for _, tc := range []struct {
		name   string
		flags  uint16
		typ    uint16
		offset uint64
		length uint32
		want   uint32
	}{
		{"read past end", 0, cmdRead, size - 4095, 4096, errInval},
		{"read starting past end", 0, cmdRead, size + 1, 1, errInval},
		{"read offset overflow", 0, cmdRead, math.MaxUint64 - 10, 4096, errInval},
		{"write past end", 0, cmdWrite, size - 1, 2, errNoSpc},
		{"write offset overflow", 0, cmdWrite, math.MaxUint64, 512, errNoSpc},
		{"trim past end", 0, cmdTrim, size, 1, errInval},
		{"trim huge", 0, cmdTrim, 0, math.MaxUint32, errInval},
		{"zero past end", 0, cmdWriteZeroes, size - 1, 4096, errNoSpc},
		{"read over max payload", 0, cmdRead, 0, 64<<10 + 1, errInval},
		{"write over max payload", 0, cmdWrite, 0, 64<<10 + 1, errInval},
		{"zero length read", 0, cmdRead, 0, 0, errInval},
		{"zero length write", 0, cmdWrite, 0, 0, errInval},
		{"zero length trim", 0, cmdTrim, 0, 0, errInval},
		{"flush with range", 0, cmdFlush, 0, 4096, errInval},
		{"unknown command", 0, 0x42, 0, 4096, errInval},
		{"cache not advertised", 0, 5, 0, 4096, errInval},
		{"block status not negotiated", 0, 7, 0, 4096, errInval},
		{"read with DF", 1 << 2, cmdRead, 0, 4096, errInval},
		{"write with NO_HOLE", cmdFlagNoHole, cmdWrite, 0, 4096, errInval},
		{"zero with FAST_ZERO", 1 << 4, cmdWriteZeroes, 0, 4096, errInval},
		{"unknown flag", 1 << 15, cmdFlush, 0, 0, errInval},
	} {
		var data []byte
		if tc.typ == cmdWrite {
			data = payload(int(tc.length))
		}
		r, err := c.do(tc.flags, tc.typ, tc.offset, tc.length, data)
		expectCode(t, tc.name, r, err, tc.want)
		// The stream is still in sync: a normal request works.
		expectReply(c.do(0, cmdRead, 0, 512, nil))(t, tc.name+": next read", 0)
	}
	if calls := b.Calls("write", "trim", "zero", "flush"); len(calls) != 0 {
		t.Fatalf("rejected requests reached the backend: %v", calls)
	}
	for _, call := range b.Calls("read") {
		if call.Off != 0 || call.Length != 512 {
			t.Fatalf("rejected read reached the backend: %v", call)
		}
	}
}

// TestOversizedWrite: up to 64 MiB a rejected payload is drained and the
// connection survives; beyond that the server hangs up rather than read it.
func TestOversizedWrite(t *testing.T) {
	opts := testOptions(t)
	opts.MaxRequest = 4096
	ts, b := oneExport(t, opts)
	c, info := ts.goClient(t, "DSA1")
	if info.MaxPayload != 4096 {
		t.Fatalf("advertised max payload %d", info.MaxPayload)
	}
	r, err := c.do(0, cmdWrite, 0, 48<<20, make([]byte, 48<<20))
	expectCode(t, "48 MiB write", r, err, errInval)
	expectReply(c.do(0, cmdRead, 0, 4096, nil))(t, "read after drained write", 0)

	check(t, c.sendRequest(0, cmdWrite, 1, 0, 64<<20+1, nil))
	check(t, c.expectClosed())
	if calls := b.Calls("write"); len(calls) != 0 {
		t.Fatalf("oversized writes reached the backend: %v", calls)
	}
}

func TestReadOnlyExport(t *testing.T) {
	b := newMemBackend(testExportSize)
	b.Fill(0, []byte("ro"))
	ts := startTestServer(t, testOptions(t), Export{Name: "RO", Backend: b, ReadOnly: true})
	c, info := ts.goClient(t, "RO")
	if info.Flags&tflagReadOnly == 0 {
		t.Fatalf("flags %#x lack READ_ONLY", info.Flags)
	}
	r, err := c.do(0, cmdWrite, 0, 512, make([]byte, 512))
	expectCode(t, "write", r, err, errPerm)
	r, err = c.do(0, cmdTrim, 0, 512, nil)
	expectCode(t, "trim", r, err, errPerm)
	r, err = c.do(cmdFlagNoHole, cmdWriteZeroes, 0, 512, nil)
	expectCode(t, "zero", r, err, errPerm)
	r, err = c.do(0, cmdWrite, testExportSize, 512, make([]byte, 512))
	expectCode(t, "write past end", r, err, errPerm)
	r = must(c.do(0, cmdRead, 0, 2, nil))(t)
	if r.Error != 0 || string(r.Data) != "ro" {
		t.Fatalf("read: %+v", r)
	}
	expectReply(c.do(0, cmdFlush, 0, 0, nil))(t, "flush", 0)
	if calls := b.Calls("write", "trim", "zero"); len(calls) != 0 {
		t.Fatalf("read-only backend modified: %v", calls)
	}
}

func TestWriteReadTrimZero(t *testing.T) {
	ts, b := oneExport(t, testOptions(t))
	c, _ := ts.goClient(t, "DSA1")
	data := pattern(3*4096, 1)
	expectReply(c.do(0, cmdWrite, 8192, uint32(len(data)), data))(t, "write", 0)
	r := must(c.do(0, cmdRead, 8192, uint32(len(data)), nil))(t)
	if !bytes.Equal(r.Data, data) {
		t.Fatal("read back differs from written data")
	}

	expectReply(c.do(0, cmdTrim, 8192, 4096, nil))(t, "trim", 0)
	expectReply(c.do(0, cmdWriteZeroes, 12288, 100, nil))(t, "zero", 0)
	expectReply(c.do(cmdFlagNoHole, cmdWriteZeroes, 16384, 4096, nil))(t, "zero no-hole", 0)
	r = must(c.do(0, cmdRead, 8192, uint32(len(data)), nil))(t)
	want := append(make([]byte, 4096), make([]byte, 100)...)
	want = append(want, data[4096+100:8192]...)
	want = append(want, make([]byte, 4096)...)
	if !bytes.Equal(r.Data, want) {
		t.Fatal("trimmed/zeroed ranges do not read back as zeroes")
	}
	// NO_HOLE must not reach Zero, which may deallocate: it is written.
	if z := b.Calls("zero"); len(z) != 1 || z[0].Off != 12288 || z[0].Length != 100 {
		t.Fatalf("zero calls %v", z)
	}
	w := b.Calls("write")
	if last := w[len(w)-1]; last.Off != 16384 || last.Length != 4096 || !bytes.Equal(last.Data, make([]byte, 4096)) {
		t.Fatalf("NO_HOLE zero went to %v", last)
	}
}

func TestLargeNoHoleZeroIsChunkedAndFlushed(t *testing.T) {
	opts := testOptions(t)
	b := newMemBackend(4 << 20)
	b.Fill(0, bytes.Repeat([]byte{0xff}, 4<<20))
	ts := startTestServer(t, opts, Export{Name: "DSA1", Backend: b})
	c, _ := ts.goClient(t, "DSA1")
	expectReply(c.do(cmdFlagNoHole|cmdFlagFUA, cmdWriteZeroes, 1, 3<<20, nil))(t, "zero", 0)
	if got := b.Bytes(); got[0] != 0xff || !bytes.Equal(got[1:1+3<<20], make([]byte, 3<<20)) || got[1+3<<20] != 0xff {
		t.Fatal("range not zeroed exactly")
	}
	calls := b.Calls("write", "flush")
	if len(calls) != 4 || calls[3].Op != "flush" {
		t.Fatalf("calls %v, want three writes then a flush", calls)
	}
}

func TestFUAPassedThrough(t *testing.T) {
	ts, b := oneExport(t, testOptions(t))
	c, _ := ts.goClient(t, "DSA1")
	expectReply(c.do(0, cmdWrite, 0, 512, make([]byte, 512)))(t, "write", 0)
	expectReply(c.do(cmdFlagFUA, cmdWrite, 512, 512, make([]byte, 512)))(t, "write fua", 0)
	expectReply(c.do(0, cmdWriteZeroes, 0, 512, nil))(t, "zero", 0)
	expectReply(c.do(cmdFlagFUA, cmdWriteZeroes, 512, 512, nil))(t, "zero fua", 0)
	expectReply(c.do(cmdFlagFUA|cmdFlagNoHole, cmdWriteZeroes, 1024, 512, nil))(t, "zero fua no-hole", 0)
	expectReply(c.do(cmdFlagFUA, cmdTrim, 0, 512, nil))(t, "trim fua", 0)
	expectReply(c.do(cmdFlagFUA, cmdRead, 0, 512, nil))(t, "read fua (ignored)", 0)
	expectReply(c.do(cmdFlagFUA, cmdFlush, 0, 0, nil))(t, "flush fua (ignored)", 0)

	var got []string
	for _, call := range b.Calls("write", "zero", "trim", "flush") {
		got = append(got, call.String())
	}
	want := []string{
		"write(off=0 len=512 fua=false)",
		"write(off=512 len=512 fua=true)",
		"zero(off=0 len=512 fua=false)",
		"zero(off=512 len=512 fua=true)",
		"write(off=1024 len=512 fua=true)",
		"trim(off=0 len=512 fua=false)",
		"flush(off=0 len=0 fua=false)", // trim's FUA
		"flush(off=0 len=0 fua=false)", // the FLUSH
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("backend calls\n got %q\nwant %q", got, want)
	}
}

func TestBackendErrorsMapped(t *testing.T) {
	b := newMemBackend(testExportSize)
	fail := map[int64]error{
		4096:  fmt.Errorf("member full: %w", syscall.ENOSPC),
		8192:  syscall.EPERM,
		12288: syscall.EINVAL,
		16384: errors.New("disk on fire"),
		20480: syscall.EROFS,
	}
	b.fail = func(op string, off int64) error { return fail[off] }
	ts := startTestServer(t, testOptions(t), Export{Name: "DSA1", Backend: b})
	c, _ := ts.goClient(t, "DSA1")
	for off, want := range map[uint64]uint32{4096: errNoSpc, 8192: errPerm, 12288: errInval, 16384: errIO, 20480: errPerm} {
		r, err := c.do(0, cmdWrite, off, 512, make([]byte, 512))
		expectCode(t, fmt.Sprintf("write at %d", off), r, err, want)
		// A failed READ sends no payload: the next reply must parse.
		r, err = c.do(0, cmdRead, off, 512, nil)
		expectCode(t, fmt.Sprintf("read at %d", off), r, err, want)
		if r.Data != nil {
			t.Fatalf("failed read carried data")
		}
	}
	expectReply(c.do(0, cmdRead, 0, 512, nil))(t, "read ok", 0)
	if b.quickWrites.Load() == 0 {
		t.Fatal("no write took the quick path: its error mapping went untested")
	}
}

// TestConcurrentRequestsOutOfOrder holds the first READ in the backend
// while 100 more requests complete; their replies must come back first,
// each matched to its cookie with the right data, and the held one last.
func TestConcurrentRequestsOutOfOrder(t *testing.T) {
	b := newMemBackend(testExportSize)
	b.Fill(0, pattern(testExportSize, 3))
	release := newGate()
	b.readGate = release.holdOffsetZero
	ts := startTestServer(t, testOptions(t), Export{Name: "DSA1", Backend: b})
	release.openOnCleanup(t)
	c, _ := ts.goClient(t, "DSA1")
	// Writes go to the upper half of the device, reads to the lower.
	const n = 100
	expect := map[uint64][]byte{} // cookie → data a READ must return (nil: a write)
	check(t, c.sendRequest(0, cmdRead, 0, 0, 4096, nil))
	for i := uint64(1); i <= n; i++ {
		off := i * 4096
		if i%2 == 0 {
			data := pattern(4096, byte(i))
			expect[i] = nil
			check(t, c.sendRequest(0, cmdWrite, i, off+testExportSize/2, 4096, data))
		} else {
			expect[i] = pattern(testExportSize, 3)[off : off+4096]
			check(t, c.sendRequest(0, cmdRead, i, off, 4096, nil))
		}
	}
	expectReplies(t, c, expect)
	release.open()
	r := must(c.readReply())(t)
	if r.Cookie != 0 || r.Error != 0 || !bytes.Equal(r.Data, pattern(testExportSize, 3)[:4096]) {
		t.Fatalf("held read reply: cookie %d error %d", r.Cookie, r.Error)
	}
	for i := uint64(2); i <= n; i += 2 {
		off := int(i*4096 + testExportSize/2)
		if !bytes.Equal(b.Bytes()[off:off+4096], pattern(4096, byte(i))) {
			t.Fatalf("write %d not applied", i)
		}
	}
}

// TestInFlightBounded: with MaxInFlight 4 the server has at most 4
// requests in the backend, and resumes reading when one completes.
func TestInFlightBounded(t *testing.T) {
	b := newMemBackend(testExportSize)
	release := newGate()
	b.readGate = release.hold
	opts := testOptions(t)
	opts.MaxInFlight = 4
	ts := startTestServer(t, opts, Export{Name: "DSA1", Backend: b})
	release.openOnCleanup(t)
	c, _ := ts.goClient(t, "DSA1")
	for i := range uint64(10) {
		check(t, c.sendRequest(0, cmdRead, i, i*512, 512, nil))
	}
	release.waitHeld(t, 4)
	time.Sleep(200 * time.Millisecond) // give an unbounded server time to overshoot
	if extra := len(release.reached); extra != 0 {
		t.Fatalf("%d requests in the backend, want 4", 4+extra)
	}
	release.open()
	for range 10 {
		expectReply(c.readReply())(t, "read", 0)
	}
}

// TestFlushCoversAcknowledgedWrites: the backend flush for a FLUSH starts
// only after every write acknowledged before it, on any connection.
func TestFlushCoversAcknowledgedWrites(t *testing.T) {
	ts, b := oneExport(t, testOptions(t))
	c1, _ := ts.goClient(t, "DSA1")
	c2, _ := ts.goClient(t, "DSA1")
	for i := range uint64(20) {
		check(t, c1.sendRequest(0, cmdWrite, i, i*4096, 4096, pattern(4096, byte(i))))
	}
	for range 20 {
		expectReply(c1.readReply())(t, "write", 0)
	}
	expectReply(c2.do(0, cmdFlush, 0, 0, nil))(t, "flush on the other connection", 0)
	calls := b.Calls("write", "flush")
	if len(calls) != 21 || calls[20].Op != "flush" {
		t.Fatalf("calls %v: flush is not after the acknowledged writes", calls)
	}
	// Multi-conn: the other connection sees the writes.
	r := must(c2.do(0, cmdRead, 19*4096, 4096, nil))(t)
	if !bytes.Equal(r.Data, pattern(4096, 19)) {
		t.Fatal("write on one connection not visible on another")
	}
}

// TestDisconnectFinishesInFlight: after NBD_CMD_DISC the server still runs
// and answers what it had read, then closes.
func TestDisconnectFinishesInFlight(t *testing.T) {
	b := newMemBackend(testExportSize)
	release := newGate()
	b.writeGate = release.hold
	ts := startTestServer(t, testOptions(t), Export{Name: "DSA1", Backend: b})
	release.openOnCleanup(t)
	c, _ := ts.goClient(t, "DSA1")
	check(t, c.sendRequest(0, cmdWrite, 7, 0, 4, []byte("data")))
	check(t, c.sendRequest(0, cmdDisc, 8, 0, 0, nil))
	release.waitHeld(t, 1)
	release.open()
	r := must(c.readReply())(t)
	if r.Cookie != 7 || r.Error != 0 {
		t.Fatalf("reply %+v", r)
	}
	check(t, c.expectClosed())
	if string(b.Bytes()[:4]) != "data" {
		t.Fatal("write before DISC lost")
	}
}

// TestRemoveExport: removal closes the export's connections after their
// in-flight requests, waits for that, and hides the export from new
// clients.
func TestRemoveExport(t *testing.T) {
	b := newMemBackend(testExportSize)
	release := newGate()
	b.writeGate = release.hold
	ts := startTestServer(t, testOptions(t), Export{Name: "DSA1", Backend: b}, Export{Name: "DSA2", Backend: newMemBackend(4096)})
	release.openOnCleanup(t)
	c, _ := ts.goClient(t, "DSA1")
	other, _ := ts.goClient(t, "DSA2")
	check(t, c.sendRequest(0, cmdWrite, 1, 0, 4, []byte("last")))
	release.waitHeld(t, 1)

	removed := make(chan struct{})
	go func() { ts.RemoveExport("DSA1"); close(removed) }()
	select {
	case <-removed:
		t.Fatal("RemoveExport returned while a write was in flight")
	case <-time.After(100 * time.Millisecond):
	}
	release.open()
	select {
	case <-removed:
	case <-time.After(5 * time.Second):
		t.Fatal("RemoveExport did not return")
	}
	expectReply(c.readReply())(t, "in-flight write", 0)
	check(t, c.expectClosed())

	expectReply(other.do(0, cmdRead, 0, 512, nil))(t, "other export unaffected", 0)
	c3 := dialTest(t, "tcp", ts.addr)
	if _, err := c3.connectGo("DSA1"); optErrorType(err) != repErrUnknown {
		t.Fatalf("GO after removal: %v", err)
	}
	check(t, ts.AddExport(Export{Name: "DSA1", Backend: b}))
	must(c3.infoOrGo(optGo, "DSA1"))(t)
}

func TestShutdownFinishesInFlight(t *testing.T) {
	b := newMemBackend(testExportSize)
	release := newGate()
	b.writeGate = release.hold
	ts := startTestServer(t, testOptions(t), Export{Name: "DSA1", Backend: b})
	release.openOnCleanup(t)

	c, _ := ts.goClient(t, "DSA1")
	idle := dialTest(t, "tcp", ts.addr)
	check(t, idle.handshake(flagCFixedNewstyle)) // still negotiating
	check(t, c.sendRequest(0, cmdWrite, 1, 0, 4, []byte("last")))
	release.waitHeld(t, 1)

	shut := make(chan error, 1)
	go func() { shut <- ts.Shutdown(context.Background()) }()
	check(t, idle.expectClosed())
	release.open()
	expectReply(c.readReply())(t, "in-flight write", 0)
	check(t, c.expectClosed())
	check(t, <-shut)
	if string(b.Bytes()[:4]) != "last" {
		t.Fatal("in-flight write lost")
	}
	// The cleanup checks that Serve returned ErrServerClosed.
	if err := ts.Serve(must(net.Listen("tcp", "127.0.0.1:0"))(t)); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve after Shutdown: %v", err)
	}
}

func TestShutdownDeadline(t *testing.T) {
	b := newMemBackend(testExportSize)
	release := newGate()
	b.writeGate = release.hold
	// The cleanup opens the gate, then shuts down again, which waits for
	// the abandoned write, so nothing logs after the test ends.
	ts := startTestServer(t, testOptions(t), Export{Name: "DSA1", Backend: b})
	release.openOnCleanup(t)

	c, _ := ts.goClient(t, "DSA1")
	check(t, c.sendRequest(0, cmdWrite, 1, 0, 4, []byte("last")))
	release.waitHeld(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := ts.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v", err)
	}
	check(t, c.expectClosed()) // closed forcibly, no reply
}

func TestAddExportValidation(t *testing.T) {
	s := NewServer(Options{})
	b := newMemBackend(4096)
	check(t, s.AddExport(Export{Name: "DSA1", Backend: b}))
	for name, e := range map[string]Export{
		"duplicate":   {Name: "DSA1", Backend: b},
		"empty name":  {Backend: b},
		"nil backend": {Name: "DSA2"},
		"NUL in name": {Name: "DS\x00A", Backend: b},
		"long name":   {Name: string(bytes.Repeat([]byte("x"), 4097)), Backend: b},
	} {
		if err := s.AddExport(e); err == nil {
			t.Errorf("%s: AddExport accepted %+v", name, e)
		}
	}
	s.RemoveExport("nope") // no-op
}

func TestErrnoMapping(t *testing.T) {
	for err, want := range map[error]uint32{
		syscall.ENOSPC:                         errNoSpc,
		fmt.Errorf("x: %w", syscall.EDQUOT):    errNoSpc,
		syscall.EPERM:                          errPerm,
		fmt.Errorf("x: %w", syscall.EINVAL):    errInval,
		syscall.EIO:                            errIO,
		io.ErrUnexpectedEOF:                    errIO,
		fmt.Errorf("x: %w", syscall.EROFS):     errPerm,
		fmt.Errorf("x: %w", syscall.ESHUTDOWN): errShutdn,
	} {
		if got := errno(err); got != want {
			t.Errorf("errno(%v) = %d, want %d", err, got, want)
		}
	}
}

// ackBackend is a memBackend that refuses to acknowledge while refuse is
// set (nbd.Acknowledger), as a fenced cluster host does.
type ackBackend struct {
	*memBackend
	refuse atomic.Bool
}

func (a *ackBackend) Acknowledge() error {
	if a.refuse.Load() {
		return errors.New("lease lost")
	}
	return nil
}

// TestAcknowledgerRefuses: with the backend refusing to acknowledge, a
// write that reached it is answered EIO (and so are flush, trim and zero),
// while reads are still answered.
func TestAcknowledgerRefuses(t *testing.T) {
	b := &ackBackend{memBackend: newMemBackend(1 << 20)}
	b.noQuick = true
	ts := startTestServer(t, testOptions(t), Export{Name: "DSA1", Backend: b})
	c, _ := ts.goClient(t, "DSA1")
	data := pattern(4096, 3)
	expectReply(c.do(0, cmdWrite, 0, 4096, data))(t, "write acknowledged", 0)
	b.refuse.Store(true)
	expectReply(c.do(0, cmdWrite, 4096, 4096, data))(t, "write not acknowledged", errIO)
	expectReply(c.do(0, cmdFlush, 0, 0, nil))(t, "flush not acknowledged", errIO)
	expectReply(c.do(0, cmdTrim, 8192, 4096, nil))(t, "trim not acknowledged", errIO)
	expectReply(c.do(0, cmdWriteZeroes, 8192, 4096, nil))(t, "zero not acknowledged", errIO)
	// (The refused write reached the backend: the refusal is at the reply.)
	if r := must(c.do(0, cmdRead, 4096, 4096, nil))(t); !bytes.Equal(r.Data, data) {
		t.Fatal("read with acknowledgements refused did not return the data")
	}
	if w := b.Calls("write"); len(w) != 2 {
		t.Fatalf("%d writes reached the backend, want 2 (refusal is at the reply)", len(w))
	}
}
