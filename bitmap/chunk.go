package bitmap

import (
	"errors"
	"fmt"
	"math/bits"
)

// Chunk sizes a set may use. Every size is a power of two so that a byte
// offset maps to its chunk with a shift, never a division, on the write path.
const (
	// DefaultChunkSize is the chunk size of a set created without one:
	// 16 Mi chunks per TiB, small enough that a minimerge after a crash
	// rewrites little more than what was written, large enough that the
	// bitmap of a busy volume stays a few MiB.
	DefaultChunkSize int64 = 64 << 10
	// MinChunkSize is the page size: a smaller chunk would only cost memory,
	// since writes are never tracked below a 4 KiB block.
	MinChunkSize int64 = 4 << 10
	// MaxChunkSize bounds the work one bit can cause: a single 512-byte
	// write costs a merge or copy of a whole chunk.
	MaxChunkSize int64 = 64 << 20
)

// Errors returned by this package. Callers test them with errors.Is; the
// returned errors wrap them with the detail.
var (
	// ErrChunkSize reports a chunk size that is not a power of two between
	// MinChunkSize and MaxChunkSize, or two bitmaps of different chunk sizes
	// combined.
	ErrChunkSize = errors.New("bitmap: bad chunk size")
	// ErrCorrupt reports an encoded bitmap that fails a check: magic,
	// checksum, roaring payload, chunk count, trailing bytes.
	ErrCorrupt = errors.New("bitmap: corrupt encoding")
	// ErrTruncated reports an encoded bitmap shorter than its header says.
	ErrTruncated = errors.New("bitmap: truncated encoding")
	// ErrVersion reports a well-formed encoding of a format version this
	// build does not know.
	ErrVersion = errors.New("bitmap: unknown format version")
	// ErrNoSink reports a tracker sink name that is not registered.
	ErrNoSink = errors.New("bitmap: no such sink")
	// ErrSinkExists reports a tracker sink name registered twice.
	ErrSinkExists = errors.New("bitmap: sink already exists")
	// ErrFlushToken reports a flush token that is unknown or already done.
	ErrFlushToken = errors.New("bitmap: unknown flush token")
)

// ValidChunkSize reports whether n bytes may be a set's chunk size.
func ValidChunkSize(n int64) error {
	if n < MinChunkSize || n > MaxChunkSize {
		return fmt.Errorf("%w: %d bytes is outside [%d, %d]", ErrChunkSize, n, MinChunkSize, MaxChunkSize)
	}
	if n&(n-1) != 0 {
		return fmt.Errorf("%w: %d bytes is not a power of two", ErrChunkSize, n)
	}
	return nil
}

// chunkShift returns log2 of a chunk size already checked by ValidChunkSize.
func chunkShift(n int64) uint8 {
	return uint8(bits.TrailingZeros64(uint64(n)))
}

// chunkRange returns the first and last chunk overlapping the byte range
// [off, off+length). ok is false when the range holds no byte: length 0, or
// a negative offset or length, which no device accepts either.
//
// The sum is taken in uint64: two non-negative int64 values cannot overflow
// it, so a range reaching the end of the int64 space needs no clamping.
func chunkRange(shift uint8, off, length int64) (first, last uint64, ok bool) {
	if off < 0 || length <= 0 {
		return 0, 0, false
	}
	first = uint64(off) >> shift
	last = (uint64(off) + uint64(length) - 1) >> shift
	return first, last, true
}
