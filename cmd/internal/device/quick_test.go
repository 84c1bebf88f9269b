package device

import (
	"bytes"
	"errors"
	"os"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestQuickBuffered(t *testing.T) {
	p := newFile(t, 1<<20)
	d := mustOpen(t, p, Options{})
	q, ok := d.(Quick)
	if !ok || !q.QuickWrites() {
		t.Fatal("a buffered os device has no quick path")
	}
	data := pattern(1, 8192)
	if ok, err := q.TryWriteAt(data, 4096); !ok || err != nil {
		t.Fatalf("TryWriteAt = %v, %v", ok, err)
	}
	if ok, err := q.TryWriteAt(data, 1<<20-4096); !ok || !errors.Is(err, ErrRange) {
		t.Fatalf("TryWriteAt past the end = %v, %v; want ErrRange as WriteAt", ok, err)
	}
	got := make([]byte, len(data))
	if !q.TryReadAt(got, 4096) || !bytes.Equal(got, data) {
		t.Fatal("TryReadAt of data just written (in the page cache) failed or differs")
	}
	if q.TryReadAt(got, 1<<20-4096) {
		t.Fatal("TryReadAt past the end succeeded")
	}
	// Once written back and dropped from the page cache, reading would
	// wait for the disk: TryReadAt declines.
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if !dropPages(t, f, 4096, len(data)) {
		t.Skip("the kernel kept the file's pages in memory; nothing to test")
	}
	if q.TryReadAt(got, 4096) {
		t.Fatal("TryReadAt succeeded on data no longer in memory")
	}
	if _, err := d.ReadAt(got, 4096); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("ReadAt after the decline: %v", err)
	}
}

func TestQuickDirectDeclines(t *testing.T) {
	d := mustOpen(t, newFile(t, 1<<20), Options{Direct: true})
	q := d.(Quick)
	if q.QuickWrites() {
		t.Fatal("a direct device claims quick writes")
	}
	buf := AlignedBuffer(4096, 4096)
	if ok, err := q.TryWriteAt(buf, 0); ok || err != nil {
		t.Fatalf("direct TryWriteAt = %v, %v; want a decline", ok, err)
	}
	if q.TryReadAt(buf, 0) {
		t.Fatal("direct TryReadAt did not decline")
	}
}

// dropPages asks the kernel to drop f's clean pages and reports whether
// [off, off+n) has left memory (mincore), retrying a little: pages still
// in another CPU's LRU batch are not dropped at the first request.
func dropPages(t *testing.T, f *os.File, off, n int) bool {
	t.Helper()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	page := os.Getpagesize()
	vec := make([]byte, (len(m)+page-1)/page)
	for range 50 {
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			t.Fatalf("fadvise: %v", err)
		}
		if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
			t.Fatalf("mincore: %v", errno)
		}
		resident := false
		for _, v := range vec[off/page : (off+n+page-1)/page] {
			resident = resident || v&1 != 0
		}
		if !resident {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return false
}
