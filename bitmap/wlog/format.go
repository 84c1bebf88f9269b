package wlog

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"iter"
	"math/bits"
	"unsafe"
)

// Sizes of the on-disk format.
const (
	// BlockSize is the unit of the region: one header block, then
	// bitmap blocks, each written whole by one synchronous write.
	BlockSize = 4096
	// blockHeader is the size of every block's header; a bitmap
	// block's bits fill the rest.
	blockHeader = 64
	// BitsPerBlock is the number of extents one bitmap block covers.
	BitsPerBlock  = (BlockSize - blockHeader) * 8
	wordsPerBlock = BitsPerBlock / 64

	// MinExtentSize is the smallest extent: 64 KiB, the write bitmaps'
	// default chunk, so one extent never splits a chunk.
	MinExtentSize = 64 << 10
	// DefaultExtentSize is DRBD's activity-log extent: 4 MiB.
	DefaultExtentSize = 4 << 20
	// MaxExtentSize bounds the extent size Load accepts (and Format
	// accepts as a request).
	MaxExtentSize = 1 << 40

	// Version is the format version Format writes and Load reads.
	Version = 1

	// maxVolumeSize keeps every byte offset computation within int64.
	maxVolumeSize = 1 << 62
)

var (
	headerMagic = [8]byte{'S', 'H', 'D', 'W', 'W', 'L', 'O', 'G'}
	bitmapMagic = [8]byte{'S', 'H', 'D', 'W', 'W', 'L', 'B', 'M'}
	castagnoli  = crc32.MakeTable(crc32.Castagnoli)
	le          = binary.LittleEndian
)

// Errors callers test for with errors.Is. ErrBlank, ErrTorn and
// ErrCorrupt all mean the same thing to a caller after a crash: the log
// says nothing trustworthy, so the set needs a full merge, not a
// refusal (DESIGN.md invariant 10). They differ in what an operator is
// told.
var (
	// ErrBlank: the region is all zeroes: no log was ever formatted
	// here (or it was wiped).
	ErrBlank = errors.New("wlog: blank region (no write log)")
	// ErrTorn: a block's checksum does not match, or a block could not
	// be read: a write was cut short by a crash or the medium failed.
	ErrTorn = errors.New("wlog: torn or unreadable block")
	// ErrCorrupt: the blocks are whole but do not form a log this
	// volume can use: bad magic, an unknown version, a header that does
	// not match the volume or the region, a block from another log (an
	// interrupted format), bits past the volume's end.
	ErrCorrupt = errors.New("wlog: corrupt log")
	// ErrInvalid: a caller's bad argument: a misaligned or too small
	// region, a volume too large for it, a range outside the volume.
	ErrInvalid = errors.New("wlog: invalid argument")
	// ErrFailed: a log write or a flush of the member failed. The log
	// can no longer set bits durably nor clear any; the member must be
	// expelled. The error also wraps the cause.
	ErrFailed = errors.New("wlog: failed")
	// ErrClosed: a call after Close.
	ErrClosed = errors.New("wlog: closed")
)

// Region is where the log lies on the member, in bytes from its start:
// meta.Area's LogOffset and LogLength.
type Region struct {
	Offset, Length int64
}

func (r Region) check() error {
	if r.Offset < 0 || r.Offset%BlockSize != 0 || r.Length%BlockSize != 0 || r.Length < 2*BlockSize ||
		r.Length > maxVolumeSize-r.Offset {
		return fmt.Errorf("wlog: region %d+%d: need 4 KiB-aligned offset and length of at least two blocks: %w", r.Offset, r.Length, ErrInvalid)
	}
	return nil
}

// capacity is the number of extents the region's bitmap blocks hold.
func (r Region) capacity() uint64 { return uint64(r.Length/BlockSize-1) * BitsPerBlock }

// Device is what the log needs of a member: reads to load it and
// range-limited synchronous writes (device.SyncWriter) to set and clear
// bits. The device package's os device and Faulty have both.
type Device interface {
	ReadAt(p []byte, off int64) (int, error)
	SyncWriteAt(p []byte, off int64) (int, error)
}

// ChooseExtentSize returns the extent size Format uses for a volume of
// volumeSize bytes in region: the requested size (DefaultExtentSize if
// requested ≤ 0) rounded up to a power of two, or, if larger, the
// smallest power of two of at least MinExtentSize for which every extent
// of the volume has a bit in the region. With the standard 254-block
// region that second term is 64 KiB up to a volume of about 498 GiB and
// at most 4 MiB up to about 31 TiB.
func ChooseExtentSize(region Region, volumeSize, requested int64) (int64, error) {
	if err := region.check(); err != nil {
		return 0, err
	}
	if volumeSize <= 0 || volumeSize > maxVolumeSize {
		return 0, fmt.Errorf("wlog: volume size %d: %w", volumeSize, ErrInvalid)
	}
	if requested <= 0 {
		requested = DefaultExtentSize
	}
	if requested > MaxExtentSize {
		return 0, fmt.Errorf("wlog: extent size %d above %d: %w", requested, int64(MaxExtentSize), ErrInvalid)
	}
	req := int64(1) << bits.Len64(uint64(requested-1))
	fit := int64(MinExtentSize)
	for extentsOf(volumeSize, fit) > region.capacity() {
		if fit >= MaxExtentSize {
			return 0, fmt.Errorf("wlog: volume of %d bytes does not fit a region of %d bytes: %w", volumeSize, region.Length, ErrInvalid)
		}
		fit <<= 1
	}
	return max(req, fit), nil
}

func extentsOf(volumeSize, extentSize int64) uint64 {
	return uint64((volumeSize-1)/extentSize + 1)
}

func blocksOf(extents uint64) int { return int((extents-1)/BitsPerBlock + 1) }

// header is the content of block 0.
type header struct {
	extentSize int64
	volumeSize int64
	blocks     int    // bitmap blocks after the header
	id         uint64 // random per Format: ties the blocks to this log
}

func (h header) extents() uint64 { return extentsOf(h.volumeSize, h.extentSize) }

// Header block layout (little endian):
//
//	 0  [8] magic "SHDWWLOG"
//	 8  u32 version
//	12  u32 BitsPerBlock (so a reader knows the geometry it was written with)
//	16  u64 extent size in bytes (a power of two)
//	24  u64 volume (data) size in bytes
//	32  u32 number of bitmap blocks
//	36  u32 reserved, zero
//	40  u64 log ID
//	48  [12] reserved, zero
//	60  u32 CRC32C of the block with these four bytes left out
//	64  reserved to the end of the block, zero
func encodeHeader(b []byte, h header) {
	clear(b[:BlockSize])
	copy(b, headerMagic[:])
	le.PutUint32(b[8:], Version)
	le.PutUint32(b[12:], BitsPerBlock)
	le.PutUint64(b[16:], uint64(h.extentSize))
	le.PutUint64(b[24:], uint64(h.volumeSize))
	le.PutUint32(b[32:], uint32(h.blocks))
	le.PutUint64(b[40:], h.id)
	le.PutUint32(b[60:], checksum(b))
}

// Bitmap block layout (little endian):
//
//	 0  [8] magic "SHDWWLBM"
//	 8  u32 block index in the region (1 for the first bitmap block)
//	12  u32 reserved, zero
//	16  u64 log ID (the header's)
//	24  u64 sequence number, bumped on every write of this block
//	32  [28] reserved, zero
//	60  u32 CRC32C of the block with these four bytes left out
//	64  the bitmap: bit k (byte k/8, bit k%8) is extent
//	    (index-1)*BitsPerBlock + k; bits past the volume's last extent
//	    are zero
func encodeBitmap(b []byte, index int, id, seq uint64, words []uint64) {
	clear(b[:blockHeader])
	copy(b, bitmapMagic[:])
	le.PutUint32(b[8:], uint32(index))
	le.PutUint64(b[16:], id)
	le.PutUint64(b[24:], seq)
	for i, w := range words {
		le.PutUint64(b[blockHeader+8*i:], w)
	}
	le.PutUint32(b[60:], checksum(b))
}

func checksum(b []byte) uint32 {
	return crc32.Update(crc32.Checksum(b[:60], castagnoli), castagnoli, b[64:BlockSize])
}

// decodeHeader checks block 0. errZero reports an all-zero block, which
// the caller tells apart from a blank region.
func decodeHeader(b []byte, region Region) (header, error) {
	if allZero(b) {
		return header{}, errZero
	}
	if [8]byte(b[:8]) != headerMagic {
		return header{}, fmt.Errorf("wlog: header at %d: bad magic %q: %w", region.Offset, b[:8], ErrCorrupt)
	}
	if got, want := le.Uint32(b[60:]), checksum(b); got != want {
		return header{}, fmt.Errorf("wlog: header at %d: checksum %#08x, computed %#08x: %w", region.Offset, got, want, ErrTorn)
	}
	if v := le.Uint32(b[8:]); v != Version {
		return header{}, fmt.Errorf("wlog: header at %d: format version %d, this program reads %d: %w", region.Offset, v, Version, ErrCorrupt)
	}
	if bpb := le.Uint32(b[12:]); bpb != BitsPerBlock {
		return header{}, fmt.Errorf("wlog: header at %d: %d bits per block, expected %d: %w", region.Offset, bpb, BitsPerBlock, ErrCorrupt)
	}
	ext, vol := le.Uint64(b[16:]), le.Uint64(b[24:])
	if ext < MinExtentSize || ext > MaxExtentSize || ext&(ext-1) != 0 {
		return header{}, fmt.Errorf("wlog: header at %d: extent size %d: %w", region.Offset, ext, ErrCorrupt)
	}
	if vol == 0 || vol > maxVolumeSize {
		return header{}, fmt.Errorf("wlog: header at %d: volume size %d: %w", region.Offset, vol, ErrCorrupt)
	}
	h := header{extentSize: int64(ext), volumeSize: int64(vol), blocks: int(le.Uint32(b[32:])), id: le.Uint64(b[40:])}
	n := h.extents()
	if n > region.capacity() {
		return header{}, fmt.Errorf("wlog: header at %d: %d extents do not fit the region of %d bytes: %w", region.Offset, n, region.Length, ErrCorrupt)
	}
	if h.blocks != blocksOf(n) {
		return header{}, fmt.Errorf("wlog: header at %d: %d bitmap blocks for %d extents: %w", region.Offset, h.blocks, n, ErrCorrupt)
	}
	return h, nil
}

var errZero = errors.New("wlog: all-zero block")

// decodeBitmap checks a bitmap block against the header and returns its
// sequence number, filling words with its bits.
func decodeBitmap(b []byte, index int, h header, off int64, words []uint64) (uint64, error) {
	if [8]byte(b[:8]) != bitmapMagic {
		return 0, fmt.Errorf("wlog: bitmap block %d at %d: bad magic %q: %w", index, off, b[:8], ErrCorrupt)
	}
	if got, want := le.Uint32(b[60:]), checksum(b); got != want {
		return 0, fmt.Errorf("wlog: bitmap block %d at %d: checksum %#08x, computed %#08x: %w", index, off, got, want, ErrTorn)
	}
	if i := le.Uint32(b[8:]); int(i) != index {
		return 0, fmt.Errorf("wlog: bitmap block %d at %d: says it is block %d: %w", index, off, i, ErrCorrupt)
	}
	if id := le.Uint64(b[16:]); id != h.id {
		return 0, fmt.Errorf("wlog: bitmap block %d at %d: log ID %016x, header says %016x (an interrupted format?): %w", index, off, id, h.id, ErrCorrupt)
	}
	for i := range words {
		words[i] = le.Uint64(b[blockHeader+8*i:])
	}
	// Bits past the last extent must be clear: a set one would name
	// data the volume does not have.
	first := uint64(index-1) * BitsPerBlock
	if n := h.extents(); n < first+BitsPerBlock {
		valid := n - first
		if w := valid / 64; valid%64 != 0 && words[w]>>(valid%64) != 0 || anyNonZero(words[(valid+63)/64:]) {
			return 0, fmt.Errorf("wlog: bitmap block %d at %d: bits set past the volume's last extent %d: %w", index, off, n-1, ErrCorrupt)
		}
	}
	return le.Uint64(b[24:]), nil
}

func anyNonZero(w []uint64) bool {
	for _, x := range w {
		if x != 0 {
			return true
		}
	}
	return false
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if le.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Logged is what a log held when it was loaded: the extents whose data
// may differ between members and must be merged.
type Logged struct {
	// ExtentSize is the size of one extent in bytes; extent i covers
	// [i*ExtentSize, (i+1)*ExtentSize), the last one cut at VolumeSize.
	ExtentSize int64
	// VolumeSize is the data size the log was formatted for.
	VolumeSize int64
	// Extents are the logged extents' indexes, ascending.
	Extents []uint64
}

// Ranges yields the logged byte ranges (offset, length) in ascending
// order, adjacent extents joined into one range.
func (g Logged) Ranges() iter.Seq2[int64, int64] {
	return func(yield func(int64, int64) bool) {
		for i := 0; i < len(g.Extents); {
			j := i + 1
			for j < len(g.Extents) && g.Extents[j] == g.Extents[j-1]+1 {
				j++
			}
			off := int64(g.Extents[i]) * g.ExtentSize
			end := min(int64(g.Extents[j-1]+1)*g.ExtentSize, g.VolumeSize)
			if !yield(off, end-off) {
				return
			}
			i = j
		}
	}
}

// Bytes is the total size of the logged ranges: what a minimerge of
// this log reads.
func (g Logged) Bytes() int64 {
	var n int64
	for _, length := range g.Ranges() {
		n += length
	}
	return n
}

// loaded is a whole valid log as read from the region.
type loaded struct {
	h     header
	seqs  []uint64   // per bitmap block
	words [][]uint64 // per bitmap block
}

// Load reads the log in region of dev and returns what it holds. A
// volumeSize > 0 must match the one the log was formatted for (a log of
// another geometry names other bytes); 0 skips that check, for tools
// that only show a log. Every failure other than ErrInvalid means the
// log cannot be trusted and the set needs a full merge: ErrBlank (never
// formatted), ErrTorn (a bad checksum or an unreadable block), ErrCorrupt
// (anything else).
func Load(dev Device, region Region, volumeSize int64) (Logged, error) {
	img, err := load(dev, region, volumeSize)
	if err != nil {
		return Logged{}, err
	}
	return img.logged(), nil
}

func load(dev Device, region Region, volumeSize int64) (*loaded, error) {
	if err := region.check(); err != nil {
		return nil, err
	}
	hb := alignedBuffer(BlockSize)
	if err := readFull(dev, hb, region.Offset); err != nil {
		return nil, fmt.Errorf("wlog: read header at %d: %w: %w", region.Offset, ErrTorn, err)
	}
	h, err := decodeHeader(hb, region)
	if errors.Is(err, errZero) {
		return nil, blankOrCorrupt(dev, region)
	}
	if err != nil {
		return nil, err
	}
	if volumeSize > 0 && h.volumeSize != volumeSize {
		return nil, fmt.Errorf("wlog: log at %d was formatted for a volume of %d bytes, this one has %d: %w", region.Offset, h.volumeSize, volumeSize, ErrCorrupt)
	}
	data := alignedBuffer(h.blocks * BlockSize)
	if err := readFull(dev, data, region.Offset+BlockSize); err != nil {
		return nil, fmt.Errorf("wlog: read bitmap blocks at %d: %w: %w", region.Offset+BlockSize, ErrTorn, err)
	}
	img := &loaded{h: h, seqs: make([]uint64, h.blocks), words: make([][]uint64, h.blocks)}
	for i := range h.blocks {
		off := region.Offset + int64(i+1)*BlockSize
		img.words[i] = make([]uint64, wordsPerBlock)
		img.seqs[i], err = decodeBitmap(data[i*BlockSize:(i+1)*BlockSize], i+1, h, off, img.words[i])
		if err != nil {
			return nil, err
		}
	}
	return img, nil
}

// blankOrCorrupt tells an all-zero region (never formatted) from one
// whose header is zero but whose blocks are not (a format interrupted
// before its header was written).
func blankOrCorrupt(dev Device, region Region) error {
	buf := alignedBuffer(64 << 10)
	for off := region.Offset + BlockSize; off < region.Offset+region.Length; off += int64(len(buf)) {
		b := buf[:min(int64(len(buf)), region.Offset+region.Length-off)]
		if err := readFull(dev, b, off); err != nil {
			return fmt.Errorf("wlog: read region at %d: %w: %w", off, ErrTorn, err)
		}
		if !allZero(b) {
			return fmt.Errorf("wlog: header at %d is blank but the region is not: %w", region.Offset, ErrCorrupt)
		}
	}
	return fmt.Errorf("wlog: region %d+%d: %w", region.Offset, region.Length, ErrBlank)
}

func readFull(dev Device, p []byte, off int64) error {
	n, err := dev.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return err
}

func (img *loaded) logged() Logged {
	g := Logged{ExtentSize: img.h.extentSize, VolumeSize: img.h.volumeSize}
	for i, words := range img.words {
		base := uint64(i) * BitsPerBlock
		for wi, w := range words {
			for w != 0 {
				g.Extents = append(g.Extents, base+uint64(wi*64+bits.TrailingZeros64(w)))
				w &= w - 1
			}
		}
	}
	return g
}

// newID returns a random, non-zero log ID.
func newID() (uint64, error) {
	var b [8]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			return 0, fmt.Errorf("wlog: log ID: %w", err)
		}
		if id := le.Uint64(b[:]); id != 0 {
			return id, nil
		}
	}
}

// alignedBuffer returns n zeroed bytes starting at a 4 KiB-aligned
// address, so that a member opened O_DIRECT writes and reads them
// without a bounce copy. (Go's collector does not move heap objects.)
func alignedBuffer(n int) []byte {
	b := make([]byte, n+BlockSize)
	off := 0
	if r := int(uintptr(unsafe.Pointer(unsafe.SliceData(b))) & (BlockSize - 1)); r != 0 {
		off = BlockSize - r
	}
	return b[off : off+n : off+n]
}
