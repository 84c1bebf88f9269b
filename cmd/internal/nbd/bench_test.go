package nbd

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fileBackend serves a regular file through the page cache, like nbdkit's
// file plugin, so the two can be compared on equal terms.
type fileBackend struct {
	f    *os.File
	fd   int
	size int64
}

func openFileBackend(path string, size int64) (*fileBackend, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open file backend: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, fmt.Errorf("size file backend: %w", err)
	}
	return &fileBackend{f: f, fd: int(f.Fd()), size: size}, nil
}

func (b *fileBackend) Size() int64 { return b.size }

func (b *fileBackend) ReadAt(p []byte, off int64) error {
	_, err := b.f.ReadAt(p, off)
	return err
}

func (b *fileBackend) WriteAt(p []byte, off int64, fua bool) error {
	if _, err := b.f.WriteAt(p, off); err != nil {
		return err
	}
	if fua {
		return unix.Fdatasync(b.fd)
	}
	return nil
}

// Flush: fdatasync covers every completed write to the file, through any
// descriptor, which is what CAN_MULTI_CONN requires.
func (b *fileBackend) Flush() error { return unix.Fdatasync(b.fd) }

func (b *fileBackend) Trim(off, length int64) error {
	return unix.Fallocate(b.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

func (b *fileBackend) Zero(off, length int64, fua bool) error {
	if err := unix.Fallocate(b.fd, unix.FALLOC_FL_ZERO_RANGE, off, length); err != nil {
		return err
	}
	if fua {
		return unix.Fdatasync(b.fd)
	}
	return nil
}

func (b *fileBackend) Close() error { return b.f.Close() }

const (
	benchSize    = 64 << 20
	benchRuntime = 5 * time.Second
)

// BenchmarkFioRandWrite runs fio 4 KiB random writes at queue depth 16,
// one job, against this server (memory and file backends) and against
// `nbdkit file` on the same file, side by side in one run, over TCP and a
// unix socket. It reports fio's IOPS; ns/op is the fio run time and means
// nothing. Numbers from a noisy VM are only comparable within one run, and
// only without -race:
//
//	go test -run '^$' -bench FioRandWrite ./cmd/internal/nbd/
func BenchmarkFioRandWrite(b *testing.B) {
	requireTool(b, "fio")
	dir := b.TempDir()
	file := filepath.Join(dir, "bench.img")
	for _, transport := range []string{"tcp", "unix"} {
		b.Run("shadow-memory/"+transport, func(b *testing.B) {
			uri := serveForBench(b, transport, newRAMBackend(benchSize))
			benchFio(b, uri)
		})
		b.Run("shadow-file/"+transport, func(b *testing.B) {
			fb, err := openFileBackend(file, benchSize)
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { fb.Close() })
			uri := serveForBench(b, transport, fb)
			benchFio(b, uri)
		})
		b.Run("nbdkit-file/"+transport, func(b *testing.B) {
			uri := startNbdkitFile(b, transport, file)
			benchFio(b, uri)
		})
	}
}

// serveForBench serves backend as export "BENCH" and returns its URI.
func serveForBench(b *testing.B, transport string, backend Backend) string {
	s := NewServer(Options{})
	check(b, s.AddExport(Export{Name: "BENCH", Backend: backend}))
	var l net.Listener
	var uri string
	if transport == "unix" {
		sock := filepath.Join(b.TempDir(), "shadow.sock")
		l = must(net.Listen("unix", sock))(b)
		uri = "nbd+unix:///BENCH?socket=" + sock
	} else {
		l = must(net.Listen("tcp", "127.0.0.1:0"))(b)
		uri = "nbd://" + l.Addr().String() + "/BENCH"
	}
	go s.Serve(l)
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.Shutdown(ctx)
	})
	return uri
}

// startNbdkitFile runs `nbdkit file` in the foreground and stops it, by
// PID, when the benchmark ends; --exit-with-parent covers a crash of the
// test binary.
func startNbdkitFile(b *testing.B, transport, file string) string {
	path := requireTool(b, "nbdkit")
	args := []string{"-f", "--exit-with-parent"}
	var uri, addr string
	if transport == "unix" {
		addr = filepath.Join(b.TempDir(), "nbdkit.sock")
		args = append(args, "-U", addr)
		uri = "nbd+unix:///?socket=" + addr
	} else {
		// nbdkit cannot report an ephemeral port; take a free one.
		l := must(net.Listen("tcp", "127.0.0.1:0"))(b)
		addr = l.Addr().String()
		l.Close()
		_, port, _ := net.SplitHostPort(addr)
		args = append(args, "-i", "127.0.0.1", "-p", port)
		uri = "nbd://" + addr + "/"
	}
	args = append(args, "file", file)

	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.WaitDelay = 5 * time.Second
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		cancel()
		b.Fatalf("start nbdkit: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	b.Cleanup(func() {
		cancel() // kills cmd.Process, by PID
		<-exited
	})

	network := "tcp"
	if transport == "unix" {
		network = "unix"
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if nc, err := net.DialTimeout(network, addr, time.Second); err == nil {
			nc.Close()
			return uri
		}
		select {
		case err := <-exited:
			b.Fatalf("nbdkit exited: %v\n%s", err, stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			b.Fatalf("nbdkit not listening on %s after 10s\n%s", addr, stderr.String())
		}
	}
}

func benchFio(b *testing.B, uri string) {
	var iops, mibps float64
	runs := 0
	for b.Loop() {
		res := runToolOK(b, benchRuntime+time.Minute, "fio", "--name=bench", "--ioengine=nbd",
			"--uri="+uri, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=1",
			fmt.Sprintf("--size=%d", benchSize), "--time_based",
			fmt.Sprintf("--runtime=%ds", int(benchRuntime.Seconds())), "--output-format=json")
		var report struct {
			Jobs []struct {
				Error int `json:"error"`
				Write struct {
					IOPS float64 `json:"iops"`
					BW   float64 `json:"bw"`
				} `json:"write"`
			} `json:"jobs"`
		}
		out := res.Stdout[max(strings.Index(res.Stdout, "{"), 0):]
		if err := json.Unmarshal([]byte(out), &report); err != nil {
			b.Fatalf("fio json: %v\n%s", err, res.Stdout)
		}
		if len(report.Jobs) != 1 {
			b.Fatalf("fio ran %d jobs, want 1", len(report.Jobs))
		}
		if report.Jobs[0].Error != 0 {
			b.Fatalf("fio job error %d\n%s", report.Jobs[0].Error, res.Stderr)
		}
		iops += report.Jobs[0].Write.IOPS
		mibps += report.Jobs[0].Write.BW / 1024
		runs++
	}
	b.ReportMetric(iops/float64(runs), "iops")
	b.ReportMetric(mibps/float64(runs), "MiB/s")
}
