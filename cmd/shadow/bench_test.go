package main

// The side-by-side performance comparison behind `make bench`
// (SHADOW_BENCH=1): our agent against its peers on the same machine in the
// same run, alternating A B A B five times and taking medians, so only
// ratios are reported. It is a test, not a Go benchmark, because each
// sample is a whole fio run; it asserts nothing about speed (timed
// assertions flake), it prints the table docs/performance.md records.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const (
	benchSize    = 1 << 30
	benchRounds  = 5
	benchRuntime = "10"
)

// settle writes back dirty pages and, as root, drops the page cache, so
// that every sample starts from the same cache state whoever ran before.
func settle(t *testing.T) {
	t.Helper()
	syscall.Sync()
	if os.Getuid() == 0 {
		_ = os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200)
	}
}

// warm reads files whole, after settling, so that a read measurement finds
// every target's data in the page cache: it then measures the servers, not
// this VM's virtual disk, whose cold 4 KiB read rate swings 5× from one
// minute to the next (docs/performance.md).
func warm(t *testing.T, files ...string) {
	t.Helper()
	settle(t)
	for _, f := range files {
		mustRun(t, 2*time.Minute, "dd", "if="+f, "of=/dev/null", "bs=1M", "status=none")
	}
}

// fioIOPS runs one fio job against an NBD URI and returns its IOPS. Writes
// start from a settled cache, reads from a warm one over files.
func fioIOPS(t *testing.T, uri, rw string, files ...string) float64 {
	t.Helper()
	if rw == "randread" {
		warm(t, files...)
	} else {
		settle(t)
	}
	return fioRun(t, uri, rw, "1g")
}

// fioIOPSSized measures random writes over a volume of the given size
// (fio's --size) after settling the cache.
func fioIOPSSized(t *testing.T, uri, size string) float64 {
	t.Helper()
	settle(t)
	return fioRun(t, uri, "randwrite", size)
}

func fioRun(t *testing.T, uri, rw, size string) float64 {
	t.Helper()
	out := mustRun(t, 2*time.Minute, "fio", "--thread", "--name=bench", "--ioengine=nbd", "--uri="+uri, "--rw="+rw, "--bs=4k",
		"--iodepth=16", "--size="+size, "--time_based", "--runtime="+benchRuntime, "--ramp_time=2",
		"--output-format=terse", "--terse-version=3")
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(line, ";")
		if len(f) < 50 {
			continue
		}
		field := f[48] // write IOPS
		if rw == "randread" {
			field = f[7]
		}
		v, err := strconv.ParseFloat(field, 64)
		if err != nil {
			t.Fatalf("fio terse output: %v", err)
		}
		return v
	}
	t.Fatalf("no fio result in:\n%s", out)
	return 0
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

// filled creates a file of benchSize bytes, every block written, so that
// no target pays for allocating blocks the others had already.
func filled(t *testing.T, path string, size int64) {
	t.Helper()
	mustRun(t, 2*time.Minute, "dd", "if=/dev/zero", "of="+path, "bs=1M", fmt.Sprintf("count=%d", size>>20), "conv=fdatasync", "status=none")
}

// peer is a background server process ended by PID.
type peer struct{ cmd *exec.Cmd }

func startPeer(t *testing.T, wait string, name string, args ...string) *peer {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &peer{cmd}
	t.Cleanup(p.stop)
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(wait); err == nil {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not create %s", name, wait)
		}
	}
}

func (p *peer) stop() {
	if p.cmd.Process != nil {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = p.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			endGroup(p.cmd)
		}
	}
}

func TestPerformanceComparison(t *testing.T) {
	if os.Getenv("SHADOW_BENCH") != "1" {
		t.Skip("set SHADOW_BENCH=1 (make bench)")
	}
	requireTools(t, "fio", "nbdkit", "qemu-storage-daemon", "dd")
	h := newHost(t)
	d := h.dir
	for _, n := range []string{"m1", "m2", "q1", "q2", "k1"} {
		filled(t, filepath.Join(d, n), benchSize+1<<20)
	}
	h.start("--min-rate", "0")
	h.mustCLI("mount", "DSA1", "--member", filepath.Join(d, "m1"), "--member", filepath.Join(d, "m2"), "--confirm")
	h.waitIdle("DSA1")
	ours := h.uri("DSA1")

	qsock := filepath.Join(d, "q.sock")
	startPeer(t, qsock, "qemu-storage-daemon",
		"--blockdev", "driver=file,node-name=f1,filename="+filepath.Join(d, "q1"),
		"--blockdev", "driver=file,node-name=f2,filename="+filepath.Join(d, "q2"),
		"--blockdev", "driver=quorum,node-name=q,children.0=f1,children.1=f2,vote-threshold=1,read-pattern=fifo",
		"--nbd-server", "addr.type=unix,addr.path="+qsock,
		"--export", "type=nbd,id=e,node-name=q,name=q,writable=on")
	quorum := "nbd+unix:///q?socket=" + qsock
	ksock := filepath.Join(d, "k.sock")
	startPeer(t, ksock, "nbdkit", "-f", "-U", ksock, "file", filepath.Join(d, "k1"))
	nbdkit := "nbd+unix:///?socket=" + ksock

	type row struct {
		what, peerName string
		a, b           []float64
	}
	rows := []*row{
		{what: "4 KiB random writes, iodepth 16 (IOPS)", peerName: "qemu-storage-daemon quorum, 2 files"},
		{what: "4 KiB random writes, iodepth 16 (IOPS)", peerName: "nbdkit file plugin, 1 file"},
		{what: "4 KiB random reads, iodepth 16, warm cache (IOPS)", peerName: "nbdkit file plugin, 1 file"},
	}
	peers := []string{quorum, nbdkit, nbdkit}
	modes := []string{"randwrite", "randwrite", "randread"}
	ourFiles := []string{filepath.Join(d, "m1"), filepath.Join(d, "m2")}
	peerFiles := [][]string{nil, nil, {filepath.Join(d, "k1")}}
	for i, r := range rows {
		for range benchRounds {
			r.a = append(r.a, fioIOPS(t, ours, modes[i], ourFiles...))
			r.b = append(r.b, fioIOPS(t, peers[i], modes[i], peerFiles[i]...))
		}
	}

	// A full copy of a populated 1 GiB member against dd of the same file.
	var copyA, copyB []float64
	for i := range benchRounds {
		target := filepath.Join(d, fmt.Sprintf("c%d", i))
		filled(t, target, benchSize+1<<20)
		settle(t)
		start := time.Now()
		h.mustCLI("mount", "DSA1", "--member", target, "--confirm")
		h.waitIdle("DSA1")
		copyA = append(copyA, benchSize/time.Since(start).Seconds()/(1<<20))
		h.mustCLI("dismount", "DSA1", "--member", target)
		os.Remove(target)
		out := filepath.Join(d, "dd.out")
		settle(t)
		start = time.Now()
		mustRun(t, 2*time.Minute, "dd", "if="+filepath.Join(d, "m1"), "of="+out, "bs=1M", fmt.Sprintf("count=%d", benchSize>>20), "conv=fdatasync", "status=none")
		copyB = append(copyB, benchSize/time.Since(start).Seconds()/(1<<20))
		os.Remove(out)
	}

	var b strings.Builder
	fmt.Fprintf(&b, "| measure | shadow (median) | peer | peer (median) | ratio |\n|---|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %.0f | %s | %.0f | %.2f× |\n", r.what, median(r.a), r.peerName, median(r.b), median(r.a)/median(r.b))
	}
	fmt.Fprintf(&b, "| full copy of 1 GiB (MiB/s) | %.0f | dd bs=1M conv=fdatasync | %.0f | %.2f× |\n", median(copyA), median(copyB), median(copyA)/median(copyB))
	t.Logf("samples: %v", func() string {
		var s []string
		for _, r := range rows {
			s = append(s, fmt.Sprintf("%s vs %s: %v / %v", r.what, r.peerName, r.a, r.b))
		}
		s = append(s, fmt.Sprintf("copy: %v / %v", copyA, copyB))
		return strings.Join(s, "; ")
	}())
	fmt.Println(b.String())
	appendBenchOut(t, b.String())
}

// appendBenchOut adds a table to SHADOW_BENCH_OUT (make bench empties it
// first).
func appendBenchOut(t *testing.T, table string) {
	t.Helper()
	p := os.Getenv("SHADOW_BENCH_OUT")
	if p == "" {
		return
	}
	f, err := os.OpenFile(p, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := fmt.Fprintf(f, "%s\n", table); err != nil {
		t.Fatal(err)
	}
}
