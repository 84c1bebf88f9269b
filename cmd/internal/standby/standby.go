// Package standby owns a writer's side of HBMM write policy active: the
// standby masters of one set, the bit-sets sent to them asynchronously,
// and whether each one holds every bit the writer has acknowledged.
//
// Under write policy active (the seed's replica write policy), a write
// waits for its active master only; the standbys are brought up to date
// without holding the write back. A standby that misses a bit-set (its
// answer is late or failed, its queue overflowed, it restarted) is behind:
// it recovers by copying the active master's whole bitmap for the writer,
// and is unusable while that copy fails. A standby that is in step is one
// the writer can make its active master at once when the active one fails
// (Confirm); one that is not must wait for the writer's handshake (a
// flush of every member), and until then the writer's chunks need a full
// merge. The core never counts on a standby (shadowset.WriteActive): this
// package only decides how quickly one can take over.
package standby

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/bitmap/wire"
	"github.com/shadow-project/shadow/cmd/internal/masters"
	"github.com/shadow-project/shadow/cmd/internal/report"
)

// States of a standby, as show reports them.
const (
	// InStep: every bit-set since its last copy of the active bitmap was
	// acknowledged.
	InStep = "in_step"
	// Behind: it missed a bit-set; a copy of the active bitmap is due.
	Behind = "behind"
	// Copying: it is copying the active master's bitmap.
	Copying = "copying"
	// Unusable: its last copy failed ("corrupted" in the seed); the copy
	// is retried.
	Unusable = "unusable"
)

// DefaultAckTimeout is how long a standby may take to acknowledge an
// asynchronous bit-set before it counts as behind. It is well under the
// cluster's failure detection, so a standby that stalls (SIGSTOP, a long
// pause) is behind long before it is failed.
const DefaultAckTimeout = time.Second

// MaxOutstanding bounds the bit-sets in flight to one standby: beyond it
// the standby is behind (a copy catches it up) instead of holding memory.
const MaxOutstanding = 1024

// retryDelay is how long a standby waits between failed copies.
const retryDelay = 500 * time.Millisecond

// Sender is what the tracker needs of the bit-set streams (masters.Pool).
type Sender interface {
	BitSet(ctx context.Context, host, set, writer string, rs []wire.Range) (uint64, error)
	Fetch(ctx context.Context, host, set, writer string) (*bitmap.Bitmap, error)
}

type standby struct {
	host    string
	state   string
	since   time.Time
	dropped bool
	// fails counts missed bit-sets: a copy that began at fails == n makes
	// the standby in step only if no bit-set was missed meanwhile.
	fails       uint64
	outstanding int
	// drained is closed when outstanding falls to zero.
	drained              chan struct{}
	copies, copyFailures uint64
	missed               uint64
	lastErr              string
}

// Tracker keeps one writer's standbys of one set.
type Tracker struct {
	send        Sender
	key, writer string
	ackTimeout  time.Duration
	log         zerolog.Logger

	mu   sync.Mutex
	sbs  map[string]*standby
	kick chan struct{}
}

// New returns a tracker for writer's bitmaps in the masters' store entry
// key (the set's name); ackTimeout 0: DefaultAckTimeout.
func New(send Sender, key, writer string, ackTimeout time.Duration, log zerolog.Logger) *Tracker {
	if ackTimeout <= 0 {
		ackTimeout = DefaultAckTimeout
	}
	return &Tracker{send: send, key: key, writer: writer, ackTimeout: ackTimeout, log: log, sbs: map[string]*standby{}, kick: make(chan struct{}, 1)}
}

// SetStandbys makes hosts the standbys. A host that becomes one starts
// behind: it has missed the bits set before. A host that stops being one
// keeps its state for Confirm (it may be the one taking over) but gets no
// more bit-sets.
func (t *Tracker) SetStandbys(hosts []string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for h, s := range t.sbs {
		if !slices.Contains(hosts, h) {
			s.dropped = true
		}
	}
	for _, h := range hosts {
		s, ok := t.sbs[h]
		if ok && !s.dropped {
			continue
		}
		if !ok {
			s = &standby{host: h}
			t.sbs[h] = s
		}
		s.dropped = false
		s.fails++
		t.setState(s, Behind)
	}
	t.wake()
}

// Standbys are the current standbys, sorted.
func (t *Tracker) Standbys() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []string
	for h, s := range t.sbs {
		if !s.dropped {
			out = append(out, h)
		}
	}
	slices.Sort(out)
	return out
}

func (t *Tracker) setState(s *standby, state string) {
	if s.state != state {
		s.state, s.since = state, time.Now()
	}
}

func (t *Tracker) wake() {
	select {
	case t.kick <- struct{}{}:
	default:
	}
}

// Send sends rs to every standby without waiting. The caller's context
// bounds nothing: each send has its own ackTimeout.
func (t *Tracker) Send(ctx context.Context, rs []wire.Range) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, s := range t.sbs {
		if s.dropped {
			continue
		}
		if s.outstanding >= MaxOutstanding {
			t.missLocked(s, fmt.Errorf("standby: %d bit-sets in flight", s.outstanding))
			continue
		}
		if s.outstanding == 0 {
			s.drained = make(chan struct{})
		}
		s.outstanding++
		go func() {
			sctx, cancel := context.WithTimeout(ctx, t.ackTimeout)
			_, err := t.send.BitSet(sctx, s.host, t.key, t.writer, rs)
			cancel()
			t.mu.Lock()
			defer t.mu.Unlock()
			if err != nil {
				t.missLocked(s, err)
			}
			s.outstanding--
			if s.outstanding == 0 {
				close(s.drained)
			}
		}()
	}
}

func (t *Tracker) missLocked(s *standby, err error) {
	s.fails++
	s.missed++
	s.lastErr = err.Error()
	if s.state == InStep {
		t.log.Info().Str("standby", s.host).Str("key", t.key).Err(err).Msg("hbmm standby missed a bit-set: behind until it copies the active bitmap")
	}
	if s.state != Copying {
		t.setState(s, Behind)
	}
	t.wake()
}

// Confirm waits (within ctx) for the bit-sets in flight to host, and
// reports whether it holds every bit this writer has acknowledged: it
// was in step, and missed nothing since.
func (t *Tracker) Confirm(ctx context.Context, host string) bool {
	t.mu.Lock()
	s, ok := t.sbs[host]
	if !ok {
		t.mu.Unlock()
		return false
	}
	drained := s.drained
	waiting := s.outstanding > 0
	t.mu.Unlock()
	if waiting {
		select {
		case <-drained:
		case <-ctx.Done():
			return false
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return s.state == InStep && s.outstanding == 0
}

// Run copies the active master's bitmap to every standby that is behind
// or unusable, until ctx ends. active names the writer's active master
// now ("" while it has none: nobody to copy from).
func (t *Tracker) Run(ctx context.Context, active func() string) {
	retry := time.NewTimer(retryDelay)
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.kick:
		case <-retry.C:
		}
		pending := t.due()
		if len(pending) == 0 {
			continue
		}
		from := active()
		if from == "" {
			retry.Reset(retryDelay)
			continue
		}
		failed := false
		for _, s := range pending {
			if !t.copyTo(ctx, s, from) {
				failed = true
			}
		}
		if failed {
			retry.Reset(retryDelay)
		} else {
			t.wake() // a miss during a copy: once more
		}
	}
}

// due are the standbys that need a copy.
func (t *Tracker) due() []*standby {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []*standby
	for _, s := range t.sbs {
		if !s.dropped && (s.state == Behind || s.state == Unusable) {
			out = append(out, s)
		}
	}
	slices.SortFunc(out, func(a, b *standby) int {
		if a.host < b.host {
			return -1
		}
		return 1
	})
	return out
}

// copyTo copies from's bitmap for the writer to s. Every bit the writer
// acknowledged before the fetch is in it (the active master sets a bit
// before it acknowledges it); every later one reaches s by Send, so s is
// in step if it missed nothing from the copy's start on.
func (t *Tracker) copyTo(ctx context.Context, s *standby, from string) bool {
	t.mu.Lock()
	if s.host == from || s.dropped {
		t.mu.Unlock()
		return true
	}
	gen := s.fails
	t.setState(s, Copying)
	t.mu.Unlock()
	err := t.copyBitmap(ctx, s.host, from)
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case err != nil:
		s.copyFailures++
		s.lastErr = err.Error()
		t.setState(s, Unusable)
		t.log.Info().Str("standby", s.host).Str("active", from).Str("key", t.key).Err(err).Msg("hbmm standby unusable: copy of the active bitmap failed; retrying")
		return false
	case s.fails != gen:
		t.setState(s, Behind) // missed a bit-set meanwhile: copy again
	default:
		s.copies++
		t.setState(s, InStep)
		t.log.Info().Str("standby", s.host).Str("active", from).Str("key", t.key).Msg("hbmm standby in step: copied the active bitmap")
	}
	return true
}

// copyTimeout bounds one copy of the active bitmap.
const copyTimeout = 10 * time.Second

func (t *Tracker) copyBitmap(ctx context.Context, to, from string) error {
	ctx, cancel := context.WithTimeout(ctx, copyTimeout)
	defer cancel()
	b, err := t.send.Fetch(ctx, from, t.key, t.writer)
	if errors.Is(err, masters.ErrNoWriter) {
		// The active master has no bitmap of this writer: it never
		// acknowledged a bit-set of it (one it forgot would not be
		// active), so there is nothing to copy.
		return nil
	}
	if err != nil {
		return err
	}
	for batch := range masters.Batches(b, wire.MaxRanges) {
		if _, err := t.send.BitSet(ctx, to, t.key, t.writer, batch); err != nil {
			return err
		}
	}
	return nil
}

// Show is every current standby's state, by host.
func (t *Tracker) Show() []report.StandbyShow {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []report.StandbyShow
	for _, s := range t.sbs {
		if s.dropped {
			continue
		}
		out = append(out, report.StandbyShow{Host: s.host, State: s.state, Since: s.since, Copies: s.copies, CopyFailures: s.copyFailures,
			Missed: s.missed, Outstanding: s.outstanding, LastError: s.lastErr})
	}
	slices.SortFunc(out, func(a, b report.StandbyShow) int {
		if a.Host < b.Host {
			return -1
		}
		return 1
	})
	return out
}
