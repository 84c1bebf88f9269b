package vu

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"
	"github.com/shadow-project/shadow/cmd/internal/device"
)

// memDev is an in-memory member with injectable failures.
type memDev struct {
	path string
	mu   sync.Mutex
	data []byte
	// failWrite / failRead / failFlush, when set, decide per call.
	failWrite func(off int64) error
	failRead  func(off int64) error
	failFlush func() error
	writes    atomic.Int64
}

func newMem(path string, size int) *memDev { return &memDev{path: path, data: make([]byte, size)} }

func (m *memDev) Path() string { return m.path }
func (m *memDev) ReadAt(p []byte, off int64) (int, error) {
	if m.failRead != nil {
		if err := m.failRead(off); err != nil {
			return 0, err
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.data[off:]), nil
}
func (m *memDev) WriteAt(p []byte, off int64) (int, error) {
	if m.failWrite != nil {
		if err := m.failWrite(off); err != nil {
			return 0, err
		}
	}
	m.writes.Add(1)
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.data[off:], p), nil
}
func (m *memDev) Flush() error {
	if m.failFlush != nil {
		return m.failFlush()
	}
	return nil
}
func (m *memDev) Zero(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	return nil
}
func (m *memDev) snapshot() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.Clone(m.data)
}

const size = 1 << 20

func newVU(t *testing.T, expel func(string, error) error, devs ...*memDev) *VU {
	t.Helper()
	var ds []Device
	for _, d := range devs {
		ds = append(ds, d)
	}
	return vuOf(t, nil, expel, ds...)
}

// vuOf builds DSA1 of size bytes over devs, all full members.
func vuOf(t testing.TB, g Gate, expel func(string, error) error, devs ...Device) *VU {
	t.Helper()
	var specs []MemberSpec
	for _, d := range devs {
		specs = append(specs, MemberSpec{Dev: d, Role: Full})
	}
	v, err := New(Config{Name: "DSA1", Size: size, Members: specs, Gate: g, Expel: expel, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestRangeLockOrdersOverlapsAndAllowsDisjoint(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var l RangeLock
		var order []string
		var mu sync.Mutex
		note := func(s string) { mu.Lock(); order = append(order, s); mu.Unlock() }
		u1 := l.Lock(0, 100)
		go func() { u := l.Lock(50, 100); note("second"); u() }()
		synctest.Wait()
		go func() { u := l.Lock(60, 10); note("third"); u() }()
		synctest.Wait()
		// Disjoint: granted at once while the others wait.
		u4 := l.Lock(1000, 10)
		u4()
		if len(order) != 0 {
			t.Fatalf("overlapping holders ran before the first released: %v", order)
		}
		u1()
		synctest.Wait()
		if fmt.Sprint(order) != "[second third]" {
			t.Fatalf("overlaps ran as %v, want FIFO", order)
		}
		if l.Held() != 0 {
			t.Fatalf("%d ranges still held", l.Held())
		}
	})
}

func TestWritesReachEveryMemberAndOverlapsStayIdentical(t *testing.T) {
	a, b := newMem("a", size), newMem("b", size)
	v := newVU(t, nil, a, b)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			buf := make([]byte, 8192)
			for range 300 {
				off := int64(rng.IntN(64)) * 512 // heavy overlap in the first 40 KiB
				n := 512 * (1 + rng.IntN(16))
				for i := range buf[:n] {
					buf[i] = byte(w)
				}
				if err := v.WriteAt(buf[:n], off, rng.IntN(4) == 0); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if !bytes.Equal(a.snapshot(), b.snapshot()) {
		t.Fatal("members differ after overlapping concurrent writes")
	}
}

func TestFailedMemberIsExpelledBeforeAck(t *testing.T) {
	a, b := newMem("a", size), newMem("b", size)
	var expelled []string
	acked := false
	v := newVU(t, func(p string, err error) error {
		if acked {
			t.Error("expel ran after the write was acknowledged")
		}
		expelled = append(expelled, p)
		return nil
	}, a, b)
	b.failWrite = func(int64) error { return errors.New("injected EIO") }
	if err := v.WriteAt([]byte("hello"), 4096, false); err != nil {
		t.Fatalf("write with one good member failed: %v", err)
	}
	acked = true
	if fmt.Sprint(expelled) != "[b]" {
		t.Fatalf("expelled %v, want [b]", expelled)
	}
	if ioErrs, ex := v.Faults(); ioErrs != 1 || ex != 1 {
		t.Fatalf("faults: %d I/O errors, %d expulsions; want 1, 1", ioErrs, ex)
	}
	got := make([]byte, 5)
	if err := v.ReadAt(got, 4096); err != nil || string(got) != "hello" {
		t.Fatalf("read after expel: %q %v", got, err)
	}
	if n := len(v.Members()); n != 1 {
		t.Fatalf("%d members left, want 1", n)
	}
	// The last full member is never expelled: the request fails.
	a.failWrite = func(int64) error { return errors.New("injected EIO") }
	if err := v.WriteAt([]byte("x"), 0, false); !errors.Is(err, ErrNoMember) {
		t.Fatalf("write on a failing last member: %v, want ErrNoMember", err)
	}
	if len(v.Members()) != 1 || len(expelled) != 1 {
		t.Fatal("the last full member was expelled")
	}
	if ioErrs, ex := v.Faults(); ioErrs != 2 || ex != 1 {
		t.Fatalf("faults: %d I/O errors, %d expulsions; want 2, 1", ioErrs, ex)
	}
}

func TestFailedExpelFailsTheRequest(t *testing.T) {
	a, b := newMem("a", size), newMem("b", size)
	v := newVU(t, func(string, error) error { return errors.New("metadata update failed") }, a, b)
	b.failFlush = func() error { return errors.New("injected flush error") }
	if err := v.Flush(); err == nil {
		t.Fatal("flush acknowledged although the expel could not be made durable")
	}
}

func TestReadErrorIsRepairedFromAnotherMember(t *testing.T) {
	a, b := newMem("a", size), newMem("b", size)
	v := newVU(t, nil, a, b)
	if err := v.WriteAt([]byte("good data"), 0, false); err != nil {
		t.Fatal(err)
	}
	copy(a.data, "bad! data") // a has a latent bad block: reads fail once
	var once atomic.Bool
	a.failRead = func(int64) error {
		if once.CompareAndSwap(false, true) {
			return errors.New("injected read error")
		}
		return nil
	}
	if err := v.SetReadCost("b", 500); err != nil { // prefer a
		t.Fatal(err)
	}
	got := make([]byte, 9)
	if err := v.ReadAt(got, 0); err != nil || string(got) != "good data" {
		t.Fatalf("read: %q %v", got, err)
	}
	if !bytes.Equal(a.snapshot()[:9], []byte("good data")) {
		t.Fatalf("a was not repaired: %q", a.snapshot()[:9])
	}
}

func TestReadPicksLowestCost(t *testing.T) {
	a, b := newMem("a", size), newMem("b", size)
	v := newVU(t, nil, a, b)
	copy(b.data, "from b")
	copy(a.data, "from a")
	if err := v.SetReadCost("a", 1000); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 6)
	if err := v.ReadAt(got, 0); err != nil || string(got) != "from b" {
		t.Fatalf("read %q %v, want from b", got, err)
	}
}

type fence struct{ at atomic.Int64 }

func (f *fence) Pending(off, n int64) bool { return off+n > f.at.Load() }

func TestMergeTimeReadsAgree(t *testing.T) {
	a, b := newMem("a", size), newMem("b", size)
	v := newVU(t, nil, a, b)
	// After a crash the members differ in two places.
	copy(a.data[0:], "old")
	copy(b.data[0:], "new")
	copy(a.data[8192:], "AAA")
	copy(b.data[8192:], "BBB")
	f := &fence{}
	f.at.Store(4096) // the merge has covered [0, 4096)
	v.SetMerge(f, "b")
	if err := v.SetReadCost("b", 1000); err != nil { // plain reads would pick a
		t.Fatal(err)
	}
	got := make([]byte, 3)
	if err := v.ReadAt(got, 8192); err != nil || string(got) != "BBB" {
		t.Fatalf("merge-time read %q %v, want BBB from the master", got, err)
	}
	if string(a.snapshot()[8192:8195]) != "BBB" {
		t.Fatal("merge-time read did not write the master's data to the other member")
	}
	// Below the fence the merge is done: plain reads.
	if err := v.ReadAt(got, 0); err != nil || string(got) != "old" {
		t.Fatalf("read below the merge fence %q %v", got, err)
	}
	v.SetMerge(nil, "")
	if err := v.ReadAt(got, 8192); err != nil || string(got) != "BBB" {
		t.Fatalf("after the merge %q %v", got, err)
	}
}

func TestZeroAndRange(t *testing.T) {
	a, b := newMem("a", size), newMem("b", size)
	v := newVU(t, nil, a, b)
	if err := v.WriteAt(bytes.Repeat([]byte{7}, 8192), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := v.Trim(1024, 4096); err != nil {
		t.Fatal(err)
	}
	for _, d := range []*memDev{a, b} {
		if !bytes.Equal(d.snapshot()[1024:5120], make([]byte, 4096)) || d.snapshot()[5120] != 7 {
			t.Fatalf("%s does not read zeroes exactly where trimmed", d.path)
		}
	}
	writes := a.writes.Load()
	if err := v.WriteAt([]byte{1}, size, false); !errors.Is(err, ErrRange) {
		t.Fatalf("write past the end: %v", err)
	}
	if err := v.ReadAt(make([]byte, 2), size-1); !errors.Is(err, ErrRange) {
		t.Fatalf("read across the end: %v", err)
	}
	if a.writes.Load() != writes {
		t.Fatal("a refused request touched a member")
	}
}

func TestSlowMemberDelaysAck(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := newMem("a", size), newMem("b", size)
		b.failWrite = func(int64) error { time.Sleep(time.Second); return nil }
		v := newVU(t, nil, a, b)
		start := time.Now()
		if err := v.WriteAt([]byte("x"), 0, false); err != nil {
			t.Fatal(err)
		}
		if time.Since(start) < time.Second {
			t.Fatal("write acknowledged before the slow member completed")
		}
	})
}

// testGate records what the VU tells its gate.
type testGate struct {
	t       *testing.T
	dev     *memDev
	refuse  bool
	open    atomic.Int32
	flushes []bool
}

func (g *testGate) BeginWrite(off, n int64) error {
	if off != 0 || n != 1 {
		g.t.Errorf("gate got [%d, +%d), want [0, +1)", off, n)
	}
	if g.refuse {
		return errors.New("dirty flag not durable")
	}
	if g.dev.writes.Load() != 0 && g.open.Load() == 0 {
		g.t.Error("a member was written before the gate opened")
	}
	g.open.Add(1)
	return nil
}

func (g *testGate) EndWrite(off, n int64) { g.open.Add(-1) }

// TryBeginWrite declines, as a gate that would have to write metadata.
func (g *testGate) TryBeginWrite(off, n int64) bool { return false }

func (g *testGate) BeginFlush() func(bool) {
	return func(ok bool) { g.flushes = append(g.flushes, ok) }
}

func TestWriteGateRunsBeforeMembersAndCanRefuse(t *testing.T) {
	a, b := newMem("a", size), newMem("b", size)
	g := &testGate{t: t, dev: a}
	v := vuOf(t, g, nil, a, b)
	if err := v.WriteAt([]byte("x"), 0, false); err != nil {
		t.Fatal(err)
	}
	if g.open.Load() != 0 || v.Busy() {
		t.Fatal("gate or busy count not released after the write")
	}
	g.refuse = true
	before := a.writes.Load()
	if err := v.WriteAt([]byte("y"), 0, false); err == nil || a.writes.Load() != before {
		t.Fatalf("refused gate: err %v, writes %d -> %d", err, before, a.writes.Load())
	}
	if g.open.Load() != 0 {
		t.Fatal("a refused write was ended")
	}
}

func TestFlushGateSeesOutcome(t *testing.T) {
	a, b := newMem("a", size), newMem("b", size)
	g := &testGate{t: t, dev: a}
	v := vuOf(t, g, nil, a, b)
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if len(g.flushes) != 1 || !g.flushes[0] {
		t.Fatalf("flush gate outcomes %v; want [true]", g.flushes)
	}
}

// A member I/O the lease refused blames no member: nothing is expelled,
// the request fails, and a write that reached some members is reported.
func TestFencedIOExpelsNobody(t *testing.T) {
	a, b := newMem("/a", size), newMem("/b", size)
	fenced := fmt.Errorf("fence: no valid lease: %w", device.ErrFenced)
	expelled := 0
	v := newVU(t, func(string, error) error { expelled++; return nil }, a, b)
	b.failWrite = func(int64) error { return fenced }
	err := v.WriteAt(bytes.Repeat([]byte{7}, 4096), 0, false)
	if !errors.Is(err, device.ErrFenced) {
		t.Fatalf("write with one member fenced: %v, want ErrFenced", err)
	}
	if expelled != 0 || len(v.Members()) != 2 {
		t.Fatalf("expelled %d, members %d: a fenced write must blame no member", expelled, len(v.Members()))
	}
	if !v.TakePartial() || v.TakePartial() {
		t.Fatal("a write that reached /a only must be reported once as partial")
	}
	// Every member fenced: nothing reached, nothing partial.
	a.failWrite = func(int64) error { return fenced }
	if err := v.WriteAt(make([]byte, 4096), 0, false); !errors.Is(err, device.ErrFenced) {
		t.Fatalf("write with every member fenced: %v", err)
	}
	if v.TakePartial() {
		t.Fatal("a write that reached no member is not partial")
	}
	// Reads: fenced on the first member tried, the read fails without
	// trying (or repairing) another.
	a.failRead = func(int64) error { return fenced }
	b.failRead = func(int64) error { return fenced }
	if err := v.ReadAt(make([]byte, 4096), 0); !errors.Is(err, device.ErrFenced) {
		t.Fatalf("read while fenced: %v", err)
	}
	if expelled != 0 || len(v.Members()) != 2 {
		t.Fatalf("a fenced read expelled: %d", expelled)
	}
}

// TestAcknowledgeRefused: a write, zero or flush that reached every member
// is still failed when Acknowledge refuses (the host lost its lease while
// the reply was pending), and nobody is expelled.
func TestAcknowledgeRefused(t *testing.T) {
	a, b := newMem("/a", size), newMem("/b", size)
	v := newVU(t, func(string, error) error { t.Fatal("expelled a member"); return nil }, a, b)
	fenced := fmt.Errorf("fence: declared failed: %w", device.ErrFenced)
	var refuse error
	v.ack = func() error { return refuse }
	if err := v.WriteAt(bytes.Repeat([]byte{1}, 4096), 0, false); err != nil {
		t.Fatalf("write with the lease held: %v", err)
	}
	refuse = fenced
	if err := v.WriteAt(bytes.Repeat([]byte{2}, 4096), 0, false); !errors.Is(err, device.ErrFenced) {
		t.Fatalf("write whose acknowledgement was refused: %v, want ErrFenced", err)
	}
	if err := v.Zero(0, 4096, false); !errors.Is(err, device.ErrFenced) {
		t.Fatalf("zero whose acknowledgement was refused: %v, want ErrFenced", err)
	}
	if err := v.Flush(); !errors.Is(err, device.ErrFenced) {
		t.Fatalf("flush whose acknowledgement was refused: %v, want ErrFenced", err)
	}
	if len(v.Members()) != 2 {
		t.Fatalf("members %d, want 2", len(v.Members()))
	}
}
