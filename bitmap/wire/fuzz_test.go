package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"testing"
)

// FuzzDecode checks that Decode never panics, refuses only with ErrVersion
// or ErrMalformed, and accepts only canonical bodies: an accepted body
// re-encodes to exactly the same bytes, and reads back the same through
// ReadFrame.
func FuzzDecode(f *testing.F) {
	for _, fr := range sampleFrames() {
		if len(fr.Ranges) > 8 {
			continue // keep the corpus small; the bound is in the unit tests
		}
		enc, err := AppendFrame(nil, fr)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(enc[4:])
	}
	f.Add([]byte{})
	f.Add([]byte{Version})
	f.Add([]byte{Version + 1, byte(KindAck), 1, 0})
	f.Add([]byte{Version, byte(KindAck), 0x80, 0x00, 0})
	f.Add([]byte{Version, byte(KindBitSet), 1, 1, 's', 1, 'w', 1, 5, 4})
	f.Add([]byte("\x01\x06\x01\x00\xff\xff\xff\xff\x0f"))
	f.Add(bytes.Repeat([]byte{0xff}, 40))

	f.Fuzz(func(t *testing.T, body []byte) {
		fr, err := Decode(body)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrVersion) {
				t.Fatalf("Decode refused with %v, neither ErrMalformed nor ErrVersion", err)
			}
			if fr != nil {
				t.Fatalf("Decode returned a frame with its error")
			}
			return
		}
		enc, err := AppendFrame(nil, fr)
		if err != nil {
			t.Fatalf("AppendFrame refused a decoded frame %+v: %v", fr, err)
		}
		if !bytes.Equal(enc[4:], body) {
			t.Fatalf("not canonical: decoded % x, re-encoded % x", body, enc[4:])
		}
		if n := binary.BigEndian.Uint32(enc); int(n) != len(body) {
			t.Fatalf("length prefix %d for a %d-byte body", n, len(body))
		}
		again, err := ReadFrame(bytes.NewReader(enc))
		if err != nil || !reflect.DeepEqual(again, fr) {
			t.Fatalf("ReadFrame: %+v, %v; want %+v", again, err, fr)
		}
	})
}
