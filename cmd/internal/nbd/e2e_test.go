package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// End-to-end tests against the real NBD clients of libnbd-bin,
// python3-libnbd and fio, over TCP on 127.0.0.1 and over a unix socket.

// requireTool returns the path of an external program, or skips the test
// when it is missing, unless SHADOW_REQUIRE_TOOLS=1 makes that a failure
// (CI installs the tools and must not silently skip).
func requireTool(t testing.TB, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("SHADOW_REQUIRE_TOOLS") == "1" {
			t.Fatalf("%s not installed and SHADOW_REQUIRE_TOOLS=1: %v", name, err)
		}
		t.Skipf("%s not installed: %v", name, err)
	}
	return path
}

// toolResult is a finished external command.
type toolResult struct {
	Stdout, Stderr string
	ExitCode       int
}

// runTool runs a program with a timeout, so a hang fails the test instead
// of wedging the suite; on timeout CommandContext kills it by PID.
// PATH starts with /usr/bin because nbdsh needs the system python3, which
// has the libnbd module, not whatever python3 comes first.
func runTool(t testing.TB, timeout time.Duration, name string, args ...string) toolResult {
	t.Helper()
	path := requireTool(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"))
	cmd.WaitDelay = 5 * time.Second // do not wait forever on pipes a grandchild holds
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := toolResult{Stdout: stdout.String(), Stderr: stderr.String()}
	var exitErr *exec.ExitError
	switch {
	case ctx.Err() != nil:
		t.Fatalf("%s %q: timed out after %v\nstdout: %s\nstderr: %s", name, args, timeout, res.Stdout, res.Stderr)
	case errors.As(err, &exitErr):
		res.ExitCode = exitErr.ExitCode()
	case err != nil:
		t.Fatalf("%s %q: %v", name, args, err)
	}
	return res
}

// runToolOK is runTool that also requires exit status 0.
func runToolOK(t testing.TB, timeout time.Duration, name string, args ...string) toolResult {
	t.Helper()
	res := runTool(t, timeout, name, args...)
	if res.ExitCode != 0 {
		t.Fatalf("%s %q: exit %d\nstdout: %s\nstderr: %s", name, args, res.ExitCode, res.Stdout, res.Stderr)
	}
	return res
}

// ramBackend is a lean thread-safe in-memory Backend for bulk I/O (the
// recording memBackend would copy every payload). It counts the calls the
// tools are expected to make.
type ramBackend struct {
	mu   sync.RWMutex
	data []byte

	flushes, fuaWrites, trims, zeroes atomic.Int64
}

func newRAMBackend(size int) *ramBackend { return &ramBackend{data: make([]byte, size)} }

func (r *ramBackend) Size() int64 { return int64(len(r.data)) }

func (r *ramBackend) inRange(off, length int64) error {
	if off < 0 || length < 0 || off > int64(len(r.data))-length {
		return fmt.Errorf("ramBackend: [%d, +%d) out of range", off, length)
	}
	return nil
}

func (r *ramBackend) ReadAt(p []byte, off int64) error {
	if err := r.inRange(off, int64(len(p))); err != nil {
		return err
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	copy(p, r.data[off:])
	return nil
}

func (r *ramBackend) WriteAt(p []byte, off int64, fua bool) error {
	if err := r.inRange(off, int64(len(p))); err != nil {
		return err
	}
	if fua {
		r.fuaWrites.Add(1)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	copy(r.data[off:], p)
	return nil
}

func (r *ramBackend) Flush() error {
	r.flushes.Add(1)
	return nil
}

func (r *ramBackend) Trim(off, length int64) error {
	r.trims.Add(1)
	return r.Zero(off, length, false)
}

func (r *ramBackend) Zero(off, length int64, fua bool) error {
	if err := r.inRange(off, length); err != nil {
		return err
	}
	r.zeroes.Add(1)
	r.mu.Lock()
	defer r.mu.Unlock()
	clear(r.data[off : off+length])
	return nil
}

// connCounter is the server's log sink in e2e tests: it forwards each
// event to the test log and tracks the most NBD connections open at once
// per export, to check that the tools really used several connections
// (CAN_MULTI_CONN).
type connCounter struct {
	t       testing.TB
	mu      sync.Mutex
	open    map[string]int
	maxOpen map[string]int
}

func newConnCounter(t testing.TB) *connCounter {
	return &connCounter{t: t, open: map[string]int{}, maxOpen: map[string]int{}}
}

func (c *connCounter) Write(p []byte) (int, error) {
	var ev struct {
		Message, Export string
	}
	if json.Unmarshal(p, &ev) == nil && ev.Export != "" {
		c.mu.Lock()
		switch ev.Message {
		case "nbd transmission started":
			c.open[ev.Export]++
			c.maxOpen[ev.Export] = max(c.maxOpen[ev.Export], c.open[ev.Export])
		case "nbd connection closed":
			c.open[ev.Export]--
		}
		c.mu.Unlock()
	}
	c.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// takeMax returns the most connections to export open at once since the
// last call.
func (c *connCounter) takeMax(export string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.maxOpen[export]
	c.maxOpen[export] = c.open[export]
	return n
}

// e2eServer serves three exports on both transports: DSA1 (64 MiB, for
// nbdinfo, nbdcopy, nbdsh), FIO (128 MiB: two fio jobs of 64 MiB each) and
// RO (read-only).
type e2eServer struct {
	tcpAddr, socket string
	conns           *connCounter
	dsa1, fio       *ramBackend
}

func startE2EServer(t *testing.T) *e2eServer {
	t.Helper()
	conns := newConnCounter(t)
	// Info level: per-connection events only, not per request.
	s := NewServer(Options{Logger: zerolog.New(conns).Level(zerolog.InfoLevel)})
	e := &e2eServer{conns: conns, dsa1: newRAMBackend(64 << 20), fio: newRAMBackend(128 << 20)}
	for _, x := range []Export{
		{Name: "DSA1", Description: "shadow set DSA1", Backend: e.dsa1},
		{Name: "FIO", Backend: e.fio},
		{Name: "RO", Backend: newRAMBackend(1 << 20), ReadOnly: true},
	} {
		check(t, s.AddExport(x))
	}

	tcp := must(net.Listen("tcp", "127.0.0.1:0"))(t)
	e.tcpAddr = tcp.Addr().String()
	e.socket = filepath.Join(t.TempDir(), "nbd.sock")
	unix := must(net.Listen("unix", e.socket))(t)
	served := make(chan error, 2)
	go func() { served <- s.Serve(tcp) }()
	go func() { served <- s.Serve(unix) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		for range 2 {
			if err := <-served; !errors.Is(err, ErrServerClosed) {
				t.Errorf("Serve: %v", err)
			}
		}
	})
	return e
}

// uri names an export in one of the two NBD URI forms.
func (e *e2eServer) uri(transport, export string) string {
	if transport == "unix" {
		return fmt.Sprintf("nbd+unix:///%s?socket=%s", export, e.socket)
	}
	return fmt.Sprintf("nbd://%s/%s", e.tcpAddr, export)
}

func TestToolsE2E(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end tests run external tools")
	}
	srv := startE2EServer(t)
	for _, transport := range []string{"tcp", "unix"} {
		t.Run(transport, func(t *testing.T) {
			t.Run("nbdinfo", func(t *testing.T) { testNbdinfo(t, srv, transport) })
			t.Run("nbdcopy", func(t *testing.T) { testNbdcopy(t, srv, transport) })
			t.Run("nbdsh", func(t *testing.T) { testNbdsh(t, srv, transport) })
			t.Run("fio", func(t *testing.T) { testFio(t, srv, transport) })
		})
	}
}

func testNbdinfo(t *testing.T, srv *e2eServer, transport string) {
	uri := srv.uri(transport, "DSA1")
	res := runToolOK(t, time.Minute, "nbdinfo", "--json", uri)
	var info struct {
		Protocol   string `json:"protocol"`
		Structured bool   `json:"structured"`
		Exports    []struct {
			Name         string `json:"export-name"`
			Description  string `json:"description"`
			Size         int64  `json:"export-size"`
			ReadOnly     bool   `json:"is_read_only"`
			CanFlush     bool   `json:"can_flush"`
			CanFUA       bool   `json:"can_fua"`
			CanTrim      bool   `json:"can_trim"`
			CanZero      bool   `json:"can_zero"`
			CanMultiConn bool   `json:"can_multi_conn"`
			CanDF        bool   `json:"can_df"`
			CanCache     bool   `json:"can_cache"`
			CanFastZero  bool   `json:"can_fast_zero"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(res.Stdout), &info); err != nil {
		t.Fatalf("nbdinfo --json: %v\n%s", err, res.Stdout)
	}
	t.Logf("nbdinfo --json: %s", strings.Join(strings.Fields(res.Stdout), " "))
	if info.Protocol != "newstyle-fixed" || info.Structured || len(info.Exports) != 1 {
		t.Fatalf("protocol %q structured %v exports %d", info.Protocol, info.Structured, len(info.Exports))
	}
	x := info.Exports[0]
	if x.Name != "DSA1" || x.Size != 64<<20 || x.ReadOnly ||
		!x.CanFlush || !x.CanFUA || !x.CanTrim || !x.CanZero || !x.CanMultiConn ||
		x.CanDF || x.CanCache || x.CanFastZero {
		t.Fatalf("nbdinfo reports %+v", x)
	}

	// The same through exit codes: 0 = yes, 2 = no.
	for feature, want := range map[string]int{
		"flush": 0, "fua": 0, "trim": 0, "zero": 0, "multi-conn": 0,
		"df": 2, "cache": 2, "fast-zero": 2, "structured-reply": 2,
	} {
		if got := runTool(t, time.Minute, "nbdinfo", "--can", feature, uri).ExitCode; got != want {
			t.Errorf("nbdinfo --can %s: exit %d, want %d", feature, got, want)
		}
	}
	if got := runTool(t, time.Minute, "nbdinfo", "--is", "read-only", srv.uri(transport, "RO")).ExitCode; got != 0 {
		t.Errorf("nbdinfo --is read-only RO: exit %d, want 0", got)
	}
	if got := runTool(t, time.Minute, "nbdinfo", "--is", "read-only", uri).ExitCode; got != 2 {
		t.Errorf("nbdinfo --is read-only DSA1: exit %d, want 2", got)
	}

	list := runToolOK(t, time.Minute, "nbdinfo", "--list", "--json", srv.uri(transport, "")).Stdout
	for _, name := range []string{`"DSA1"`, `"FIO"`, `"RO"`, `"shadow set DSA1"`} {
		if !strings.Contains(list, name) {
			t.Errorf("nbdinfo --list lacks %s:\n%s", name, list)
		}
	}
	srv.conns.takeMax("DSA1")
}

func testNbdcopy(t *testing.T, srv *e2eServer, transport string) {
	dir := t.TempDir()
	src, out := filepath.Join(dir, "src.img"), filepath.Join(dir, "out.img")
	data := make([]byte, 64<<20)
	rand.Read(data)
	check(t, os.WriteFile(src, data, 0o600))
	uri := srv.uri(transport, "DSA1")

	flushes := srv.dsa1.flushes.Load()
	srv.conns.takeMax("DSA1")
	start := time.Now()
	// nbdcopy uses no more connections than threads.
	runToolOK(t, 2*time.Minute, "nbdcopy", "--flush", "--connections=4", "--threads=4", src, uri)
	in := time.Since(start)
	if n := srv.conns.takeMax("DSA1"); n != 4 {
		t.Errorf("nbdcopy --connections=4 had %d connections open at once, want 4 (CAN_MULTI_CONN)", n)
	}
	if srv.dsa1.flushes.Load() == flushes {
		t.Error("nbdcopy --flush sent no FLUSH")
	}
	start = time.Now()
	runToolOK(t, 2*time.Minute, "nbdcopy", uri, out)
	back := time.Since(start)
	got := must(os.ReadFile(out))(t)
	if !bytes.Equal(got, data) {
		t.Fatalf("nbdcopy round trip of 64 MiB differs (%d bytes back)", len(got))
	}
	t.Logf("nbdcopy 64 MiB over %s: in %v, out %v, identical", transport, in.Round(time.Millisecond), back.Round(time.Millisecond))
}

func testNbdsh(t *testing.T, srv *e2eServer, transport string) {
	uri := srv.uri(transport, "DSA1")
	res := runToolOK(t, time.Minute, "nbdsh", "-u", uri,
		"-c", `h.pwrite(b"hello, shadow", 4096, nbd.CMD_FLAG_FUA)`,
		"-c", `print(bytes(h.pread(13, 4096)))`,
		"-c", `h.trim(4096, 0); h.zero(4096, 4096); print(h.pread(4, 4096) == bytes(4))`,
		"-c", `h.flush(); print(h.can_fua(), h.can_multi_conn(), h.get_size())`)
	want := "b'hello, shadow'\nTrue\nTrue True 67108864\n"
	if res.Stdout != want {
		t.Fatalf("nbdsh printed %q, want %q\nstderr: %s", res.Stdout, want, res.Stderr)
	}
	if srv.dsa1.fuaWrites.Load() == 0 || srv.dsa1.trims.Load() == 0 || srv.dsa1.zeroes.Load() == 0 {
		t.Fatalf("FUA write, TRIM or WRITE_ZEROES did not reach the backend")
	}

	// NBD_CMD_DISC after an unanswered write: the server finishes the
	// write before closing [checklist: DISC drains].
	runToolOK(t, time.Minute, "nbdsh", "-u", uri, "-c", `h.aio_pwrite(b"\xaa"*4096, 8192); h.shutdown()`)
	res = runToolOK(t, time.Minute, "nbdsh", "-u", uri, "-c", `print(bytes(h.pread(4096, 8192)) == b"\xaa"*4096)`)
	if res.Stdout != "True\n" {
		t.Fatalf("write before NBD_CMD_DISC lost: %q", res.Stdout)
	}

	// The error checklist, through a real client with strict mode off so
	// the requests reach the server: read past end, write past end, an
	// unknown flag, an oversized write (drained); then the connection
	// still works.
	res = runToolOK(t, time.Minute, "nbdsh", "-u", uri,
		"-c", "h.set_strict_mode(0); z = h.get_size()",
		"-c", "for f in (lambda: h.pread(512, z), lambda: h.pwrite(b'x'*512, z), lambda: h.pread(512, 0, 0x100), lambda: h.pwrite(bytes(48<<20), 0)):\n"+
			" try: f(); print('NONE')\n except nbd.Error as e: print(e.errno)",
		"-c", "print(len(h.pread(512, 0)))")
	if want := "EINVAL\nENOSPC\nEINVAL\nEINVAL\n512\n"; res.Stdout != want {
		t.Fatalf("nbdsh error checks printed %q, want %q", res.Stdout, want)
	}

	// Read-only export, unknown export then retry, EXPORT_NAME, ABORT.
	res = runToolOK(t, time.Minute, "nbdsh", "-u", srv.uri(transport, "RO"),
		"-c", "h.set_strict_mode(0)",
		"-c", "try: h.pwrite(b'x'*512, 0)\nexcept nbd.Error as e: print(e.errno)")
	if res.Stdout != "EPERM\n" {
		t.Fatalf("write to RO printed %q, want EPERM", res.Stdout)
	}
	res = runToolOK(t, time.Minute, "nbdsh", "--opt-mode", "-u", srv.uri(transport, "nope"),
		"-c", "try: h.opt_go()\nexcept nbd.Error as e: print(e.errno)",
		"-c", "h.set_export_name('DSA1'); h.opt_go(); print(h.get_size())")
	if res.Stdout != "ENOENT\n67108864\n" {
		t.Fatalf("unknown export then retry printed %q", res.Stdout)
	}
	for _, flags := range []string{"0", "nbd.HANDSHAKE_FLAG_NO_ZEROES"} {
		res = runToolOK(t, time.Minute, "nbdsh", "-c", "h.set_handshake_flags("+flags+")", "-u", uri,
			"-c", "print(h.get_protocol(), len(h.pread(512, 0)))")
		if res.Stdout != "newstyle 512\n" {
			t.Fatalf("EXPORT_NAME with handshake flags %s printed %q", flags, res.Stdout)
		}
	}
	runToolOK(t, time.Minute, "nbdsh", "--opt-mode", "-u", uri, "-c", "h.opt_abort()")
	srv.conns.takeMax("DSA1")
}

func testFio(t *testing.T, srv *e2eServer, transport string) {
	srv.conns.takeMax("FIO")
	// Two jobs, two connections, each on its own 64 MiB half of the
	// export so that their verification does not see the other's writes.
	res := runToolOK(t, 5*time.Minute, "fio", "--name=shadow", "--ioengine=nbd",
		"--uri="+srv.uri(transport, "FIO"), "--rw=randwrite", "--bs=4k", "--iodepth=16",
		"--numjobs=2", "--size=64m", "--offset_increment=64m",
		"--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
		"--output-format=json")
	var report struct {
		Jobs []struct {
			Name  string `json:"jobname"`
			Error int    `json:"error"`
			Write struct {
				IOPS float64 `json:"iops"`
				BW   int64   `json:"bw"` // KiB/s
			} `json:"write"`
			Read struct {
				IOPS float64 `json:"iops"`
			} `json:"read"`
		} `json:"jobs"`
	}
	// fio prints notes before the JSON document on some versions.
	out := res.Stdout[max(strings.Index(res.Stdout, "{"), 0):]
	if err := json.Unmarshal([]byte(out), &report); err != nil {
		t.Fatalf("fio json: %v\n%s", err, res.Stdout)
	}
	if len(report.Jobs) != 2 {
		t.Fatalf("fio ran %d jobs, want 2", len(report.Jobs))
	}
	for i, j := range report.Jobs {
		if j.Error != 0 {
			t.Fatalf("fio job %d: error %d", i, j.Error)
		}
		t.Logf("fio job %d over %s: randwrite 4k QD16 %.0f IOPS (%.1f MiB/s), verify read %.0f IOPS",
			i, transport, j.Write.IOPS, float64(j.Write.BW)/1024, j.Read.IOPS)
	}
	// fio also opens a short connection per job to learn the size.
	if n := srv.conns.takeMax("FIO"); n < 2 {
		t.Errorf("fio --numjobs=2 had %d connections open at once, want 2 or more", n)
	}
}
