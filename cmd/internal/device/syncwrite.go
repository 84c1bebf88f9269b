package device

import (
	"errors"
	"fmt"
	"io"

	"golang.org/x/sys/unix"
)

// SyncWriter is the optional range-limited synchronous write. Write logs
// need one small block on stable storage before a data write may start;
// Flush would do it, but Flush makes the whole member durable (every
// dirty page of it, and the drive's cache), which is far too much to pay
// for each bit. The os device and Faulty implement it; find it with a
// type assertion (dev.(SyncWriter)).
type SyncWriter interface {
	// SyncWriteAt writes p at off and returns once just this range is
	// on stable storage; other unflushed writes stay unflushed. Range
	// and failure rules are WriteAt's: an I/O error fails the device for
	// good, as a failed Flush does.
	SyncWriteAt(p []byte, off int64) (int, error)
}

// SyncWriteAt writes p with pwritev2(RWF_DSYNC): the kernel writes back
// just this range (and the metadata needed to read it back) and, where
// the device has a volatile cache, makes the write durable there too
// (a FUA write for direct I/O on a block device, a cache flush
// otherwise). A kernel or filesystem that refuses the flag (EOPNOTSUPP,
// EINVAL, ENOSYS before Linux 4.7) gets WriteAt followed by fdatasync,
// once and for all for this device: correct, only slower. An unaligned
// request on a Direct device takes the same fallback after the bounce
// path; write logs write whole aligned blocks and never pay it.
func (d *osDevice) SyncWriteAt(p []byte, off int64) (int, error) {
	return d.write("sync write", p, off, d.syncWrite)
}

func (d *osDevice) syncWrite(p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if !d.noDSync.Load() && (!d.direct || d.aligned(p, off)) {
		n, err := d.pwriteDSync(p, off)
		if n > 0 || !dsyncUnsupported(err) {
			return n, err
		}
		// Nothing was written: remember the refusal so later calls go
		// straight to the fallback.
		d.noDSync.Store(true)
	}
	n, err := d.pwrite(p, off)
	if err != nil {
		return n, err
	}
	if err := d.control(unix.Fdatasync); err != nil {
		return n, fmt.Errorf("fdatasync: %w", err)
	}
	return n, nil
}

// pwriteDSync loops over short writes, as os.File.WriteAt does.
func (d *osDevice) pwriteDSync(p []byte, off int64) (int, error) {
	done := 0
	err := d.control(func(fd int) error {
		for done < len(p) {
			n, err := unix.Pwritev2(fd, [][]byte{p[done:]}, off+int64(done), unix.RWF_DSYNC)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				return fmt.Errorf("pwritev2(RWF_DSYNC): %w", err)
			}
			if n == 0 {
				return io.ErrShortWrite
			}
			done += n
		}
		return nil
	})
	return done, err
}

// dsyncUnsupported tells whether pwritev2 refused the call itself rather
// than failing the I/O.
func dsyncUnsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS)
}

// SyncWriteAt implements SyncWriter. Rules see it as OpSyncWrite, not
// OpWrite, so that a test can fail a write log's writes and nothing else
// (a rule meant for every write names both). On the underlying device it
// calls SyncWriteAt when there is one, else WriteAt and Flush.
//
// With power loss armed it is durable on return, as promised: Crash
// keeps its bytes even with no Flush after it. Older unflushed writes
// that overlap its range lose that part of their undo record (the range
// now holds the synced bytes); their bytes outside it are still rolled
// back. A later unflushed write over the range is undone to the synced
// bytes, as for any write.
func (f *Faulty) SyncWriteAt(p []byte, off int64) (int, error) {
	n := int64(len(p))
	if err := checkRange(f.dev.Path(), OpSyncWrite.String(), off, n, f.dev.Size()); err != nil {
		return 0, err
	}
	injected := f.decide(OpSyncWrite, off, n)
	f.mu.RLock()
	if !f.armed || injected != nil {
		defer f.mu.RUnlock()
		if err := f.usable(); err != nil {
			return 0, err
		}
		if injected != nil {
			return 0, f.fail(OpSyncWrite, injected)
		}
		w, err := f.syncWrite(p, off)
		return w, f.fail(OpSyncWrite, err)
	}
	f.mu.RUnlock()

	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.usable(); err != nil {
		return 0, err
	}
	if !f.armed || n == 0 {
		w, err := f.syncWrite(p, off)
		return w, f.fail(OpSyncWrite, err)
	}
	old := make([]byte, n)
	if m, err := f.dev.ReadAt(old, off); m != len(old) {
		return 0, f.fail(OpSyncWrite, fmt.Errorf("device: %s %s: save old contents at %d+%d: %w", OpSyncWrite, f.dev.Path(), off, n, err))
	}
	w, err := f.syncWrite(p, off)
	if err != nil {
		// Failed halfway: the range may hold anything, and a crash
		// restores it like an unflushed write.
		f.undo = append(f.undo, undoRecord{off: off, old: old})
		return w, f.fail(OpSyncWrite, err)
	}
	f.undo = trimUndo(f.undo, off, off+n)
	return w, nil
}

func (f *Faulty) syncWrite(p []byte, off int64) (int, error) {
	if sw, ok := f.dev.(SyncWriter); ok {
		return sw.SyncWriteAt(p, off)
	}
	n, err := f.dev.WriteAt(p, off)
	if err != nil {
		return n, err
	}
	return n, f.dev.Flush()
}

// trimUndo removes [start, end) from every record: that range is durable
// now, so no rollback may touch it. A record straddling the range splits
// in two.
func trimUndo(undo []undoRecord, start, end int64) []undoRecord {
	out := undo[:0:0]
	for _, u := range undo {
		uEnd := u.off + int64(len(u.old))
		if uEnd <= start || u.off >= end {
			out = append(out, u)
			continue
		}
		if u.off < start {
			out = append(out, undoRecord{off: u.off, old: u.old[:start-u.off]})
		}
		if uEnd > end {
			out = append(out, undoRecord{off: end, old: u.old[end-u.off:]})
		}
	}
	return out
}

// Both implementations, checked at compile time.
var (
	_ SyncWriter = (*osDevice)(nil)
	_ SyncWriter = (*Faulty)(nil)
)
