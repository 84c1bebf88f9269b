package meta

import (
	"bytes"
	"errors"
	"fmt"
)

// slotState is what one slot held when read.
type slotState struct {
	slot  Slot
	raw   []byte
	m     *Metadata // valid metadata, or nil
	blank bool      // all zeroes
	err   error     // corrupt, unknown version, or unreadable
	ioErr bool      // err came from the device, not the contents
}

func (s *slotState) describe() string {
	switch {
	case s.m != nil:
		return fmt.Sprintf("slot %s seq %d", s.slot, s.m.Seq)
	case s.blank:
		return fmt.Sprintf("slot %s blank", s.slot)
	case s.ioErr:
		return fmt.Sprintf("slot %s unreadable (%v)", s.slot, s.err)
	case errors.Is(s.err, ErrVersion):
		return fmt.Sprintf("slot %s: %v", s.slot, s.err)
	}
	return fmt.Sprintf("slot %s corrupt (%s)", s.slot, reason(s.err))
}

// name is the device's path for messages, when it has one.
func name(dev Device) string {
	if p, ok := dev.(interface{ Path() string }); ok {
		return p.Path()
	}
	return "member"
}

// readSlots reads and decodes both slots.
func readSlots(dev Device) ([2]slotState, error) {
	var st [2]slotState
	_, area, err := Layout(dev.Size())
	if err != nil {
		return st, fmt.Errorf("meta: %s: %w", name(dev), err)
	}
	for i := range st {
		s := &st[i]
		s.slot = Slot(i + 1)
		s.raw = make([]byte, SlotSize)
		// A full read counts even with io.EOF: slot B may end exactly
		// at the end of the device.
		if n, err := dev.ReadAt(s.raw, area.Slots[i]); n != SlotSize {
			s.err, s.ioErr = fmt.Errorf("read at %d: %w", area.Slots[i], err), true
			continue
		}
		if allZero(s.raw) {
			s.blank = true
			continue
		}
		s.m, s.err = Decode(s.raw)
		if s.m != nil {
			s.m.Slot = s.slot
		}
	}
	return st, nil
}

// newest returns the index of the valid slot with the highest seq (slot
// A on a tie), or -1.
func newest(st *[2]slotState) int {
	best := -1
	for i := range st {
		if st[i].m != nil && (best < 0 || st[i].m.Seq > st[best].m.Seq) {
			best = i
		}
	}
	return best
}

// versionError refuses a device where a slot carries a valid checksum
// but a format this program does not know: falling back to the other
// slot, or overwriting it, would silently downgrade a newer program's
// metadata.
func versionError(dev Device, st *[2]slotState) error {
	for i := range st {
		if errors.Is(st[i].err, ErrVersion) {
			return fmt.Errorf("meta: %s: slot %s: %w", name(dev), st[i].slot, st[i].err)
		}
	}
	return nil
}

// Read returns the newest valid metadata on dev: both slots are read and
// the valid one with the higher seq wins. A slot that is corrupt or
// unreadable while the other is valid costs a warning, not an error. With
// no valid slot the error matches ErrBlank (both slots all zeroes: never
// initialised) or ErrCorrupt (something is there but nothing valid), or
// wraps the device's read error. A slot in an unknown format version
// fails Read (ErrVersion) whatever the other holds.
func Read(dev Device) (m *Metadata, warnings []string, err error) {
	st, err := readSlots(dev)
	if err != nil {
		return nil, nil, err
	}
	if err := versionError(dev, &st); err != nil {
		return nil, nil, err
	}
	best := newest(&st)
	if best < 0 {
		desc := st[0].describe() + ", " + st[1].describe()
		switch {
		case st[0].blank && st[1].blank:
			return nil, nil, fmt.Errorf("meta: %s: %w: both slots are all zeroes", name(dev), ErrBlank)
		case st[0].ioErr || st[1].ioErr:
			return nil, nil, fmt.Errorf("meta: %s: no valid metadata: %s: %w", name(dev), desc, errors.Join(st[0].err, st[1].err))
		}
		return nil, nil, fmt.Errorf("meta: %s: no valid metadata: %s: %w", name(dev), desc, ErrCorrupt)
	}
	m, other := st[best].m, &st[1-best]
	using := fmt.Sprintf("using slot %s seq %d", m.Slot, m.Seq)
	switch {
	case other.m != nil:
		if other.m.Seq == m.Seq && !bytes.Equal(other.raw, st[best].raw) {
			warnings = append(warnings, fmt.Sprintf("slots A and B both hold seq %d but differ, %s", m.Seq, using))
		}
	case other.blank:
		// Normal after the first Write only: every later one alternates.
		if m.Seq > 1 {
			warnings = append(warnings, fmt.Sprintf("slot %s blank although seq %d was written after it, %s", other.slot, m.Seq, using))
		}
	default:
		warnings = append(warnings, other.describe()+", "+using)
	}
	return m, warnings, nil
}

// Write stores m in the slot that does not hold the newest valid copy,
// with seq = that copy's seq + 1 (1 on a device with no valid slot), so a
// torn write can only spoil the older copy. It flushes dev before the
// slot write, so the metadata never describes data that is not yet
// durable (a clean flag or a copy checkpoint is only written after the
// data it vouches for), and after it, so the metadata is durable when
// Write returns. On success m.Seq, m.Slot and m.Version are set.
//
// Write refuses metadata out of bounds (ErrInvalid), a write-log
// descriptor outside the area's log region, and a device with a slot in
// an unknown format version. Callers serialise Writes to one device.
func Write(dev Device, m *Metadata) error {
	_, area, err := Layout(dev.Size())
	if err != nil {
		return fmt.Errorf("meta: %s: %w", name(dev), err)
	}
	if wl := m.WriteLog; wl.Length != 0 || wl.Offset != 0 {
		lo, hi := uint64(area.LogOffset), uint64(area.LogOffset+area.LogLength)
		if wl.Offset < lo || wl.Offset > hi || wl.Length > hi-wl.Offset {
			return fmt.Errorf("meta: %s: %w: write log %d+%d outside the log region %d+%d",
				name(dev), ErrInvalid, wl.Offset, wl.Length, area.LogOffset, area.LogLength)
		}
	}
	st, err := readSlots(dev)
	if err != nil {
		return err
	}
	if err := versionError(dev, &st); err != nil {
		return err
	}
	target, seq := 0, uint64(1)
	if best := newest(&st); best >= 0 {
		target, seq = 1-best, st[best].m.Seq+1
	} else if st[0].ioErr && st[1].ioErr {
		return fmt.Errorf("meta: %s: cannot read either slot: %w", name(dev), errors.Join(st[0].err, st[1].err))
	}

	c := *m
	c.Seq = seq
	img, err := Encode(&c)
	if err != nil {
		return fmt.Errorf("meta: %s: %w", name(dev), err)
	}
	slot := Slot(target + 1)
	if err := dev.Flush(); err != nil {
		return fmt.Errorf("meta: %s: flush before writing slot %s: %w", name(dev), slot, err)
	}
	if n, err := dev.WriteAt(img, area.Slots[target]); n != len(img) || err != nil {
		if err == nil {
			err = fmt.Errorf("short write (%d of %d bytes)", n, len(img))
		}
		return fmt.Errorf("meta: %s: write slot %s seq %d: %w", name(dev), slot, seq, err)
	}
	if err := dev.Flush(); err != nil {
		return fmt.Errorf("meta: %s: flush after writing slot %s seq %d: %w", name(dev), slot, seq, err)
	}
	m.Seq, m.Slot, m.Version = seq, slot, FormatVersionSingle
	if !m.Cluster.IsZero() {
		m.Version = FormatVersion
	}
	return nil
}
