package device

import (
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Quick is the optional "complete it from memory or not at all" form of
// ReadAt and WriteAt. The NBD server serves a request on the connection's
// own reader goroutine when every device it touches can do so without
// waiting for a disk, and hands it to a worker goroutine otherwise; on
// two cores the handoffs (goroutine start, thread wake-ups) had cost as
// much CPU per 4 KiB write as the write itself. The os device implements
// it for buffered I/O; find it with a type assertion (dev.(Quick)).
type Quick interface {
	// QuickWrites reports whether TryWriteAt can ever succeed here, so
	// that a request touching several devices can decline before writing
	// any of them.
	QuickWrites() bool
	// TryWriteAt writes p at off when the write will land in memory (the
	// page cache) without waiting for the disk. false: nothing was
	// written, use WriteAt. When it returns true, err is WriteAt's.
	TryWriteAt(p []byte, off int64) (bool, error)
	// TryReadAt fills all of p when every byte is already in memory.
	// false: p holds nothing usable, use ReadAt (which also reports the
	// errors: TryReadAt never does).
	TryReadAt(p []byte, off int64) bool
}

// quickState remembers what the kernel refused, so that a refusal costs
// one system call per device, not one per request.
type quickState struct {
	noReadNoWait atomic.Bool
}

// QuickWrites is false for O_DIRECT: every write waits for the disk.
func (d *osDevice) QuickWrites() bool { return !d.direct }

// TryWriteAt writes through the page cache: buffered writes wait for the
// disk only under writeback pressure, which the kernel applies to every
// writer alike. O_DIRECT writes always wait for the disk, so a direct
// device declines. pwritev2(RWF_NOWAIT) would tell exactly, but ext4
// refuses it for buffered writes (EOPNOTSUPP on Linux 6.18).
func (d *osDevice) TryWriteAt(p []byte, off int64) (bool, error) {
	if d.direct {
		return false, nil
	}
	_, err := d.WriteAt(p, off)
	return true, err
}

// TryReadAt uses preadv2(RWF_NOWAIT), which returns EAGAIN (or a short
// count) instead of reading from the disk.
func (d *osDevice) TryReadAt(p []byte, off int64) bool {
	if d.direct || d.quick.noReadNoWait.Load() || len(p) == 0 || d.usable() != nil {
		return false
	}
	if off < 0 || off > d.size || int64(len(p)) > d.size-off {
		return false
	}
	if d.enter("read") != nil {
		return false // ReadAt reports it
	}
	defer d.exit()
	var n int
	err := d.control(func(fd int) error {
		var err error
		n, err = unix.Preadv2(fd, [][]byte{p}, off, unix.RWF_NOWAIT)
		return err
	})
	switch err {
	case nil:
		return n == len(p)
	case unix.EOPNOTSUPP, unix.EINVAL, unix.ENOSYS:
		d.quick.noReadNoWait.Store(true)
	}
	return false
}
