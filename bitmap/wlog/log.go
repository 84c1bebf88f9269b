package wlog

import (
	"context"
	"fmt"
	"io"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"
)

// An extent's state is one atomic word, so that the hot path (an extent
// already durably set) is a single atomic add and Release a single CAS:
//
//	bits  0–23  writes in flight (Acquired, not yet Released)
//	bit   24    durable: the bit is set in the log on the member, and
//	            stays set until Sweep clears this flag (under CAS, with
//	            no write in flight) before it clears the bit
//	bit   25    pinned: loaded by Open or set by FormatDirty; never
//	            cleared until Unpin
//	bits 26–63  epoch of the last Release (or Unpin): the flush epoch
//	            current when the write completed
const (
	inflightMask = 1<<24 - 1
	flagDurable  = 1 << 24
	flagPinned   = 1 << 25
	epochShift   = 26
	epochMask    = 1<<epochShift - 1 // the bits below the epoch
)

// Log is the runtime write log of one member. Its methods are safe for
// concurrent use, except Close, which must come after every other call
// has returned.
type Log struct {
	dev    Device
	region Region
	h      header
	shift  uint // log2(extent size)

	st []atomic.Uint64 // per extent, see above

	// epoch is bumped by FlushBegin; flushed is the highest epoch whose
	// flush completed successfully. A Release records the epoch current
	// when it runs: a flush whose FlushBegin returned that epoch or a
	// later one was issued after the write completed.
	epoch   atomic.Uint64
	flushed atomic.Uint64
	closed  atomic.Bool

	mu      sync.Mutex
	blocks  []block
	err     error // sticky: a failed log write or flush
	writers sync.WaitGroup

	sweepMu sync.Mutex
	cands   map[uint64]candidate // guarded by sweepMu

	logWrites atomic.Uint64
	misses    atomic.Uint64
}

// block is one bitmap block and its group commit. At most one write of
// a block is in flight (cur); Acquires that need a bit set while it is
// in flight join next, which starts when cur completes: the whole batch
// shares one synchronous write, as in a group-commit WAL. Guarded by
// Log.mu, except buf, which only the writer of cur touches while cur is
// in flight (and readers under mu).
type block struct {
	index   int      // in the region; the first bitmap block is 1
	words   []uint64 // the bits as they should be on the member
	buf     []byte   // encoded block; the snapshot cur is writing
	seq     uint64
	pending []uint64 // extents set in words since the last snapshot
	cur     *batch
	next    *batch
}

// batch is one write of a block and the extents it makes durable.
type batch struct {
	done    chan struct{}
	err     error
	pending []uint64
}

// candidate: an extent Sweep found clearable, since when, at which
// last-write epoch (a different epoch later means a write in between).
type candidate struct {
	since time.Time
	epoch uint64
}

// Format writes an empty log to region of dev and returns it running.
// The extent size is ChooseExtentSize's. The bitmap blocks are written
// (synchronously) before the header, so a crash during Format leaves a
// log that Load refuses (ErrCorrupt or ErrBlank): never one that looks
// empty over an older log's bits.
//
// Format throws away what the region held. A caller that found logged
// extents (or no usable log) must merge them first, or use FormatDirty
// until the merge is done.
func Format(dev Device, region Region, volumeSize, extentSize int64) (*Log, error) {
	return format(dev, region, volumeSize, extentSize, false)
}

// FormatDirty is Format with every extent logged and pinned: for a set
// that owes a full merge and writes during it. Should a crash interrupt
// the merge, the restart finds every extent logged (a minimerge of
// everything, i.e. the full merge again) rather than an empty log that
// would skip it. Unpin the ranges the merge has finished.
func FormatDirty(dev Device, region Region, volumeSize, extentSize int64) (*Log, error) {
	return format(dev, region, volumeSize, extentSize, true)
}

func format(dev Device, region Region, volumeSize, extentSize int64, dirty bool) (*Log, error) {
	ext, err := ChooseExtentSize(region, volumeSize, extentSize)
	if err != nil {
		return nil, err
	}
	id, err := newID()
	if err != nil {
		return nil, err
	}
	h := header{extentSize: ext, volumeSize: volumeSize, id: id}
	h.blocks = blocksOf(h.extents())
	l := newLog(dev, region, h)
	if dirty {
		for e := range uint64(len(l.st)) {
			l.st[e].Store(flagDurable | flagPinned)
			l.blocks[e/BitsPerBlock].set(int(e % BitsPerBlock))
		}
	}
	buf := alignedBuffer(h.blocks * BlockSize)
	for i := range l.blocks {
		b := &l.blocks[i]
		b.seq = 1
		encodeBitmap(buf[i*BlockSize:], b.index, id, b.seq, b.words)
	}
	if err := syncWrite(dev, buf, region.Offset+BlockSize); err != nil {
		return nil, fmt.Errorf("wlog: format: write bitmap blocks at %d: %w", region.Offset+BlockSize, err)
	}
	hb := alignedBuffer(BlockSize)
	encodeHeader(hb, h)
	if err := syncWrite(dev, hb, region.Offset); err != nil {
		return nil, fmt.Errorf("wlog: format: write header at %d: %w", region.Offset, err)
	}
	return l, nil
}

// Open loads the log in region (as Load, checking it was made for a
// volume of volumeSize bytes) and resumes it: the loaded extents stay
// set, pinned, until the merge they call for is done and the caller
// Unpins them. It returns what was loaded, for that merge. On any error
// there is no log to resume: merge in full and Format (or FormatDirty).
func Open(dev Device, region Region, volumeSize int64) (*Log, Logged, error) {
	if volumeSize <= 0 {
		return nil, Logged{}, fmt.Errorf("wlog: open: volume size %d: %w", volumeSize, ErrInvalid)
	}
	img, err := load(dev, region, volumeSize)
	if err != nil {
		return nil, Logged{}, err
	}
	l := newLog(dev, region, img.h)
	for i := range l.blocks {
		b := &l.blocks[i]
		b.seq = img.seqs[i]
		copy(b.words, img.words[i])
		base := uint64(i) * BitsPerBlock
		for wi, w := range b.words {
			for w != 0 {
				l.st[base+uint64(wi*64+bits.TrailingZeros64(w))].Store(flagDurable | flagPinned)
				w &= w - 1
			}
		}
	}
	return l, img.logged(), nil
}

func newLog(dev Device, region Region, h header) *Log {
	l := &Log{
		dev:    dev,
		region: region,
		h:      h,
		shift:  uint(bits.TrailingZeros64(uint64(h.extentSize))),
		st:     make([]atomic.Uint64, h.extents()),
		blocks: make([]block, h.blocks),
		cands:  make(map[uint64]candidate),
	}
	l.epoch.Store(1)
	bufs := alignedBuffer(h.blocks * BlockSize)
	words := make([]uint64, h.blocks*wordsPerBlock)
	for i := range l.blocks {
		l.blocks[i] = block{
			index: i + 1,
			words: words[i*wordsPerBlock : (i+1)*wordsPerBlock : (i+1)*wordsPerBlock],
			buf:   bufs[i*BlockSize : (i+1)*BlockSize : (i+1)*BlockSize],
		}
	}
	return l
}

// ExtentSize is the log's extent size in bytes.
func (l *Log) ExtentSize() int64 { return l.h.extentSize }

// span returns the extents [first, end) that the byte range touches.
func (l *Log) span(off, length int64) (first, end uint64, err error) {
	if off < 0 || length < 0 || off > l.h.volumeSize || length > l.h.volumeSize-off {
		return 0, 0, fmt.Errorf("wlog: range %d+%d outside the volume of %d bytes: %w", off, length, l.h.volumeSize, ErrInvalid)
	}
	if length == 0 {
		return 0, 0, nil
	}
	return uint64(off) >> l.shift, uint64(off+length-1)>>l.shift + 1, nil
}

// Acquire is called before a data write of [off, off+length) to this
// member, and returns once every extent the range touches has its bit
// durable in the log; the extents then count the write as in flight
// until Release. An extent already durably set costs an atomic add and
// nothing else. Otherwise the bit goes into the next write of its log
// block, shared with every Acquire that arrives meanwhile (one
// synchronous write of one 4 KiB block for the whole batch).
//
// On error nothing is held (do not Release) and the data write must not
// be issued: ErrInvalid for a range outside the volume, ErrClosed, the
// context's error if it ended while waiting, or ErrFailed wrapping a log
// write's failure (the member is failed; expel it).
func (l *Log) Acquire(ctx context.Context, off, length int64) error {
	first, end, err := l.span(off, length)
	if err != nil {
		return err
	}
	if l.closed.Load() {
		return fmt.Errorf("wlog: acquire: %w", ErrClosed)
	}
	miss := false
	for e := first; e < end; e++ {
		if l.st[e].Add(1)&flagDurable == 0 {
			miss = true
		}
	}
	if !miss {
		return nil
	}
	if err := l.acquireSlow(ctx, first, end); err != nil {
		l.drop(first, end)
		return err
	}
	return nil
}

// TryAcquire is Acquire when no log write is needed: it admits the write
// and returns true when every extent of the range is already durable,
// and otherwise admits nothing and returns false (call Acquire, which
// may wait for a log write). A true must be paired with Release.
func (l *Log) TryAcquire(off, length int64) bool {
	first, end, err := l.span(off, length)
	if err != nil || l.closed.Load() {
		return false
	}
	for e := first; e < end; e++ {
		if l.st[e].Add(1)&flagDurable == 0 {
			l.drop(first, e+1)
			return false
		}
	}
	return true
}

// acquireSlow makes durable the extents of [first, end) that are not
// yet; every one of them already counts this write as in flight, which
// keeps Sweep away from them.
func (l *Log) acquireSlow(ctx context.Context, first, end uint64) error {
	l.misses.Add(1)
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("wlog: acquire: %w", err)
	}
	var waitBuf [4]*batch
	var startBuf [2]*block
	waits, starts := waitBuf[:0], startBuf[:0]

	l.mu.Lock()
	if err := l.usableLocked(); err != nil {
		l.mu.Unlock()
		return err
	}
	for e := first; e < end; e++ {
		if l.st[e].Load()&flagDurable != 0 {
			continue
		}
		b := &l.blocks[e/BitsPerBlock]
		bit := int(e % BitsPerBlock)
		// The bit goes into the image first, whichever write we wait
		// for: the image is what every later write of the block
		// carries, and Sweep cannot take the bit out while this write
		// is in flight.
		if !b.has(bit) {
			b.set(bit)
			b.pending = append(b.pending, e)
			starts = l.needNext(b, starts)
		}
		var w *batch
		if b.cur != nil && b.snapshotHas(bit) {
			w = b.cur // the write in flight carries the bit already
		} else {
			starts = l.needNext(b, starts)
			w = b.next
		}
		if !containsBatch(waits, w) {
			waits = append(waits, w)
		}
	}
	for _, b := range starts {
		l.begin(b)
	}
	l.mu.Unlock()

	// The writes this Acquire started are done here, not by a helper
	// goroutine: the acquirer leads its batch, and cannot abandon it.
	for _, b := range starts {
		l.write(b)
	}
	for _, w := range waits {
		select {
		case <-w.done:
			if w.err != nil {
				return w.err
			}
		case <-ctx.Done():
			// The batch goes on without us; its extents become durable
			// with no write in flight, and Sweep clears them later.
			return fmt.Errorf("wlog: acquire: %w", ctx.Err())
		}
	}
	return nil
}

// needNext makes sure b has a next batch, and that it will be started:
// now by the caller if no write of b is in flight, else when cur ends.
func (l *Log) needNext(b *block, starts []*block) []*block {
	if b.next == nil {
		b.next = &batch{done: make(chan struct{})}
	}
	if b.cur == nil && !containsBlock(starts, b) {
		starts = append(starts, b)
	}
	return starts
}

// begin snapshots b into its buffer as the write of b.next. Called with
// mu held, b.cur nil and b.next set.
func (l *Log) begin(b *block) {
	c := b.next
	b.next = nil
	c.pending, b.pending = b.pending, nil
	b.seq++
	encodeBitmap(b.buf, b.index, l.h.id, b.seq, b.words)
	b.cur = c
	l.writers.Add(1)
}

// write performs the write begun on b and completes it. If another
// batch gathered meanwhile, a goroutine writes that one (and any after
// it), so that this caller, an acquirer, goes on with its data write.
func (l *Log) write(b *block) {
	if l.writeOnce(b) {
		go l.writeChain(b)
	}
}

func (l *Log) writeChain(b *block) {
	for l.writeOnce(b) {
	}
}

func (l *Log) writeOnce(b *block) (again bool) {
	err := syncWrite(l.dev, b.buf, l.region.Offset+int64(b.index)*BlockSize)
	l.logWrites.Add(1)
	return l.finish(b, err)
}

// finish completes b.cur and begins b.next if it has waiters, telling
// the caller to write it.
func (l *Log) finish(b *block, err error) (again bool) {
	l.mu.Lock()
	defer l.writers.Done()
	defer l.mu.Unlock()
	c := b.cur
	b.cur = nil
	if err != nil {
		c.err = l.failLocked(fmt.Errorf("wlog: write log block %d at %d: %w", b.index, l.region.Offset+int64(b.index)*BlockSize, err))
	} else {
		for _, e := range c.pending {
			l.st[e].Or(flagDurable)
		}
	}
	close(c.done)
	if b.next != nil {
		l.begin(b)
		return true
	}
	return false
}

// failLocked records the log's failure (the first one wins) and fails
// every batch not yet started: no write will carry them.
func (l *Log) failLocked(err error) error {
	if l.err == nil {
		l.err = fmt.Errorf("%w: %w", ErrFailed, err)
	}
	for i := range l.blocks {
		if n := l.blocks[i].next; n != nil {
			n.err = l.err
			close(n.done)
			l.blocks[i].next = nil
		}
	}
	return l.err
}

func (l *Log) usableLocked() error {
	if l.closed.Load() {
		return fmt.Errorf("wlog: %w", ErrClosed)
	}
	return l.err
}

// drop undoes Acquire's in-flight counts without recording a write.
func (l *Log) drop(first, end uint64) {
	for e := first; e < end; e++ {
		l.st[e].Add(^uint64(0))
	}
}

// Release is called when the data write of [off, off+length) that
// Acquire admitted has finished, successfully or not. It records, per
// extent, the flush epoch the write completed in: only a flush issued
// after this (FlushBegin called after Release) covers it. Releasing a
// range that was not acquired is a bug that would let Sweep clear a bit
// under a write in flight; it panics.
func (l *Log) Release(off, length int64) {
	first, end, err := l.span(off, length)
	if err != nil {
		panic(err)
	}
	ep := l.epoch.Load()
	for e := first; e < end; e++ {
		st := &l.st[e]
		for {
			s := st.Load()
			if s&inflightMask == 0 {
				panic(fmt.Sprintf("wlog: Release of extent %d with no write in flight", e))
			}
			ns := s - 1
			if s>>epochShift < ep {
				ns = ns&epochMask | ep<<epochShift
			}
			if st.CompareAndSwap(s, ns) {
				break
			}
		}
	}
}

// FlushBegin is called just before a flush of this member is issued; it
// returns the flush's sequence for FlushDone. Writes Released before
// FlushBegin are covered by that flush once it succeeds.
func (l *Log) FlushBegin() uint64 { return l.epoch.Add(1) - 1 }

// FlushDone reports how the flush FlushBegin numbered seq ended. After a
// successful one, extents whose last write was Released before its
// FlushBegin and that have no write in flight are clean candidates for
// Sweep. A failed flush fails the log for good (the member's data may
// be gone whatever a later flush says): nothing is cleared from then on.
func (l *Log) FlushDone(seq uint64, ok bool) {
	if !ok {
		l.mu.Lock()
		l.failLocked(fmt.Errorf("wlog: flush %d of the member failed", seq))
		l.mu.Unlock()
		return
	}
	for {
		f := l.flushed.Load()
		if seq <= f || l.flushed.CompareAndSwap(f, seq) {
			return
		}
	}
}

// Sweep clears the bits of clean candidates that have stayed so for at
// least idle (measured with the now of successive Sweeps: a candidate
// seen first at now clears at a Sweep with now+idle or later; idle 0
// clears at once), rewriting each affected log block with one
// synchronous write, and returns once those writes are done. Clearing
// late is always safe; Sweep never clears an extent with a write in
// flight, one written after the last successful flush began, or a
// pinned one. Sweeps do not run concurrently with each other.
func (l *Log) Sweep(now time.Time, idle time.Duration) error {
	l.sweepMu.Lock()
	defer l.sweepMu.Unlock()
	flushed := l.flushed.Load()
	var waits []*batch
	for i := range l.blocks {
		b := &l.blocks[i]
		l.mu.Lock()
		if err := l.usableLocked(); err != nil {
			l.mu.Unlock()
			return err
		}
		cleared := false
		base := uint64(i) * BitsPerBlock
		for wi, w := range b.words {
			for w != 0 {
				bit := wi*64 + bits.TrailingZeros64(w)
				w &= w - 1
				e := base + uint64(bit)
				if l.sweepOne(e, flushed, now, idle) {
					b.clear(bit)
					cleared = true
				}
			}
		}
		var starts []*block
		if cleared {
			starts = l.needNext(b, nil)
			waits = append(waits, b.next)
			for _, s := range starts {
				l.begin(s)
			}
		}
		l.mu.Unlock()
		for _, s := range starts {
			l.write(s)
		}
	}
	for _, w := range waits {
		<-w.done
		if w.err != nil {
			return w.err
		}
	}
	return nil
}

// sweepOne decides extent e, whose bit is set, and takes its durable
// flag away when it is to be cleared. Called with mu and sweepMu held.
func (l *Log) sweepOne(e, flushed uint64, now time.Time, idle time.Duration) bool {
	s := l.st[e].Load()
	ep := s >> epochShift
	if s&(flagDurable|flagPinned|inflightMask) != flagDurable || ep > flushed {
		delete(l.cands, e)
		return false
	}
	c, seen := l.cands[e]
	if !seen || c.epoch != ep {
		l.cands[e] = candidate{since: now, epoch: ep}
		if idle > 0 {
			return false
		}
	} else if now.Sub(c.since) < idle {
		return false
	}
	// The CAS fails if a writer came in since the Load: it keeps the
	// bit. Once it succeeds, a new Acquire misses and sets the bit
	// again, under mu, after we clear it.
	if !l.st[e].CompareAndSwap(s, s&^flagDurable) {
		return false
	}
	delete(l.cands, e)
	return true
}

// Unpin ends the pin of the extents [off, off+length) touches (those
// Open loaded, or FormatDirty set): their merge is done. They are
// cleared as if written now: after a flush issued from now on, and idle.
func (l *Log) Unpin(off, length int64) error {
	first, end, err := l.span(off, length)
	if err != nil {
		return err
	}
	ep := l.epoch.Load()
	for e := first; e < end; e++ {
		st := &l.st[e]
		for {
			s := st.Load()
			if s&flagPinned == 0 {
				break
			}
			ns := s &^ flagPinned
			if s>>epochShift < ep {
				ns = ns&epochMask | ep<<epochShift
			}
			if st.CompareAndSwap(s, ns) {
				break
			}
		}
	}
	return nil
}

// Stats are counters for tests, benchmarks and metrics.
type Stats struct {
	Extents    uint64 // in the volume
	ExtentSize int64
	Set        int    // extents whose bit is set (or being set) in the log
	LogWrites  uint64 // synchronous writes of log blocks, Format's excluded
	Misses     uint64 // Acquires that had to wait for a log write
}

// Stats returns the log's counters.
func (l *Log) Stats() Stats {
	s := Stats{Extents: uint64(len(l.st)), ExtentSize: l.h.extentSize, LogWrites: l.logWrites.Load(), Misses: l.misses.Load()}
	l.mu.Lock()
	for i := range l.blocks {
		for _, w := range l.blocks[i].words {
			s.Set += bits.OnesCount64(w)
		}
	}
	l.mu.Unlock()
	return s
}

// Close stops the log: later calls fail with ErrClosed. It waits for
// log writes in flight and leaves the log on the member as it is (set
// bits stay set: a restart merges them). For an orderly shutdown,
// flush the member (FlushBegin, flush, FlushDone) and Sweep with idle 0
// first: the log is then empty. The device is the caller's to close.
func (l *Log) Close() error {
	if l.closed.Swap(true) {
		return fmt.Errorf("wlog: close: %w", ErrClosed)
	}
	l.writers.Wait()
	return nil
}

func (b *block) has(bit int) bool { return b.words[bit/64]&(1<<(bit%64)) != 0 }
func (b *block) set(bit int)      { b.words[bit/64] |= 1 << (bit % 64) }
func (b *block) clear(bit int)    { b.words[bit/64] &^= 1 << (bit % 64) }

// snapshotHas tells whether the write in flight carries bit. Called
// with mu held and cur set.
func (b *block) snapshotHas(bit int) bool {
	return b.buf[blockHeader+bit/8]&(1<<(bit%8)) != 0
}

func containsBatch(s []*batch, b *batch) bool {
	for _, x := range s {
		if x == b {
			return true
		}
	}
	return false
}

func containsBlock(s []*block, b *block) bool {
	for _, x := range s {
		if x == b {
			return true
		}
	}
	return false
}

// syncWrite writes p whole with SyncWriteAt.
func syncWrite(dev Device, p []byte, off int64) error {
	n, err := dev.SyncWriteAt(p, off)
	if err == nil && n != len(p) {
		err = io.ErrShortWrite
	}
	return err
}
