package vu

import "sync"

// RangeLock orders overlapping I/O on a volume. Holders of disjoint ranges
// proceed concurrently; a request that overlaps an earlier one (held or
// still waiting) waits for it, so overlapping writes are applied to every
// member in the order they arrived, and a merge or copy of a chunk never
// interleaves with an application write to it.
//
// Waiting is FIFO among overlapping requests, which keeps a stream of
// application writes from starving a merge chunk and vice versa. The queue
// is scanned linearly: it holds at most the requests in flight (tens), and
// a tree would cost more than it saves at that size.
type RangeLock struct {
	mu    sync.Mutex
	queue []*rangeEntry // arrival order; granted and waiting
}

type rangeEntry struct {
	off, end int64
	granted  bool
	ready    chan struct{}
}

func (e *rangeEntry) overlaps(o *rangeEntry) bool { return e.off < o.end && o.off < e.end }

// Lock waits until [off, off+n) may be used and returns the function that
// releases it. A zero-length range is treated as one byte so that it still
// orders against writes at the same offset.
func (l *RangeLock) Lock(off, n int64) (unlock func()) {
	if n <= 0 {
		n = 1
	}
	e := &rangeEntry{off: off, end: off + n}
	l.mu.Lock()
	e.granted = l.free(e, len(l.queue))
	if !e.granted {
		e.ready = make(chan struct{})
	}
	l.queue = append(l.queue, e)
	l.mu.Unlock()
	if e.ready != nil {
		<-e.ready
	}
	return func() { l.release(e) }
}

// tryLock takes [off, off+n) only if no queued request overlaps it, and
// returns nil instead of waiting otherwise. Pass the entry to release.
func (l *RangeLock) tryLock(off, n int64) *rangeEntry {
	if n <= 0 {
		n = 1
	}
	e := &rangeEntry{off: off, end: off + n, granted: true}
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.free(e, len(l.queue)) {
		return nil
	}
	l.queue = append(l.queue, e)
	return e
}

// free reports whether no entry before position i overlaps e.
func (l *RangeLock) free(e *rangeEntry, i int) bool {
	for _, o := range l.queue[:i] {
		if o.overlaps(e) {
			return false
		}
	}
	return true
}

func (l *RangeLock) release(e *rangeEntry) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, o := range l.queue {
		if o == e {
			l.queue = append(l.queue[:i], l.queue[i+1:]...)
			break
		}
	}
	for i, w := range l.queue {
		if !w.granted && w.overlaps(e) && l.free(w, i) {
			w.granted = true
			close(w.ready)
		}
	}
}

// Held reports how many ranges are granted or waiting (for tests and
// metrics).
func (l *RangeLock) Held() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.queue)
}
