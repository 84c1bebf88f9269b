package agent

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/shadow-project/shadow/shadowset"
)

// ErrClosed: the log no longer takes events.
var ErrClosed = errors.New("agent: event log closed")

// Log is the one ordered path by which events reach the shadowset core.
// No decision may bypass it: mounts, dismounts, member changes, I/O
// failures, progress, completion and timer expiries all become events
// here. In-process today; the cluster issue puts hashicorp/raft behind the
// same interface so every host applies the same events in the same order.
type Log interface {
	// Append orders ev after every event appended before it, applies it
	// and returns the core's verdict (a refused event changed nothing).
	Append(ev shadowset.Event) error
	// AppendFrom is Append for an engine's report: it is dropped, under
	// the log's order, if ctx was canceled first (the run was stopped).
	AppendFrom(ctx context.Context, ev shadowset.Event) error
}

// eventLog is what the agent needs of its log: the single-host LocalLog
// and the cluster's raft-backed log both have it.
type eventLog interface {
	Log
	// View runs f with the core under the log's lock (for reads).
	View(f func(c *shadowset.Core))
	// Locked is the core, for code already running under the log's lock
	// (the apply callbacks).
	Locked() *shadowset.Core
	History() []shadowset.Event
	Close()
}

// LocalLog is the single-host Log: a mutex orders the events, the core is
// stepped in Append, and the actions are handed to Apply in order while the
// mutex is held. Apply must not call Append (it would deadlock); it starts
// goroutines for anything long.
type LocalLog struct {
	mu     sync.Mutex
	core   *shadowset.Core
	apply  func(shadowset.Ready)
	timers map[time.Duration]*time.Timer
	closed bool
	// history keeps every applied event, in order: the stream an event
	// session replays.
	history []shadowset.Event
}

// NewLocalLog wraps a core. apply receives each event's Ready.
func NewLocalLog(core *shadowset.Core, apply func(shadowset.Ready)) *LocalLog {
	return &LocalLog{core: core, apply: apply, timers: map[time.Duration]*time.Timer{}}
}

// Append implements Log.
func (l *LocalLog) Append(ev shadowset.Event) error { return l.AppendFrom(context.Background(), ev) }

// AppendFrom implements Log.
func (l *LocalLog) AppendFrom(ctx context.Context, ev shadowset.Event) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := l.core.Step(ev); err != nil {
		return err
	}
	l.history = append(l.history, ev)
	rd := l.core.Ready()
	l.core.Advance()
	for _, a := range rd.Actions {
		if a.Kind == shadowset.ActTimer {
			l.armTimer(a.At)
		}
	}
	if l.apply != nil {
		l.apply(rd)
	}
	return nil
}

// armTimer turns the core's virtual deadline into a real timer whose
// expiry is itself an event (a tick reaching the deadline).
func (l *LocalLog) armTimer(at time.Duration) {
	if _, ok := l.timers[at]; ok {
		return
	}
	wait := at - l.core.Now()
	l.timers[at] = time.AfterFunc(wait, func() {
		l.mu.Lock()
		delete(l.timers, at)
		now := l.core.Now()
		l.mu.Unlock()
		if at > now {
			_ = l.Append(shadowset.Event{Kind: shadowset.EvTick, Duration: at - now})
		}
	})
}

// View runs f with the core under the log's lock, for reads (show).
func (l *LocalLog) View(f func(c *shadowset.Core)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f(l.core)
}

// Locked implements eventLog.
func (l *LocalLog) Locked() *shadowset.Core { return l.core }

// History returns the events applied so far.
func (l *LocalLog) History() []shadowset.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]shadowset.Event(nil), l.history...)
}

// Close stops the log and its timers.
func (l *LocalLog) Close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	for _, t := range l.timers {
		t.Stop()
	}
}
