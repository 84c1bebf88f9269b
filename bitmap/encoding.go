package bitmap

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math/bits"

	"github.com/RoaringBitmap/roaring/v2/roaring64"
)

// The encoding of a Bitmap, for disk and wire. All integers are
// little-endian.
//
//	offset size
//	     0    4  magic "SHBM"
//	     4    2  format version (1)
//	     6    1  log2 of the chunk size
//	     7    1  flags, zero in version 1
//	     8    8  number of chunks in the bitmap
//	    16    8  payload length n
//	    24    n  payload: roaring's portable 64-bit serialization, run-optimized
//	  24+n    4  CRC32C (Castagnoli) of bytes [0, 24+n)
//
// The 24-byte header keeps this layout in every version, so that a reader
// can find the checksum of an encoding it cannot parse, prove it intact, and
// then answer "unknown version" rather than "corrupt". A layout change needs
// a new magic.
//
// Every bitmap has exactly one encoding: the payload is run-optimized, and
// Decode refuses a payload that would not re-encode to the same bytes. So
// two hosts holding the same chunks send the same bytes, and a checksum or a
// byte comparison of two encodings compares the bitmaps.
const (
	magic         = "SHBM"
	formatVersion = 1
	headerLen     = 24
	trailerLen    = 4
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// MarshalBinary encodes the bitmap (see the format above). It works on a
// snapshot, so it blocks writers only for the time of a copy.
func (b *Bitmap) MarshalBinary() ([]byte, error) {
	rb := b.snapshot()
	rb.RunOptimize()
	return encode(b.shift, rb)
}

func encode(shift uint8, rb *roaring64.Bitmap) ([]byte, error) {
	buf := bytes.NewBuffer(make([]byte, headerLen, headerLen+int(rb.GetSerializedSizeInBytes())+trailerLen))
	if _, err := rb.WriteTo(buf); err != nil {
		return nil, fmt.Errorf("bitmap: encode roaring payload: %w", err)
	}
	out := buf.Bytes()
	copy(out, magic)
	binary.LittleEndian.PutUint16(out[4:], formatVersion)
	out[6] = shift
	out[7] = 0
	binary.LittleEndian.PutUint64(out[8:], rb.GetCardinality())
	binary.LittleEndian.PutUint64(out[16:], uint64(len(out)-headerLen))
	return binary.LittleEndian.AppendUint32(out, crc32.Checksum(out, castagnoli)), nil
}

// UnmarshalBinary replaces b with the bitmap p encodes, chunk size
// included. It is meant for a fresh Bitmap (the zero value is fine) and must
// not run concurrently with other methods of b. On error b is unchanged.
func (b *Bitmap) UnmarshalBinary(p []byte) error {
	d, err := Decode(p)
	if err != nil {
		return err
	}
	b.mu.Lock()
	b.chunkSize, b.shift, b.rb = d.chunkSize, d.shift, d.rb
	b.mu.Unlock()
	return nil
}

// Decode returns the bitmap p encodes. It trusts nothing in p: an input that
// is not, byte for byte, what MarshalBinary produces is refused with an error
// wrapping ErrTruncated (shorter than its header says), ErrVersion (intact,
// but of an unknown version) or ErrCorrupt (anything else). Decode never
// panics, and allocates in proportion to len(p). The returned bitmap does not
// share memory with p.
func Decode(p []byte) (*Bitmap, error) {
	if len(p) < headerLen {
		if !bytes.HasPrefix([]byte(magic), p[:min(len(p), len(magic))]) {
			return nil, fmt.Errorf("%w: bad magic %q", ErrCorrupt, p[:min(len(p), len(magic))])
		}
		return nil, fmt.Errorf("%w: %d bytes, header needs %d", ErrTruncated, len(p), headerLen)
	}
	if string(p[:4]) != magic {
		return nil, fmt.Errorf("%w: bad magic %q", ErrCorrupt, p[:4])
	}
	payloadLen := binary.LittleEndian.Uint64(p[16:])
	if have := uint64(len(p) - headerLen); payloadLen > have || have-payloadLen < trailerLen {
		return nil, fmt.Errorf("%w: %d bytes after the header, need %d payload and %d checksum",
			ErrTruncated, have, payloadLen, trailerLen)
	}
	end := headerLen + int(payloadLen)
	if len(p) > end+trailerLen {
		return nil, fmt.Errorf("%w: %d trailing bytes", ErrCorrupt, len(p)-end-trailerLen)
	}
	if got, want := crc32.Checksum(p[:end], castagnoli), binary.LittleEndian.Uint32(p[end:]); got != want {
		return nil, fmt.Errorf("%w: checksum %08x, stored %08x", ErrCorrupt, got, want)
	}
	if v := binary.LittleEndian.Uint16(p[4:]); v != formatVersion {
		return nil, fmt.Errorf("%w: version %d, this build reads %d", ErrVersion, v, formatVersion)
	}
	shift := p[6]
	if shift >= 63 {
		return nil, fmt.Errorf("%w: chunk size 2^%d: %w", ErrCorrupt, shift, ErrChunkSize)
	}
	chunkSize := int64(1) << shift
	if err := ValidChunkSize(chunkSize); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if p[7] != 0 {
		return nil, fmt.Errorf("%w: flags %#02x, version %d has none", ErrCorrupt, p[7], formatVersion)
	}
	payload := p[headerLen:end]
	// The checksum only proves the bytes are what some writer sent, not that
	// the writer was sane: check the roaring structure here, before roaring
	// sees it, because roaring's reader trusts counts and sort orders and
	// would panic, or misbehave later, on a malformed payload.
	count, err := checkPayload(payload)
	if err != nil {
		return nil, fmt.Errorf("%w: roaring payload: %w", ErrCorrupt, err)
	}
	if want := binary.LittleEndian.Uint64(p[8:]); count != want {
		return nil, fmt.Errorf("%w: payload holds %d chunks, header says %d", ErrCorrupt, count, want)
	}
	rb, err := readPayload(payload)
	if err != nil {
		return nil, fmt.Errorf("%w: roaring payload: %w", ErrCorrupt, err)
	}
	return newBitmap(chunkSize, rb), nil
}

// readPayload hands a payload checkPayload accepted to roaring, and checks
// it is canonical: run-optimizing and re-serializing it gives it back.
func readPayload(payload []byte) (rb *roaring64.Bitmap, err error) {
	defer func() {
		// checkPayload should make this unreachable; a roaring bug met on
		// hostile input must still not take the agent down.
		if r := recover(); r != nil {
			rb, err = nil, fmt.Errorf("roaring panicked: %v", r)
		}
	}()
	rb = roaring64.New()
	n, err := rb.ReadPortableFrom(bytes.NewReader(payload))
	if err != nil {
		return nil, err
	}
	if n != int64(len(payload)) {
		return nil, fmt.Errorf("roaring read %d of %d bytes", n, len(payload))
	}
	rb.RunOptimize()
	var again bytes.Buffer
	again.Grow(len(payload))
	if _, err := rb.WriteTo(&again); err != nil {
		return nil, err
	}
	if !bytes.Equal(again.Bytes(), payload) {
		return nil, fmt.Errorf("not in canonical form")
	}
	return rb, nil
}

// Constants of the roaring format
// (https://github.com/RoaringBitmap/RoaringFormatSpec).
const (
	cookieRuns       = 12347 // low 16 bits; the high 16 hold the container count - 1
	cookieNoRuns     = 12346 // followed by a uint32 container count
	noOffsetMinCount = 4     // with runs, fewer containers than this have no offset table
	arrayMaxCard     = 4096  // a larger non-run container is a bitmap
	bitmapBytes      = 8192
)

// reader walks a byte slice; every read checks the length first.
type reader struct {
	p   []byte
	off int
}

func (r *reader) next(n int) ([]byte, error) {
	if n < 0 || n > len(r.p)-r.off {
		return nil, fmt.Errorf("need %d bytes at offset %d, have %d", n, r.off, len(r.p)-r.off)
	}
	b := r.p[r.off : r.off+n]
	r.off += n
	return b, nil
}

func (r *reader) u16() (uint16, error) {
	b, err := r.next(2)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint16(b), nil
}

func (r *reader) u32() (uint32, error) {
	b, err := r.next(4)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(b), nil
}

func (r *reader) u64() (uint64, error) {
	b, err := r.next(8)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b), nil
}

// checkPayload checks that p is a well-formed portable 64-bit roaring
// serialization, whose every count matches the bytes that follow it, and
// returns the number of values it holds. It reads each byte once and
// allocates nothing, so hostile input costs time linear in its length.
func checkPayload(p []byte) (uint64, error) {
	r := &reader{p: p}
	buckets, err := r.u64()
	if err != nil {
		return 0, err
	}
	// A bucket takes at least 18 bytes: key, cookie, count, one header entry,
	// one offset, one value.
	if buckets > uint64(len(p))/18 {
		return 0, fmt.Errorf("%d buckets cannot fit in %d bytes", buckets, len(p))
	}
	var total uint64
	var prev uint32
	for i := range buckets {
		key, err := r.u32()
		if err != nil {
			return 0, fmt.Errorf("bucket %d: %w", i, err)
		}
		if i > 0 && key <= prev {
			return 0, fmt.Errorf("bucket %d: key %d not above %d", i, key, prev)
		}
		prev = key
		n, err := check32(r)
		if err != nil {
			return 0, fmt.Errorf("bucket %d (key %d): %w", i, key, err)
		}
		total += n
	}
	if r.off != len(p) {
		return 0, fmt.Errorf("%d bytes after the last bucket", len(p)-r.off)
	}
	return total, nil
}

// check32 checks one 32-bit roaring bitmap at r and returns its cardinality.
// An empty one is refused: roaring64 never stores an empty bucket.
func check32(r *reader) (uint64, error) {
	cookie, err := r.u32()
	if err != nil {
		return 0, err
	}
	var (
		size     int
		runFlags []byte
		offsets  = true
	)
	switch {
	case cookie&0xffff == cookieRuns:
		size = int(cookie>>16) + 1
		if runFlags, err = r.next((size + 7) / 8); err != nil {
			return 0, fmt.Errorf("run flags: %w", err)
		}
		offsets = size >= noOffsetMinCount
	case cookie == cookieNoRuns:
		n, err := r.u32()
		if err != nil {
			return 0, fmt.Errorf("container count: %w", err)
		}
		if n == 0 || n > 1<<16 {
			return 0, fmt.Errorf("container count %d outside [1, 65536]", n)
		}
		size = int(n)
	default:
		return 0, fmt.Errorf("bad cookie %#x", cookie)
	}
	hdr, err := r.next(4 * size)
	if err != nil {
		return 0, fmt.Errorf("container headers: %w", err)
	}
	if offsets {
		// Their values are checked by the re-encoding in readPayload.
		if _, err := r.next(4 * size); err != nil {
			return 0, fmt.Errorf("container offsets: %w", err)
		}
	}
	var total uint64
	prevKey := -1
	for i := range size {
		key := int(binary.LittleEndian.Uint16(hdr[4*i:]))
		card := int(binary.LittleEndian.Uint16(hdr[4*i+2:])) + 1
		if key <= prevKey {
			return 0, fmt.Errorf("container %d: key %d not above %d", i, key, prevKey)
		}
		prevKey = key
		var err error
		switch {
		case runFlags != nil && runFlags[i/8]&(1<<(i%8)) != 0:
			err = checkRuns(r, card)
		case card > arrayMaxCard:
			err = checkBitmap(r, card)
		default:
			err = checkArray(r, card)
		}
		if err != nil {
			return 0, fmt.Errorf("container %d (key %d): %w", i, key, err)
		}
		total += uint64(card)
	}
	return total, nil
}

// checkRuns checks a run container: sorted, disjoint, non-adjacent runs
// inside the container that add up to card values.
func checkRuns(r *reader, card int) error {
	n, err := r.u16()
	if err != nil {
		return fmt.Errorf("run count: %w", err)
	}
	if n == 0 {
		return fmt.Errorf("no runs")
	}
	runs, err := r.next(4 * int(n))
	if err != nil {
		return fmt.Errorf("runs: %w", err)
	}
	sum, prevLast := 0, -2
	for j := range int(n) {
		start := int(binary.LittleEndian.Uint16(runs[4*j:]))
		last := start + int(binary.LittleEndian.Uint16(runs[4*j+2:]))
		if start <= prevLast+1 {
			return fmt.Errorf("run %d at %d overlaps or touches the one ending at %d", j, start, prevLast)
		}
		if last > 0xffff {
			return fmt.Errorf("run %d ends at %d, past the container", j, last)
		}
		sum += last - start + 1
		prevLast = last
	}
	if sum != card {
		return fmt.Errorf("runs hold %d values, header says %d", sum, card)
	}
	return nil
}

func checkBitmap(r *reader, card int) error {
	words, err := r.next(bitmapBytes)
	if err != nil {
		return fmt.Errorf("bitmap: %w", err)
	}
	n := 0
	for i := 0; i < len(words); i += 8 {
		n += bits.OnesCount64(binary.LittleEndian.Uint64(words[i:]))
	}
	if n != card {
		return fmt.Errorf("bitmap holds %d values, header says %d", n, card)
	}
	return nil
}

func checkArray(r *reader, card int) error {
	vals, err := r.next(2 * card)
	if err != nil {
		return fmt.Errorf("array: %w", err)
	}
	for j := 1; j < card; j++ {
		if binary.LittleEndian.Uint16(vals[2*j:]) <= binary.LittleEndian.Uint16(vals[2*j-2:]) {
			return fmt.Errorf("array not strictly increasing at %d", j)
		}
	}
	return nil
}
