// Package masters owns both ends of cross-host HBMM: the master side, which
// keeps one write bitmap per (set, writer host) and serves bit-set, rollback
// and fetch requests on a stream (Store, Serve), and the writer side, which
// keeps one persistent, batching stream per master host and turns calls into
// frames and replies (Pool).
//
// Keeping a bitmap per writer, rather than one per set, is what lets a
// surviving master merge only a dead writer's chunks. The frame format is
// bitmap/wire's; authentication belongs to whoever provides the net.Conn.
package masters

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/bitmap/wire"
)

const (
	// MaxApplyChunks caps the chunks one Apply may name, so that a bad
	// peer cannot make a master allocate or compute without bound. A
	// legitimate write spans a few chunks; a whole-volume TRIM of 1 TiB
	// at 64 KiB chunks is exactly this.
	MaxApplyChunks = 1 << 24
	// undoDepth is how many recent bit-sets per writer a master can roll
	// back. A writer rolls back only a bit-set still in flight, and it
	// never has more than a few thousand in flight.
	undoDepth = 4096
)

// Errors returned by the Store, wrapped with the detail. Callers test them
// with errors.Is.
var (
	// ErrNotOpen reports a set this master does not have open: it holds no
	// bitmap of it, so a bit-set cannot be recorded.
	ErrNotOpen = errors.New("masters: set not open")
	// ErrBadRange reports a chunk range that is reversed or past the
	// largest volume the set's chunk size can address.
	ErrBadRange = errors.New("masters: bad chunk range")
	// ErrTooLarge reports a bit-set naming more than MaxApplyChunks chunks.
	ErrTooLarge = errors.New("masters: bit-set too large")
	// ErrStaleReset reports a reset overtaken by a later bit-set of the
	// same writer: clearing now could drop that bit-set's chunks.
	ErrStaleReset = errors.New("masters: reset overtaken by a later bit-set")
	// ErrNoWriter reports a fetch of a writer this master keeps no bitmap
	// of (it never sent a bit-set here, or was forgotten).
	ErrNoWriter = errors.New("masters: no bitmap of writer")
)

// Store holds the master bitmaps of this host: one per (set, writer host),
// for each set it has open. It is safe for concurrent use.
//
// A writer's bitmap changes only through Apply and Rollback, except the
// local writer's, which is its tracker's sink and never receives Apply or
// Rollback: the undo records that make Rollback exact assume nobody else
// sets or clears chunks behind them.
type Store struct {
	// mu guards the maps and each writer's undo records. One lock is enough:
	// an Apply costs a few bitmap operations, and holding it across the
	// whole Apply makes a rollback see each bit-set entirely or not at all.
	mu   sync.Mutex
	sets map[string]*openSet
	// resetCheck, if set, says whether a writer's bitmap may be reset now
	// (see SetResetCheck).
	resetCheck func(set, writer string, inc uint64) error
}

type openSet struct {
	chunkSize int64
	// chunkLimit is one past the last chunk whose byte range an int64
	// offset can express; the bitmap's byte-range methods need that.
	chunkLimit uint64
	writers    map[string]*writerBitmaps
}

type writerBitmaps struct {
	live *bitmap.Bitmap
	// undo holds the chunks each recent bit-set newly set, oldest first.
	undo []undoRecord
	// pending is the union of the undo records, which are kept disjoint: a
	// chunk belongs to at most one record, so no two rollbacks can both
	// claim it.
	pending *bitmap.Bitmap
	// maxSeq is the highest bit-set seq applied, by incarnation (each run
	// of a writer numbers from 1): a reset numbered below its run's was
	// overtaken (ErrStaleReset).
	maxSeq map[uint64]uint64
	// incs are the writer's incarnations whose bit-sets live holds (from
	// their streams' Hello): see Forget.
	incs []uint64
}

type undoRecord struct {
	seq   uint64
	newly *bitmap.Bitmap // nil when the bit-set set nothing new
}

// NewStore returns a store with no set open.
func NewStore() *Store {
	return &Store{sets: make(map[string]*openSet)}
}

// Open makes set ready to receive bit-sets, with chunks of chunkSize bytes.
// Opening an open set again is a no-op if the size matches and an error
// wrapping bitmap.ErrChunkSize otherwise: two sizes would make the writers'
// chunk numbers mean different bytes.
func (s *Store) Open(set string, chunkSize int64) error {
	if err := bitmap.ValidChunkSize(chunkSize); err != nil {
		return fmt.Errorf("masters: open %s: %w", set, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if o, ok := s.sets[set]; ok {
		if o.chunkSize != chunkSize {
			return fmt.Errorf("masters: open %s with %d-byte chunks: %w: already open with %d",
				set, chunkSize, bitmap.ErrChunkSize, o.chunkSize)
		}
		return nil
	}
	s.sets[set] = &openSet{
		chunkSize:  chunkSize,
		chunkLimit: uint64(math.MaxInt64 / chunkSize),
		writers:    make(map[string]*writerBitmaps),
	}
	return nil
}

// writer returns the bitmaps of writer in set, creating them. The caller
// holds s.mu.
func (s *Store) writer(set, writer string) (*openSet, *writerBitmaps, error) {
	o, ok := s.sets[set]
	if !ok {
		return nil, nil, fmt.Errorf("%w: %s", ErrNotOpen, set)
	}
	w, ok := o.writers[writer]
	if !ok {
		live, err := bitmap.New(o.chunkSize)
		if err != nil {
			return nil, nil, fmt.Errorf("masters: bitmap of writer %s in %s: %w", writer, set, err)
		}
		pending, _ := bitmap.New(o.chunkSize) // same size, already accepted
		w = &writerBitmaps{live: live, pending: pending, maxSeq: map[uint64]uint64{}}
		o.writers[writer] = w
	}
	return o, w, nil
}

// existing returns writer's bitmaps of set without creating them: nil if
// it has none; open false if set is not open. The caller holds s.mu.
func (s *Store) existing(set, writer string) (w *writerBitmaps, open bool) {
	o, ok := s.sets[set]
	if !ok {
		return nil, false
	}
	return o.writers[writer], true
}

// Bitmap returns writer's live bitmap of set, creating it empty if absent.
// The local writer uses it as its tracker's sink, so chunks it marks are in
// this master's bitmap without a message.
func (s *Store) Bitmap(set, writer string) (*bitmap.Bitmap, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, w, err := s.writer(set, writer)
	if err != nil {
		return nil, fmt.Errorf("masters: bitmap of %s: %w", writer, err)
	}
	return w.live, nil
}

// Apply sets the chunks of rs in writer's bitmap of set, and remembers
// which of them were not set before, so that Rollback(seq) can clear
// exactly those. It refuses the whole request, changing nothing, if set is
// not open (ErrNotOpen), a range is bad (ErrBadRange), or the ranges name
// more than MaxApplyChunks chunks (ErrTooLarge).
//
// A chunk that seq newly set and that a later bit-set of the same writer
// names again stays set through a rollback of seq: the later bit-set may
// have been acknowledged, and its write issued, in the meantime.
func (s *Store) Apply(set, writer string, inc, seq uint64, rs []wire.Range) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	o, ok := s.sets[set]
	if !ok {
		return fmt.Errorf("masters: apply bit-set %d of %s: %w: %s", seq, writer, ErrNotOpen, set)
	}
	var total uint64
	for i, r := range rs {
		if r.First > r.Last || r.Last >= o.chunkLimit {
			return fmt.Errorf("masters: apply bit-set %d of %s in %s: %w: range %d is chunks %d-%d, the set has chunks 0-%d",
				seq, writer, set, ErrBadRange, i, r.First, r.Last, o.chunkLimit-1)
		}
		// Checked range by range, so the sum cannot overflow.
		total += r.Last - r.First + 1
		if total > MaxApplyChunks {
			return fmt.Errorf("masters: apply bit-set %d of %s in %s: %w: more than %d chunks",
				seq, writer, set, ErrTooLarge, MaxApplyChunks)
		}
	}
	_, w, err := s.writer(set, writer)
	if err != nil {
		return fmt.Errorf("masters: apply bit-set %d: %w", seq, err)
	}

	cs := o.chunkSize
	var newly *bitmap.Bitmap
	pinned := false
	for _, r := range rs {
		off, n := int64(r.First)*cs, int64(r.Last-r.First+1)*cs
		// Computed against the bitmap before any range is added, so that
		// overlapping ranges within one request still count as new.
		newly = addNewChunks(w.live, newly, off, n, cs)
		pinned = pinned || w.pending.Intersects(off, n)
	}
	if pinned {
		// Take the chunks this request names away from earlier records:
		// rolling those back must no longer clear them.
		req, _ := bitmap.New(cs)
		for _, r := range rs {
			req.AddRange(int64(r.First)*cs, int64(r.Last-r.First+1)*cs)
		}
		for _, u := range w.undo {
			if u.newly != nil {
				_ = u.newly.AndNot(req) // same chunk size by construction
			}
		}
		_ = w.pending.AndNot(req)
	}
	for _, r := range rs {
		w.live.AddRange(int64(r.First)*cs, int64(r.Last-r.First+1)*cs)
	}

	// A repeated seq means the writer restarted its numbering; the older
	// record is no longer addressable, so its chunks simply stay set.
	if i := w.find(seq); i >= 0 {
		w.remove(i)
	}
	w.undo = append(w.undo, undoRecord{seq: seq, newly: newly})
	w.maxSeq[inc] = max(w.maxSeq[inc], seq)
	if inc != 0 && !slices.Contains(w.incs, inc) {
		w.incs = append(w.incs, inc)
	}
	if newly != nil {
		_ = w.pending.Or(newly)
	}
	if len(w.undo) > undoDepth {
		w.remove(0)
	}
	return nil
}

// addNewChunks adds to newly (allocated on first use) the chunks of the
// byte range [off, off+n) that live lacks. It bisects, so the cost grows
// with the number of set/unset boundaries in the range, not its length.
func addNewChunks(live, newly *bitmap.Bitmap, off, n, chunkSize int64) *bitmap.Bitmap {
	if live.ContainsRange(off, n) {
		return newly
	}
	if !live.Intersects(off, n) {
		if newly == nil {
			newly, _ = bitmap.New(chunkSize)
		}
		newly.AddRange(off, n)
		return newly
	}
	// Partly set, so at least two chunks long.
	half := (n / chunkSize / 2) * chunkSize
	newly = addNewChunks(live, newly, off, half, chunkSize)
	return addNewChunks(live, newly, off+half, n-half, chunkSize)
}

// find returns the index of seq's undo record, or -1.
func (w *writerBitmaps) find(seq uint64) int {
	for i := len(w.undo) - 1; i >= 0; i-- {
		if w.undo[i].seq == seq {
			return i
		}
	}
	return -1
}

// remove forgets undo record i; its chunks stay set.
func (w *writerBitmaps) remove(i int) {
	if u := w.undo[i]; u.newly != nil {
		_ = w.pending.AndNot(u.newly)
	}
	w.undo = append(w.undo[:i], w.undo[i+1:]...)
}

// Rollback clears the chunks that bit-set seq of writer newly set in set,
// except those a later bit-set named again (see Apply). A seq this store
// does not remember, because it never arrived, was already rolled back, or
// is older than the last 4096, is a no-op: there is nothing it alone set.
func (s *Store) Rollback(set, writer string, seq uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	w, open := s.existing(set, writer)
	if !open {
		return fmt.Errorf("masters: roll back bit-set %d of %s: %w: %s", seq, writer, ErrNotOpen, set)
	}
	if w == nil {
		return nil
	}
	i := w.find(seq)
	if i < 0 {
		return nil
	}
	if u := w.undo[i]; u.newly != nil {
		if err := w.live.AndNot(u.newly); err != nil {
			return fmt.Errorf("masters: roll back bit-set %d of %s in %s: %w", seq, writer, set, err)
		}
	}
	w.remove(i)
	return nil
}

// SetResetCheck installs the check Reset makes first: the agent refuses a
// reset from a writer that is not a live incarnation mounting the set, or
// while a merge is owed on the set (a bitmap feeding a pending merge, or
// a failed writer's, is never reset: invariant 5). It is called without
// the store's lock.
func (s *Store) SetResetCheck(check func(set, writer string, inc uint64) error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.resetCheck = check
}

// Reset clears writer's bitmap of set at the writer's request (RESET_THRESHOLD,
// wire.KindReset), numbered seq by the writer, which runs incarnation inc.
// The writer drained its writes, flushed every member and emptied its
// cache of known-set chunks before numbering the reset, so every chunk a
// bit-set numbered below seq set is the same on every member, and every
// later write sends a bit-set numbered above seq. Those are the only ones
// that must survive: if one was applied already, the reset arrived late
// (on an older stream, say) and is refused with ErrStaleReset, which
// leaves bits set, never too few. The reset clears the bits of every run
// of the writer: the check's conditions (the writer's live run, no merge
// owed) mean an earlier run's are no longer needed. A writer with no
// bitmap here has nothing to clear.
func (s *Store) Reset(set, writer string, inc, seq uint64) error {
	s.mu.Lock()
	check := s.resetCheck
	s.mu.Unlock()
	if check != nil {
		if err := check(set, writer, inc); err != nil {
			return fmt.Errorf("masters: reset %d of %s in %s: %w", seq, writer, set, err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	w, open := s.existing(set, writer)
	if !open {
		return fmt.Errorf("masters: reset %d of %s: %w: %s", seq, writer, ErrNotOpen, set)
	}
	if w == nil {
		return nil
	}
	if w.maxSeq[inc] > seq {
		return fmt.Errorf("masters: reset %d of %s in %s: %w (bit-set %d applied)", seq, writer, set, ErrStaleReset, w.maxSeq[inc])
	}
	w.live.Clear()
	w.pending.Clear()
	w.undo = nil
	w.incs = []uint64{inc}
	return nil
}

// Snapshot returns a copy of writer's bitmap of set, and false if there is
// none.
func (s *Store) Snapshot(set, writer string) (*bitmap.Bitmap, bool) {
	s.mu.Lock()
	w, _ := s.existing(set, writer)
	s.mu.Unlock()
	if w == nil {
		return nil, false
	}
	// Cloned outside s.mu: the bitmap is safe on its own, and a large
	// clone should not stall every bit-set.
	return w.live.Clone(), true
}

// Writers returns the number of chunks set in each writer's bitmap of set,
// or nil if set is not open.
func (s *Store) Writers(set string) map[string]uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	o, ok := s.sets[set]
	if !ok {
		return nil
	}
	out := make(map[string]uint64, len(o.writers))
	for name, w := range o.writers {
		out[name] = w.live.Count()
	}
	return out
}

// Forget drops writer's bitmap of set, once no merge needs its chunks,
// for the writer's incarnation departed that has left the set (0 if not
// known): the bitmap goes only if no other incarnation set bits in it. A writer that restarts and writes before
// this master has applied its previous run's failure sends its first
// bit-sets into the same bitmap, and dropping them with the old run's
// would lose chunks its cache already counts as set. Then the bits stay,
// too many but never too few, until the new run leaves in turn. It
// reports whether the bitmap was dropped.
func (s *Store) Forget(set, writer string, departed uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	w, _ := s.existing(set, writer)
	if w == nil {
		return false
	}
	if slices.ContainsFunc(w.incs, func(i uint64) bool { return i != departed }) {
		w.incs = slices.DeleteFunc(w.incs, func(i uint64) bool { return i == departed })
		delete(w.maxSeq, departed)
		return false
	}
	delete(s.sets[set].writers, writer)
	return true
}

// Close forgets set and every bitmap of it.
func (s *Store) Close(set string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.sets, set)
}
