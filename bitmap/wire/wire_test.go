package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
)

// sampleFrames holds a valid frame of every kind, with fields at their
// bounds where that is cheap.
func sampleFrames() map[string]*Frame {
	ranges := make([]Range, MaxRanges)
	for i := range ranges {
		ranges[i] = Range{First: uint64(i) * 10, Last: uint64(i)*10 + uint64(i%3)}
	}
	return map[string]*Frame{
		"hello":             {Kind: KindHello, Host: "alpha", Inc: 7},
		"hello inc 0":       {Kind: KindHello, Host: "a"},
		"bit-set":           {Kind: KindBitSet, Seq: 1, Set: "DSA1", Writer: "alpha", Ranges: []Range{{3, 3}, {10, 20}}},
		"bit-set bounds":    {Kind: KindBitSet, Seq: 1<<64 - 1, Set: strings.Repeat("s", MaxString), Writer: "w", Ranges: []Range{{0, MaxChunk}}},
		"bit-set max count": {Kind: KindBitSet, Seq: 300, Set: "DSA1", Writer: "alpha", Ranges: ranges},
		"ack":               {Kind: KindAck, Seq: 42},
		"ack refused":       {Kind: KindAck, Seq: 42, Err: "masters: set DSA1 not open"},
		"ack seq 0":         {Kind: KindAck},
		"rollback":          {Kind: KindRollback, Seq: 9, Set: "DSA1", Writer: "alpha"},
		"fetch":             {Kind: KindFetch, Seq: 128, Set: "DSA2", Writer: "beta"},
		"bitmap":            {Kind: KindBitmap, Seq: 5, Bitmap: []byte("SHBM\x01\x00\x10\x00")},
		"bitmap refused":    {Kind: KindBitmap, Seq: 5, Err: "no bitmap"},
		"reset":             {Kind: KindReset, Seq: 77, Set: "DSA1", Writer: "alpha"},
	}
}

func mustAppend(t testing.TB, f *Frame) []byte {
	t.Helper()
	b, err := AppendFrame(nil, f)
	if err != nil {
		t.Fatalf("AppendFrame(%+v): %v", f, err)
	}
	return b
}

func TestRoundTrip(t *testing.T) {
	for name, f := range sampleFrames() {
		t.Run(name, func(t *testing.T) {
			enc := mustAppend(t, f)
			if n := binary.BigEndian.Uint32(enc); int(n) != len(enc)-4 {
				t.Fatalf("length prefix %d, body is %d bytes", n, len(enc)-4)
			}
			if enc[4] != Version || Kind(enc[5]) != f.Kind {
				t.Fatalf("header % x, want version %d kind %d", enc[4:6], Version, f.Kind)
			}
			got, err := Decode(enc[4:])
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if !reflect.DeepEqual(got, f) {
				t.Fatalf("decoded %+v, want %+v", got, f)
			}
			again, err := ReadFrame(bytes.NewReader(enc))
			if err != nil {
				t.Fatalf("ReadFrame: %v", err)
			}
			if !reflect.DeepEqual(again, f) {
				t.Fatalf("ReadFrame gave %+v, want %+v", again, f)
			}
		})
	}
}

func TestAppendFrameKeepsDst(t *testing.T) {
	dst := []byte("prefix")
	out, err := AppendFrame(dst, &Frame{Kind: KindAck, Seq: 1})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(out, []byte("prefix")) {
		t.Fatalf("dst overwritten: %q", out)
	}
	f, err := Decode(out[len(dst)+4:])
	if err != nil || f.Seq != 1 {
		t.Fatalf("Decode after a prefix: %+v, %v", f, err)
	}
	bad, err := AppendFrame(dst, &Frame{Kind: KindAck, Seq: 1, Host: "x"})
	if err == nil || string(bad) != "prefix" {
		t.Fatalf("refused frame: got %q, %v; want dst unchanged and an error", bad, err)
	}
}

func TestDecodeDoesNotAlias(t *testing.T) {
	enc := mustAppend(t, &Frame{Kind: KindBitmap, Seq: 1, Bitmap: []byte{1, 2, 3}})
	f, err := Decode(enc[4:])
	if err != nil {
		t.Fatal(err)
	}
	for i := range enc {
		enc[i] = 0xff
	}
	if !bytes.Equal(f.Bitmap, []byte{1, 2, 3}) {
		t.Fatalf("bitmap changed with the input buffer: %v", f.Bitmap)
	}
}

// body builds a raw frame body: version, kind, then the given parts, each a
// uvarint (uint64/int), a string (length-prefixed) or raw bytes.
func body(version byte, kind Kind, parts ...any) []byte {
	b := []byte{version, byte(kind)}
	for _, p := range parts {
		switch v := p.(type) {
		case int:
			b = binary.AppendUvarint(b, uint64(v))
		case uint64:
			b = binary.AppendUvarint(b, v)
		case string:
			b = appendString(b, v)
		case []byte:
			b = append(b, v...)
		default:
			panic("body: unsupported part")
		}
	}
	return b
}

func TestDecodeRefuses(t *testing.T) {
	long := strings.Repeat("x", MaxString+1)
	tooMany := []any{1, "DSA1", "w", MaxRanges + 1}
	for range MaxRanges + 1 {
		tooMany = append(tooMany, 1, 2)
	}
	cases := []struct {
		name string
		body []byte
		want error
	}{
		{"empty", nil, ErrMalformed},
		{"version 0", body(0, KindAck, 1, ""), ErrVersion},
		{"version 2", body(2, KindAck, 1, ""), ErrVersion},
		{"version only", []byte{Version}, ErrMalformed},
		{"kind 0", body(Version, 0, 1, ""), ErrMalformed},
		{"kind 7", body(Version, 7, 1, ""), ErrMalformed},
		{"truncated seq", body(Version, KindAck, []byte{0x80}), ErrMalformed},
		{"truncated string length", body(Version, KindAck, 1), ErrMalformed},
		{"truncated string", body(Version, KindAck, 1, []byte{5, 'a', 'b'}), ErrMalformed},
		{"trailing byte", body(Version, KindAck, 1, "", []byte{0}), ErrMalformed},
		{"non-minimal seq", body(Version, KindAck, []byte{0x81, 0x00}, ""), ErrMalformed},
		{"non-minimal zero", body(Version, KindAck, []byte{0x80, 0x00}, ""), ErrMalformed},
		{"overflowing seq", body(Version, KindAck, bytes.Repeat([]byte{0xff}, 10), []byte{0x01}, ""), ErrMalformed},
		{"long err", body(Version, KindAck, 1, long), ErrMalformed},
		{"long host", body(Version, KindHello, long, 1), ErrMalformed},
		{"empty host", body(Version, KindHello, "", 1), ErrMalformed},
		{"empty set", body(Version, KindBitSet, 1, "", "w", 1, 0, 0), ErrMalformed},
		{"empty writer", body(Version, KindRollback, 1, "DSA1", ""), ErrMalformed},
		{"empty fetch writer", body(Version, KindFetch, 1, "DSA1", ""), ErrMalformed},
		{"empty reset set", body(Version, KindReset, 1, "", "w"), ErrMalformed},
		{"reset with ranges", body(Version, KindReset, 1, "DSA1", "w", 1, 0, 0), ErrMalformed},
		{"no ranges", body(Version, KindBitSet, 1, "DSA1", "w", 0), ErrMalformed},
		{"first after last", body(Version, KindBitSet, 1, "DSA1", "w", 1, 5, 4), ErrMalformed},
		{"chunk beyond MaxChunk", body(Version, KindBitSet, 1, "DSA1", "w", 1, 0, uint64(MaxChunk+1)), ErrMalformed},
		{"too many ranges", body(Version, KindBitSet, tooMany...), ErrMalformed},
		{"range count past the data", body(Version, KindBitSet, 1, "DSA1", "w", 3, 1, 2), ErrMalformed},
		{"bitmap and err", body(Version, KindBitmap, 1, "oops", []byte{1, 9}), ErrMalformed},
		{"neither bitmap nor err", body(Version, KindBitmap, 1, "", 0), ErrMalformed},
		{"bitmap length past the data", body(Version, KindBitmap, 1, "", []byte{10, 1, 2}), ErrMalformed},
		{"too long", append(body(Version, KindBitmap, 1, "", MaxFrame), make([]byte, MaxFrame)...), ErrMalformed},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f, err := Decode(c.body)
			if !errors.Is(err, c.want) {
				t.Fatalf("Decode = %+v, %v; want %v", f, err, c.want)
			}
			if f != nil {
				t.Fatalf("Decode returned a frame with its error: %+v", f)
			}
			if !strings.HasPrefix(err.Error(), "wire: ") {
				t.Errorf("error %q lacks the package prefix", err)
			}
		})
	}
}

// TestBodyHelperIsValid guards TestDecodeRefuses: its bodies differ from a
// valid one only in the defect each names.
func TestBodyHelperIsValid(t *testing.T) {
	for _, b := range [][]byte{
		body(Version, KindAck, 1, ""),
		body(Version, KindHello, "h", 1),
		body(Version, KindBitSet, 1, "DSA1", "w", 1, 4, 5),
		body(Version, KindBitSet, 1, "DSA1", "w", 1, 0, uint64(MaxChunk)),
		body(Version, KindRollback, 1, "DSA1", "w"),
		body(Version, KindReset, 1, "DSA1", "w"),
		body(Version, KindBitmap, 1, "", []byte{1, 9}),
		body(Version, KindBitmap, 1, "oops", 0),
	} {
		if _, err := Decode(b); err != nil {
			t.Errorf("Decode(% x): %v", b, err)
		}
	}
}

func TestAppendFrameRefuses(t *testing.T) {
	cases := map[string]*Frame{
		"unknown kind":        {Kind: 9, Seq: 1},
		"zero kind":           {},
		"hello with seq":      {Kind: KindHello, Host: "a", Seq: 1},
		"hello with ranges":   {Kind: KindHello, Host: "a", Ranges: []Range{{1, 1}}},
		"ack with set":        {Kind: KindAck, Seq: 1, Set: "DSA1"},
		"ack with bitmap":     {Kind: KindAck, Seq: 1, Bitmap: []byte{1}},
		"bit-set with err":    {Kind: KindBitSet, Seq: 1, Set: "s", Writer: "w", Ranges: []Range{{1, 1}}, Err: "x"},
		"bit-set with inc":    {Kind: KindBitSet, Seq: 1, Set: "s", Writer: "w", Ranges: []Range{{1, 1}}, Inc: 1},
		"rollback with range": {Kind: KindRollback, Seq: 1, Set: "s", Writer: "w", Ranges: []Range{{1, 1}}},
		"fetch with host":     {Kind: KindFetch, Seq: 1, Set: "s", Writer: "w", Host: "h"},
		"empty writer":        {Kind: KindBitSet, Seq: 1, Set: "s", Ranges: []Range{{1, 1}}},
		"no range":            {Kind: KindBitSet, Seq: 1, Set: "s", Writer: "w"},
		"first after last":    {Kind: KindBitSet, Seq: 1, Set: "s", Writer: "w", Ranges: []Range{{2, 1}}},
		"too many ranges":     {Kind: KindBitSet, Seq: 1, Set: "s", Writer: "w", Ranges: make([]Range, MaxRanges+1)},
		"long err":            {Kind: KindAck, Seq: 1, Err: strings.Repeat("e", MaxString+1)},
		"bitmap and err":      {Kind: KindBitmap, Seq: 1, Err: "x", Bitmap: []byte{1}},
		"bitmap too large":    {Kind: KindBitmap, Seq: 1, Bitmap: make([]byte, MaxFrame)},
	}
	for name, f := range cases {
		t.Run(name, func(t *testing.T) {
			if b, err := AppendFrame(nil, f); !errors.Is(err, ErrMalformed) {
				t.Fatalf("AppendFrame = % x, %v; want ErrMalformed", b, err)
			}
		})
	}
}

func TestReadFrame(t *testing.T) {
	var stream []byte
	frames := []*Frame{
		{Kind: KindHello, Host: "a", Inc: 1},
		{Kind: KindAck, Seq: 1},
		{Kind: KindFetch, Seq: 2, Set: "s", Writer: "w"},
	}
	for _, f := range frames {
		stream = append(stream, mustAppend(t, f)...)
	}
	r := bytes.NewReader(stream)
	for i, want := range frames {
		got, err := ReadFrame(r)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Fatalf("frame %d: %+v, %v; want %+v", i, got, err, want)
		}
	}
	if f, err := ReadFrame(r); err != io.EOF {
		t.Fatalf("at the end: %+v, %v; want io.EOF", f, err)
	}

	one := mustAppend(t, frames[2])
	for _, cut := range []int{1, 3, 4, 5, len(one) - 1} {
		_, err := ReadFrame(bytes.NewReader(one[:cut]))
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("frame cut at %d bytes: %v, want io.ErrUnexpectedEOF", cut, err)
		}
	}
}

func TestReadFrameRefusesLength(t *testing.T) {
	for _, n := range []uint32{0, MaxFrame + 1, 1<<32 - 1} {
		prefix := binary.BigEndian.AppendUint32(nil, n)
		// A reader that fails if touched past the prefix proves the body
		// is neither read nor allocated for a bad length.
		r := io.MultiReader(bytes.NewReader(prefix), failReader{t})
		if _, err := ReadFrame(r); !errors.Is(err, ErrMalformed) {
			t.Errorf("length %d: %v, want ErrMalformed", n, err)
		}
	}
}

type failReader struct{ t *testing.T }

func (r failReader) Read([]byte) (int, error) {
	r.t.Error("ReadFrame read the body of a frame with a bad length")
	return 0, io.EOF
}

func TestReadFrameWrongVersion(t *testing.T) {
	enc := mustAppend(t, &Frame{Kind: KindAck, Seq: 1})
	enc[4] = Version + 1
	if _, err := ReadFrame(bytes.NewReader(enc)); !errors.Is(err, ErrVersion) {
		t.Fatalf("ReadFrame: %v, want ErrVersion", err)
	}
}
