package bitmap

import (
	"fmt"
	"slices"
	"sync"

	"github.com/RoaringBitmap/roaring/v2/roaring64"
)

// HBMMSink is the conventional sink name of a set's HBMM master bitmap.
// Minicopy sinks are named by member path.
const HBMMSink = "hbmm"

// Tracker is the writer side of HBMM for one shadow set on one host. Before
// a data write is issued, Mark records its chunks in every sink: the HBMM
// master bitmap and one minicopy bitmap per absent member (invariant 2).
//
// A cache of chunks known to be in every sink makes repeated writes cheap:
// a write whose chunks are all cached takes one read lock and a lookup per
// chunk, and never touches the sinks. The cache is an under-approximation of
// the intersection of the sinks, and the tracker keeps it so: a new sink or
// a reset empties it. Clearing sink bitmaps behind the tracker's back (with
// Bitmap.Clear or Remove) breaks that, so a sink is cleared only through
// Reset; minicopy sinks are never cleared, only removed (invariant 5).
//
// All methods are safe for concurrent use.
type Tracker struct {
	chunkSize int64
	shift     uint8

	// mu guards the cache and the sink table. Mark's hit path takes it for
	// reading; the miss path, and every change to the sinks, for writing, so
	// a sink is never added or reset while a miss is writing chunks into the
	// sinks. Lock order: Tracker.mu before Bitmap.mu.
	mu    sync.RWMutex
	cache *roaring64.Bitmap
	sinks map[string]*Bitmap
	names []string // sorted keys of sinks, so Mark visits sinks in a fixed order
	// remote records chunks on other hosts (nil: none). gen counts the
	// cache's invalidations: a remote miss that waited across one must not
	// fill the cache with what it sent under the old sinks.
	remote Remote
	gen    uint64
}

// Remote is a sink on other hosts: the set's master bitmaps there. Set
// returns once the chunks are recorded as the write policy requires, or
// an error, and then the write must not be issued.
type Remote interface {
	Set(first, last uint64) error
}

// NewTracker returns a tracker with no sink for a set of the given chunk
// size.
func NewTracker(chunkSize int64) (*Tracker, error) {
	if err := ValidChunkSize(chunkSize); err != nil {
		return nil, err
	}
	return &Tracker{
		chunkSize: chunkSize,
		shift:     chunkShift(chunkSize),
		cache:     roaring64.New(),
		sinks:     make(map[string]*Bitmap),
	}, nil
}

// ChunkSize returns the set's chunk size.
func (t *Tracker) ChunkSize() int64 { return t.chunkSize }

// Mark records the byte range [off, off+length) in every sink. It must
// return before the write covering that range is issued to any member: once
// it has, every sink holds the range's chunks. An empty or negative range
// records nothing.
//
// This is on every write's path. A write whose chunks are all cached costs a
// read lock and one lookup per chunk, and does not allocate.
func (t *Tracker) Mark(off, length int64) error {
	first, last, ok := chunkRange(t.shift, off, length)
	if !ok {
		return nil
	}
	t.mu.RLock()
	// With no sink there is nothing to record (and the cache is emptied
	// when one is added), so a set without HBMM or minicopy bitmaps pays
	// a read lock and nothing more.
	hit := (len(t.names) == 0 && t.remote == nil) || containsChunks(t.cache, first, last)
	t.mu.RUnlock()
	if hit {
		return nil
	}
	t.mu.Lock()
	// Another writer may have marked the same chunks while this one waited.
	if containsChunks(t.cache, first, last) {
		t.mu.Unlock()
		return nil
	}
	for _, name := range t.names {
		t.sinks[name].addChunks(first, last)
	}
	remote, gen := t.remote, t.gen
	if remote == nil {
		t.cacheChunks(first, last)
		t.mu.Unlock()
		return nil
	}
	// The remote round trip runs without the lock, so that concurrent
	// misses can share one message; the local sinks already hold the
	// chunks (a bit too many is never wrong).
	t.mu.Unlock()
	if err := remote.Set(first, last); err != nil {
		return err
	}
	t.mu.Lock()
	if t.gen == gen {
		t.cacheChunks(first, last)
	}
	t.mu.Unlock()
	return nil
}

// Cached reports whether Mark of the range would return at once (every
// chunk known set, or nothing to record): the quick path takes only such
// writes.
func (t *Tracker) Cached(off, length int64) bool {
	first, last, ok := chunkRange(t.shift, off, length)
	if !ok {
		return true
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	return (len(t.names) == 0 && t.remote == nil) || containsChunks(t.cache, first, last)
}

// cacheChunks claims chunks for the cache; only with every sink holding
// them.
func (t *Tracker) cacheChunks(first, last uint64) {
	if first == last {
		t.cache.Add(first)
	} else {
		t.cache.AddRange(first, last+1)
	}
}

// SetRemote makes r the remote sink (nil: none) and empties the cache: a
// new master has seen none of the chunks the cache claims. Writes marked
// before it returns may have skipped r; the caller drains them before it
// counts r as whole.
func (t *Tracker) SetRemote(r Remote) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.remote = r
	t.invalidate()
}

// Invalidate empties the cache (a reset of remote bitmaps).
func (t *Tracker) Invalidate() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.invalidate()
}

func (t *Tracker) invalidate() {
	t.cache.Clear()
	t.gen++
}

// AddSink registers b as a sink under name; it must have the tracker's
// chunk size. It empties the cache, since b has not seen the chunks the
// cache claims are in every sink.
//
// b receives only writes marked after AddSink returns. For a member being
// expelled, seed its minicopy bitmap after AddSink with the chunks written
// before (SinceFlush.Snapshot), so that no write falls between the two.
func (t *Tracker) AddSink(name string, b *Bitmap) error {
	if b.chunkSize != t.chunkSize {
		return fmt.Errorf("add sink %q: %w: chunk size %d, tracker has %d", name, ErrChunkSize, b.chunkSize, t.chunkSize)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.sinks[name]; ok {
		return fmt.Errorf("add sink %q: %w", name, ErrSinkExists)
	}
	t.invalidate()
	t.sinks[name] = b
	i, _ := slices.BinarySearch(t.names, name)
	t.names = slices.Insert(t.names, i, name)
	return nil
}

// RemoveSink unregisters the sink called name and returns it, or nil if
// there is none. Writes marked after it returns are no longer recorded in
// it. The cache stays valid: fewer sinks only make it more true.
func (t *Tracker) RemoveSink(name string) *Bitmap {
	t.mu.Lock()
	defer t.mu.Unlock()
	b, ok := t.sinks[name]
	if !ok {
		return nil
	}
	delete(t.sinks, name)
	i, _ := slices.BinarySearch(t.names, name)
	t.names = slices.Delete(t.names, i, i+1)
	return b
}

// Sink returns the sink called name.
func (t *Tracker) Sink(name string) (*Bitmap, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	b, ok := t.sinks[name]
	return b, ok
}

// Sinks returns the sink names in increasing order.
func (t *Tracker) Sinks() []string {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return slices.Clone(t.names)
}

// Reset clears the sink called name, as an HBMM reset does once its bitmap
// has passed the policy's threshold and its writes have settled.
//
// The caller must guarantee that no write is in flight to the set from this
// host (the VU holds its write gate exclusively): a write marked before Reset
// but still in flight would then be on some members and not others, with no
// bit left to say so. Reset empties the cache before it clears the sink, so
// the next write to any chunk marks it again.
//
// Reset is for the HBMM master only. Minicopy bitmaps, a failed writer's
// bitmap and a bitmap feeding a pending merge are never reset (invariant 5);
// enforcing that is the caller's business.
func (t *Tracker) Reset(name string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	b, ok := t.sinks[name]
	if !ok {
		return fmt.Errorf("reset %q: %w", name, ErrNoSink)
	}
	t.invalidate()
	b.Clear()
	return nil
}

// Modified returns the number of chunks in the sink called name: SHOW
// SHADOW's "Modified blocks since bitmap creation", in chunks (multiply by
// ChunkSize/512 for blocks). It is 0 for an unknown sink.
func (t *Tracker) Modified(name string) uint64 {
	b, ok := t.Sink(name)
	if !ok {
		return 0
	}
	return b.Count()
}

// CachedChunks returns the number of chunks in the cache, for metrics.
func (t *Tracker) CachedChunks() uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.cache.GetCardinality()
}
