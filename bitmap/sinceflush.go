package bitmap

import (
	"fmt"
	"sync"

	"github.com/RoaringBitmap/roaring/v2/roaring64"
)

// SinceFlush tracks, for one shadow set, the chunks that may have been
// written since the set's last successful flush. When a member is expelled
// after an I/O error, its Snapshot is the member's automatic minicopy
// bitmap: it covers every chunk whose data the member may have lost with its
// page cache, and every chunk of a write still in flight to it.
//
// A flush covers only the writes that completed before it was issued. So
// SinceFlush keeps generations: a completed write adds its chunks to the
// current generation, and FlushBegin moves the current generation into a
// pending flush, to be dropped when that flush succeeds. A write in flight is
// counted apart from Issued to Completed, whatever flushes come and go
// meanwhile, and joins the current generation on completion. So a write
// issued before FlushBegin and completing after it survives the flush's
// success, as it must: the flush may have missed it. (Adding a write to the
// current generation at issue instead would lose it when a flush begun
// before its completion succeeds while it is still in flight.)
//
// Flushes may overlap; each is named by the FlushToken FlushBegin returns.
// Generations retire in the order their flushes began, and a failure puts
// back every pending generation, not only its own. With concurrent fsyncs
// Linux reports a write-back error to one caller only, and another one,
// issued earlier or later, may return success for data that is gone; so a
// flush's success proves nothing while a flush begun before it is still in
// doubt, nor for the writes a failed flush was covering.
//
// All methods are safe for concurrent use.
type SinceFlush struct {
	chunkSize int64
	shift     uint8

	mu       sync.Mutex
	cur      *roaring64.Bitmap    // chunks of writes completed since the last FlushBegin
	inflight map[chunkSpan]uint32 // writes issued and not completed, by chunk span
	pending  []*flushGen          // by token, oldest first
	next     uint64               // token of the next FlushBegin
}

// chunkSpan is the chunks first..last inclusive of one write. Keying writes
// in flight by span rather than by chunk makes Issued and Completed O(1)
// whatever the write's size; it relies on Completed repeating the range of
// its Issued.
type chunkSpan struct{ first, last uint64 }

type flushGen struct {
	token uint64
	gen   *roaring64.Bitmap
	done  bool // the flush succeeded; retire when every older one has
}

// FlushToken names a flush in progress. The zero value names none.
type FlushToken struct{ id uint64 }

// NewSinceFlush returns a SinceFlush with nothing written, for a set of the
// given chunk size.
func NewSinceFlush(chunkSize int64) (*SinceFlush, error) {
	if err := ValidChunkSize(chunkSize); err != nil {
		return nil, err
	}
	return &SinceFlush{
		chunkSize: chunkSize,
		shift:     chunkShift(chunkSize),
		cur:       roaring64.New(),
		inflight:  make(map[chunkSpan]uint32),
		next:      1,
	}, nil
}

// Issued records a write of [off, off+length) about to be issued. Every
// Issued must be followed by exactly one Completed of the same range.
func (s *SinceFlush) Issued(off, length int64) {
	first, last, ok := chunkRange(s.shift, off, length)
	if !ok {
		return
	}
	s.mu.Lock()
	s.inflight[chunkSpan{first, last}]++
	s.mu.Unlock()
}

// Completed records the completion of a write of [off, off+length),
// successful or not: a flush issued before this call may not cover it.
func (s *SinceFlush) Completed(off, length int64) {
	first, last, ok := chunkRange(s.shift, off, length)
	if !ok {
		return
	}
	s.mu.Lock()
	// A Completed without its Issued is a caller bug; its chunks still go
	// into the generation, and no count is driven below zero.
	span := chunkSpan{first, last}
	if n := s.inflight[span]; n > 1 {
		s.inflight[span] = n - 1
	} else if n == 1 {
		delete(s.inflight, span)
	}
	if first == last {
		s.cur.Add(first)
	} else {
		s.cur.AddRange(first, last+1)
	}
	s.mu.Unlock()
}

// FlushBegin must be called before a flush of the set's members is issued.
// The token goes to FlushDone once the flush has returned.
func (s *SinceFlush) FlushBegin() FlushToken {
	s.mu.Lock()
	defer s.mu.Unlock()
	tok := FlushToken{id: s.next}
	s.next++
	s.pending = append(s.pending, &flushGen{token: tok.id, gen: s.cur})
	s.cur = roaring64.New()
	return tok
}

// FlushDone reports how the flush named by tok ended. On success its
// generation is dropped, once every flush begun before it has succeeded as
// well. On failure, every pending generation goes back into the current
// one, to stay until a flush begun after this call succeeds.
func (s *SinceFlush) FlushDone(tok FlushToken, ok bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := s.find(tok.id)
	if i < 0 || s.pending[i].done {
		return fmt.Errorf("flush done %d: %w", tok.id, ErrFlushToken)
	}
	if !ok {
		for _, p := range s.pending {
			s.cur.Or(p.gen)
		}
		// Flushes still running hand in their results later; keep their
		// entries, now empty, so their tokens stay valid.
		kept := s.pending[:0]
		for j, p := range s.pending {
			if j != i && !p.done {
				kept = append(kept, &flushGen{token: p.token, gen: roaring64.New()})
			}
		}
		clear(s.pending[len(kept):])
		s.pending = kept
		return nil
	}
	s.pending[i].done = true
	n := 0
	for n < len(s.pending) && s.pending[n].done {
		n++
	}
	clear(s.pending[:n])
	s.pending = s.pending[n:]
	return nil
}

func (s *SinceFlush) find(id uint64) int {
	for i, p := range s.pending {
		if p.token == id {
			return i
		}
	}
	return -1
}

// Snapshot returns every chunk not known to be flushed: those of writes in
// flight, of the current generation, and of flushes not yet retired.
func (s *SinceFlush) Snapshot() *Bitmap {
	s.mu.Lock()
	defer s.mu.Unlock()
	rb := s.cur.Clone()
	for _, p := range s.pending {
		rb.Or(p.gen)
	}
	for w := range s.inflight {
		rb.AddRange(w.first, w.last+1)
	}
	return newBitmap(s.chunkSize, rb)
}

// PendingFlushes returns the number of flushes begun and not yet retired.
func (s *SinceFlush) PendingFlushes() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.pending)
}
