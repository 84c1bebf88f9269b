// Package wire owns the frame format of the host-to-host HBMM stream: the
// bit-set requests a writer sends to a set's master hosts, the masters'
// replies, rollbacks, and copies of whole bitmaps.
//
// A frame on the stream is
//
//	uint32 big-endian length L (1 <= L <= MaxFrame), then L bytes:
//	u8 version (Version), u8 kind, then the kind's fields in a fixed order,
//	integers as minimal uvarints, strings and byte slices as a uvarint
//	length and the bytes.
//
// Every frame carries its version so that hosts of adjacent versions can
// tell "newer than me" (ErrVersion) from "garbage" (ErrMalformed) during a
// rolling upgrade. Decoding trusts nothing: a frame is accepted only if it is
// exactly what AppendFrame would write for the decoded Frame, so each Frame
// has one encoding, and a peer cannot smuggle state through padding,
// non-minimal varints or fields its kind does not carry.
package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

const (
	// Version is the frame format this build writes and reads.
	Version = 1
	// MaxFrame bounds what a peer can make us allocate for one frame; it
	// leaves room for the bitmap of a busy multi-TiB volume.
	MaxFrame = 4 << 20
	// MaxRanges bounds the ranges of one bit-set, so that one request's
	// work on the master stays small.
	MaxRanges = 4096
	// MaxString is the longest host, set, writer or error text a frame
	// may carry.
	MaxString = 255
	// MaxChunk is the largest chunk number a range may name: 2^40 chunks
	// of the smallest chunk size is 4 PiB, past any volume we serve, and the
	// bound keeps a hostile range from naming chunks no byte offset reaches.
	MaxChunk = 1<<40 - 1
)

// Errors returned by Decode, ReadFrame and AppendFrame, wrapped with the
// detail. Callers test them with errors.Is.
var (
	// ErrVersion reports a frame of a version this build does not speak.
	ErrVersion = errors.New("wire: unknown frame version")
	// ErrMalformed reports a frame that is not the canonical encoding of a
	// valid Frame: bad length, unknown kind, truncated or trailing bytes,
	// a field out of bounds, or a field its kind does not carry.
	ErrMalformed = errors.New("wire: malformed frame")
)

// Kind says what a frame asks or answers.
type Kind uint8

const (
	// KindHello is the first frame each way: Host (the sender) and Inc
	// (its incarnation, so a restarted peer is told apart).
	KindHello Kind = 1
	// KindBitSet (writer → master) asks to set Ranges in Writer's bitmap
	// of Set.
	KindBitSet Kind = 2
	// KindAck (master → writer) answers the BitSet, Rollback or Reset
	// numbered Seq: applied if Err is empty, refused with Err's text otherwise.
	KindAck Kind = 3
	// KindRollback (writer → master) asks to clear the chunks the BitSet
	// numbered Seq newly set in Writer's bitmap of Set.
	KindRollback Kind = 4
	// KindFetch (any → master) asks for a copy of Writer's bitmap of Set.
	KindFetch Kind = 5
	// KindBitmap (master → asker) answers the Fetch numbered Seq: Bitmap
	// holds bitmap.MarshalBinary's encoding, or Err says why not.
	KindBitmap Kind = 6
	// KindReset (writer → master) asks to clear Writer's bitmap of Set
	// (RESET_THRESHOLD). The writer has drained its writes, flushed every
	// member and emptied its cache of known-set chunks before numbering
	// it, so every bit-set numbered below Seq is covered by that flush and
	// every later write sends a bit-set numbered above it. A master that
	// has applied a bit-set of Writer numbered above Seq refuses it. Sent
	// only at core level 4 (cluster.LevelHBMMReset): an older master
	// would close the stream on an unknown kind.
	KindReset Kind = 7
)

func (k Kind) String() string {
	switch k {
	case KindHello:
		return "hello"
	case KindBitSet:
		return "bit-set"
	case KindAck:
		return "ack"
	case KindRollback:
		return "rollback"
	case KindFetch:
		return "fetch"
	case KindBitmap:
		return "bitmap"
	case KindReset:
		return "reset"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Range is a run of chunk numbers, both ends included.
type Range struct{ First, Last uint64 }

// Frame is one decoded frame. Only the fields of its Kind are meaningful;
// the others are zero.
type Frame struct {
	Kind   Kind
	Seq    uint64
	Host   string // Hello
	Inc    uint64 // Hello
	Set    string
	Writer string
	Ranges []Range
	Err    string
	Bitmap []byte
}

// field names one Frame field; a kind's layout lists its fields in wire
// order.
type field uint8

const (
	fSeq field = iota
	fHost
	fInc
	fSet
	fWriter
	fRanges
	fErr
	fBitmap
	numFields
)

var fieldNames = [numFields]string{"seq", "host", "inc", "set", "writer", "ranges", "err", "bitmap"}

// layouts is the single description of each kind that both directions
// follow, so the encoder and the decoder cannot drift apart.
var layouts = map[Kind][]field{
	KindHello:    {fHost, fInc},
	KindBitSet:   {fSeq, fSet, fWriter, fRanges},
	KindAck:      {fSeq, fErr},
	KindRollback: {fSeq, fSet, fWriter},
	KindFetch:    {fSeq, fSet, fWriter},
	KindBitmap:   {fSeq, fErr, fBitmap},
	KindReset:    {fSeq, fSet, fWriter},
}

// validate checks what does not depend on the bytes: every field outside the
// kind's layout is zero, required fields are present, bounds hold. Both
// AppendFrame and Decode call it, which is what makes "AppendFrame refuses
// what Decode would refuse" true by construction.
func validate(f *Frame) error {
	layout, ok := layouts[f.Kind]
	if !ok {
		return fmt.Errorf("%w: unknown kind %d", ErrMalformed, uint8(f.Kind))
	}
	var carried [numFields]bool
	for _, fl := range layout {
		carried[fl] = true
	}
	for fl := range numFields {
		if !carried[fl] && !isZero(f, fl) {
			return fmt.Errorf("%w: %v frame carries no %s", ErrMalformed, f.Kind, fieldNames[fl])
		}
	}
	for _, s := range []struct {
		fl  field
		val string
	}{{fHost, f.Host}, {fSet, f.Set}, {fWriter, f.Writer}, {fErr, f.Err}} {
		if len(s.val) > MaxString {
			return fmt.Errorf("%w: %v %s is %d bytes, at most %d", ErrMalformed, f.Kind, fieldNames[s.fl], len(s.val), MaxString)
		}
		if carried[s.fl] && s.fl != fErr && s.val == "" {
			return fmt.Errorf("%w: %v frame with an empty %s", ErrMalformed, f.Kind, fieldNames[s.fl])
		}
	}
	if carried[fRanges] {
		if len(f.Ranges) == 0 {
			// A bit-set that sets nothing is a writer bug, not a request.
			return fmt.Errorf("%w: %v frame with no range", ErrMalformed, f.Kind)
		}
		if len(f.Ranges) > MaxRanges {
			return fmt.Errorf("%w: %d ranges, at most %d", ErrMalformed, len(f.Ranges), MaxRanges)
		}
		for i, r := range f.Ranges {
			if r.First > r.Last {
				return fmt.Errorf("%w: range %d: first chunk %d after last %d", ErrMalformed, i, r.First, r.Last)
			}
			if r.Last > MaxChunk {
				return fmt.Errorf("%w: range %d: chunk %d beyond %d", ErrMalformed, i, r.Last, uint64(MaxChunk))
			}
		}
	}
	if carried[fBitmap] && (len(f.Bitmap) == 0) == (f.Err == "") {
		// Exactly one of the two says how the fetch went.
		return fmt.Errorf("%w: %v frame needs either a bitmap or an error, not %d bitmap bytes and error %q",
			ErrMalformed, f.Kind, len(f.Bitmap), f.Err)
	}
	return nil
}

func isZero(f *Frame, fl field) bool {
	switch fl {
	case fSeq:
		return f.Seq == 0
	case fHost:
		return f.Host == ""
	case fInc:
		return f.Inc == 0
	case fSet:
		return f.Set == ""
	case fWriter:
		return f.Writer == ""
	case fRanges:
		return len(f.Ranges) == 0
	case fErr:
		return f.Err == ""
	case fBitmap:
		return len(f.Bitmap) == 0
	}
	panic(fmt.Sprintf("wire: no field %d", fl))
}

// AppendFrame appends f's encoding, length prefix included, to dst. It
// refuses, with ErrMalformed, any frame Decode would refuse; dst is then
// returned unchanged.
func AppendFrame(dst []byte, f *Frame) ([]byte, error) {
	if err := validate(f); err != nil {
		return dst, err
	}
	start := len(dst)
	out := append(dst, 0, 0, 0, 0, Version, byte(f.Kind))
	for _, fl := range layouts[f.Kind] {
		switch fl {
		case fSeq:
			out = binary.AppendUvarint(out, f.Seq)
		case fHost:
			out = appendString(out, f.Host)
		case fInc:
			out = binary.AppendUvarint(out, f.Inc)
		case fSet:
			out = appendString(out, f.Set)
		case fWriter:
			out = appendString(out, f.Writer)
		case fRanges:
			out = binary.AppendUvarint(out, uint64(len(f.Ranges)))
			for _, r := range f.Ranges {
				out = binary.AppendUvarint(out, r.First)
				out = binary.AppendUvarint(out, r.Last)
			}
		case fErr:
			out = appendString(out, f.Err)
		case fBitmap:
			out = binary.AppendUvarint(out, uint64(len(f.Bitmap)))
			out = append(out, f.Bitmap...)
		}
	}
	n := len(out) - start - 4
	if n > MaxFrame {
		return dst[:start], fmt.Errorf("%w: %v frame of %d bytes, at most %d", ErrMalformed, f.Kind, n, MaxFrame)
	}
	binary.BigEndian.PutUint32(out[start:], uint32(n))
	return out, nil
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// Decode returns the frame body encodes; body is the L bytes after the
// length prefix. It never panics on any input, and the returned Frame shares
// no memory with body.
func Decode(body []byte) (*Frame, error) {
	if len(body) == 0 {
		return nil, fmt.Errorf("%w: empty frame", ErrMalformed)
	}
	if len(body) > MaxFrame {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrMalformed, len(body), MaxFrame)
	}
	if body[0] != Version {
		return nil, fmt.Errorf("%w: version %d, this build speaks %d", ErrVersion, body[0], Version)
	}
	if len(body) < 2 {
		return nil, fmt.Errorf("%w: no kind", ErrMalformed)
	}
	f := &Frame{Kind: Kind(body[1])}
	layout, ok := layouts[f.Kind]
	if !ok {
		return nil, fmt.Errorf("%w: unknown kind %d", ErrMalformed, body[1])
	}
	d := decoder{p: body, off: 2}
	for _, fl := range layout {
		switch fl {
		case fSeq:
			f.Seq = d.uvarint("seq")
		case fHost:
			f.Host = d.str("host")
		case fInc:
			f.Inc = d.uvarint("inc")
		case fSet:
			f.Set = d.str("set")
		case fWriter:
			f.Writer = d.str("writer")
		case fRanges:
			n := d.uvarint("range count")
			if d.err == nil && n > MaxRanges {
				// Checked before allocating: the count is the peer's word.
				d.fail(fmt.Errorf("%d ranges, at most %d", n, MaxRanges))
			}
			if d.err == nil && n > 0 {
				f.Ranges = make([]Range, n)
				for i := range f.Ranges {
					f.Ranges[i].First = d.uvarint("range first")
					f.Ranges[i].Last = d.uvarint("range last")
				}
			}
		case fErr:
			f.Err = d.str("err")
		case fBitmap:
			if b := d.bytes("bitmap", MaxFrame); len(b) > 0 {
				f.Bitmap = bytes.Clone(b)
			}
		}
	}
	if d.err != nil {
		return nil, fmt.Errorf("%w: %v frame: %w", ErrMalformed, f.Kind, d.err)
	}
	if d.off != len(body) {
		return nil, fmt.Errorf("%w: %v frame: %d trailing bytes", ErrMalformed, f.Kind, len(body)-d.off)
	}
	if err := validate(f); err != nil {
		return nil, err
	}
	return f, nil
}

// decoder reads fields off a body, keeping the first error so that the
// caller checks once per frame instead of once per field.
type decoder struct {
	p   []byte
	off int
	err error
}

func (d *decoder) fail(err error) {
	if d.err == nil {
		d.err = err
	}
}

func (d *decoder) uvarint(what string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.p[d.off:])
	switch {
	case n == 0:
		d.fail(fmt.Errorf("%s truncated at offset %d", what, d.off))
		return 0
	case n < 0:
		d.fail(fmt.Errorf("%s at offset %d overflows 64 bits", what, d.off))
		return 0
	case n > 1 && d.p[d.off+n-1] == 0:
		// binary.Uvarint accepts padding such as 0x80 0x00 for 0; a
		// second encoding of one value would break canonical frames.
		d.fail(fmt.Errorf("%s at offset %d is not minimally encoded", what, d.off))
		return 0
	}
	d.off += n
	return v
}

func (d *decoder) bytes(what string, limit int) []byte {
	n := d.uvarint(what + " length")
	if d.err != nil {
		return nil
	}
	if n > uint64(limit) {
		d.fail(fmt.Errorf("%s is %d bytes, at most %d", what, n, limit))
		return nil
	}
	if n > uint64(len(d.p)-d.off) {
		d.fail(fmt.Errorf("%s of %d bytes truncated at offset %d", what, n, d.off))
		return nil
	}
	b := d.p[d.off : d.off+int(n)]
	d.off += int(n)
	return b
}

func (d *decoder) str(what string) string {
	return string(d.bytes(what, MaxString))
}

// ReadFrame reads one frame, length prefix and body, from r. It returns
// io.EOF only when r ends exactly between frames; a frame cut short gives
// io.ErrUnexpectedEOF. A bad length is refused before the body is read, so a
// peer cannot make it allocate more than MaxFrame bytes.
func ReadFrame(r io.Reader) (*Frame, error) {
	var prefix [4]byte
	if _, err := io.ReadFull(r, prefix[:]); err != nil {
		if err == io.EOF {
			return nil, io.EOF
		}
		return nil, fmt.Errorf("wire: read frame length: %w", err)
	}
	n := binary.BigEndian.Uint32(prefix[:])
	if n == 0 || n > MaxFrame {
		return nil, fmt.Errorf("%w: length %d, want 1 to %d", ErrMalformed, n, MaxFrame)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("wire: read %d-byte frame: %w", n, err)
	}
	return Decode(body)
}
