package vu

import (
	"bytes"
	"errors"
	"sync/atomic"
	"testing"
)

// quickDev is a memDev with the device.Quick fast path; decline makes it
// answer "would wait", direct makes it a device that always would.
type quickDev struct {
	*memDev
	decline, direct bool
	quickWrites     atomic.Int64
}

func (q *quickDev) QuickWrites() bool { return !q.direct }

func newQuick(path string) *quickDev { return &quickDev{memDev: newMem(path, size)} }

func (q *quickDev) TryWriteAt(p []byte, off int64) (bool, error) {
	if q.decline || q.direct {
		return false, nil
	}
	q.quickWrites.Add(1)
	_, err := q.WriteAt(p, off)
	return true, err
}

func (q *quickDev) TryReadAt(p []byte, off int64) bool {
	if q.decline {
		return false
	}
	_, err := q.ReadAt(p, off)
	return err == nil
}

// countingGate admits quick writes when allow is set and counts
// admissions and ends, which must balance.
type countingGate struct {
	allow       bool
	begun, ends atomic.Int64
}

func (g *countingGate) BeginWrite(off, n int64) error { g.begun.Add(1); return nil }
func (g *countingGate) TryBeginWrite(off, n int64) bool {
	if g.allow {
		g.begun.Add(1)
	}
	return g.allow
}
func (g *countingGate) EndWrite(off, n int64)     { g.ends.Add(1) }
func (g *countingGate) BeginFlush() func(ok bool) { return func(bool) {} }

func TestTryWriteAtWritesEveryMemberInTurn(t *testing.T) {
	a, b := newQuick("a"), newQuick("b")
	g := &countingGate{allow: true}
	v := vuOf(t, g, nil, a, b)
	done, err := v.TryWriteAt([]byte("hello"), 4096)
	if !done || err != nil {
		t.Fatalf("TryWriteAt = %v, %v", done, err)
	}
	for _, d := range []*quickDev{a, b} {
		if string(d.snapshot()[4096:4101]) != "hello" || d.quickWrites.Load() != 1 {
			t.Fatalf("member %s: data %q, %d quick writes", d.path, d.snapshot()[4096:4101], d.quickWrites.Load())
		}
	}
	// A member that turns out unable to write from memory after the
	// first one wrote is written the usual way: the write is never half
	// done.
	b.decline = true
	if done, err := v.TryWriteAt([]byte("again"), 0); !done || err != nil {
		t.Fatalf("TryWriteAt with a declining second member = %v, %v", done, err)
	}
	if string(b.snapshot()[:5]) != "again" {
		t.Fatal("second member missed the write")
	}
	if g.begun.Load() != 2 || g.ends.Load() != 2 {
		t.Fatalf("gate: %d admitted, %d ended, want 2 and 2", g.begun.Load(), g.ends.Load())
	}
	got := make([]byte, 5)
	if !v.TryReadAt(got, 0) || string(got) != "again" {
		t.Fatalf("TryReadAt: %q", got)
	}
}

// TestTryWriteAtDeclinesWithoutEffect: whatever makes it decline, nothing
// reaches any member and the gate's admission is undone.
func TestTryWriteAtDeclinesWithoutEffect(t *testing.T) {
	cases := map[string]func(t *testing.T) (*VU, *countingGate, []*memDev){
		"gate would wait": func(t *testing.T) (*VU, *countingGate, []*memDev) {
			a, b := newQuick("a"), newQuick("b")
			g := &countingGate{}
			return vuOf(t, g, nil, a, b), g, []*memDev{a.memDev, b.memDev}
		},
		"member without a quick path": func(t *testing.T) (*VU, *countingGate, []*memDev) {
			a, b := newQuick("a"), newMem("b", size)
			g := &countingGate{allow: true}
			return vuOf(t, g, nil, a, b), g, []*memDev{a.memDev, b}
		},
		"second member always waits (direct I/O)": func(t *testing.T) (*VU, *countingGate, []*memDev) {
			a, b := newQuick("a"), newQuick("b")
			b.direct = true
			g := &countingGate{allow: true}
			return vuOf(t, g, nil, a, b), g, []*memDev{a.memDev, b.memDev}
		},
		"first member would wait": func(t *testing.T) (*VU, *countingGate, []*memDev) {
			a, b := newQuick("a"), newQuick("b")
			a.decline = true
			g := &countingGate{allow: true}
			return vuOf(t, g, nil, a, b), g, []*memDev{a.memDev, b.memDev}
		},
		"overlapping request in flight": func(t *testing.T) (*VU, *countingGate, []*memDev) {
			a, b := newQuick("a"), newQuick("b")
			g := &countingGate{allow: true}
			v := vuOf(t, g, nil, a, b)
			t.Cleanup(v.Lock(4000, 200)) // a merge chunk, say
			return v, g, []*memDev{a.memDev, b.memDev}
		},
	}
	for name, setup := range cases {
		t.Run(name, func(t *testing.T) {
			v, g, devs := setup(t)
			done, err := v.TryWriteAt([]byte("hello"), 4096)
			if done || err != nil {
				t.Fatalf("TryWriteAt = %v, %v; want a decline", done, err)
			}
			for _, d := range devs {
				if d.writes.Load() != 0 {
					t.Fatalf("member %s was written", d.path)
				}
			}
			if g.begun.Load() != g.ends.Load() {
				t.Fatalf("gate: %d admitted, %d ended", g.begun.Load(), g.ends.Load())
			}
			if v.Busy() {
				t.Fatal("application I/O still counted in flight")
			}
		})
	}
}

func TestTryWriteAtExpelsAFailingMember(t *testing.T) {
	a, b := newQuick("a"), newQuick("b")
	var expelled []string
	v := vuOf(t, &countingGate{allow: true}, func(p string, err error) error {
		expelled = append(expelled, p)
		return nil
	}, a, b)
	b.failWrite = func(int64) error { return errors.New("injected EIO") }
	if done, err := v.TryWriteAt([]byte("x"), 0); !done || err != nil {
		t.Fatalf("TryWriteAt with one good member = %v, %v", done, err)
	}
	if len(expelled) != 1 || expelled[0] != "b" || len(v.Members()) != 1 {
		t.Fatalf("expelled %v, %d members left", expelled, len(v.Members()))
	}
	a.failWrite = b.failWrite
	if done, err := v.TryWriteAt([]byte("x"), 0); !done || !errors.Is(err, ErrNoMember) {
		t.Fatalf("TryWriteAt on a failing last member = %v, %v; want ErrNoMember", done, err)
	}
	if len(v.Members()) != 1 {
		t.Fatal("the last full member was expelled")
	}
}

// TestTryReadAtLeavesMergeReadsToReadAt: a range the merge has not reached
// must be read through the master and rewritten (invariant 4), which the
// quick path never does.
func TestTryReadAtLeavesMergeReadsToReadAt(t *testing.T) {
	a, b := newQuick("a"), newQuick("b")
	v := vuOf(t, nil, nil, a, b)
	copy(a.data[8192:], "AAA")
	copy(b.data[8192:], "BBB")
	f := &fence{}
	f.at.Store(4096)
	v.SetMerge(f, "b")
	got := make([]byte, 3)
	if v.TryReadAt(got, 8192) {
		t.Fatalf("TryReadAt served %q from a range the merge has not reached", got)
	}
	if !v.TryReadAt(got, 0) {
		t.Fatal("TryReadAt declined a range the merge has covered")
	}
	b.decline = true
	if err := v.SetReadCost("a", 1000); err != nil {
		t.Fatal(err)
	}
	v.SetMerge(nil, "")
	if v.TryReadAt(got, 8192) {
		t.Fatal("TryReadAt served although the chosen member would wait")
	}
	if err := v.ReadAt(got, 8192); err != nil || !bytes.Equal(got, []byte("BBB")) {
		t.Fatalf("ReadAt after the decline: %q %v", got, err)
	}
}

// TestBusyProbeSeesQuickRequests: a request served in microseconds is
// over before an engine looks, but it still makes that engine's next look
// busy, once; another engine's probe sees it too.
func TestBusyProbeSeesQuickRequests(t *testing.T) {
	v := vuOf(t, &countingGate{allow: true}, nil, newQuick("a"), newQuick("b"))
	merge, cp := v.BusyProbe(), v.BusyProbe()
	if merge() || cp() {
		t.Fatal("busy before any request")
	}
	if done, err := v.TryWriteAt([]byte("x"), 0); !done || err != nil {
		t.Fatal(done, err)
	}
	if v.Busy() {
		t.Fatal("Busy counts a completed request as in flight")
	}
	if !merge() {
		t.Fatal("a completed quick write did not make the probe busy")
	}
	if merge() {
		t.Fatal("still busy with nothing new since the last look")
	}
	if !cp() {
		t.Fatal("one probe's look hid the write from the other")
	}
	got := make([]byte, 1)
	if !v.TryReadAt(got, 0) || !merge() {
		t.Fatal("a completed quick read did not make the probe busy")
	}
}
