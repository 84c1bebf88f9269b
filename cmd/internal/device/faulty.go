package device

import (
	"errors"
	"fmt"
	"sync"
	"time"
)

// Op names a Device operation, for fault rules.
type Op uint8

// The operations a Rule sees.
const (
	OpRead Op = iota + 1
	OpWrite
	OpFlush
	OpZero
	// OpSyncWrite is SyncWriteAt, kept apart from OpWrite so that a rule
	// can fail a write log's range-limited synchronous writes alone.
	OpSyncWrite
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpFlush:
		return "flush"
	case OpZero:
		return "zero"
	case OpSyncWrite:
		return "sync-write"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Rule decides the fate of one operation: a non-nil error fails it
// without doing it, a positive delay holds it back first. off and length
// are the request's range (0, 0 for a flush). Rules run outside the
// Faulty's locks and may be called concurrently.
type Rule func(op Op, off, length int64) (err error, delay time.Duration)

// When builds the common Rule: operations for which pred is true get err
// (nil for none) after delay. Rules built with it need no function
// literal returning an error first, which staticcheck (ST1008) flags.
func When(pred func(op Op, off, length int64) bool, err error, delay time.Duration) Rule {
	//lint:ignore ST1008 the Rule signature puts the error first by design (it mirrors errorfs)
	return func(op Op, off, length int64) (error, time.Duration) {
		if pred(op, off, length) {
			return err, delay
		}
		return nil, 0
	}
}

// Faulty wraps a Device for tests, after the model of pebble's
// vfs/errorfs: rules inject errors and delays into chosen operations, and
// a power-loss mode records every write and zero not yet covered by a
// successful Flush (or by a later SyncWriteAt of the same range) so that
// Crash can undo them, leaving the device as it would be after the
// machine lost power.
//
// It keeps the Device contract: an error from a write, zero or flush,
// injected or not, fails the Faulty for good (later calls return it).
// Read errors do not. It is safe for concurrent use; while power loss is
// armed, writes, zeroes and flushes are serialised, so that the undo log
// is exactly the order in which the device saw them.
type Faulty struct {
	dev Device

	rulesMu sync.Mutex
	rules   []Rule

	// mu: I/O holds it shared; armed writes, flushes and Crash hold it
	// exclusively.
	mu      sync.RWMutex
	armed   bool
	undo    []undoRecord
	crashed bool

	failMu sync.Mutex
	failed error
}

// undoRecord is the content of [off, off+len(old)) before a write.
type undoRecord struct {
	off int64
	old []byte
}

// NewFaulty wraps d. With no rule and power loss not armed it passes
// every call through.
func NewFaulty(d Device) *Faulty { return &Faulty{dev: d} }

// Inject adds a rule. Every rule sees every operation; delays add up and
// the first non-nil error (in the order rules were added) is returned.
func (f *Faulty) Inject(r Rule) {
	f.rulesMu.Lock()
	f.rules = append(f.rules, r)
	f.rulesMu.Unlock()
}

// ClearRules removes every rule. It does not clear a sticky failure.
func (f *Faulty) ClearRules() {
	f.rulesMu.Lock()
	f.rules = nil
	f.rulesMu.Unlock()
}

// PowerLoss arms recording: from now on every write and zero keeps the
// old contents of its range until a Flush succeeds. The undo log costs
// memory equal to the bytes written and zeroed since the last Flush (a
// test should not Zero a whole large device while armed).
func (f *Faulty) PowerLoss() {
	f.mu.Lock()
	f.armed = true
	f.mu.Unlock()
}

// Unflushed is the number of writes and zeroes Crash would undo now.
func (f *Faulty) Unflushed() int {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return len(f.undo)
}

// Crash simulates the power loss: it writes back the old contents of
// every unflushed write and zero, newest first, on the underlying device,
// flushes it, and fails every later call on the Faulty with ErrCrashed
// (Close still closes the underlying device, so the test can reopen it).
// The error reports a rollback that could not be written.
func (f *Faulty) Crash() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.crashed {
		return nil
	}
	f.crashed = true
	var errs []error
	for i := len(f.undo) - 1; i >= 0; i-- {
		u := f.undo[i]
		if _, err := f.dev.WriteAt(u.old, u.off); err != nil {
			errs = append(errs, fmt.Errorf("device: crash: roll back %d+%d: %w", u.off, len(u.old), err))
		}
	}
	if len(f.undo) > 0 {
		if err := f.dev.Flush(); err != nil {
			errs = append(errs, fmt.Errorf("device: crash: flush after rollback: %w", err))
		}
	}
	f.undo = nil
	return errors.Join(errs...)
}

// decide runs the rules for one operation, sleeping their delay.
func (f *Faulty) decide(op Op, off, length int64) error {
	f.rulesMu.Lock()
	rules := f.rules
	f.rulesMu.Unlock()
	var delay time.Duration
	var first error
	for _, r := range rules {
		err, d := r(op, off, length)
		if d > 0 {
			delay += d
		}
		if first == nil && err != nil {
			first = err
		}
	}
	if delay > 0 {
		time.Sleep(delay)
	}
	if first != nil {
		return fmt.Errorf("device: %s %s at %d+%d: injected: %w", op, f.dev.Path(), off, length, first)
	}
	return nil
}

// usable reports a crash or a sticky failure. Called with mu held.
func (f *Faulty) usable() error {
	if f.crashed {
		return fmt.Errorf("device: %s: %w", f.dev.Path(), ErrCrashed)
	}
	f.failMu.Lock()
	defer f.failMu.Unlock()
	return f.failed
}

// fail makes err sticky if it is an I/O failure, and returns what the
// caller should see.
func (f *Faulty) fail(op Op, err error) error {
	if !sticks(err) {
		return err
	}
	f.failMu.Lock()
	defer f.failMu.Unlock()
	if f.failed == nil {
		f.failed = newFailed(f.dev.Path(), op.String(), err)
	}
	return f.failed
}

func (f *Faulty) ReadAt(p []byte, off int64) (int, error) {
	injected := f.decide(OpRead, off, int64(len(p)))
	f.mu.RLock()
	defer f.mu.RUnlock()
	if err := f.usable(); err != nil {
		return 0, err
	}
	if injected != nil {
		// A read error is not sticky: the engine repairs it.
		return 0, injected
	}
	return f.dev.ReadAt(p, off)
}

func (f *Faulty) WriteAt(p []byte, off int64) (int, error) {
	n := int64(len(p))
	var written int
	err := f.mutate(OpWrite, off, n, func() error {
		var err error
		written, err = f.dev.WriteAt(p, off)
		return err
	})
	return written, err
}

func (f *Faulty) Zero(off, length int64) error {
	return f.mutate(OpZero, off, length, func() error { return f.dev.Zero(off, length) })
}

// mutate runs a write or zero of [off, off+n): rules first, then, when
// power loss is armed, the old contents go to the undo log before do
// touches the device.
func (f *Faulty) mutate(op Op, off, n int64, do func() error) error {
	if err := checkRange(f.dev.Path(), op.String(), off, n, f.dev.Size()); err != nil {
		return err
	}
	injected := f.decide(op, off, n)
	f.mu.RLock()
	if !f.armed || injected != nil {
		defer f.mu.RUnlock()
		if err := f.usable(); err != nil {
			return err
		}
		if injected != nil {
			return f.fail(op, injected)
		}
		return f.fail(op, do())
	}
	f.mu.RUnlock()

	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.usable(); err != nil {
		return err
	}
	if f.armed && n > 0 {
		old := make([]byte, n)
		if m, err := f.dev.ReadAt(old, off); m != len(old) {
			return f.fail(op, fmt.Errorf("device: %s %s: save old contents at %d+%d: %w", op, f.dev.Path(), off, n, err))
		}
		// Logged before the write: a write that fails halfway may have
		// changed part of the range, and Crash must restore it too.
		f.undo = append(f.undo, undoRecord{off: off, old: old})
	}
	return f.fail(op, do())
}

func (f *Faulty) Flush() error {
	injected := f.decide(OpFlush, 0, 0)
	f.mu.RLock()
	if !f.armed || injected != nil {
		defer f.mu.RUnlock()
		if err := f.usable(); err != nil {
			return err
		}
		if injected != nil {
			return f.fail(OpFlush, injected)
		}
		return f.fail(OpFlush, f.dev.Flush())
	}
	f.mu.RUnlock()

	// Armed: the flush holds writes off, so everything in the undo log
	// was written before it began and is durable once it succeeds.
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.usable(); err != nil {
		return err
	}
	if err := f.dev.Flush(); err != nil {
		return f.fail(OpFlush, err)
	}
	f.undo = nil
	return nil
}

func (f *Faulty) Size() int64  { return f.dev.Size() }
func (f *Faulty) Path() string { return f.dev.Path() }

// Close closes the underlying device, crashed or not.
func (f *Faulty) Close() error { return f.dev.Close() }
