// Package wlogtest helps test write logs and the code that drives them:
// MemDevice, an in-memory member with a power-loss model and fault
// hooks, and Stress, a randomized crash test of the write-log invariant
// over any device (the device package runs it over device.Faulty).
package wlogtest

import (
	"errors"
	"fmt"
	"io"
	"sync"
)

// Errors of MemDevice.
var (
	// ErrCrashed: a call after Crash.
	ErrCrashed = errors.New("wlogtest: crashed (simulated power loss)")
	// ErrFailed: an earlier write or flush failed; as a real member,
	// the device refuses I/O from then on.
	ErrFailed = errors.New("wlogtest: failed earlier")
	// ErrRange: a request outside the device.
	ErrRange = errors.New("wlogtest: request out of range")
)

// MemDevice is an in-memory member with the power-loss model of
// device.Faulty: WriteAt changes what reads see; Flush makes everything
// written so far durable; SyncWriteAt makes just its own range durable;
// Crash loses everything else. It is safe for concurrent use.
type MemDevice struct {
	mu      sync.Mutex
	visible []byte
	durable []byte
	dirty   map[int64]bool // 4 KiB pages written since the last Flush
	crashed bool
	failed  error

	syncWrites, flushes int

	hookMu   sync.Mutex
	syncHook func(off, length int64) error
	readHook func(off, length int64) error
}

// NewMemDevice returns a zeroed device of size bytes.
func NewMemDevice(size int64) *MemDevice {
	return &MemDevice{visible: make([]byte, size), durable: make([]byte, size), dirty: map[int64]bool{}}
}

// SetSyncHook installs fn, called before every SyncWriteAt outside the
// device's lock: it may block (to hold a log write in flight) or return
// an error, which fails the write and the device, as a real I/O error
// would. nil removes it.
func (m *MemDevice) SetSyncHook(fn func(off, length int64) error) {
	m.hookMu.Lock()
	m.syncHook = fn
	m.hookMu.Unlock()
}

// SetReadHook installs fn, called before every ReadAt: an error fails
// the read (and only the read). nil removes it.
func (m *MemDevice) SetReadHook(fn func(off, length int64) error) {
	m.hookMu.Lock()
	m.readHook = fn
	m.hookMu.Unlock()
}

func (m *MemDevice) hooks() (syncHook, readHook func(off, length int64) error) {
	m.hookMu.Lock()
	defer m.hookMu.Unlock()
	return m.syncHook, m.readHook
}

// Size is the device's size.
func (m *MemDevice) Size() int64 { return int64(len(m.visible)) }

func (m *MemDevice) check(off int64, n int) error {
	if off < 0 || off > int64(len(m.visible)) || int64(n) > int64(len(m.visible))-off {
		return fmt.Errorf("wlogtest: %d+%d beyond %d: %w", off, n, len(m.visible), ErrRange)
	}
	if m.crashed {
		return ErrCrashed
	}
	return m.failed
}

// ReadAt reads what the last writes left, durable or not.
func (m *MemDevice) ReadAt(p []byte, off int64) (int, error) {
	if _, read := m.hooks(); read != nil {
		if err := read(off, int64(len(p))); err != nil {
			return 0, err
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.crashed {
		return 0, ErrCrashed
	}
	if off < 0 {
		return 0, fmt.Errorf("wlogtest: read at %d: %w", off, ErrRange)
	}
	if off >= int64(len(m.visible)) {
		return 0, io.EOF
	}
	n := copy(p, m.visible[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// WriteAt writes p; it is lost by a Crash unless a Flush or a
// SyncWriteAt over it comes first.
func (m *MemDevice) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, len(p)); err != nil {
		return 0, err
	}
	for pg := off >> 12; pg < (off+int64(len(p))+4095)>>12; pg++ {
		m.dirty[pg] = true
	}
	return copy(m.visible[off:], p), nil
}

// SyncWriteAt writes p and makes just that range durable.
func (m *MemDevice) SyncWriteAt(p []byte, off int64) (int, error) {
	if hook, _ := m.hooks(); hook != nil {
		if err := hook(off, int64(len(p))); err != nil {
			m.mu.Lock()
			defer m.mu.Unlock()
			if m.failed == nil && !m.crashed {
				m.failed = fmt.Errorf("%w: sync write at %d+%d: %w", ErrFailed, off, len(p), err)
			}
			if m.crashed {
				return 0, ErrCrashed
			}
			return 0, m.failed
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, len(p)); err != nil {
		return 0, err
	}
	copy(m.visible[off:], p)
	copy(m.durable[off:], p)
	m.syncWrites++
	return len(p), nil
}

// Flush makes everything written so far durable.
func (m *MemDevice) Flush() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(0, 0); err != nil {
		return err
	}
	for pg := range m.dirty {
		start, end := pg<<12, min((pg+1)<<12, int64(len(m.visible)))
		copy(m.durable[start:end], m.visible[start:end])
	}
	clear(m.dirty)
	m.flushes++
	return nil
}

// Crash simulates a power loss now: every write not made durable is
// lost, and later calls fail with ErrCrashed. Restarted gives the
// device back as it comes up again.
func (m *MemDevice) Crash() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.crashed = true
	copy(m.visible, m.durable)
}

// Restarted returns a new device holding what survived: the durable
// contents (all of them if there was no Crash), with no hooks.
func (m *MemDevice) Restarted() *MemDevice {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := NewMemDevice(int64(len(m.durable)))
	copy(n.visible, m.durable)
	copy(n.durable, m.durable)
	return n
}

// Poke overwrites bytes at off, durably and behind every check: a test's
// way to tear or corrupt a block.
func (m *MemDevice) Poke(off int64, p []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.visible[off:], p)
	copy(m.durable[off:], p)
}

// Bytes returns a copy of what reads see at [off, off+n).
func (m *MemDevice) Bytes(off, n int64) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.visible[off:off+n]...)
}

// SyncWrites is the number of successful SyncWriteAt calls.
func (m *MemDevice) SyncWrites() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.syncWrites
}
