package fence

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shadow-project/shadow/cmd/internal/device"
)

// TestMain lets this test binary play the watchdog and its victim.
func TestMain(m *testing.M) {
	switch {
	case len(os.Args) > 1 && os.Args[1] == WatchdogCommand:
		if err := RunWatchdog(); err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		os.Exit(0)
	case os.Getenv("FENCE_TEST_VICTIM") != "":
		victim(os.Getenv("FENCE_TEST_VICTIM"))
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// victim holds a 300 ms lease under a 200 ms watchdog and then, with an
// I/O outstanding ("stuck") or none ("idle"), outlives its lease by far.
func victim(mode string) {
	g, wd, err := StartWatchdog(200*time.Millisecond, IOError, time.Second)
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		os.Exit(2)
	}
	defer wd.Stop()
	g.Extend(Now() + int64(300*time.Millisecond))
	if err := g.Enter(); err != nil {
		os.Exit(3)
	}
	if mode == "idle" {
		g.Exit()
	}
	os.Stdout.WriteString("ready\n")
	time.Sleep(3 * time.Second)
	os.Stdout.WriteString("survived\n")
}

func TestGateRefusesWithoutLease(t *testing.T) {
	g := New(IOError, time.Second, nil)
	g.Enforce()
	if err := g.Enter(); !errors.Is(err, ErrNoLease) || !errors.Is(err, device.ErrFenced) {
		t.Fatalf("enter without a lease: %v, want ErrNoLease wrapping device.ErrFenced", err)
	}
	g.Extend(Now() + int64(time.Hour))
	if err := g.Enter(); err != nil {
		t.Fatalf("enter with a lease: %v", err)
	}
	if s := g.Snapshot(); s.Outstanding != 1 || s.State != "valid" {
		t.Fatalf("snapshot %+v, want one outstanding, valid", s)
	}
	g.Exit()
	// The lease never moves back.
	g.Extend(Now() - 1)
	if !g.Valid() {
		t.Fatal("an older renewal shortened the lease")
	}
	g.Fence()
	if err := g.Enter(); !errors.Is(err, ErrFenced) {
		t.Fatalf("enter after Fence: %v, want ErrFenced", err)
	}
	if s := g.Snapshot(); s.State != "fenced" || s.Outstanding != 0 || s.Refused != 2 {
		t.Fatalf("snapshot %+v, want fenced, nothing outstanding, 2 refused", s)
	}
}

func TestGateUnenforcedUntilLease(t *testing.T) {
	g := New(IOError, time.Second, nil)
	if err := g.Enter(); err != nil {
		t.Fatalf("a gate of a cluster without leases refused: %v", err)
	}
	g.Exit()
	g.Extend(Now() - 1) // a renewal arrived, already old
	if err := g.Enter(); !errors.Is(err, ErrNoLease) {
		t.Fatalf("after the first renewal the gate must hold: %v", err)
	}
}

func TestGateSuspendsUntilLeaseOrTimeout(t *testing.T) {
	g := New(SuspendIO, 2*time.Second, nil)
	g.Enforce()
	done := make(chan error, 1)
	go func() { done <- g.Enter() }()
	select {
	case err := <-done:
		t.Fatalf("I/O passed without a lease: %v", err)
	case <-time.After(150 * time.Millisecond):
	}
	g.Extend(Now() + int64(time.Hour))
	if err := <-done; err != nil {
		t.Fatalf("suspended I/O after the lease came back: %v", err)
	}
	g.Exit()
	if s := g.Snapshot(); s.Waited != 1 {
		t.Fatalf("waited %d, want 1", s.Waited)
	}
	// Without quorum for the whole timeout, it fails.
	h := New(SuspendIO, 200*time.Millisecond, nil)
	h.Enforce()
	start := time.Now()
	if err := h.Enter(); !errors.Is(err, ErrNoLease) || time.Since(start) < 200*time.Millisecond {
		t.Fatalf("timeout: %v after %s, want ErrNoLease after 200ms", err, time.Since(start))
	}
	// Fencing ends a wait at once.
	k := New(SuspendIO, time.Hour, nil)
	k.Enforce()
	go func() { done <- k.Enter() }()
	time.Sleep(50 * time.Millisecond)
	k.Fence()
	select {
	case err := <-done:
		if !errors.Is(err, ErrFenced) {
			t.Fatalf("fenced while waiting: %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a suspended I/O outlived Fence")
	}
}

func TestHandlesOfAnEarlierRunStayFenced(t *testing.T) {
	g := New(SuspendIO, 300*time.Millisecond, nil)
	old := g.Handle()
	g.Extend(Now() + int64(time.Hour))
	if err := old.Enter(); err != nil {
		t.Fatal(err)
	}
	old.Exit()
	g.Fence()
	g.Reset()
	g.Extend(Now() + int64(time.Hour))
	if err := old.Enter(); !errors.Is(err, ErrFenced) {
		t.Fatalf("an earlier run's device after the new run's lease: %v, want ErrFenced", err)
	}
	if err := g.Handle().Enter(); err != nil {
		t.Fatalf("the new run's device: %v", err)
	}
}

// The watchdog kills an agent whose lease lapsed with I/O outstanding,
// within W of the lapse, and leaves an idle one alone.
func TestWatchdog(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{"stuck", "idle"} {
		t.Run(mode, func(t *testing.T) {
			cmd := exec.Command(exe, "-test.run=^$")
			cmd.Env = append(os.Environ(), "FENCE_TEST_VICTIM="+mode)
			var out, errb strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &errb
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = cmd.Process.Kill() })
			start := time.Now()
			err := cmd.Wait()
			elapsed := time.Since(start)
			switch mode {
			case "stuck":
				var ee *exec.ExitError
				if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
					t.Fatalf("stuck victim ended with %v (stdout %q, stderr %q), want SIGKILL", err, out.String(), errb.String())
				}
				// Lease 300 ms, W 200 ms: dead well before its 3 s sleep.
				if elapsed > 2*time.Second || strings.Contains(out.String(), "survived") {
					t.Fatalf("killed after %s (stdout %q)", elapsed, out.String())
				}
				if !strings.Contains(errb.String(), "killing the agent") {
					t.Fatalf("the watchdog did not say why: %q", errb.String())
				}
			case "idle":
				if err != nil || !strings.Contains(out.String(), "survived") {
					t.Fatalf("idle victim: %v, stdout %q, stderr %q: an idle agent must outlive its lease", err, out.String(), errb.String())
				}
			}
		})
	}
}
