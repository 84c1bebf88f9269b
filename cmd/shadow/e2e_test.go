package main

// End-to-end tests: the real binary as an agent process, driven by the
// real CLI and by real NBD clients (nbdinfo, nbdcopy, fio, nbdfuse with a
// kernel filesystem). A missing tool skips its test, unless
// SHADOW_REQUIRE_TOOLS=1 (as in CI), where it fails.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shadow-project/shadow/cmd/internal/agent"
	"github.com/shadow-project/shadow/cmd/internal/control"
	"github.com/shadow-project/shadow/cmd/internal/meta"
	"github.com/shadow-project/shadow/cmd/internal/report"
)

var shadowBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "shbin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	shadowBin = filepath.Join(dir, "shadow")
	if out, err := exec.Command("go", "build", "-o", shadowBin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build shadow: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func requireTools(t *testing.T, tools ...string) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test (-short)")
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("SHADOW_REQUIRE_TOOLS") == "1" {
				t.Fatalf("%s is not installed (SHADOW_REQUIRE_TOOLS=1)", tool)
			}
			t.Skipf("%s is not installed", tool)
		}
	}
}

// background starts a long command in its own process group, ended
// (group and all) when the test ends.
func background(t *testing.T, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = os.TempDir()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { endGroup(cmd) })
	return cmd
}

// endGroup kills a background command's process group by its PID.
func endGroup(cmd *exec.Cmd) {
	if cmd.Process == nil || cmd.ProcessState != nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	_ = cmd.Wait()
}

// run runs a command with a timeout and returns its combined output.
func runCmd(t *testing.T, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "PATH=/usr/sbin:/sbin:/usr/bin:"+os.Getenv("PATH"))
	cmd.Dir = os.TempDir() // fio drops state files in its working folder
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return string(out), fmt.Errorf("%s timed out after %s", name, timeout)
	}
	return string(out), err
}

func mustRun(t *testing.T, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	out, err := runCmd(t, timeout, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// host is one agent process with its sockets.
type host struct {
	t       *testing.T
	dir     string
	sock    string
	nbdSock string
	cmd     *exec.Cmd
	log     *bytes.Buffer
	// bin is the agent's binary (empty: shadowBin).
	bin string
}

func newHost(t *testing.T) *host {
	d, err := os.MkdirTemp("", "she")
	if err != nil {
		t.Fatal(err)
	}
	h := &host{t: t, dir: d, sock: filepath.Join(d, "a.sock"), nbdSock: filepath.Join(d, "n.sock")}
	t.Cleanup(func() {
		h.kill()
		if t.Failed() && h.log != nil {
			t.Logf("agent log:\n%s", lastLines(h.log.String(), 40))
		}
		os.RemoveAll(d)
	})
	return h
}

func lastLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func (h *host) start(extra ...string) {
	h.t.Helper()
	args := append([]string{"agent", "--socket", h.sock, "--nbd-unix", h.nbdSock, "--nbd-listen", "", "--clean-after", "1s"}, extra...)
	bin := shadowBin
	if h.bin != "" {
		bin = h.bin
	}
	h.cmd = exec.Command(bin, args...)
	h.log = &bytes.Buffer{}
	h.cmd.Stdout, h.cmd.Stderr = h.log, h.log
	if err := h.cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if err := (&control.Client{Path: h.sock, Timeout: time.Second}).Call("show", agent.ShowArgs{}, nil); err == nil {
			return
		}
	}
	h.t.Fatalf("agent did not come up:\n%s", h.log)
}

// kill ends the agent by PID with SIGKILL (the process-crash model).
func (h *host) kill() {
	if h.cmd == nil || h.cmd.Process == nil {
		return
	}
	_ = h.cmd.Process.Signal(syscall.SIGKILL)
	_ = h.cmd.Wait()
	h.cmd = nil
}

// stop ends the agent with SIGTERM (orderly).
func (h *host) stop() {
	h.t.Helper()
	if h.cmd == nil {
		return
	}
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- h.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			h.t.Errorf("agent exited with %v:\n%s", err, lastLines(h.log.String(), 20))
		}
	case <-time.After(60 * time.Second):
		h.t.Error("agent ignored SIGTERM for 60s")
		h.kill()
	}
	h.cmd = nil
}

func (h *host) cli(args ...string) (string, error) {
	h.t.Helper()
	full := append([]string{args[0], "--socket", h.sock}, args[1:]...)
	return runCmd(h.t, 2*time.Minute, shadowBin, full...)
}

func (h *host) mustCLI(args ...string) string {
	h.t.Helper()
	out, err := h.cli(args...)
	if err != nil {
		h.t.Fatalf("shadow %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (h *host) show() report.ShowReport {
	h.t.Helper()
	var r report.ShowReport
	if err := json.Unmarshal([]byte(h.mustCLI("show", "--json")), &r); err != nil {
		h.t.Fatal(err)
	}
	return r
}

func (h *host) waitIdle(set string) {
	h.t.Helper()
	for deadline := time.Now().Add(5 * time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		r := h.show()
		for _, s := range r.Sets {
			if s.Name == set && len(s.Ops) == 0 {
				return
			}
		}
	}
	h.t.Fatalf("%s never became idle: %+v", set, h.show())
}

func (h *host) uri(set string) string { return fmt.Sprintf("nbd+unix:///%s?socket=%s", set, h.nbdSock) }

func makeFile(t *testing.T, path string, data int64) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, data+meta.ReservedSize); err != nil {
		t.Fatal(err)
	}
}

// mirrored starts an agent with a new set DSA1 on n fresh member files of
// size data bytes, waits for its initial copies, and returns the host and
// the member paths.
func mirrored(t *testing.T, n int, size int64, agentArgs ...string) (*host, []string) {
	t.Helper()
	h := newHost(t)
	var ms []string
	args := []string{"mount", "DSA1"}
	for i := range n {
		p := filepath.Join(h.dir, fmt.Sprintf("m%d", i+1))
		makeFile(t, p, size)
		ms = append(ms, p)
		args = append(args, "--member", p)
	}
	h.start(agentArgs...)
	h.mustCLI(args...)
	h.waitIdle("DSA1")
	return h, ms
}

// sameData compares the data regions of member files.
func sameData(t *testing.T, size int64, paths ...string) {
	t.Helper()
	first, err := os.ReadFile(paths[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range paths[1:] {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(first[:size], b[:size]) {
			for i := int64(0); i < size; i++ {
				if first[i] != b[i] {
					t.Fatalf("%s and %s differ first at byte %d", paths[0], p, i)
				}
			}
		}
	}
}

func TestE2ENbdcopyAndMembersIdentical(t *testing.T) {
	requireTools(t, "nbdcopy", "nbdinfo")
	const size = 256 << 20
	h, ms := mirrored(t, 2, size)
	m1, m2 := ms[0], ms[1]
	info := mustRun(t, 30*time.Second, "nbdinfo", "--json", h.uri("DSA1"))
	for _, flag := range []string{`"can_flush": true`, `"can_fua": true`, `"can_trim": true`, `"can_zero": true`, `"can_multi_conn": true`} {
		if !strings.Contains(info, flag) {
			t.Errorf("nbdinfo lacks %s:\n%s", flag, info)
		}
	}
	src := filepath.Join(h.dir, "rand.bin")
	data := make([]byte, size)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	mustRun(t, 2*time.Minute, "nbdcopy", src, h.uri("DSA1"))
	out := filepath.Join(h.dir, "out.bin")
	mustRun(t, 2*time.Minute, "nbdcopy", h.uri("DSA1"), out)
	back, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, data) {
		t.Fatal("data read back differs from data written")
	}
	h.stop()
	sameData(t, size, m1, m2)
	if !strings.Contains(mustRun(t, 10*time.Second, shadowBin, "examine", m1), "clean") {
		t.Error("an orderly shutdown did not mark the members clean")
	}
}

func TestE2EFioVerifyAndOverlappingWrites(t *testing.T) {
	requireTools(t, "fio")
	const size = 128 << 20
	h, ms := mirrored(t, 2, size)
	m1, m2 := ms[0], ms[1]
	// Random writes with crc32c verification, iodepth 16, two connections
	// on disjoint halves.
	mustRun(t, 5*time.Minute, "fio", "--thread", "--name=verify", "--ioengine=nbd", "--uri="+h.uri("DSA1"), "--rw=randwrite", "--bs=4k",
		"--iodepth=16", "--numjobs=2", "--size=64m", "--offset_increment=64m", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0")
	// Overlapping writes from two connections at once, same region.
	mustRun(t, 5*time.Minute, "fio", "--thread", "--name=overlap", "--ioengine=nbd", "--uri="+h.uri("DSA1"), "--rw=randwrite", "--bs=4k",
		"--iodepth=16", "--numjobs=2", "--size=4m", "--io_size=32m", "--norandommap")
	h.stop()
	sameData(t, size, m1, m2)
	// 4 KiB requests on a buffered set take the reader's quick path: the
	// test above must have exercised it, not only the workers.
	requests, quick := nbdCounts(t, h.log.String())
	if quick == 0 || quick > requests {
		t.Fatalf("%d of %d NBD requests took the quick path", quick, requests)
	}
	t.Logf("%d of %d NBD requests took the quick path", quick, requests)
}

// nbdCounts sums the request counters of the agent's "nbd connection
// closed" log lines. Read the log only once the agent has exited.
func nbdCounts(t *testing.T, log string) (requests, quick uint64) {
	t.Helper()
	for _, line := range strings.Split(log, "\n") {
		var ev struct {
			Message  string `json:"message"`
			Requests uint64 `json:"requests"`
			Quick    uint64 `json:"quick"`
		}
		if json.Unmarshal([]byte(line), &ev) != nil || ev.Message != "nbd connection closed" {
			continue
		}
		requests += ev.Requests
		quick += ev.Quick
	}
	return requests, quick
}

// TestE2EKillDuringWrites: SIGKILL the agent during fio writes, ten times
// at random moments. Each restart runs a full merge; what was written and
// flushed before the crash (an nbdcopy that exited) is intact; the members
// end identical.
func TestE2EKillDuringWrites(t *testing.T) { killDuringWrites(t, false) }

// TestE2EKillDuringWritesWithWriteLogs: the same on a set with write
// logs, fio confined to 8 MiB of the 256 MiB volume: each restart runs a
// controller minimerge of the logged extents only.
func TestE2EKillDuringWritesWithWriteLogs(t *testing.T) { killDuringWrites(t, true) }

func killDuringWrites(t *testing.T, writeLog bool) {
	requireTools(t, "fio", "nbdcopy")
	size := int64(64 << 20)
	fioArea := []string{"--offset=32m", "--size=32m"}
	var h *host
	var ms []string
	if writeLog {
		size = 256 << 20
		fioArea = []string{"--offset=128m", "--size=8m"}
		h = newHost(t)
		for i := range 2 {
			p := filepath.Join(h.dir, fmt.Sprintf("m%d", i+1))
			makeFile(t, p, size)
			ms = append(ms, p)
		}
		h.start()
		h.mustCLI("mount", "DSA1", "--member", ms[0], "--member", ms[1], "--write-log")
		h.waitIdle("DSA1")
	} else {
		h, ms = mirrored(t, 2, size)
	}
	m1, m2 := ms[0], ms[1]
	// A flushed pattern in the first 32 MiB; fio hammers elsewhere.
	pattern := make([]byte, 32<<20)
	if _, err := rand.Read(pattern); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(h.dir, "pattern.bin")
	if err := os.WriteFile(src, pattern, 0o600); err != nil {
		t.Fatal(err)
	}
	mustRun(t, time.Minute, "nbdcopy", src, h.uri("DSA1")) // nbdcopy flushes before it exits
	waitState := func(round int, state string) {
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if out, _ := runCmd(t, 10*time.Second, shadowBin, "examine", m1); strings.Contains(out, "State : "+state) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("round %d: the set never became %s", round, state)
			}
		}
	}
	want := "full-merge"
	if writeLog {
		want = "controller-minimerge"
	}
	for round := range 10 {
		waitState(round, "clean") // idle since the last merge: marked clean
		args := append([]string{"--thread", "--name=load", "--ioengine=nbd", "--uri=" + h.uri("DSA1"), "--rw=randwrite", "--bs=4k",
			"--iodepth=16", "--time_based", "--runtime=30"}, fioArea...)
		fio := background(t, "fio", args...)
		// Kill only once fio's writes have begun (the set is dirty on
		// disk), at a random moment after that.
		waitState(round, "dirty")
		time.Sleep(time.Duration(mrand(500)) * time.Millisecond)
		h.kill()
		endGroup(fio)
		h.start()
		out, err := h.cli("mount", "DSA1", "--member", m1, "--member", m2, "--json")
		if err != nil {
			t.Fatalf("round %d: remount: %v\n%s", round, err, out)
		}
		var res agent.MountResult
		if err := json.Unmarshal([]byte(out), &res); err != nil || res.Merge != want {
			t.Fatalf("round %d: after a crash the mount says %s (%v), want a %s", round, out, err, want)
		}
		h.waitIdle("DSA1")
		if writeLog {
			// Only logged extents: fio's 8 MiB (4 MiB extents, so at most
			// 12 MiB), and the pattern's 32 MiB if its extents were not
			// swept yet: far fewer than the volume.
			c := h.show().Sets[0].Completed
			if w := c[len(c)-1]; w.Kind != want || w.BytesDone > 44<<20 {
				t.Fatalf("round %d: recovery %+v, want a %s of at most 44 MiB", round, w, want)
			}
		}
		got := filepath.Join(h.dir, "got.bin")
		mustRun(t, time.Minute, "nbdcopy", h.uri("DSA1"), got)
		b, err := os.ReadFile(got)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b[:len(pattern)], pattern) {
			t.Fatalf("round %d: flushed data changed after a crash", round)
		}
		os.Remove(got)
	}
	h.stop()
	sameData(t, size, m1, m2)
}

func mrand(n int) int {
	var b [2]byte
	_, _ = rand.Read(b[:])
	return (int(b[0])<<8 | int(b[1])) % n
}

// TestE2ENbdfuseExt4: a real kernel filesystem on the export.
func TestE2ENbdfuseExt4(t *testing.T) {
	requireTools(t, "nbdfuse", "mkfs.ext4", "e2fsck", "fusermount3", "mount", "umount")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	const size = 128 << 20
	h, ms := mirrored(t, 2, size)
	m1, m2 := ms[0], ms[1]
	mnt, fsmnt := filepath.Join(h.dir, "mnt"), filepath.Join(h.dir, "fs")
	for _, d := range []string{mnt, fsmnt} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	disk := filepath.Join(mnt, "disk")
	fuse := background(t, "nbdfuse", disk, h.uri("DSA1"))
	t.Cleanup(func() { // runs before background's cleanup: unmount first
		_, _ = runCmd(t, 10*time.Second, "umount", fsmnt)
		_, _ = runCmd(t, 10*time.Second, "fusermount3", "-u", mnt)
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if fi, err := os.Stat(disk); err == nil && fi.Size() == size {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("nbdfuse did not expose the disk")
		}
	}
	mustRun(t, time.Minute, "mkfs.ext4", "-F", "-q", disk)
	mustRun(t, time.Minute, "mount", "-o", "loop", disk, fsmnt)
	payload := make([]byte, 8<<20)
	if _, err := rand.Read(payload); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if err := os.WriteFile(filepath.Join(fsmnt, fmt.Sprintf("f%d", i)), payload, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mustRun(t, time.Minute, "umount", fsmnt)
	out, err := runCmd(t, time.Minute, "e2fsck", "-fn", disk)
	if err != nil {
		t.Fatalf("e2fsck: %v\n%s", err, out)
	}
	mustRun(t, 30*time.Second, "fusermount3", "-u", mnt)
	_ = fuse.Wait()
	h.stop()
	sameData(t, size, m1, m2)
}

func TestE2EBadCLIArguments(t *testing.T) {
	h := newHost(t)
	h.start()
	m := filepath.Join(h.dir, "m1")
	makeFile(t, m, 8<<20)
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"mount"}, "give one set name"},
		{[]string{"mount", "DSA1"}, "no --member"},
		{[]string{"mount", "disk7", "--member", m}, "not DSAn"},
		{[]string{"mount", "DSA1", "--member", filepath.Join(h.dir, "nope")}, "no such file"},
		{[]string{"dismount", "DSA9"}, "not mounted"},
		{[]string{"set", "DSA1"}, "exactly one of"},
		{[]string{"set", "DSA1", "--priority", "5", "--demand-merge"}, "exactly one of"},
		{[]string{"show", "DSA4"}, "not mounted"},
		{[]string{"set", "DSA1", "--enable", "hbmm", "--demand-merge"}, "cannot be mixed"},
		{[]string{"set", "--policy", "hbmm=(master_list=(a))"}, "--name"},
		{[]string{"set", "DSA1", "--policy", "hbmm=(count=2)"}, "master_list"},
		{[]string{"dismount", "DSA1", "--policy", "minicopy"}, "give --member"},
		{[]string{"mount", "DSA1", "--member", m, "--direct-member", "/elsewhere"}, "not among the --member"},
	}
	for _, c := range cases {
		out, err := h.cli(c.args...)
		if err == nil || !strings.Contains(out, c.want) {
			t.Errorf("shadow %v: %v %q, want an error with %q", c.args, err, out, c.want)
		}
	}
	if out, err := runCmd(t, 10*time.Second, shadowBin, "examine", m); err == nil || !strings.Contains(out, "blank") {
		t.Errorf("examine of a blank member: %v %q", err, out)
	}
	// Nothing was created by the refused mounts.
	if r := h.show(); len(r.Sets) != 0 {
		t.Fatalf("refused commands left sets: %+v", r.Sets)
	}
}

// TestE2EAddMemberUnderLoadWithWatch: a fresh member joins a populated set
// while fio writes; `show --watch` shows the copy progress; the members
// end identical.
func TestE2EAddMemberUnderLoadWithWatch(t *testing.T) {
	requireTools(t, "fio", "nbdcopy")
	const size = 128 << 20
	h := newHost(t)
	m1, m2, m3 := filepath.Join(h.dir, "m1"), filepath.Join(h.dir, "m2"), filepath.Join(h.dir, "m3")
	for _, p := range []string{m1, m2, m3} {
		makeFile(t, p, size)
	}
	h.start("--max-rate", "32000000") // about 4 s for the copy, so the watch sees it move
	h.mustCLI("mount", "DSA1", "--member", m1, "--member", m2)
	h.waitIdle("DSA1")
	src := filepath.Join(h.dir, "rand.bin")
	data := make([]byte, size)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	mustRun(t, time.Minute, "nbdcopy", src, h.uri("DSA1"))
	fio := background(t, "fio", "--thread", "--name=load", "--ioengine=nbd", "--uri="+h.uri("DSA1"), "--rw=randwrite", "--bs=4k",
		"--iodepth=16", "--size=128m", "--time_based", "--runtime=8", "--rate_iops=2000")
	time.Sleep(500 * time.Millisecond)
	h.mustCLI("mount", "DSA1", "--member", m3)
	watch := h.mustCLI("show", "DSA1", "--watch", "--interval", "200ms")
	if err := fio.Wait(); err != nil {
		t.Fatalf("fio: %v", err)
	}
	pcts := map[string]bool{}
	for _, line := range strings.Split(watch, "\n") {
		if i := strings.Index(line, "] "); i > 0 && strings.Contains(line, "full-copy") {
			pcts[strings.TrimSpace(line[i+2:])] = true
		}
	}
	if len(pcts) < 2 || !strings.Contains(watch, "Copy Target (") {
		t.Fatalf("show --watch did not show the copy progressing (%v):\n%s", pcts, lastLines(watch, 30))
	}
	h.waitIdle("DSA1")
	h.stop()
	sameData(t, size, m1, m2, m3)
}
