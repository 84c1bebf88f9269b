package device

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// bounceSize bounds the bounce buffer of an unaligned Direct request: a
// longer request is done in pieces of this size, so memory stays bounded
// whatever the request length.
const bounceSize = 1 << 20

// rmwStripes is the number of locks guarding read-modify-write of partial
// sectors (see osDevice.rmw).
const rmwStripes = 64

// osDevice is a Device over an *os.File: a regular file or a block device.
type osDevice struct {
	f        *os.File
	rc       syscall.RawConn // f's, made once: control runs on every quick read
	path     string
	size     int64
	block    bool
	readOnly bool
	shared   bool
	fence    Fence

	// direct is set for O_DIRECT; align is then the offset and length
	// alignment it needs, memAlign the buffer address alignment.
	direct   bool
	align    int64
	memAlign int
	bounce   sync.Pool // *[]byte of bounceSize, aligned

	// lbs is a block device's logical block size (BLKZEROOUT's unit).
	lbs int64

	// rmw serialises read-modify-write of a partial sector. Two unaligned
	// writes that do not overlap may still share a sector; without the
	// lock each would read the sector, patch its bytes and write it back,
	// and the later write-back would undo the other's bytes. A write
	// locks the stripes of its head and tail sectors only.
	rmw [rmwStripes]sync.Mutex

	// noDSync is set once pwritev2 has refused RWF_DSYNC here, so that
	// SyncWriteAt goes straight to its fallback.
	noDSync atomic.Bool

	quick quickState

	closed atomic.Bool
	failed atomic.Pointer[failedError]
}

// Open opens the member at path exclusively: a regular file is locked
// with flock(LOCK_EX|LOCK_NB), a block device is opened with O_EXCL;
// either way a second Open, even from this process, fails with ErrBusy
// until Close. Anything but a regular file or block device fails with
// ErrNotDevice; a missing path with an error matching fs.ErrNotExist.
//
// With opts.Direct the device is opened O_DIRECT. Requests need not be
// aligned: one whose offset, length and buffer address are aligned goes
// straight to the kernel; any other is bounced through an aligned buffer
// (one extra copy) and, for a write, the partial first and last sectors
// are read first and written back whole (read-modify-write: up to two
// extra sector reads, serialised with other writes to the same sector).
// Callers that care about speed use AlignedBuffer and aligned offsets.
// A regular file opened Direct must have a size that is a multiple of the
// alignment, so that no request needs to extend it.
func Open(path string, opts Options) (Device, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("device: open %s: %w", path, pathCause(err))
	}
	block := false
	switch m := fi.Mode(); {
	case m.IsRegular():
	case m&fs.ModeDevice != 0 && m&fs.ModeCharDevice == 0:
		block = true
	default:
		// Refused before open(2): opening a FIFO would block.
		return nil, fmt.Errorf("device: open %s: %w (%s)", path, ErrNotDevice, kindOf(m))
	}

	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	if opts.Direct {
		flag |= syscall.O_DIRECT
	}
	if block && !opts.Shared {
		// On a block device, O_EXCL without O_CREAT claims it: it fails
		// with EBUSY if it is mounted or opened O_EXCL elsewhere.
		flag |= os.O_EXCL
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		err = pathCause(err)
		if errors.Is(err, syscall.EBUSY) {
			return nil, fmt.Errorf("device: open %s: in use (mounted or opened exclusively elsewhere): %w: %w", path, ErrBusy, err)
		}
		if opts.Direct && errors.Is(err, syscall.EINVAL) {
			return nil, fmt.Errorf("device: open %s: direct I/O not supported here: %w", path, err)
		}
		return nil, fmt.Errorf("device: open %s: %w", path, err)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("device: open %s: %w", path, err)
	}
	d := &osDevice{f: f, rc: rc, path: path, block: block, readOnly: opts.ReadOnly, direct: opts.Direct, shared: opts.Shared, fence: opts.Fence}
	if err := d.setup(fi); err != nil {
		f.Close()
		return nil, err
	}
	return d, nil
}

// setup checks what was opened, takes the lock and learns sizes and
// alignments. On error the caller closes the file, releasing any lock.
func (d *osDevice) setup(fi fs.FileInfo) error {
	fi2, err := d.f.Stat()
	if err != nil {
		return fmt.Errorf("device: stat %s: %w", d.path, pathCause(err))
	}
	if !os.SameFile(fi, fi2) {
		return fmt.Errorf("device: open %s: the path was replaced while opening", d.path)
	}
	if !d.block {
		how := unix.LOCK_EX
		if d.shared {
			how = unix.LOCK_SH
		}
		err := d.control(func(fd int) error { return unix.Flock(fd, how|unix.LOCK_NB) })
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("device: open %s: locked by another open (flock): %w", d.path, ErrBusy)
		}
		if err != nil {
			return fmt.Errorf("device: flock %s: %w", d.path, err)
		}
		d.size = fi2.Size()
	} else {
		var size uint64
		err := d.control(func(fd int) error {
			_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size)))
			if e != 0 {
				return e
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("device: BLKGETSIZE64 %s: %w", d.path, err)
		}
		d.size = int64(size)
		var lbs int
		err = d.control(func(fd int) (err error) {
			lbs, err = unix.IoctlGetInt(fd, unix.BLKSSZGET)
			return err
		})
		if err != nil {
			return fmt.Errorf("device: BLKSSZGET %s: %w", d.path, err)
		}
		d.lbs = max(int64(lbs), MinAlign)
	}
	if d.direct {
		if err := d.setupDirect(); err != nil {
			return err
		}
	}
	return nil
}

// setupDirect learns the direct-I/O alignment: the logical block size of
// a block device, and what statx(STATX_DIOALIGN) reports for a file (4 KiB
// when the kernel cannot say: safe on every filesystem we know).
func (d *osDevice) setupDirect() error {
	var stx unix.Statx_t
	err := d.control(func(fd int) error {
		return unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &stx)
	})
	known := err == nil && stx.Mask&unix.STATX_DIOALIGN != 0
	if known && stx.Dio_offset_align == 0 && !d.block {
		return fmt.Errorf("device: open %s: the filesystem does not support direct I/O", d.path)
	}
	switch {
	case d.block:
		d.align = d.lbs
	case known:
		d.align = max(int64(stx.Dio_offset_align), MinAlign)
	default:
		d.align = 4096
	}
	d.memAlign = int(d.align)
	if known && stx.Dio_mem_align != 0 {
		d.memAlign = int(stx.Dio_mem_align)
	}
	if d.align&(d.align-1) != 0 || d.memAlign&(d.memAlign-1) != 0 {
		return fmt.Errorf("device: open %s: direct I/O alignment %d/%d is not a power of two", d.path, d.align, d.memAlign)
	}
	if d.size%d.align != 0 {
		return fmt.Errorf("device: open %s: size %d is not a multiple of the direct I/O alignment %d", d.path, d.size, d.align)
	}
	bufAlign := max(d.memAlign, int(d.align), 4096)
	n := int(alignUp(bounceSize, d.align))
	d.bounce.New = func() any {
		b := AlignedBuffer(n, bufAlign)
		return &b
	}
	return nil
}

func kindOf(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "a directory"
	case m&fs.ModeCharDevice != 0:
		return "a character device"
	case m&fs.ModeNamedPipe != 0:
		return "a FIFO"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeSymlink != 0:
		return "a dangling symbolic link"
	}
	return "mode " + m.String()
}

// control runs fn on the file descriptor, holding a reference so a
// concurrent Close cannot recycle the descriptor under it.
func (d *osDevice) control(fn func(fd int) error) error {
	var ferr error
	if err := d.rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

func (d *osDevice) Path() string { return d.path }

// enter passes the fence, if any, for one request.
func (d *osDevice) enter(op string) error {
	if d.fence == nil {
		return nil
	}
	if err := d.fence.Enter(); err != nil {
		return fmt.Errorf("device: %s %s: %w", op, d.path, err)
	}
	return nil
}

func (d *osDevice) exit() {
	if d.fence != nil {
		d.fence.Exit()
	}
}
func (d *osDevice) Size() int64 { return d.size }

// usable returns why no I/O may be done now, if anything.
func (d *osDevice) usable() error {
	if d.closed.Load() {
		return fmt.Errorf("device: %s: %w", d.path, ErrClosed)
	}
	if fe := d.failed.Load(); fe != nil {
		return fe
	}
	return nil
}

// fail records err as the device's sticky failure (the first one wins)
// and returns the sticky error.
func (d *osDevice) fail(op string, err error) error {
	d.failed.CompareAndSwap(nil, newFailed(d.path, op, err).(*failedError))
	return d.failed.Load()
}

func (d *osDevice) ReadAt(p []byte, off int64) (int, error) {
	if err := d.usable(); err != nil {
		return 0, err
	}
	if err := d.enter("read"); err != nil {
		return 0, err
	}
	defer d.exit()
	if off < 0 {
		return 0, checkRange(d.path, "read", off, int64(len(p)), d.size)
	}
	if off >= d.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	short := false
	if int64(len(p)) > d.size-off {
		p, short = p[:d.size-off], true
	}
	var n int
	var err error
	if d.direct && !d.aligned(p, off) {
		n, err = d.readBounce(p, off)
	} else {
		n, err = d.f.ReadAt(p, off)
	}
	if err != nil && err != io.EOF {
		// Read errors do not fail the device: the engine repairs a bad
		// block by rewriting it from another member.
		return n, fmt.Errorf("device: read %s at %d+%d: %w", d.path, off, len(p), pathCause(err))
	}
	if err == nil && short {
		err = io.EOF
	}
	return n, err
}

func (d *osDevice) WriteAt(p []byte, off int64) (int, error) {
	return d.write("write", p, off, d.pwrite)
}

// write checks a write of p at off and runs it with do; a failure fails
// the device for good. op names it in errors.
func (d *osDevice) write(op string, p []byte, off int64, do func([]byte, int64) (int, error)) (int, error) {
	if err := d.usable(); err != nil {
		return 0, err
	}
	if d.readOnly {
		return 0, fmt.Errorf("device: %s %s: %w", op, d.path, ErrReadOnly)
	}
	if err := checkRange(d.path, op, off, int64(len(p)), d.size); err != nil {
		return 0, err
	}
	if err := d.enter(op); err != nil {
		return 0, err
	}
	defer d.exit()
	if d.fence != nil {
		testPark(d.path, off, int64(len(p)))
	}
	n, err := do(p, off)
	if err != nil {
		return n, d.fail(op, fmt.Errorf("%s at %d+%d: %w", op, off, len(p), err))
	}
	return n, nil
}

// pwrite writes p at off, bouncing unaligned Direct requests.
func (d *osDevice) pwrite(p []byte, off int64) (int, error) {
	if d.direct && !d.aligned(p, off) {
		return d.writeBounce(p, off)
	}
	n, err := d.f.WriteAt(p, off)
	return n, pathCause(err)
}

// aligned tells whether a Direct request can go to the kernel as is.
func (d *osDevice) aligned(p []byte, off int64) bool {
	return off&(d.align-1) == 0 && int64(len(p))&(d.align-1) == 0 && IsAligned(p, d.memAlign)
}

func (d *osDevice) getBounce() *[]byte { return d.bounce.Get().(*[]byte) }

// readBounce reads an unaligned request through aligned pieces. The
// request lies within size, which is a multiple of align, so every
// aligned piece does too.
func (d *osDevice) readBounce(p []byte, off int64) (int, error) {
	bp := d.getBounce()
	defer d.bounce.Put(bp)
	buf := *bp
	end := off + int64(len(p))
	done := 0
	for done < len(p) {
		cur := off + int64(done)
		start := alignDown(cur, d.align)
		stop := min(alignUp(end, d.align), start+int64(len(buf)))
		m, err := d.f.ReadAt(buf[:stop-start], start)
		if got := start + int64(m) - cur; got > 0 {
			done += copy(p[done:], buf[cur-start:m])
		}
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// writeBounce writes an unaligned request by read-modify-write of aligned
// pieces: only the first piece can start mid-sector and only the last
// can end mid-sector, and those edge sectors are read, patched and
// written back under their stripe locks.
func (d *osDevice) writeBounce(p []byte, off int64) (int, error) {
	end := off + int64(len(p))
	head := alignDown(off, d.align)
	tail := alignDown(end-1, d.align)
	var locks []*sync.Mutex
	if off != head {
		locks = append(locks, d.stripe(head))
	}
	if end&(d.align-1) != 0 {
		if l := d.stripe(tail); len(locks) == 0 || l != locks[0] {
			locks = append(locks, l)
		}
	}
	// Lock in address order of the mutexes, so two writers never wait on
	// each other's second lock.
	if len(locks) == 2 && uintptr(unsafe.Pointer(locks[0])) > uintptr(unsafe.Pointer(locks[1])) {
		locks[0], locks[1] = locks[1], locks[0]
	}
	for _, l := range locks {
		l.Lock()
		defer l.Unlock()
	}

	bp := d.getBounce()
	defer d.bounce.Put(bp)
	buf := *bp
	done := 0
	for done < len(p) {
		cur := off + int64(done)
		start := alignDown(cur, d.align)
		stop := min(alignUp(end, d.align), start+int64(len(buf)))
		piece := buf[:stop-start]
		dataEnd := min(end, stop)
		if cur != start {
			if _, err := d.f.ReadAt(piece[:d.align], start); err != nil {
				return done, fmt.Errorf("read-modify-write: read sector at %d: %w", start, pathCause(err))
			}
		}
		if dataEnd != stop && (stop-d.align != start || cur == start) {
			if _, err := d.f.ReadAt(piece[stop-d.align-start:], stop-d.align); err != nil {
				return done, fmt.Errorf("read-modify-write: read sector at %d: %w", stop-d.align, pathCause(err))
			}
		}
		n := copy(piece[cur-start:dataEnd-start], p[done:])
		if _, err := d.f.WriteAt(piece, start); err != nil {
			return done, pathCause(err)
		}
		done += n
	}
	return done, nil
}

func (d *osDevice) stripe(sectorOff int64) *sync.Mutex {
	return &d.rmw[uint64(sectorOff/d.align)%rmwStripes]
}

func (d *osDevice) Flush() error {
	if err := d.usable(); err != nil {
		return err
	}
	if d.readOnly {
		return nil
	}
	if err := d.enter("flush"); err != nil {
		return err
	}
	defer d.exit()
	// fdatasync, not fsync: it writes what is needed to read the data
	// back (size, block map) and, on a block device, flushes the drive's
	// cache; timestamps can wait.
	if err := d.control(unix.Fdatasync); err != nil {
		return d.fail("flush", fmt.Errorf("fdatasync: %w", err))
	}
	return nil
}

func (d *osDevice) Zero(off, length int64) error {
	if err := d.usable(); err != nil {
		return err
	}
	if d.readOnly {
		return fmt.Errorf("device: zero %s: %w", d.path, ErrReadOnly)
	}
	if err := checkRange(d.path, "zero", off, length, d.size); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	if err := d.enter("zero"); err != nil {
		return err
	}
	defer d.exit()
	var err error
	if d.block {
		err = d.zeroBlock(off, length)
	} else {
		err = d.zeroFile(off, length)
	}
	if err != nil {
		return d.fail("zero", fmt.Errorf("zero %d+%d: %w", off, length, err))
	}
	return nil
}

// zeroFile punches a hole, which frees the blocks and keeps the size;
// filesystems without hole punching get zeroes written instead.
func (d *osDevice) zeroFile(off, length int64) error {
	err := d.control(func(fd int) error {
		return unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	})
	if unsupported(err) {
		return d.writeZeroes(off, length)
	}
	if err != nil {
		return fmt.Errorf("fallocate punch hole: %w", err)
	}
	return nil
}

// zeroBlock asks the device to zero the sector-aligned middle with
// BLKZEROOUT (which also drops those pages from the page cache), and
// writes zeroes over the unaligned edges, or over everything when the
// ioctl is not supported.
func (d *osDevice) zeroBlock(off, length int64) error {
	end := off + length
	a, b := alignUp(off, d.lbs), alignDown(end, d.lbs)
	if a >= b {
		return d.writeZeroes(off, length)
	}
	rng := [2]uint64{uint64(a), uint64(b - a)}
	err := d.control(func(fd int) error {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKZEROOUT, uintptr(unsafe.Pointer(&rng)))
		if e != 0 {
			return e
		}
		return nil
	})
	if unsupported(err) {
		return d.writeZeroes(off, length)
	}
	if err != nil {
		return fmt.Errorf("BLKZEROOUT: %w", err)
	}
	if off < a {
		if err := d.writeZeroes(off, a-off); err != nil {
			return err
		}
	}
	if b < end {
		return d.writeZeroes(b, end-b)
	}
	return nil
}

// zeroes is a shared, read-only source for writeZeroes, aligned for the
// Direct fast path.
var zeroes = AlignedBuffer(bounceSize, 4096)

func (d *osDevice) writeZeroes(off, length int64) error {
	for length > 0 {
		n := min(length, int64(len(zeroes)))
		if _, err := d.pwrite(zeroes[:n], off); err != nil {
			return fmt.Errorf("write zeroes at %d+%d: %w", off, n, err)
		}
		off += n
		length -= n
	}
	return nil
}

// unsupported tells whether an fallocate or ioctl error means "not here"
// (so writing zeroes is the answer) rather than an I/O failure.
func unsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) ||
		errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL)
}

func (d *osDevice) Close() error {
	if d.closed.Swap(true) {
		return fmt.Errorf("device: close %s: %w", d.path, ErrClosed)
	}
	// Closing the descriptor releases the flock or the O_EXCL claim.
	if err := d.f.Close(); err != nil {
		return fmt.Errorf("device: close %s: %w", d.path, pathCause(err))
	}
	return nil
}
