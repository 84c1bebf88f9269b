package fence

import (
	"fmt"
	"os"
	"os/exec"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// WatchdogCommand is the hidden subcommand the agent starts its watchdog
// with (`shadow __watchdog`, the shared page as file descriptor 3).
const WatchdogCommand = "__watchdog"

// Watchdog is the agent's side of its watchdog process.
type Watchdog struct {
	cmd *exec.Cmd
	mem []byte
}

// StartWatchdog maps a shared page, starts the watchdog on it (the
// current executable, run as WatchdogCommand) and returns a gate over the
// page. w is the watchdog's W: it kills the agent within w of a lapse
// that leaves member I/O outstanding.
func StartWatchdog(w time.Duration, policy Policy, timeout time.Duration) (*Gate, *Watchdog, error) {
	fd, err := unix.MemfdCreate("shadow-lease", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: memfd: %w", ErrWatchdog, err)
	}
	f := os.NewFile(uintptr(fd), "shadow-lease")
	defer f.Close()
	if err := f.Truncate(4096); err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrWatchdog, err)
	}
	mem, err := unix.Mmap(fd, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: mmap: %w", ErrWatchdog, err)
	}
	g := New(policy, timeout, mem)
	atomic.StoreInt64(g.word(wordWatchdog), int64(w))
	exe, err := os.Executable()
	if err != nil {
		unix.Munmap(mem)
		return nil, nil, fmt.Errorf("%w: %w", ErrWatchdog, err)
	}
	cmd := exec.Command(exe, WatchdogCommand)
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		unix.Munmap(mem)
		return nil, nil, fmt.Errorf("%w: start: %w", ErrWatchdog, err)
	}
	return g, &Watchdog{cmd: cmd, mem: mem}, nil
}

// PID is the watchdog's process ID.
func (w *Watchdog) PID() int { return w.cmd.Process.Pid }

// Stop ends the watchdog (a clean stop: no member I/O is left).
func (w *Watchdog) Stop() {
	_ = w.cmd.Process.Kill()
	_ = w.cmd.Wait()
}

// RunWatchdog is the watchdog process: it watches the shared page on fd 3
// and SIGKILLs its parent, the agent, once the lease has lapsed by half
// of W with member I/O outstanding. It polls every W/8, so the kill comes
// within W of the lapse. It exits when its parent does.
func RunWatchdog() error {
	mem, err := unix.Mmap(3, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("watchdog: map the lease page: %w", err)
	}
	ws := unsafe.Slice((*int64)(unsafe.Pointer(&mem[0])), words)
	parent := os.Getppid()
	w := time.Duration(atomic.LoadInt64(&ws[wordWatchdog]))
	if w <= 0 {
		return fmt.Errorf("watchdog: no W in the lease page")
	}
	for {
		time.Sleep(w / 8)
		if os.Getppid() != parent {
			return nil // the agent is gone
		}
		end := atomic.LoadInt64(&ws[wordLeaseEnd])
		out := atomic.LoadInt64(&ws[wordOutstanding])
		if out > 0 && end > 0 && Now() > end+int64(w/2) {
			fmt.Fprintf(os.Stderr, `{"level":"error","component":"watchdog","agent_pid":%d,"outstanding":%d,"lapsed_ms":%d,"message":"lease lapsed with member I/O outstanding: killing the agent"}`+"\n",
				parent, out, (Now()-end)/int64(time.Millisecond))
			if err := unix.Kill(parent, unix.SIGKILL); err != nil {
				return fmt.Errorf("watchdog: kill %d: %w", parent, err)
			}
			return nil
		}
	}
}
