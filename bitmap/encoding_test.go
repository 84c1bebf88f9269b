package bitmap

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"slices"
	"testing"
)

// sampleBitmaps returns bitmaps of every shape the encoding must round-trip:
// each container type, several buckets, and what removals leave behind.
func sampleBitmaps(t testing.TB) map[string]*Bitmap {
	t.Helper()
	r := rand.New(rand.NewPCG(1, 2))
	out := map[string]*Bitmap{}
	add := func(name string, chunkSize int64, fill func(b *Bitmap)) {
		b := mustNew(t, chunkSize)
		fill(b)
		out[name] = b
	}
	add("empty", DefaultChunkSize, func(*Bitmap) {})
	add("one", MinChunkSize, func(b *Bitmap) { b.Add(7) })
	add("sparse", DefaultChunkSize, func(b *Bitmap) {
		for range 500 {
			b.Add(r.Uint64N(1 << 24))
		}
	})
	add("dense", DefaultChunkSize, func(b *Bitmap) {
		for range 20000 {
			b.Add(r.Uint64N(1 << 16))
		}
	})
	add("runs", MaxChunkSize, func(b *Bitmap) {
		for i := range int64(50) {
			b.AddRange(i*1000*MaxChunkSize, (i%7+1)*100*MaxChunkSize)
		}
	})
	add("full container", DefaultChunkSize, func(b *Bitmap) { b.AddRange(0, 1<<16*DefaultChunkSize) })
	add("many buckets", MinChunkSize, func(b *Bitmap) {
		for i := range uint64(10) {
			b.Add(i<<32 | i)
			b.Add(i<<32 | 1<<20)
		}
		b.Add(1<<51 - 1)
	})
	add("after removals", DefaultChunkSize, func(b *Bitmap) {
		b.AddRange(0, 100000*DefaultChunkSize)
		for c := uint64(0); c < 100000; c += 3 {
			b.Remove(c)
		}
		b.Add(1 << 33)
		b.Remove(1 << 33)
	})
	add("adjacent ranges", DefaultChunkSize, func(b *Bitmap) {
		for i := range int64(100) {
			b.AddRange(i*10*DefaultChunkSize, 10*DefaultChunkSize)
		}
	})
	return out
}

func TestEncodeRoundTrip(t *testing.T) {
	for name, b := range sampleBitmaps(t) {
		t.Run(name, func(t *testing.T) {
			enc, err := b.MarshalBinary()
			if err != nil {
				t.Fatal(err)
			}
			d, err := Decode(enc)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if d.ChunkSize() != b.ChunkSize() {
				t.Errorf("chunk size %d, want %d", d.ChunkSize(), b.ChunkSize())
			}
			if !slices.Equal(chunksOf(d), chunksOf(b)) {
				t.Errorf("decoded chunks differ")
			}
			again, err := d.MarshalBinary()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(again, enc) {
				t.Errorf("re-encoding differs")
			}
			var u Bitmap
			if err := u.UnmarshalBinary(enc); err != nil {
				t.Fatalf("UnmarshalBinary: %v", err)
			}
			if u.ChunkSize() != b.ChunkSize() || u.Count() != b.Count() {
				t.Errorf("UnmarshalBinary: chunk size %d count %d", u.ChunkSize(), u.Count())
			}
			// The encoding must not alias the input.
			clear(enc)
			if d.Count() != b.Count() || !slices.Equal(chunksOf(d), chunksOf(b)) {
				t.Errorf("decoded bitmap changed with its input")
			}
		})
	}
}

// TestEncodingGolden pins the format: a change to these bytes breaks every
// bitmap already on disk and every host of the previous version.
func TestEncodingGolden(t *testing.T) {
	b := mustNew(t, DefaultChunkSize)
	b.Add(1)
	b.Add(5)
	b.AddRange(10*DefaultChunkSize, 3*DefaultChunkSize)
	enc, err := b.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	const want = "5348424d" + "0100" + "10" + "00" + "0500000000000000" + "2600000000000000" +
		"0100000000000000" + "00000000" + // one bucket, key 0
		"3a300000" + "01000000" + "00000400" + "10000000" + // no runs, 1 container, key 0 card 5, offset 16
		"01000500" + "0a000b00" + "0c00" +
		"671ef62d"
	if got := hex.EncodeToString(enc); got != want {
		t.Errorf("encoding\n got %s\nwant %s", got, want)
	}
}

// frame wraps a payload in a header and a valid checksum, so tests can
// reach the checks behind the checksum.
func frame(version uint16, shift, flags uint8, count uint64, payload []byte) []byte {
	p := []byte(magic)
	p = binary.LittleEndian.AppendUint16(p, version)
	p = append(p, shift, flags)
	p = binary.LittleEndian.AppendUint64(p, count)
	p = binary.LittleEndian.AppendUint64(p, uint64(len(payload)))
	p = append(p, payload...)
	return binary.LittleEndian.AppendUint32(p, crc32.Checksum(p, castagnoli))
}

// bucket32 builds a one-bucket payload around a 32-bit roaring body.
func bucket32(key uint32, body ...[]byte) []byte {
	p := binary.LittleEndian.AppendUint64(nil, 1)
	p = binary.LittleEndian.AppendUint32(p, key)
	for _, b := range body {
		p = append(p, b...)
	}
	return p
}

func le16(v ...uint16) []byte {
	var p []byte
	for _, x := range v {
		p = binary.LittleEndian.AppendUint16(p, x)
	}
	return p
}

func le32(v ...uint32) []byte {
	var p []byte
	for _, x := range v {
		p = binary.LittleEndian.AppendUint32(p, x)
	}
	return p
}

func TestDecodeRefuses(t *testing.T) {
	b := mustNew(t, DefaultChunkSize)
	b.AddRange(0, 40*DefaultChunkSize)
	b.Add(1000)
	good, err := b.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	end := len(good) - trailerLen
	payload := good[headerLen:end]
	mutate := func(f func(p []byte) []byte) []byte { return f(bytes.Clone(good)) }
	// Plain one-container array body: key 0, values.
	array := func(vals ...uint16) []byte {
		return slices.Concat(le32(cookieNoRuns, 1), le16(0, uint16(len(vals)-1)), le32(16), le16(vals...))
	}
	for _, tc := range []struct {
		name string
		in   []byte
		want error
	}{
		{"nil", nil, ErrTruncated},
		{"magic only", []byte("SHB"), ErrTruncated},
		{"short garbage", []byte("xyz"), ErrCorrupt},
		{"header only", good[:headerLen], ErrTruncated},
		{"payload cut", good[:headerLen+5], ErrTruncated},
		{"checksum cut", good[:len(good)-1], ErrTruncated},
		{"trailing byte", append(bytes.Clone(good), 0), ErrCorrupt},
		{"bad magic", mutate(func(p []byte) []byte { p[0] = 'X'; return p }), ErrCorrupt},
		{"bad checksum", mutate(func(p []byte) []byte { p[len(p)-1] ^= 1; return p }), ErrCorrupt},
		{"flipped payload bit", mutate(func(p []byte) []byte { p[headerLen+20] ^= 4; return p }), ErrCorrupt},
		{"huge payload length", mutate(func(p []byte) []byte { binary.LittleEndian.PutUint64(p[16:], 1<<63); return p }), ErrTruncated},
		{"unknown version", frame(2, 16, 0, 41, payload), ErrVersion},
		{"version 0", frame(0, 16, 0, 41, payload), ErrVersion},
		{"flags", frame(1, 16, 1, 41, payload), ErrCorrupt},
		{"chunk too small", frame(1, 11, 0, 41, payload), ErrCorrupt},
		{"chunk too big", frame(1, 27, 0, 41, payload), ErrCorrupt},
		{"chunk 2^255", frame(1, 255, 0, 41, payload), ErrCorrupt},
		{"count mismatch", frame(1, 16, 0, 40, payload), ErrCorrupt},
		{"empty payload", frame(1, 16, 0, 0, nil), ErrCorrupt},
		{"huge bucket count", frame(1, 16, 0, 0, le32(0xffffffff, 0xffffffff)), ErrCorrupt},
		{"bucket count past bytes", frame(1, 16, 0, 1, bucket32(0, array(1))[:12]), ErrCorrupt},
		{"payload trailing", frame(1, 16, 0, 1, append(bucket32(0, array(1)), 0)), ErrCorrupt},
		{"bad cookie", frame(1, 16, 0, 1, bucket32(0, le32(1, 1), le16(0, 0), le32(16), le16(1))), ErrCorrupt},
		{"zero containers", frame(1, 16, 0, 0, bucket32(0, le32(cookieNoRuns, 0))), ErrCorrupt},
		{"too many containers", frame(1, 16, 0, 1, bucket32(0, le32(cookieNoRuns, 1<<16+1))), ErrCorrupt},
		{"unsorted array", frame(1, 16, 0, 2, bucket32(0, array(5, 3))), ErrCorrupt},
		{"duplicate in array", frame(1, 16, 0, 2, bucket32(0, array(3, 3))), ErrCorrupt},
		{"array cut", frame(1, 16, 0, 3, bucket32(0, array(1, 2, 3))[:30]), ErrCorrupt},
		{"non-canonical array", frame(1, 16, 0, 5, bucket32(0, array(1, 2, 3, 4, 5))), ErrCorrupt},
		{"bad offset", frame(1, 16, 0, 1, bucket32(0, le32(cookieNoRuns, 1), le16(0, 0), le32(99), le16(1))), ErrCorrupt},
		{"unsorted keys", frame(1, 16, 0, 2, bucket32(0, le32(cookieNoRuns, 2), le16(5, 0, 4, 0), le32(24, 26), le16(1, 1))), ErrCorrupt},
		{"unsorted buckets", frame(1, 16, 0, 2, slices.Concat(le32(2, 0), le32(5), array(1), le32(4), array(1))), ErrCorrupt},
		{"empty run container", frame(1, 16, 0, 1, bucket32(0, le32(cookieRuns), []byte{1}, le16(0, 0), le16(0))), ErrCorrupt},
		{"run past container", frame(1, 16, 0, 2, bucket32(0, le32(cookieRuns), []byte{1}, le16(0, 1), le16(1, 0xffff, 1))), ErrCorrupt},
		{"overlapping runs", frame(1, 16, 0, 20, bucket32(0, le32(cookieRuns), []byte{1}, le16(0, 19), le16(2, 0, 9, 5, 9))), ErrCorrupt},
		{"adjacent runs", frame(1, 16, 0, 20, bucket32(0, le32(cookieRuns), []byte{1}, le16(0, 19), le16(2, 0, 9, 10, 9))), ErrCorrupt},
		{"run card mismatch", frame(1, 16, 0, 11, bucket32(0, le32(cookieRuns), []byte{1}, le16(0, 10), le16(1, 0, 9))), ErrCorrupt},
		{"bitmap popcount", frame(1, 16, 0, 5000, bucket32(0, le32(cookieNoRuns, 1), le16(0, 4999), le32(16), make([]byte, bitmapBytes))), ErrCorrupt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := Decode(tc.in)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Decode = %v, %v; want %v", d, err, tc.want)
			}
			t.Logf("%v", err)
		})
	}
	// The helpers themselves must be able to build an encoding Decode takes,
	// or the cases above prove nothing.
	for _, tc := range []struct {
		name string
		in   []byte
	}{
		{"framed payload", frame(1, 16, 0, 41, payload)},
		{"hand-built array", frame(1, 16, 0, 2, bucket32(0, array(3, 5)))},
		{"hand-built run", frame(1, 16, 0, 20, bucket32(0, le32(cookieRuns), []byte{1}, le16(0, 19), le16(1, 0, 19)))},
	} {
		if _, err := Decode(tc.in); err != nil {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
}

// fuzzSeeds are valid encodings of every shape, and cuts of them.
func fuzzSeeds(t testing.TB) [][]byte {
	var seeds [][]byte
	for _, b := range sampleBitmaps(t) {
		enc, err := b.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, enc)
		if len(enc) < 2000 {
			for _, n := range []int{0, 3, headerLen, headerLen + 8, len(enc) - 5, len(enc) - 1} {
				if n >= 0 && n < len(enc) {
					seeds = append(seeds, enc[:n])
				}
			}
		}
	}
	return seeds
}

// FuzzDecode checks that every input either decodes to a bitmap that
// encodes back to the same bytes, or is refused with a sentinel, and never
// panics. Random bytes seldom carry a valid checksum, so each input is also
// tried with its checksum made valid, which sends it on to the header and
// payload checks.
func FuzzDecode(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		check := func(in []byte) {
			d, err := Decode(in)
			if err != nil {
				if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrTruncated) && !errors.Is(err, ErrVersion) {
					t.Fatalf("Decode error wraps no sentinel: %v", err)
				}
				return
			}
			again, err := d.MarshalBinary()
			if err != nil {
				t.Fatalf("re-encode: %v", err)
			}
			if !bytes.Equal(again, in) {
				t.Fatalf("re-encoding differs:\n in %x\nout %x", in, again)
			}
			// A few bytes of runs can hold billions of chunks: walk only
			// small bitmaps.
			if count := d.Count(); count <= 1<<16 {
				n := uint64(0)
				for range d.Chunks() {
					n++
				}
				if n != count {
					t.Fatalf("walk saw %d chunks, Count says %d", n, count)
				}
			}
		}
		check(in)
		if len(in) >= headerLen+trailerLen {
			fixed := bytes.Clone(in)
			// Make the payload length fit, then the checksum.
			binary.LittleEndian.PutUint64(fixed[16:], uint64(len(fixed)-headerLen-trailerLen))
			body := fixed[:len(fixed)-trailerLen]
			binary.LittleEndian.PutUint32(fixed[len(body):], crc32.Checksum(body, castagnoli))
			check(fixed)
		}
	})
}
