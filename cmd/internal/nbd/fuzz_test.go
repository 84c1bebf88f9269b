package nbd

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

const (
	fuzzExportSize = 64 << 10
	fuzzMaxRequest = 4096 // the smallest allowed, so oversized requests are cheap to build
	fuzzTimeout    = 10 * time.Second
)

// fuzzServer has a writable export and a read-only one on separate
// recording backends.
func fuzzServer(t *testing.T) (s *Server, rw, ro *memBackend) {
	rw, ro = newMemBackend(fuzzExportSize), newMemBackend(fuzzExportSize)
	s = NewServer(Options{MaxRequest: fuzzMaxRequest, MaxInFlight: 8, HandshakeTimeout: fuzzTimeout})
	check(t, s.AddExport(Export{Name: "DSA1", Backend: rw}))
	check(t, s.AddExport(Export{Name: "RO", Backend: ro, ReadOnly: true}))
	return s, rw, ro
}

// feed runs one server connection over net.Pipe: optionally an OPT_GO
// handshake to DSA1, then input, then the client hangs up. Replies are
// drained concurrently, since net.Pipe has no buffer. The server must
// finish (no hang) within fuzzTimeout; a panic fails the fuzz run by
// itself.
func feed(t *testing.T, s *Server, goFirst bool, input []byte) {
	cli, srv := net.Pipe()
	defer cli.Close()
	cli.SetDeadline(time.Now().Add(fuzzTimeout))
	c := s.startConn(srv)

	client := newTestClient(cli)
	if goFirst {
		if _, err := client.connectGo("DSA1"); err != nil {
			t.Fatalf("handshake: %v", err)
		}
	}
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		io.Copy(io.Discard, client.br)
	}()
	// Write returns once the server has read everything, or fails when
	// it has closed; either is fine.
	client.write(input)
	cli.Close()

	select {
	case <-c.done:
	case <-time.After(fuzzTimeout):
		t.Fatalf("server connection still running %v after the client hung up", fuzzTimeout)
	}
	<-drained
}

// expectedMutation is a well-formed, in-range request that may change the
// device, decoded independently of the server from the fuzz input.
type expectedMutation struct {
	typ         uint16
	flags       uint16
	off, length int64
	payload     []byte
}

// wellFormedMutations decodes input as the server should, as far as the
// framing goes, and returns the mutating requests the specification lets
// reach a device of the given size.
func wellFormedMutations(input []byte, size uint64) []expectedMutation {
	var out []expectedMutation
	for len(input) >= 28 {
		if binary.BigEndian.Uint32(input) != requestMagic {
			break
		}
		flags := binary.BigEndian.Uint16(input[4:])
		typ := binary.BigEndian.Uint16(input[6:])
		off := binary.BigEndian.Uint64(input[16:])
		length := uint64(binary.BigEndian.Uint32(input[24:]))
		input = input[28:]
		inRange := length > 0 && length <= size && off <= size-length
		m := expectedMutation{typ: typ, flags: flags, off: int64(off), length: int64(length)}
		switch typ {
		case cmdDisc:
			return out
		case cmdWrite:
			if length > uint64(len(input)) {
				return out // payload never completed: cannot have run
			}
			m.payload, input = input[:length], input[length:]
			if flags&^cmdFlagFUA == 0 && inRange && length <= fuzzMaxRequest {
				out = append(out, m)
			}
		case cmdTrim:
			if flags&^cmdFlagFUA == 0 && inRange {
				out = append(out, m)
			}
		case cmdWriteZeroes:
			if flags&^(cmdFlagFUA|cmdFlagNoHole) == 0 && inRange {
				out = append(out, m)
			}
		}
	}
	return out
}

// checkCalls fails unless every backend call was in range and every
// modification is explained by one of the allowed requests (nil: none).
func checkCalls(t *testing.T, b *memBackend, allowed []expectedMutation, anyInRange bool) {
	t.Helper()
	for _, c := range b.Calls() {
		if c.Off < 0 || c.Length < 0 || c.Off > b.Size()-c.Length {
			t.Fatalf("out-of-range backend call %v", c)
		}
		if c.Op == "read" || c.Op == "flush" || anyInRange {
			continue
		}
		if !explained(c, allowed) {
			t.Fatalf("backend call %v matches no well-formed request", c)
		}
	}
}

func explained(c backendCall, allowed []expectedMutation) bool {
	for _, m := range allowed {
		switch {
		case c.Op == "write" && m.typ == cmdWrite:
			if c.Off == m.off && bytes.Equal(c.Data, m.payload) && c.FUA == (m.flags&cmdFlagFUA != 0) {
				return true
			}
		case c.Op == "write" && m.typ == cmdWriteZeroes && m.flags&cmdFlagNoHole != 0:
			if c.Off >= m.off && c.Off+c.Length <= m.off+m.length && bytes.Count(c.Data, []byte{0}) == len(c.Data) {
				return true
			}
		case c.Op == "trim" && m.typ == cmdTrim, c.Op == "zero" && m.typ == cmdWriteZeroes && m.flags&cmdFlagNoHole == 0:
			if c.Off == m.off && c.Length == m.length {
				return true
			}
		}
	}
	return false
}

// encodeRequest encodes one request for the seed corpus.
func encodeRequest(flags, typ uint16, cookie, off uint64, length uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, requestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	return append(b, payload...)
}

func concat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// FuzzRequests feeds arbitrary bytes to the transmission phase, after a
// valid OPT_GO. The server must not panic or hang, and the backend may
// only change through well-formed, in-range WRITE, TRIM and WRITE_ZEROES.
func FuzzRequests(f *testing.F) {
	f.Add(concat(
		encodeRequest(0, cmdWrite, 1, 0, 4, []byte("abcd")),
		encodeRequest(cmdFlagFUA, cmdWrite, 2, fuzzExportSize-4, 4, []byte("wxyz")),
		encodeRequest(0, cmdRead, 3, 0, 4096, nil),
		encodeRequest(0, cmdFlush, 4, 0, 0, nil),
		encodeRequest(cmdFlagFUA, cmdTrim, 5, 4096, 4096, nil),
		encodeRequest(cmdFlagNoHole, cmdWriteZeroes, 6, 100, 5000, nil),
		encodeRequest(0, cmdWriteZeroes, 7, 0, fuzzExportSize, nil),
		encodeRequest(0, cmdDisc, 8, 0, 0, nil),
	))
	f.Add(concat(
		encodeRequest(0, cmdWrite, 1, fuzzExportSize-1, 2, []byte("no")), // past end: payload drained
		encodeRequest(0, cmdWrite, 2, 0, fuzzMaxRequest+1, make([]byte, fuzzMaxRequest+1)),
		encodeRequest(cmdFlagNoHole, cmdWrite, 3, 0, 2, []byte("xx")), // bad flag
		encodeRequest(0, 0x42, 4, 0, 2, nil),
		encodeRequest(0, cmdWrite, 5, 8, 2, []byte("ok")),
	))
	f.Add(concat(encodeRequest(0, cmdRead, 1, 0, 512, nil), []byte("garbage after")))
	f.Add(encodeRequest(0, cmdWrite, 1, 0, 1000, []byte("short payload")))
	f.Add(encodeRequest(0, cmdWrite, 1, 0, 0xffffffff, nil))
	f.Add(encodeRequest(0, cmdTrim, 1, 0xffffffffffffff00, 0x200, nil))
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, input []byte) {
		s, rw, ro := fuzzServer(t)
		feed(t, s, true, input)
		checkCalls(t, rw, wellFormedMutations(input, fuzzExportSize), false)
		checkCalls(t, ro, nil, false)
	})
}

// FuzzNegotiation feeds arbitrary bytes from the first byte the client
// sends. The server must not panic or hang, must never touch the read-only
// export's data, and every backend call must be in range (input that
// negotiates successfully may go on to write).
func FuzzNegotiation(f *testing.F) {
	flags := func(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
	option := func(opt uint32, data []byte) []byte {
		b := binary.BigEndian.AppendUint64(nil, ihaveoptMagic)
		b = binary.BigEndian.AppendUint32(b, opt)
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		return append(b, data...)
	}
	fixed := flags(flagCFixedNewstyle | flagCNoZeroes)
	f.Add(concat(fixed, option(optGo, infoRequestData("DSA1", infoBlockSize)), encodeRequest(0, cmdWrite, 1, 0, 2, []byte("hi"))))
	f.Add(concat(fixed, option(optList, nil), option(optInfo, infoRequestData("RO", infoName, infoDescription)), option(optAbort, nil)))
	f.Add(concat(fixed, option(0x1234, []byte("data")), option(optGo, infoRequestData("nope")), option(optGo, []byte{0, 0, 0, 9})))
	f.Add(concat(flags(0), option(optExportName, []byte("RO")), encodeRequest(0, cmdWrite, 1, 0, 2, []byte("no"))))
	f.Add(concat(fixed, option(optExportName, []byte("DSA1")), encodeRequest(0, cmdTrim, 1, 0, 4096, nil)))
	f.Add(concat(flags(1<<7), option(optList, nil)))
	f.Add(concat(fixed, []byte("IHAVEOPX"), []byte{0, 0, 0, 3, 0, 0, 0, 0}))
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, input []byte) {
		s, rw, ro := fuzzServer(t)
		feed(t, s, false, input)
		checkCalls(t, rw, nil, true)
		for _, c := range ro.Calls("write", "trim", "zero") {
			t.Fatalf("read-only export modified: %v", c)
		}
		checkCalls(t, ro, nil, true)
	})
}
