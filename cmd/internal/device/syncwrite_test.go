package device

import (
	"bytes"
	"errors"
	"syscall"
	"testing"
)

func TestSyncWriteAt(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(map[bool]string{false: "buffered", true: "direct"}[direct], func(t *testing.T) {
			p := newFile(t, 1<<20)
			d := mustOpen(t, p, Options{Direct: direct})
			sw, ok := d.(SyncWriter)
			if !ok {
				t.Fatal("the os device is not a SyncWriter")
			}
			// Aligned (the write log's case) and unaligned (the bounce
			// fallback on a Direct device).
			aligned := AlignedBuffer(8192, 4096)
			copy(aligned, pattern(3, len(aligned)))
			if n, err := sw.SyncWriteAt(aligned, 64<<10); n != len(aligned) || err != nil {
				t.Fatalf("aligned: %d, %v", n, err)
			}
			odd := pattern(4, 5000)
			if n, err := sw.SyncWriteAt(odd, 777); n != len(odd) || err != nil {
				t.Fatalf("unaligned: %d, %v", n, err)
			}
			if n, err := sw.SyncWriteAt(nil, 0); n != 0 || err != nil {
				t.Fatalf("empty: %d, %v", n, err)
			}
			if d.(*osDevice).noDSync.Load() {
				// ext4, xfs, tmpfs and block devices take the flag
				// since Linux 4.7; worth knowing when one does not.
				t.Log("pwritev2(RWF_DSYNC) refused: using the fdatasync fallback")
			}
			d.Close()
			got := readAll(t, mustOpen(t, p, Options{}))
			if !bytes.Equal(got[64<<10:72<<10], aligned) || !bytes.Equal(got[777:777+5000], odd) {
				t.Fatal("read back differs")
			}
		})
	}
}

func TestSyncWriteAtFallback(t *testing.T) {
	p := newFile(t, 64<<10)
	d := mustOpen(t, p, Options{})
	d.(*osDevice).noDSync.Store(true)
	b := pattern(5, 4096)
	if _, err := d.(SyncWriter).SyncWriteAt(b, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(b))
	if _, err := d.ReadAt(got, 4096); err != nil || !bytes.Equal(got, b) {
		t.Fatalf("read back: %v", err)
	}
}

func TestSyncWriteAtRefusals(t *testing.T) {
	p := newFile(t, 64<<10)
	d := mustOpen(t, p, Options{})
	sw := d.(SyncWriter)
	if _, err := sw.SyncWriteAt(make([]byte, 10), d.Size()-5); !errors.Is(err, ErrRange) {
		t.Fatalf("across end: %v", err)
	}
	if _, err := sw.SyncWriteAt([]byte{1}, -1); !errors.Is(err, ErrRange) {
		t.Fatalf("before start: %v", err)
	}
	if _, err := sw.SyncWriteAt([]byte{1}, 0); err != nil {
		t.Fatalf("after range errors: %v", err)
	}
	d.Close()
	if _, err := sw.SyncWriteAt([]byte{1}, 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("after close: %v", err)
	}
	ro := mustOpen(t, p, Options{ReadOnly: true})
	if _, err := ro.(SyncWriter).SyncWriteAt([]byte{1}, 0); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("read-only: %v", err)
	}
}

// TestSyncWriteAtSticky: a sync write that fails in the kernel (EBADF on
// a descriptor swapped for a read-only one) fails the device, and a
// later Flush reports it instead of succeeding.
func TestSyncWriteAtSticky(t *testing.T) {
	d, restore := withReadOnlyDescriptor(t)
	if _, err := d.SyncWriteAt(make([]byte, 4096), 0); !errors.Is(err, ErrFailed) || !errors.Is(err, syscall.EBADF) {
		t.Fatalf("sync write: %v, want ErrFailed wrapping EBADF", err)
	}
	if d.noDSync.Load() {
		t.Fatal("an I/O error was taken for an unsupported flag")
	}
	restore()
	if err := d.Flush(); !errors.Is(err, ErrFailed) {
		t.Fatalf("flush after failed sync write: %v", err)
	}
	if _, err := d.SyncWriteAt(make([]byte, 4096), 0); !errors.Is(err, ErrFailed) {
		t.Fatalf("second sync write: %v", err)
	}
}

// plainDevice hides SyncWriteAt: a Device and nothing more.
type plainDevice struct{ Device }

// TestFaultySyncWritePowerLoss: a synced range survives a crash with no
// Flush, while unflushed writes around it are rolled back, including the
// parts of an older unflushed write outside the synced range, and a
// later unflushed write over it is undone to the synced bytes.
func TestFaultySyncWritePowerLoss(t *testing.T) {
	for _, under := range []string{"os", "plain"} {
		t.Run(under, func(t *testing.T) {
			const size = 256 << 10
			p := newFile(t, size)
			dev, err := Open(p, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if under == "plain" {
				dev = plainDevice{dev}
			}
			f := NewFaulty(dev)
			f.PowerLoss()
			want := make([]byte, size)
			write := func(b []byte, off int64, durable bool) {
				t.Helper()
				if durable {
					if _, err := f.SyncWriteAt(b, off); err != nil {
						t.Fatal(err)
					}
					copy(want[off:], b)
				} else if _, err := f.WriteAt(b, off); err != nil {
					t.Fatal(err)
				}
			}
			flushed := pattern(20, 4096)
			write(flushed, 100<<10, false)
			if err := f.Flush(); err != nil {
				t.Fatal(err)
			}
			copy(want[100<<10:], flushed)

			write(pattern(21, 30000), 10000, false)      // older, unflushed
			write(pattern(22, 4096), 16384, true)        // inside it: splits its record
			write(pattern(23, 8192), 36000, true)        // overlaps its tail
			write(pattern(24, 1000), 17000, false)       // newer, over the synced range
			write(pattern(25, 5000), 100<<10-100, false) // over the flushed block
			write(pattern(26, 4096), 200<<10, true)      // alone
			write(pattern(27, 4096), 200<<10+4096, false)
			if err := f.Crash(); err != nil {
				t.Fatal(err)
			}
			f.Close()
			if got := readAll(t, mustOpen(t, p, Options{})); !bytes.Equal(got, want) {
				for i := range got {
					if got[i] != want[i] {
						t.Fatalf("after the crash byte %d is %#x, want %#x", i, got[i], want[i])
					}
				}
			}
		})
	}
}

// TestFaultySyncWriteRules: OpSyncWrite rules fail sync writes (for
// good), OpWrite rules do not touch them.
func TestFaultySyncWriteRules(t *testing.T) {
	f := NewFaulty(mustOpen(t, newFile(t, 64<<10), Options{}))
	f.Inject(When(func(op Op, off, length int64) bool { return op == OpWrite }, syscall.EIO, 0))
	if _, err := f.SyncWriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("sync write under an OpWrite rule: %v", err)
	}
	f.ClearRules()
	f.Inject(When(func(op Op, off, length int64) bool { return op == OpSyncWrite && off >= 8192 }, syscall.EIO, 0))
	if _, err := f.SyncWriteAt(make([]byte, 4096), 4096); err != nil {
		t.Fatalf("sync write outside the rule: %v", err)
	}
	if _, err := f.SyncWriteAt(make([]byte, 4096), 8192); !errors.Is(err, syscall.EIO) || !errors.Is(err, ErrFailed) {
		t.Fatalf("sync write in the rule: %v, want EIO and ErrFailed", err)
	}
	f.ClearRules()
	if _, err := f.WriteAt(make([]byte, 1), 0); !errors.Is(err, ErrFailed) {
		t.Fatalf("write after a failed sync write: %v", err)
	}
	if OpSyncWrite.String() != "sync-write" {
		t.Fatalf("OpSyncWrite prints as %q", OpSyncWrite)
	}
}

func TestTrimUndo(t *testing.T) {
	rec := func(off int64, n int) undoRecord {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(off + int64(i))
		}
		return undoRecord{off: off, old: b}
	}
	undo := []undoRecord{rec(0, 100), rec(50, 10), rec(200, 10), rec(95, 20)}
	// [52, 60) is now durable: the first record splits around it, the
	// second loses its tail, the others do not touch it.
	got := trimUndo(undo, 52, 60)
	want := []undoRecord{rec(0, 52), rec(60, 40), rec(50, 2), rec(200, 10), rec(95, 20)}
	if len(got) != len(want) {
		t.Fatalf("got %d records, want %d: %v", len(got), len(want), got)
	}
	for i := range got {
		if got[i].off != want[i].off || !bytes.Equal(got[i].old, want[i].old) {
			t.Errorf("record %d: %d+%d, want %d+%d", i, got[i].off, len(got[i].old), want[i].off, len(want[i].old))
		}
	}
	if len(undo) != 4 || undo[0].off != 0 || len(undo[0].old) != 100 {
		t.Fatal("trimUndo changed its input")
	}
}
