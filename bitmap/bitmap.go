package bitmap

import (
	"fmt"
	"iter"
	"sync"

	"github.com/RoaringBitmap/roaring/v2/roaring64"
)

// Bitmap is a set of chunk numbers of one volume, safe for concurrent use.
//
// It is built on roaring64 rather than the 32-bit roaring bitmap. With the
// smallest chunk (4 KiB), 2^32 chunks is only 16 TiB, and a 32-bit bitmap
// would need a volume-size check on every set and a format change the day a
// larger volume appears. roaring64 costs almost nothing below 2^32 chunks:
// it keeps one 32-bit roaring bitmap per 2^32 chunks, so a lookup adds one
// search in a one-element slice (see BenchmarkTrackerMarkHit), and its
// portable serialization is the same 32-bit format behind an 8-byte count.
//
// Make one with New or Decode; a zero Bitmap is only a target for
// UnmarshalBinary.
type Bitmap struct {
	chunkSize int64
	shift     uint8

	mu sync.RWMutex
	rb *roaring64.Bitmap // guarded by mu
}

// New returns an empty bitmap of chunks of chunkSize bytes.
func New(chunkSize int64) (*Bitmap, error) {
	if err := ValidChunkSize(chunkSize); err != nil {
		return nil, err
	}
	return newBitmap(chunkSize, roaring64.New()), nil
}

func newBitmap(chunkSize int64, rb *roaring64.Bitmap) *Bitmap {
	return &Bitmap{chunkSize: chunkSize, shift: chunkShift(chunkSize), rb: rb}
}

// ChunkSize returns the number of bytes each chunk covers.
func (b *Bitmap) ChunkSize() int64 { return b.chunkSize }

// AddRange adds every chunk overlapping the byte range [off, off+length).
// An empty or negative range adds nothing.
func (b *Bitmap) AddRange(off, length int64) {
	first, last, ok := chunkRange(b.shift, off, length)
	if !ok {
		return
	}
	b.addChunks(first, last)
}

// addChunks adds chunks first..last inclusive. roaring64.AddRange takes an
// exclusive end, which cannot express the last uint64; no byte offset maps
// that far (2^63 bytes / 4 KiB is 2^51 chunks), so last+1 cannot wrap.
func (b *Bitmap) addChunks(first, last uint64) {
	b.mu.Lock()
	if first == last {
		b.rb.Add(first)
	} else {
		b.rb.AddRange(first, last+1)
	}
	b.mu.Unlock()
}

// Add adds one chunk.
func (b *Bitmap) Add(chunk uint64) {
	b.mu.Lock()
	b.rb.Add(chunk)
	b.mu.Unlock()
}

// Remove removes one chunk.
func (b *Bitmap) Remove(chunk uint64) {
	b.mu.Lock()
	b.rb.Remove(chunk)
	b.mu.Unlock()
}

// Contains reports whether chunk is in the bitmap.
func (b *Bitmap) Contains(chunk uint64) bool {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.rb.Contains(chunk)
}

// ContainsRange reports whether every chunk overlapping the byte range
// [off, off+length) is in the bitmap. An empty range is covered; a negative
// one is not.
func (b *Bitmap) ContainsRange(off, length int64) bool {
	if length == 0 && off >= 0 {
		return true
	}
	first, last, ok := chunkRange(b.shift, off, length)
	if !ok {
		return false
	}
	b.mu.RLock()
	defer b.mu.RUnlock()
	return containsChunks(b.rb, first, last)
}

// Intersects reports whether any chunk overlapping the byte range
// [off, off+length) is in the bitmap: whether a read there must wait for
// a merge of this bitmap. An empty or negative range intersects nothing.
func (b *Bitmap) Intersects(off, length int64) bool {
	first, last, ok := chunkRange(b.shift, off, length)
	if !ok {
		return false
	}
	b.mu.RLock()
	defer b.mu.RUnlock()
	// Rank(x) counts the members <= x.
	before := uint64(0)
	if first > 0 {
		before = b.rb.Rank(first - 1)
	}
	return b.rb.Rank(last) > before
}

// rankThreshold is the span above which containsChunks counts with Rank
// instead of probing each chunk: Rank walks the containers before the range
// (a few hundred on a 1 TiB volume), which beats that many probes only for
// long ranges.
const rankThreshold = 64

// containsChunks reports whether chunks first..last inclusive are all in rb.
// It does not allocate: it sits on the write path's cache hit.
func containsChunks(rb *roaring64.Bitmap, first, last uint64) bool {
	if last-first < rankThreshold {
		for c := first; ; c++ {
			if !rb.Contains(c) {
				return false
			}
			if c == last {
				return true
			}
		}
	}
	if !rb.Contains(first) || !rb.Contains(last) {
		return false
	}
	// Rank(x) counts the members <= x, so the range is full exactly when the
	// count through last exceeds the count before first by its length.
	before := uint64(0)
	if first > 0 {
		before = rb.Rank(first - 1)
	}
	return rb.Rank(last)-before == last-first+1
}

// Count returns the number of chunks in the bitmap.
func (b *Bitmap) Count() uint64 {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.rb.GetCardinality()
}

// IsEmpty reports whether the bitmap holds no chunk.
func (b *Bitmap) IsEmpty() bool {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.rb.IsEmpty()
}

// Clear removes every chunk.
func (b *Bitmap) Clear() {
	b.mu.Lock()
	b.rb.Clear()
	b.mu.Unlock()
}

// Clone returns an independent copy.
func (b *Bitmap) Clone() *Bitmap {
	return newBitmap(b.chunkSize, b.snapshot())
}

// snapshot returns a private copy of the roaring bitmap.
func (b *Bitmap) snapshot() *roaring64.Bitmap {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.rb.Clone()
}

// Or adds every chunk of other. Both bitmaps must have the same chunk size.
func (b *Bitmap) Or(other *Bitmap) error {
	if err := b.sameChunkSize(other); err != nil {
		return fmt.Errorf("or: %w", err)
	}
	if b == other {
		return nil
	}
	// Copying other first means the two locks are never held together, so
	// a.Or(b) racing b.Or(a) cannot deadlock.
	o := other.snapshot()
	b.mu.Lock()
	b.rb.Or(o)
	b.mu.Unlock()
	return nil
}

// AndNot removes every chunk of other. Both bitmaps must have the same
// chunk size.
func (b *Bitmap) AndNot(other *Bitmap) error {
	if err := b.sameChunkSize(other); err != nil {
		return fmt.Errorf("and not: %w", err)
	}
	if b == other {
		b.Clear()
		return nil
	}
	o := other.snapshot()
	b.mu.Lock()
	b.rb.AndNot(o)
	b.mu.Unlock()
	return nil
}

func (b *Bitmap) sameChunkSize(other *Bitmap) error {
	if b.chunkSize != other.chunkSize {
		return fmt.Errorf("%w: chunk size %d differs from %d", ErrChunkSize, other.chunkSize, b.chunkSize)
	}
	return nil
}

// Chunks returns the chunks in increasing order. Each iteration walks a
// snapshot taken when it starts, so chunks added meanwhile are not seen and
// the walk holds no lock while the loop body runs. A long walk that must see
// recent additions, or that must not copy a large bitmap, uses NextFrom.
func (b *Bitmap) Chunks() iter.Seq[uint64] {
	return func(yield func(uint64) bool) {
		snap := b.snapshot()
		it := snap.Iterator()
		for it.HasNext() {
			if !yield(it.Next()) {
				return
			}
		}
	}
}

// NextFrom returns the first chunk in the bitmap that is >= chunk, and false
// if there is none. A merge or copy walk calls it with the chunk after the
// one it just finished, so it skips clean regions without visiting them and
// sees chunks added behind its back as soon as they are added.
func (b *Bitmap) NextFrom(chunk uint64) (uint64, bool) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	if b.rb.Contains(chunk) {
		return chunk, true
	}
	var it roaring64.IntIterator64
	it.Initialize(b.rb)
	it.AdvanceIfNeeded(chunk)
	if !it.HasNext() {
		return 0, false
	}
	return it.PeekNext(), true
}

// SizeInBytes returns roaring's estimate of the memory the bitmap holds.
func (b *Bitmap) SizeInBytes() uint64 {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.rb.GetSizeInBytes()
}

// Optimize converts containers to run-length encoding where that is
// smaller. Bitmaps filled one write at a time hold runs as arrays or plain
// bitmaps; calling Optimize once writes have settled shrinks them, up to a
// few hundred times for sequentially written regions. It never changes the
// set of chunks.
func (b *Bitmap) Optimize() {
	b.mu.Lock()
	b.rb.RunOptimize()
	b.mu.Unlock()
}
