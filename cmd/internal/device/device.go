// Package device owns the member devices of a shadow set: it opens a
// regular file or a block device (loop devices included) exclusively and
// hides the differences between them behind Device: positioned reads and
// writes, Flush to stable storage, Zero of a range, and the size.
//
// Two rules shape it. A member is opened exclusively (flock on files,
// O_EXCL on block devices), so two agents, or one agent twice, never write
// the same member behind each other's back. And a device whose write, zero
// or flush has failed stays failed: every later call returns that error,
// because after a failed fdatasync the kernel may report success for a
// second one although the data is gone (the "fsyncgate" lesson); the
// engine above must expel the member, never retry.
//
// Faulty wraps any Device to inject errors and delays, and to simulate a
// power loss that drops every write not yet covered by a Flush. It is how
// the tests prove the flush ordering of the layers above.
package device

import (
	"errors"
	"fmt"
	"os"
)

// Device is one member device. Methods are safe for concurrent use; the
// caller orders overlapping requests (the VU's range lock does).
type Device interface {
	// ReadAt reads len(p) bytes at off. As io.ReaderAt, it returns
	// io.EOF with a short count when the range crosses the end.
	ReadAt(p []byte, off int64) (int, error)
	// WriteAt writes len(p) bytes at off; the range must lie within
	// Size (ErrRange otherwise: a member never grows).
	WriteAt(p []byte, off int64) (int, error)
	// Flush returns once everything written (or zeroed) before it was
	// called is on stable storage. A failed Flush is never retried: the
	// device is failed from then on.
	Flush() error
	// Zero makes [off, off+length) read as zeroes.
	Zero(off, length int64) error
	// Size is the device's size in bytes, fixed at open.
	Size() int64
	// Path is the name the device was opened by.
	Path() string
	// Close releases the device and its exclusive lock.
	Close() error
}

// Options for Open.
type Options struct {
	// Direct opens with O_DIRECT, bypassing the page cache (a per-member
	// option). Requests need not be aligned: see Open for the cost.
	Direct bool
	// ReadOnly opens for reading only; writes and zeroes fail with
	// ErrReadOnly. The device is still opened exclusively.
	ReadOnly bool
	// Shared opens for the agents of one cluster, which all open the
	// members of the sets they mount (hosts sharing a SAN): a regular file
	// takes flock(LOCK_SH), so every exclusive opener (a single-host agent,
	// a tool) is still refused and refuses them; a block device is opened
	// without O_EXCL. What keeps two clusters apart is the set's metadata
	// and, on a real SAN, SCSI-3 persistent reservations (not here).
	Shared bool
	// Fence, if set, admits each read, write, zero and flush (the cluster
	// lease: cmd/internal/fence). A refusal fails that request only: it
	// wraps ErrFenced and neither fails the device nor blames the member.
	Fence Fence
}

// Fence guards member I/O; Exit follows every successful Enter.
type Fence interface {
	Enter() error
	Exit()
}

// Errors callers test for with errors.Is.
var (
	// ErrBusy: the member is already open, by this or another process
	// (flock held on a file, EBUSY from O_EXCL on a block device).
	ErrBusy = errors.New("device: busy")
	// ErrNotDevice: the path is neither a regular file nor a block
	// device (a directory, a character device, a FIFO, a socket).
	ErrNotDevice = errors.New("device: not a regular file or block device")
	// ErrRange: a request lies outside [0, Size). It does not fail the
	// device: it is the caller's bug, not the medium's.
	ErrRange = errors.New("device: request out of range")
	// ErrReadOnly: a write or zero on a device opened ReadOnly.
	ErrReadOnly = errors.New("device: read-only")
	// ErrClosed: a call after Close.
	ErrClosed = errors.New("device: closed")
	// ErrFenced: the host may not do member I/O now (no cluster lease):
	// no member is at fault.
	ErrFenced = errors.New("device: member I/O fenced")
	// ErrFailed: an earlier write, zero or flush failed; the device
	// refuses all I/O from then on. The error returned also wraps the
	// original cause (EIO, ENOSPC, an injected error...).
	ErrFailed = errors.New("device: failed earlier")
	// ErrCrashed: a call on a Faulty after Crash.
	ErrCrashed = errors.New("device: crashed (simulated power loss)")
)

// failedError is the sticky error: it matches ErrFailed and the cause.
type failedError struct {
	path  string
	op    string
	cause error
}

func (e *failedError) Error() string {
	return fmt.Sprintf("device: %s failed earlier (%s): %v", e.path, e.op, e.cause)
}

func (e *failedError) Unwrap() []error { return []error{ErrFailed, e.cause} }

// sticks tells whether an error from a write, zero or flush marks the
// device failed. Refusals that did no I/O (range, read-only, closed) do
// not: the medium is fine.
func sticks(err error) bool {
	return err != nil &&
		!errors.Is(err, ErrRange) &&
		!errors.Is(err, ErrReadOnly) &&
		!errors.Is(err, ErrClosed) &&
		!errors.Is(err, ErrCrashed)
}

// newFailed builds the sticky error for a failure of op, unless err
// already is one (a Faulty over a failed device).
func newFailed(path, op string, err error) error {
	var fe *failedError
	if errors.As(err, &fe) {
		return fe
	}
	return &failedError{path: path, op: op, cause: err}
}

// checkRange validates a request of length n at off on a device of size.
func checkRange(path, op string, off, n, size int64) error {
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("device: %s %s at %d+%d beyond size %d: %w", op, path, off, n, size, ErrRange)
	}
	return nil
}

// pathCause strips the *os.PathError the os package adds, since our
// messages already name the path and the operation.
func pathCause(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
