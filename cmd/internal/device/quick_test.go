package device

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func TestQuickBuffered(t *testing.T) {
	p := newFile(t, 1<<20)
	d := mustOpen(t, p, Options{})
	q, ok := d.(Quick)
	if !ok {
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
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Skipf("cannot drop the file's pages: %v", err)
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
	buf := AlignedBuffer(4096, 4096)
	if ok, err := q.TryWriteAt(buf, 0); ok || err != nil {
		t.Fatalf("direct TryWriteAt = %v, %v; want a decline", ok, err)
	}
	if q.TryReadAt(buf, 0) {
		t.Fatal("direct TryReadAt did not decline")
	}
}
