package cluster

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/shadow-project/shadow/shadowset"
)

var testLease = LeaseConfig{Lease: 1500 * time.Millisecond, Watchdog: 500 * time.Millisecond}

func reg(host string, inc uint64, level int, lease *LeaseConfig) entry {
	return entry{Type: entryIncarnation, Host: host, Inc: inc, Supports: level, Lease: lease}
}

func TestLeaseConfigChecks(t *testing.T) {
	if got, want := testLease.RequiredDelay(), 2290*time.Millisecond; got < want-time.Millisecond || got > want+time.Millisecond {
		t.Fatalf("required delay %s, want (1.5s+0.5s)(1.01)²+250ms = %s", got, want)
	}
	if err := (LeaseConfig{Lease: 900 * time.Millisecond, Watchdog: time.Second}).Check(DefaultTiming); !errors.Is(err, ErrLeaseConfig) {
		t.Fatalf("a lease shorter than a raft election: %v, want ErrLeaseConfig", err)
	}
	if err := (LeaseConfig{Lease: time.Second}).Check(DefaultTiming); !errors.Is(err, ErrLeaseConfig) {
		t.Fatalf("no watchdog: %v, want ErrLeaseConfig", err)
	}
	if err := testLease.Check(DefaultTiming); err != nil {
		t.Fatal(err)
	}

	// The log refuses a registration whose lease the cluster's delay does
	// not cover, unless it brings a delay that does; then no delay below
	// it.
	l := NewLog("A", 1, Hooks{})
	ap := &applier{t: t, l: l}
	ap.must(reg("A", 1, 2, nil))
	ap.must(evEntry("A", 1, shadowset.Event{Kind: shadowset.EvSetDelay, Duration: 2 * time.Second}))
	err := ap.apply(reg("B", 2, 2, &testLease))
	if !errors.Is(err, ErrLeaseConfig) || !strings.Contains(err.Error(), "at least 2.29s") {
		t.Fatalf("registration with a lease the delay does not cover: %v, want ErrLeaseConfig naming 2.29s", err)
	}
	with := reg("B", 2, 2, &testLease)
	with.Delay = int64(3 * time.Second)
	ap.must(with)
	var d time.Duration
	l.View(func(c *shadowset.Core) { d = c.Delay() })
	if d != 3*time.Second {
		t.Fatalf("delay %s after a registration that set 3s", d)
	}
	if err := ap.apply(evEntry("A", 1, shadowset.Event{Kind: shadowset.EvSetDelay, Duration: 2 * time.Second})); !errors.Is(err, ErrLeaseConfig) {
		t.Fatalf("a delay below B's lease: %v, want ErrLeaseConfig", err)
	}
	low := reg("C", 3, 2, nil)
	low.Delay = int64(time.Second)
	if err := ap.apply(low); !errors.Is(err, ErrLeaseConfig) {
		t.Fatalf("a registration lowering the delay below B's lease: %v, want ErrLeaseConfig", err)
	}
	// B leaves cleanly: its lease no longer constrains the delay.
	ap.must(entry{Type: entryLeave, Host: "B", Inc: 2})
	ap.must(evEntry("A", 1, shadowset.Event{Kind: shadowset.EvSetDelay, Duration: time.Second}))
}

func TestLevelsSwitchWhenEveryHostRunsThem(t *testing.T) {
	var levels []int
	l := NewLog("A", 1, Hooks{Level: func(n int) { levels = append(levels, n) }})
	ap := &applier{t: t, l: l}
	ap.must(reg("A", 1, 2, nil))
	if l.Level() != 2 {
		t.Fatalf("a new cluster of one level-2 host runs level %d", l.Level())
	}
	// A cluster of older and newer builds runs the older level.
	l = NewLog("A", 1, Hooks{Level: func(n int) { levels = append(levels, n) }})
	levels = nil
	ap = &applier{t: t, l: l}
	ap.must(reg("B", 2, 1, nil))
	ap.must(reg("A", 1, 2, &testLease))
	ap.must(reg("C", 3, 1, nil))
	if l.Level() != 1 || len(levels) != 0 {
		t.Fatalf("level %d (changes %v) with B and C at level 1", l.Level(), levels)
	}
	if err := ap.apply(entry{Type: entryRenew, Host: "A", Inc: 1, ID: 1}); !errors.Is(err, shadowset.ErrBadEvent) {
		t.Fatalf("a renewal at level 1: %v, want refused", err)
	}
	// B is upgraded: it leaves and registers with the new build. C still
	// holds the level down.
	ap.must(entry{Type: entryLeave, Host: "B", Inc: 2})
	ap.must(reg("B", 4, 2, nil))
	if l.Level() != 1 {
		t.Fatalf("level %d with C at level 1", l.Level())
	}
	// C crashes: a failed host still counts (it comes back with some
	// build). Its next run, upgraded, switches the level on.
	ap.must(evEntry("A", 1, shadowset.Event{Kind: shadowset.EvHostFailed, Host: "C"}))
	if l.Level() != 1 {
		t.Fatalf("level %d while failed C ran level 1", l.Level())
	}
	ap.must(reg("C", 5, 2, nil))
	if l.Level() != 2 || len(levels) != 1 || levels[0] != 2 {
		t.Fatalf("level %d (changes %v) once every host runs level 2", l.Level(), levels)
	}
	// An old build can no longer register.
	if err := ap.apply(reg("D", 6, 1, nil)); !errors.Is(err, ErrCoreLevel) {
		t.Fatalf("a level-1 build after the switch: %v, want ErrCoreLevel", err)
	}
	if err := ap.apply(reg("B", 7, 1, nil)); !errors.Is(err, ErrCoreLevel) {
		t.Fatalf("a downgrade after the switch: %v, want ErrCoreLevel", err)
	}
	if _, ok := l.HostLevels()["D"]; ok {
		t.Fatal("a refused registration left its level behind")
	}
	// The level survives a snapshot, and never drops.
	snap, err := l.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	r := NewLog("B", 4, Hooks{})
	if err := r.Restore(snap); err != nil {
		t.Fatal(err)
	}
	if r.Level() != 2 || r.HostLevels()["C"] != 2 {
		t.Fatalf("restored level %d, host levels %v", r.Level(), r.HostLevels())
	}
}

func TestRenewals(t *testing.T) {
	var extended []int64
	var fenced []string
	l := NewLog("A", 1, Hooks{})
	l.EnableLease(testLease, LeaseHooks{Now: func() int64 { return 0 }, Extended: func(u int64) { extended = append(extended, u) },
		Fenced: func(r string, rejoin bool) { fenced = append(fenced, r) }})
	ap := &applier{t: t, l: l}
	d := reg("A", 1, 2, &testLease)
	d.Delay = int64(3 * time.Second)
	ap.must(d)
	ap.must(reg("B", 2, 2, &testLease))

	// A renewal counts for the lease once this host applies it, from the
	// time it was sent.
	l.mu.Lock()
	l.renewSent[10] = 1000
	l.mu.Unlock()
	ap.must(entry{Type: entryRenew, Host: "A", Inc: 1, ID: 10})
	if len(extended) != 1 || extended[0] != 1000+int64(testLease.Lease) {
		t.Fatalf("extensions %v, want one to sent+L", extended)
	}
	// Another host's renewal extends nothing here.
	ap.must(entry{Type: entryRenew, Host: "B", Inc: 2, ID: 3})
	if len(extended) != 1 {
		t.Fatalf("B's renewal extended A's lease: %v", extended)
	}
	// A renewal must name the host's previous one as applied: a host that
	// lags the log renews nothing.
	if err := ap.apply(entry{Type: entryRenew, Host: "B", Inc: 2, ID: 4, Prev: 0}); !errors.Is(err, shadowset.ErrBadEvent) {
		t.Fatalf("a renewal naming a stale previous renewal: %v, want refused", err)
	}
	ap.must(entry{Type: entryRenew, Host: "B", Inc: 2, ID: 5, Prev: 3})
	// Stale incarnations are refused.
	if err := ap.apply(entry{Type: entryRenew, Host: "B", Inc: 9, ID: 6, Prev: 5}); !errors.Is(err, ErrStaleIncarnation) {
		t.Fatalf("a stale run's renewal: %v, want ErrStaleIncarnation", err)
	}
	// Once failed, a run renews nothing, ever.
	ap.must(evEntry("A", 1, shadowset.Event{Kind: shadowset.EvHostFailed, Host: "B"}))
	if err := ap.apply(entry{Type: entryRenew, Host: "B", Inc: 2, ID: 7, Prev: 5}); !errors.Is(err, ErrFenced) {
		t.Fatalf("a failed run's renewal: %v, want ErrFenced", err)
	}
	// The leader sees a lapse after 2L without a renewal.
	l.mu.Lock()
	l.renewedAt["A"] = time.Now().Add(-2*testLease.Lease - time.Millisecond)
	lapsed := l.lapsed()
	l.mu.Unlock()
	if inc, ok := lapsed["A"]; !ok || inc != 1 || len(lapsed) != 1 {
		t.Fatalf("lapsed %v, want only A's run 1 (B is failed already)", lapsed)
	}
	// This host declared failed: fenced, once.
	if len(fenced) != 0 {
		t.Fatalf("fenced early: %v", fenced)
	}
	ap.must(evEntry("B", 2, shadowset.Event{Kind: shadowset.EvHostUp, Host: "B"}))
	ap.must(reg("B", 8, 2, &testLease))
	ap.must(evEntry("B", 8, shadowset.Event{Kind: shadowset.EvHostFailed, Host: "A"}))
	if len(fenced) != 1 || !l.Fenced() {
		t.Fatalf("fenced %v after the cluster failed this host", fenced)
	}
	// A new run registers: no longer fenced.
	l.Reincarnate(11)
	ap.must(reg("A", 11, 2, &testLease))
	if l.Fenced() {
		t.Fatal("still fenced after registering a new run")
	}
	// Another process registering this host's name fences this one, for
	// good (no rejoin: it would fight the other).
	var rejoin []bool
	l.mu.Lock()
	l.leaseHooks.Fenced = func(_ string, r bool) { rejoin = append(rejoin, r) }
	l.mu.Unlock()
	ap.must(reg("A", 12, 2, &testLease))
	if len(rejoin) != 1 || rejoin[0] {
		t.Fatalf("fenced by a rival run: %v, want once without rejoin", rejoin)
	}
}
