package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/bitmap/wlog"
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

// loggedDevice puts a member's writes through its write log. Metadata
// writes (at or beyond the volume size) pass straight through.
type loggedDevice struct {
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
func (d *loggedDevice) descriptor() meta.WriteLog {
	if d.hostSlots {
		whole, err := logRegion(d.Device)
		if err == nil {
			return meta.WriteLog{Offset: uint64(whole.Offset), Length: uint64(whole.Length), Flags: logFlagHostSlots}
		}
	}
	return meta.WriteLog{Offset: uint64(d.region.Offset), Length: uint64(d.region.Length)}
}

func (d *loggedDevice) logged(off, n int64) bool { return off < d.size && n > 0 }

func (d *loggedDevice) WriteAt(p []byte, off int64) (int, error) {
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
func (d *loggedDevice) TryWriteAt(p []byte, off int64) (bool, error) {
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
func (d *loggedDevice) QuickWrites() bool {
	q, ok := d.Device.(device.Quick)
	return ok && q.QuickWrites()
}

// TryReadAt (device.Quick): reads do not involve the log.
func (d *loggedDevice) TryReadAt(p []byte, off int64) bool {
	q, ok := d.Device.(device.Quick)
	return ok && q.TryReadAt(p, off)
}

func (d *loggedDevice) Zero(off, length int64) error {
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

func (d *loggedDevice) Flush() error {
	seq := d.log.FlushBegin()
	err := d.Device.Flush()
	d.log.FlushDone(seq, err == nil)
	return err
}

func (d *loggedDevice) Close() error {
	err := d.log.Close()
	if errors.Is(err, wlog.ErrClosed) {
		err = nil // closed already when its host slot was released
	}
	return errors.Join(err, d.Device.Close())
}

// logRegion is where a member's write log lies.
func logRegion(dev device.Device) (wlog.Region, error) {
	_, area, err := meta.Layout(dev.Size())
	if err != nil {
		return wlog.Region{}, err
	}
	return wlog.Region{Offset: area.LogOffset, Length: area.LogLength}, nil
}

// logState is what mount learned from the members' logs.
type logState struct {
	// logged is the union of the full members' logged extents, in the
	// set's chunks; lost says some full member's log was unreadable,
	// torn or missing, so only a full merge is safe.
	logged *bitmap.Bitmap
	lost   []string
}

// attachLog wraps a member in its write log. recover: the set was found
// dirty and the member is a full member: its log is read (and what it
// holds stays pinned until the merge is done); otherwise it is formatted
// empty. A log that cannot be read costs a full merge, never a refusal.
func attachLog(dev device.Device, size int64, recover bool, st *logState) (*loggedDevice, error) {
	sdev, ok := dev.(syncDevice)
	if !ok {
		return nil, fmt.Errorf("%s cannot keep a write log (no range-limited synchronous write)", dev.Path())
	}
	region, err := logRegion(dev)
	if err != nil {
		return nil, err
	}
	format := wlog.Format
	if recover {
		l, got, err := wlog.Open(sdev, region, size)
		if err == nil {
			for off, n := range got.Ranges() {
				st.logged.AddRange(off, n)
			}
			return &loggedDevice{Device: dev, log: l, size: size, region: region}, nil
		}
		st.lost = append(st.lost, fmt.Sprintf("%s: %v", dev.Path(), err))
		// Every extent pinned until the full merge is done.
		format = wlog.FormatDirty
	}
	l, err := format(sdev, region, size, 0)
	if err != nil {
		return nil, fmt.Errorf("format the write log of %s: %w", dev.Path(), err)
	}
	return &loggedDevice{Device: dev, log: l, size: size, region: region}, nil
}

// syncDevice is a member that can keep a write log.
type syncDevice interface {
	device.Device
	device.SyncWriter
}

// memberLogs returns the write logs of the set's members.
func (vol *volume) memberLogs() []*wlog.Log {
	vol.mdMu.Lock()
	defer vol.mdMu.Unlock()
	var out []*wlog.Log
	for _, m := range vol.members {
		if ld, ok := m.dev.(*loggedDevice); ok {
			out = append(out, ld.log)
		}
	}
	return out
}

// sweepLogs clears the logs' idle, flushed extents.
func (a *Agent) sweepLogs(vol *volume) {
	now := time.Now()
	for _, l := range vol.memberLogs() {
		if err := l.Sweep(now, a.cfg.CleanAfter); err != nil && !errors.Is(err, wlog.ErrClosed) {
			a.log.Warn().Str("vu", vol.name).Err(err).Msg("write log sweep failed")
		}
	}
}

// mergeUnderway records durably, on every member, that a merge runs on a
// set with write logs (a crash then turns it into a full merge, per Table
// 8-1's mount row), or that it is done: then the logs' recovered extents
// are released.
func (a *Agent) mergeUnderway(vol *volume, on bool) error {
	if !vol.writeLog {
		return nil
	}
	vol.mdMu.Lock()
	changed := vol.md.MergeUnderway != on
	vol.md.MergeUnderway = on
	vol.mdMu.Unlock()
	if !on {
		for _, l := range vol.memberLogs() {
			if err := l.Unpin(0, vol.size); err != nil {
				a.log.Warn().Str("vu", vol.name).Err(err).Msg("could not release a write log's recovered extents")
			}
		}
		vol.bm.mu.Lock()
		vol.bm.logged = nil
		vol.bm.mu.Unlock()
	}
	if !changed || a.clustered() {
		// (In a cluster the set's metadata writer records it from the
		// log: syncMeta.)
		return nil
	}
	return vol.writeAll()
}
