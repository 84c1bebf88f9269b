package device

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
)

// newFile makes a file of size bytes in a fresh temporary directory.
func newFile(t *testing.T, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "member.img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

func mustOpen(t *testing.T, path string, opts Options) Device {
	t.Helper()
	d, err := Open(path, opts)
	if err != nil {
		if opts.Direct && !errors.Is(err, ErrBusy) {
			t.Skipf("direct I/O unavailable here: %v", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func readAll(t *testing.T, d Device) []byte {
	t.Helper()
	b := make([]byte, d.Size())
	if n, err := d.ReadAt(b, 0); n != len(b) || (err != nil && err != io.EOF) {
		t.Fatalf("read whole device: %d, %v", n, err)
	}
	return b
}

func TestOpenFileRoundTrip(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(map[bool]string{false: "buffered", true: "direct"}[direct], func(t *testing.T) {
			p := newFile(t, 1<<20)
			d := mustOpen(t, p, Options{Direct: direct})
			if d.Size() != 1<<20 || d.Path() != p {
				t.Fatalf("size %d path %q", d.Size(), d.Path())
			}
			data := pattern(1, 10000)
			if n, err := d.WriteAt(data, 777); n != len(data) || err != nil {
				t.Fatalf("write: %d, %v", n, err)
			}
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(data))
			if n, err := d.ReadAt(got, 777); n != len(got) || err != nil {
				t.Fatalf("read: %d, %v", n, err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("read back differs")
			}
			// Reads crossing the end are short with io.EOF, as io.ReaderAt.
			tail := make([]byte, 100)
			if n, err := d.ReadAt(tail, d.Size()-40); n != 40 || err != io.EOF {
				t.Fatalf("read across end: %d, %v", n, err)
			}
			if n, err := d.ReadAt(tail, d.Size()); n != 0 || err != io.EOF {
				t.Fatalf("read at end: %d, %v", n, err)
			}
		})
	}
}

func TestOpenRefuses(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(dir, Options{}); !errors.Is(err, ErrNotDevice) {
		t.Errorf("directory: %v", err)
	}
	if _, err := Open("/dev/null", Options{}); !errors.Is(err, ErrNotDevice) {
		t.Errorf("character device: %v", err)
	}
	if _, err := Open(filepath.Join(dir, "missing"), Options{}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing: %v", err)
	}
	// A FIFO would block in open(2): it must be refused before that.
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(fifo, Options{}); !errors.Is(err, ErrNotDevice) {
		t.Errorf("fifo: %v", err)
	}
}

func TestExclusiveFile(t *testing.T) {
	p := newFile(t, 64<<10)
	d, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, opts := range []Options{{}, {ReadOnly: true}, {Direct: true}} {
		if d2, err := Open(p, opts); !errors.Is(err, ErrBusy) {
			if d2 != nil {
				d2.Close()
			}
			t.Fatalf("second open %+v: %v, want ErrBusy", opts, err)
		}
	}
	// Through another name of the same file, too.
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(p, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(link, Options{}); !errors.Is(err, ErrBusy) {
		t.Fatalf("open through symlink: %v, want ErrBusy", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second close: %v", err)
	}
	if _, err := d.ReadAt(make([]byte, 1), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after close: %v", err)
	}
	d2, err := Open(p, Options{})
	if err != nil {
		t.Fatalf("open after close: %v", err)
	}
	d2.Close()
}

func TestRangeAndReadOnly(t *testing.T) {
	p := newFile(t, 64<<10)
	d := mustOpen(t, p, Options{})
	if _, err := d.WriteAt(make([]byte, 10), d.Size()-5); !errors.Is(err, ErrRange) {
		t.Fatalf("write across end: %v", err)
	}
	if err := d.Zero(-1, 10); !errors.Is(err, ErrRange) {
		t.Fatalf("zero before start: %v", err)
	}
	if _, err := d.ReadAt(make([]byte, 1), -1); !errors.Is(err, ErrRange) {
		t.Fatalf("read before start: %v", err)
	}
	// A caller's range bug does not fail the device.
	if _, err := d.WriteAt([]byte{1}, 0); err != nil {
		t.Fatalf("write after range error: %v", err)
	}
	d.Close()

	ro := mustOpen(t, p, Options{ReadOnly: true})
	if _, err := ro.WriteAt([]byte{1}, 0); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("write read-only: %v", err)
	}
	if err := ro.Zero(0, 1); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("zero read-only: %v", err)
	}
	b := make([]byte, 1)
	if _, err := ro.ReadAt(b, 0); err != nil || b[0] != 1 {
		t.Fatalf("read read-only: %v %v", b, err)
	}
}

// TestDirectMatchesBuffered runs the same random unaligned writes, zeroes
// and reads on a Direct and a buffered file: every read and the final
// contents must agree byte for byte.
func TestDirectMatchesBuffered(t *testing.T) {
	const size = 4 << 20
	buf := mustOpen(t, newFile(t, size), Options{})
	dir := mustOpen(t, newFile(t, size), Options{Direct: true})
	r := rand.New(rand.NewPCG(7, 7))
	span := func(maxLen int64) (int64, int64) {
		n := 1 + r.Int64N(maxLen)
		if r.IntN(4) == 0 {
			n = 3<<20 + r.Int64N(1<<20) // crosses bounce pieces
		}
		n = min(n, size)
		return r.Int64N(size - n + 1), n
	}
	for i := range 300 {
		off, n := span(20000)
		switch r.IntN(3) {
		case 0:
			// A buffer that starts at an odd address, too.
			raw := pattern(uint64(i), int(n)+1)
			data := raw[r.IntN(2):][:n]
			if _, err := buf.WriteAt(data, off); err != nil {
				t.Fatal(err)
			}
			if _, err := dir.WriteAt(data, off); err != nil {
				t.Fatal(err)
			}
		case 1:
			if err := buf.Zero(off, n); err != nil {
				t.Fatal(err)
			}
			if err := dir.Zero(off, n); err != nil {
				t.Fatal(err)
			}
		case 2:
			a, b := make([]byte, n), make([]byte, n+1)[1:]
			if _, err := buf.ReadAt(a, off); err != nil {
				t.Fatal(err)
			}
			if _, err := dir.ReadAt(b, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(a, b) {
				t.Fatalf("step %d: read %d+%d differs", i, off, n)
			}
		}
	}
	if !bytes.Equal(readAll(t, buf), readAll(t, dir)) {
		t.Fatal("final contents differ")
	}
}

func TestDirectRefusesUnalignedFileSize(t *testing.T) {
	p := newFile(t, 64<<10+1)
	d, err := Open(p, Options{Direct: true})
	if err == nil {
		d.Close()
		t.Fatal("direct open of a file of unaligned size succeeded")
	}
}

func TestAlignedBuffer(t *testing.T) {
	for _, a := range []int{1, 512, 4096, 65536} {
		for _, n := range []int{0, 1, 4096, 100000} {
			b := AlignedBuffer(n, a)
			if len(b) != n || cap(b) != n || !IsAligned(b, a) {
				t.Fatalf("AlignedBuffer(%d, %d): len %d cap %d aligned %v", n, a, len(b), cap(b), IsAligned(b, a))
			}
		}
	}
}

func TestZeroFile(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(map[bool]string{false: "buffered", true: "direct"}[direct], func(t *testing.T) {
			const size = 1 << 20
			p := newFile(t, size)
			d := mustOpen(t, p, Options{Direct: direct})
			data := pattern(3, size)
			if _, err := d.WriteAt(data, 0); err != nil {
				t.Fatal(err)
			}
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			var before syscall.Stat_t
			if err := syscall.Stat(p, &before); err != nil {
				t.Fatal(err)
			}
			// Unaligned at both ends, and long enough to free whole blocks.
			off, n := int64(1000), int64(300000)
			if err := d.Zero(off, n); err != nil {
				t.Fatal(err)
			}
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			want := bytes.Clone(data)
			clear(want[off : off+n])
			if !bytes.Equal(readAll(t, d), want) {
				t.Fatal("contents after Zero differ")
			}
			var after syscall.Stat_t
			if err := syscall.Stat(p, &after); err != nil {
				t.Fatal(err)
			}
			if after.Size != size {
				t.Fatalf("size after Zero: %d, want %d (KEEP_SIZE)", after.Size, size)
			}
			if after.Blocks >= before.Blocks {
				t.Logf("no blocks freed (%d -> %d): the filesystem wrote zeroes", before.Blocks, after.Blocks)
			}
		})
	}
}

// withReadOnlyDescriptor opens a device whose descriptor is then swapped
// for a read-only one, so that the kernel fails its writes (EBADF);
// restore puts the writable one back.
func withReadOnlyDescriptor(t *testing.T) (d *osDevice, restore func()) {
	t.Helper()
	p := newFile(t, 64<<10)
	d = mustOpen(t, p, Options{}).(*osDevice)
	ro, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	roRC, err := ro.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	orig, origRC := d.f, d.rc
	d.f, d.rc = ro, roRC
	restore = func() { d.f, d.rc = orig, origRC }
	t.Cleanup(func() { restore(); ro.Close() })
	return d, restore
}

// TestStickyWriteFailure makes a real write fail (the descriptor is
// swapped for a read-only one: EBADF from the kernel) and checks that
// every later call, Flush included, returns that failure, although an
// fdatasync on the descriptor would now succeed.
func TestStickyWriteFailure(t *testing.T) {
	d, _ := withReadOnlyDescriptor(t)

	_, err := d.WriteAt([]byte("x"), 0)
	if !errors.Is(err, ErrFailed) || !errors.Is(err, syscall.EBADF) {
		t.Fatalf("write: %v, want ErrFailed wrapping EBADF", err)
	}
	for name, call := range map[string]func() error{
		"flush": d.Flush,
		"zero":  func() error { return d.Zero(0, 1) },
		"write": func() error { _, err := d.WriteAt([]byte("y"), 100); return err },
		"read":  func() error { _, err := d.ReadAt(make([]byte, 1), 0); return err },
	} {
		if err := call(); !errors.Is(err, ErrFailed) || !errors.Is(err, syscall.EBADF) {
			t.Errorf("%s after failure: %v", name, err)
		}
	}
}

// TestConcurrentUnalignedWriters has writers patch disjoint, unaligned
// byte ranges that share sectors: without the read-modify-write locks a
// Direct device would lose some of them.
func TestConcurrentUnalignedWriters(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(map[bool]string{false: "buffered", true: "direct"}[direct], func(t *testing.T) {
			const size = 64 << 10
			d := mustOpen(t, newFile(t, size), Options{Direct: direct})
			const writers, piece = 8, 100
			var wg sync.WaitGroup
			for w := range writers {
				wg.Go(func() {
					for round := range 50 {
						b := bytes.Repeat([]byte{byte(w*50 + round)}, piece)
						for base := int64(0); base+writers*piece <= size; base += 7 * 512 {
							if _, err := d.WriteAt(b, base+int64(w*piece)); err != nil {
								t.Error(err)
								return
							}
						}
					}
				})
			}
			wg.Wait()
			got := readAll(t, d)
			for base := int64(0); base+writers*piece <= size; base += 7 * 512 {
				for w := range writers {
					s := got[base+int64(w*piece):][:piece]
					if !bytes.Equal(s, bytes.Repeat([]byte{byte(w*50 + 49)}, piece)) {
						t.Fatalf("writer %d at %d lost its last write: %v", w, base, s[:8])
					}
				}
			}
		})
	}
}

// TestSharedOpen: the agents of one cluster open a member together
// (LOCK_SH); an exclusive opener is refused beside them and refuses them.
func TestSharedOpen(t *testing.T) {
	p := filepath.Join(t.TempDir(), "m")
	if err := os.WriteFile(p, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	a, err := Open(p, Options{Shared: true})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Open(p, Options{Shared: true, Direct: true})
	if err != nil {
		t.Fatalf("second shared open: %v", err)
	}
	if x, err := Open(p, Options{}); !errors.Is(err, ErrBusy) {
		if x != nil {
			x.Close()
		}
		t.Fatalf("exclusive open beside shared ones: %v, want ErrBusy", err)
	}
	a.Close()
	b.Close()
	x, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	if y, err := Open(p, Options{Shared: true}); !errors.Is(err, ErrBusy) {
		if y != nil {
			y.Close()
		}
		t.Fatalf("shared open beside an exclusive one: %v, want ErrBusy", err)
	}
}
