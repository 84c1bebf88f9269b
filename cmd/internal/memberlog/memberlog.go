// Package memberlog owns a member's write log as the data path sees it:
// the device wrapper that makes a log bit durable before the data write
// it covers, and the layout of the log region, whole (one host) or split
// into per-host slots (a cluster). bitmap/wlog keeps the log's blocks;
// this package puts a member's writes through it.
package memberlog

import (
	"context"
	"errors"
	"fmt"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/bitmap/wlog"
	"github.com/shadow-project/shadow/cluster"
	"github.com/shadow-project/shadow/cmd/internal/device"
	"github.com/shadow-project/shadow/cmd/internal/meta"
)

// Write logs (controller minimerge) keep, on each member, the extents
// with writes that may not be on every member: a bit is durable in the
// member's log before any data write to that member, and cleared only
// after a flush that covers the extent's last write and an idle period
// (bitmap/wlog does the bookkeeping). After a crash the logs say what a
// controller minimerge must merge; they survive the agent, unlike HBMM
// bitmaps.

// Device puts a member's writes through its write log. Metadata
// writes (at or beyond the volume size) pass straight through.
type Device struct {
	device.Device
	log    *wlog.Log
	size   int64 // the volume's data size: the log covers [0, size)
	region wlog.Region
	// hostSlots: the log is this host's slot hostSlot of a region split
	// between a cluster's hosts (hostlogs.go).
	hostSlots bool
	hostSlot  int
}

// descriptor is what the member's metadata records of its log: the
// region, or, split into host slots, the whole region and the flag.
func (d *Device) Descriptor() meta.WriteLog {
	if d.hostSlots {
		whole, err := Region(d.Device)
		if err == nil {
			return meta.WriteLog{Offset: uint64(whole.Offset), Length: uint64(whole.Length), Flags: FlagHostSlots}
		}
	}
	return meta.WriteLog{Offset: uint64(d.region.Offset), Length: uint64(d.region.Length)}
}

func (d *Device) logged(off, n int64) bool { return off < d.size && n > 0 }

func (d *Device) WriteAt(p []byte, off int64) (int, error) {
	n := int64(len(p))
	if !d.logged(off, n) {
		return d.Device.WriteAt(p, off)
	}
	n = min(n, d.size-off)
	if err := d.log.Acquire(context.Background(), off, n); err != nil {
		return 0, fmt.Errorf("write log of %s: %w", d.Path(), err)
	}
	defer d.log.Release(off, n)
	return d.Device.WriteAt(p, off)
}

// TryWriteAt (device.Quick) writes at once only when the log needs no
// write of its own (the extent is already durable) and the member below
// can write from memory.
func (d *Device) TryWriteAt(p []byte, off int64) (bool, error) {
	q, ok := d.Device.(device.Quick)
	if !ok {
		return false, nil
	}
	n := int64(len(p))
	if !d.logged(off, n) {
		return q.TryWriteAt(p, off)
	}
	n = min(n, d.size-off)
	if !d.log.TryAcquire(off, n) {
		return false, nil
	}
	defer d.log.Release(off, n)
	return q.TryWriteAt(p, off)
}

// QuickWrites (device.Quick) is the member's: the log declines only for a
// while, until the extent is logged.
func (d *Device) QuickWrites() bool {
	q, ok := d.Device.(device.Quick)
	return ok && q.QuickWrites()
}

// TryReadAt (device.Quick): reads do not involve the log.
func (d *Device) TryReadAt(p []byte, off int64) bool {
	q, ok := d.Device.(device.Quick)
	return ok && q.TryReadAt(p, off)
}

func (d *Device) Zero(off, length int64) error {
	if !d.logged(off, length) {
		return d.Device.Zero(off, length)
	}
	n := min(length, d.size-off)
	if err := d.log.Acquire(context.Background(), off, n); err != nil {
		return fmt.Errorf("write log of %s: %w", d.Path(), err)
	}
	defer d.log.Release(off, n)
	return d.Device.Zero(off, length)
}

func (d *Device) Flush() error {
	seq := d.log.FlushBegin()
	err := d.Device.Flush()
	d.log.FlushDone(seq, err == nil)
	return err
}

func (d *Device) Close() error {
	err := d.log.Close()
	if errors.Is(err, wlog.ErrClosed) {
		err = nil // closed already when its host slot was released
	}
	return errors.Join(err, d.Device.Close())
}

// Region is where a member's write log lies.
func Region(dev device.Device) (wlog.Region, error) {
	_, area, err := meta.Layout(dev.Size())
	if err != nil {
		return wlog.Region{}, err
	}
	return wlog.Region{Offset: area.LogOffset, Length: area.LogLength}, nil
}

// State is what mount learned from the members' logs.
type State struct {
	// logged is the union of the full members' logged extents, in the
	// set's chunks; lost says some full member's log was unreadable,
	// torn or missing, so only a full merge is safe.
	Logged *bitmap.Bitmap
	Lost   []string
}

// Attach wraps a member in its write log. recover: the set was found
// dirty and the member is a full member: its log is read (and what it
// holds stays pinned until the merge is done); otherwise it is formatted
// empty. A log that cannot be read costs a full merge, never a refusal.
func Attach(dev device.Device, size int64, recover bool, st *State) (*Device, error) {
	sdev, ok := dev.(syncDevice)
	if !ok {
		return nil, fmt.Errorf("%s cannot keep a write log (no range-limited synchronous write)", dev.Path())
	}
	region, err := Region(dev)
	if err != nil {
		return nil, err
	}
	format := wlog.Format
	if recover {
		l, got, err := wlog.Open(sdev, region, size)
		if err == nil {
			for off, n := range got.Ranges() {
				st.Logged.AddRange(off, n)
			}
			return &Device{Device: dev, log: l, size: size, region: region}, nil
		}
		st.Lost = append(st.Lost, fmt.Sprintf("%s: %v", dev.Path(), err))
		// Every extent pinned until the full merge is done.
		format = wlog.FormatDirty
	}
	l, err := format(sdev, region, size, 0)
	if err != nil {
		return nil, fmt.Errorf("format the write log of %s: %w", dev.Path(), err)
	}
	return &Device{Device: dev, log: l, size: size, region: region}, nil
}

// syncDevice is a member that can keep a write log.
type syncDevice interface {
	device.Device
	device.SyncWriter
}

// FlagHostSlots marks, in meta.WriteLog.Flags, a region split into
// host slots.
const FlagHostSlots = 1 << 16

// SlotRegion is slot k of a member's write-log region.
func SlotRegion(dev device.Device, k int) (wlog.Region, error) {
	r, err := Region(dev)
	if err != nil {
		return wlog.Region{}, err
	}
	sub := (r.Length / cluster.WriteLogSlots) &^ (wlog.BlockSize - 1)
	return wlog.Region{Offset: r.Offset + int64(k)*sub, Length: sub}, nil
}

// AttachSlot formats this host's slot k on dev and puts dev's writes
// through it.
func AttachSlot(dev device.Device, size int64, k int) (*Device, error) {
	sdev, ok := dev.(syncDevice)
	if !ok {
		return nil, fmt.Errorf("%s cannot keep a write log (no range-limited synchronous write)", dev.Path())
	}
	region, err := SlotRegion(dev, k)
	if err != nil {
		return nil, err
	}
	l, err := wlog.Format(sdev, region, size, 0)
	if err != nil {
		return nil, fmt.Errorf("format write-log slot %d of %s: %w", k, dev.Path(), err)
	}
	return &Device{Device: dev, log: l, size: size, region: region, hostSlots: true, hostSlot: k}, nil
}

// ReadSlots adds to into the extents logged in the given slots of
// every device; lost lists what could not be read (torn, corrupt,
// unreadable): only a full merge is safe then. A blank slot logged
// nothing.
func ReadSlots(devs []device.Device, size int64, slots []int, into *bitmap.Bitmap) (lost []string) {
	for _, dev := range devs {
		sdev, ok := Underlying(dev).(syncDevice)
		if !ok {
			lost = append(lost, dev.Path()+": no write log")
			continue
		}
		for _, k := range slots {
			region, err := SlotRegion(dev, k)
			if err != nil {
				lost = append(lost, fmt.Sprintf("%s slot %d: %v", dev.Path(), k, err))
				continue
			}
			got, err := wlog.Load(sdev, region, size)
			switch {
			case errors.Is(err, wlog.ErrBlank):
			case err != nil:
				lost = append(lost, fmt.Sprintf("%s slot %d: %v", dev.Path(), k, err))
			default:
				for off, n := range got.Ranges() {
					into.AddRange(off, n)
				}
			}
		}
	}
	return lost
}

// FormatSlots empties the given slots on every device.
func FormatSlots(devs []device.Device, size int64, slots []int) error {
	var errs []error
	for _, dev := range devs {
		sdev, ok := Underlying(dev).(syncDevice)
		if !ok {
			continue
		}
		for _, k := range slots {
			region, err := SlotRegion(dev, k)
			if err == nil {
				var l *wlog.Log
				if l, err = wlog.Format(sdev, region, size, 0); err == nil {
					err = l.Close()
				}
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("empty write-log slot %d of %s: %w", k, dev.Path(), err))
			}
		}
	}
	return errors.Join(errs...)
}

// Underlying is the member below its write-log wrapper.
func Underlying(dev device.Device) device.Device {
	if ld, ok := dev.(*Device); ok {
		return ld.Device
	}
	return dev
}

// Log is the device's write log.
func (d *Device) Log() *wlog.Log { return d.log }

// HostSlot is the host slot the log lies in, when it is one.
func (d *Device) HostSlot() (int, bool) { return d.hostSlot, d.hostSlots }
