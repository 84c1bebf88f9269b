package nbd

import (
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
)

// memBackend is a thread-safe in-memory Backend that records every call,
// so tests can check what reached the device and with which flags.
type memBackend struct {
	mu    sync.RWMutex
	data  []byte
	calls []backendCall

	// readGate, when set, is consulted on every ReadAt; a non-nil channel
	// it returns blocks that read until the channel is closed. It lets a
	// test hold chosen requests in flight without sleeping.
	readGate  func(off int64) <-chan struct{}
	writeGate func(off int64) <-chan struct{}
	// fail, when set, makes a call fail with the returned error.
	fail func(op string, off int64) error

	// The quick path (QuickBackend) serves reads and writes unless noQuick
	// is set or a gate is (a gate stands for a backend that would wait);
	// quickDecline, when set, decides instead.
	noQuick      bool
	quickDecline func(op string, off int64) bool
	quickReads   atomic.Int64
	quickWrites  atomic.Int64
}

func (m *memBackend) quick(op string, off int64) bool {
	if m.quickDecline != nil {
		return !m.quickDecline(op, off)
	}
	return !m.noQuick && m.readGate == nil && m.writeGate == nil
}

// TryWriteAt (QuickBackend) records its call as WriteAt does.
func (m *memBackend) TryWriteAt(p []byte, off int64) (bool, error) {
	if !m.quick("write", off) {
		return false, nil
	}
	m.quickWrites.Add(1)
	return true, m.WriteAt(p, off, false)
}

// TryReadAt (QuickBackend) declines when a failure is configured: errors
// are ReadAt's to report.
func (m *memBackend) TryReadAt(p []byte, off int64) bool {
	if !m.quick("read", off) || m.fail != nil {
		return false
	}
	m.quickReads.Add(1)
	return m.ReadAt(p, off) == nil
}

// backendCall is one recorded Backend call. Data is a copy of WriteAt's p.
type backendCall struct {
	Op     string // "read", "write", "flush", "trim", "zero"
	Off    int64
	Length int64
	FUA    bool
	Data   []byte
}

func (c backendCall) String() string {
	return fmt.Sprintf("%s(off=%d len=%d fua=%v)", c.Op, c.Off, c.Length, c.FUA)
}

func newMemBackend(size int) *memBackend {
	return &memBackend{data: make([]byte, size)}
}

func (m *memBackend) Size() int64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return int64(len(m.data))
}

// check rejects out-of-range calls the way a real device would, and
// records them, so a test sees a server bug instead of a slice panic.
func (m *memBackend) check(c backendCall) error {
	m.calls = append(m.calls, c)
	if c.Off < 0 || c.Length < 0 || c.Off > int64(len(m.data))-c.Length {
		return fmt.Errorf("memBackend: %v out of range of %d bytes: %w", c, len(m.data), syscall.EINVAL)
	}
	if m.fail != nil {
		return m.fail(c.Op, c.Off)
	}
	return nil
}

func (m *memBackend) ReadAt(p []byte, off int64) error {
	if m.readGate != nil {
		if gate := m.readGate(off); gate != nil {
			<-gate
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(backendCall{Op: "read", Off: off, Length: int64(len(p))}); err != nil {
		return err
	}
	copy(p, m.data[off:])
	return nil
}

func (m *memBackend) WriteAt(p []byte, off int64, fua bool) error {
	if m.writeGate != nil {
		if gate := m.writeGate(off); gate != nil {
			<-gate
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(backendCall{Op: "write", Off: off, Length: int64(len(p)), FUA: fua, Data: append([]byte(nil), p...)}); err != nil {
		return err
	}
	copy(m.data[off:], p)
	return nil
}

func (m *memBackend) Flush() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.check(backendCall{Op: "flush"})
}

func (m *memBackend) Trim(off, length int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(backendCall{Op: "trim", Off: off, Length: length}); err != nil {
		return err
	}
	clear(m.data[off : off+length])
	return nil
}

func (m *memBackend) Zero(off, length int64, fua bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(backendCall{Op: "zero", Off: off, Length: length, FUA: fua}); err != nil {
		return err
	}
	clear(m.data[off : off+length])
	return nil
}

// Calls returns the recorded calls, optionally only those of some ops.
func (m *memBackend) Calls(ops ...string) []backendCall {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var out []backendCall
	for _, c := range m.calls {
		if len(ops) == 0 || slices.Contains(ops, c.Op) {
			out = append(out, c)
		}
	}
	return out
}

// Bytes returns a copy of the device contents.
func (m *memBackend) Bytes() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.data...)
}

// Fill sets the device contents without recording a call.
func (m *memBackend) Fill(off int, p []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
}
