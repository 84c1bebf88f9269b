// Package meta owns member metadata: the small record at the end of each
// member that says which shadow set it belongs to, as which member, in
// which generation of the set's membership, and whether its data can be
// trusted (clean/dirty, copy checkpoint).
//
// The record lives at the end of the member, like md's 1.0 superblock, so
// the first bytes of every member are a plain image of the volume: any
// member can be read or mounted without shadow. The reserved area at the
// end holds two slots, each in its own 4 KiB block, and room for a write
// log. Write alternates between the slots and flushes after each, so a
// torn write (power lost mid-write) spoils at most the slot being written
// and Read falls back to the other, older copy.
//
// Nothing here decides anything: the shadowset core and the agent decide
// what the metadata should say; this package stores it safely and refuses
// anything it cannot vouch for (bad checksum, bad bounds, unknown format)
// with a clear error.
package meta

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
)

// Sizes of the on-member layout.
const (
	// BlockSize is the alignment of everything in the reserved area, and
	// of the usable data size.
	BlockSize = 4096
	// SlotSize is the size of one metadata slot: one block, so that a
	// write of one slot never touches the other's block.
	SlotSize = BlockSize
	// ReservedSize is the reserved area at the end of a member: the write
	// log, then slot A, then slot B.
	ReservedSize = 1 << 20
	// MinMemberSize is the smallest member Layout accepts: the reserved
	// area and at least as much volume data.
	MinMemberSize = 2 * ReservedSize
	// LBNSize is the unit of checkpoint LBNs.
	LBNSize = 512
)

// Bounds of the variable parts, checked on encode and decode. They fit a
// slot: 104 bytes of fixed header, 64 of name, 16×16 of history and
// 16×(18+200) of member table leave room before the checksum.
const (
	MaxSetName  = 64
	MaxHistory  = 16
	MaxMembers  = 16
	MaxPathHint = 200
)

// Slot formats. Version 1 is a single-host agent's; version 2 adds the
// cluster stamp (ClusterStamp) after the member table. Encode writes
// version 1 when the stamp is zero, so a set a single host mounts stays
// readable by programs that know only version 1, and a set a cluster
// holds is refused by them (ErrVersion) instead of taken.
const (
	FormatVersionSingle = 1
	FormatVersion       = 2
)

// Errors callers test for with errors.Is.
var (
	// ErrBlank: both slots are all zeroes: the member was never
	// initialised (or was wiped).
	ErrBlank = errors.New("meta: blank (no metadata)")
	// ErrCorrupt: something was written but no slot holds valid
	// metadata (bad magic, checksum mismatch, a malformed field).
	ErrCorrupt = errors.New("meta: corrupt")
	// ErrVersion: a slot has a valid checksum but a format version this
	// program does not know. It is refused, not overwritten: a newer
	// program wrote it.
	ErrVersion = errors.New("meta: unsupported format version")
	// ErrTooSmall: the member cannot hold the reserved area and data.
	ErrTooSmall = errors.New("meta: member too small")
	// ErrInvalid: Encode or Write was given metadata out of bounds.
	ErrInvalid = errors.New("meta: invalid metadata")
)

// Area is where the reserved area lies on a member, in bytes from the
// member's start.
type Area struct {
	// Offset is the first byte of the area (= the usable data size);
	// Length its size.
	Offset, Length int64
	// LogOffset and LogLength are the write-log region.
	LogOffset, LogLength int64
	// Slots are the offsets of slot A and slot B.
	Slots [2]int64
}

// Layout computes where data and metadata go on a member of memberSize
// bytes: data is [0, dataSize), the reserved area follows, and ends at the
// member's size aligned down to 4 KiB (a ragged tail is left unused).
func Layout(memberSize int64) (dataSize int64, area Area, err error) {
	if memberSize < MinMemberSize {
		return 0, Area{}, fmt.Errorf("meta: member of %d bytes, need at least %d: %w", memberSize, MinMemberSize, ErrTooSmall)
	}
	end := memberSize &^ (BlockSize - 1)
	start := end - ReservedSize
	area = Area{
		Offset:    start,
		Length:    ReservedSize,
		LogOffset: start,
		LogLength: ReservedSize - 2*SlotSize,
		Slots:     [2]int64{end - 2*SlotSize, end - SlotSize},
	}
	return start, area, nil
}

// WriteLog returns the descriptor of the area's whole write-log region.
func (a Area) WriteLog() WriteLog {
	return WriteLog{Offset: uint64(a.LogOffset), Length: uint64(a.LogLength)}
}

// Device is what this package needs of a member: the device package's
// Device has it, and so do test fakes.
type Device interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Flush() error
	Size() int64
}

// Slot names a metadata slot.
type Slot uint8

// Slots; SlotNone is the zero value ("not read from a device").
const (
	SlotNone Slot = iota
	SlotA
	SlotB
)

func (s Slot) String() string {
	switch s {
	case SlotA:
		return "A"
	case SlotB:
		return "B"
	}
	return "none"
}

// Role of a member in the set's member table.
type Role uint8

// Roles. Zero is invalid, so a zeroed table entry is caught.
const (
	RoleFull Role = iota + 1
	RoleCopyTarget
	RoleRemoved
)

func (r Role) String() string {
	switch r {
	case RoleFull:
		return "full"
	case RoleCopyTarget:
		return "copy-target"
	case RoleRemoved:
		return "removed"
	}
	return fmt.Sprintf("role(%d)", uint8(r))
}

func (r Role) valid() bool { return r >= RoleFull && r <= RoleRemoved }

// UUID is a 16-byte identifier (set or member), RFC 4122 version 4 when
// made by NewUUID.
type UUID [16]byte

// NewUUID returns a random version 4 UUID.
func NewUUID() UUID {
	var u UUID
	rand.Read(u[:]) // never fails (crypto/rand, Go ≥ 1.24)
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return u
}

// IsZero tells whether u is all zeroes (unset).
func (u UUID) IsZero() bool { return u == UUID{} }

func (u UUID) String() string {
	var b [36]byte
	hex.Encode(b[0:8], u[0:4])
	b[8] = '-'
	hex.Encode(b[9:13], u[4:6])
	b[13] = '-'
	hex.Encode(b[14:18], u[6:8])
	b[18] = '-'
	hex.Encode(b[19:23], u[8:10])
	b[23] = '-'
	hex.Encode(b[24:36], u[10:16])
	return string(b[:])
}

// ParseUUID parses the canonical 8-4-4-4-12 hexadecimal form.
func ParseUUID(s string) (UUID, error) {
	var u UUID
	if len(s) != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
		return u, fmt.Errorf("meta: bad UUID %q: want xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", s)
	}
	h := s[0:8] + s[9:13] + s[14:18] + s[19:23] + s[24:36]
	if _, err := hex.Decode(u[:], []byte(h)); err != nil {
		return UUID{}, fmt.Errorf("meta: bad UUID %q: %w", s, err)
	}
	return u, nil
}

// Generation identifies one membership of the set. Number counts
// membership changes; ID is random, so two halves of a split set that
// both bump from the same number still get different generations.
type Generation struct {
	Number uint64
	ID     uint64
}

func (g Generation) String() string { return fmt.Sprintf("%d/%016x", g.Number, g.ID) }

// Member is one entry of the member table.
type Member struct {
	UUID UUID
	Role Role
	// PathHint is where the member was last seen (e.g. /dev/loop3): a
	// hint for finding it, never proof of identity (the UUID is).
	PathHint string
}

// WriteLog describes the persisted write-log region (issue 4 defines its
// contents). A zero Length means no write log.
type WriteLog struct {
	Offset, Length uint64 // bytes from the member's start
	Flags          uint32 // owned by the write log; stored verbatim
}

// Metadata is the content of one slot.
type Metadata struct {
	// Version is the format version the slot was read in; Encode writes
	// FormatVersion, or FormatVersionSingle when Cluster is zero.
	Version uint32
	// Seq orders the slots: Write stores the newest valid seq + 1.
	Seq uint64

	SetUUID    UUID
	SetName    string // e.g. "DSA1"
	MemberUUID UUID   // this member

	// Generation is bumped (NextGeneration) on every membership change;
	// History holds the previous ones, newest first, at most MaxHistory.
	Generation Generation
	History    []Generation
	Members    []Member

	// Dirty is set while the set is mounted writable and cleared only
	// after the data is flushed; a dirty member at mount needs a merge.
	Dirty bool
	// MergeUnderway: a merge was running on the set (a controller
	// minimerge interrupted by a crash becomes a full merge: Table 8-1's
	// mount row).
	MergeUnderway bool
	// CopyCheckpoint is the LBN (512-byte blocks) below which a copy to
	// this member is done and flushed.
	CopyCheckpoint uint64
	WriteLog       WriteLog
	// Cluster says which cluster's hosts hold the set, which run of the
	// writing host wrote this slot and the log index it reflects; zero
	// for a single-host agent.
	Cluster ClusterStamp

	// Slot is the slot Read took this from, or Write put it in. Not
	// stored.
	Slot Slot
}

// ClusterStamp identifies the cluster that holds a set: another cluster
// (or a single-host agent) must not take a set it holds while it is
// dirty, since that cluster's hosts may still be writing it. On a real SAN
// SCSI-3 persistent reservations would enforce what this records.
type ClusterStamp struct {
	UUID UUID
	// Incarnation is the writing host's agent run.
	Incarnation uint64
	// LogIndex is the index of the cluster's log the slot reflects.
	LogIndex uint64
}

// IsZero reports a slot written outside any cluster.
func (c ClusterStamp) IsZero() bool { return c.UUID.IsZero() }

// NextGeneration records a membership change: the current generation
// goes to the front of History (the oldest falls off past MaxHistory) and
// the new one gets the next number and a fresh random ID.
func (m *Metadata) NextGeneration() {
	m.History = slices.Insert(m.History, 0, m.Generation)
	if len(m.History) > MaxHistory {
		m.History = m.History[:MaxHistory]
	}
	var b [8]byte
	for {
		rand.Read(b[:])
		if id := binary.LittleEndian.Uint64(b[:]); id != 0 {
			m.Generation = Generation{Number: m.Generation.Number + 1, ID: id}
			return
		}
	}
}

// Member looks a member up in the table.
func (m *Metadata) Member(u UUID) (Member, bool) {
	for _, x := range m.Members {
		if x.UUID == u {
			return x, true
		}
	}
	return Member{}, false
}

// Relation of two members' metadata, from their generations.
type Relation int

// Relations Relate reports.
const (
	// Unrelated: different sets.
	Unrelated Relation = iota
	// Same: same generation.
	Same
	// Newer: the first is ahead; the second's generation is in its
	// history (the second missed membership changes).
	Newer
	// Older: the second is ahead.
	Older
	// Diverged: same set, but neither generation descends from the other
	// (split brain, or a member used outside the set), or the common
	// ancestor is older than the history keeps. Needs an operator.
	Diverged
)

func (r Relation) String() string {
	return [...]string{"unrelated", "same", "newer", "older", "diverged"}[r]
}

// Relate compares a and b by set and generation history.
func Relate(a, b *Metadata) Relation {
	switch {
	case a.SetUUID != b.SetUUID:
		return Unrelated
	case a.Generation == b.Generation:
		return Same
	case slices.Contains(a.History, b.Generation):
		return Newer
	case slices.Contains(b.History, a.Generation):
		return Older
	}
	return Diverged
}

// IsBlank tells whether [off, off+length) of r reads as all zeroes.
func IsBlank(r io.ReaderAt, off, length int64) (bool, error) {
	if off < 0 || length < 0 {
		return false, fmt.Errorf("meta: blank check of %d+%d: negative range", off, length)
	}
	buf := make([]byte, min(length, 64<<10))
	for length > 0 {
		n := min(length, int64(len(buf)))
		if m, err := r.ReadAt(buf[:n], off); int64(m) != n {
			if err == nil {
				err = io.ErrUnexpectedEOF
			}
			return false, fmt.Errorf("meta: read %d+%d: %w", off, n, err)
		}
		if !allZero(buf[:n]) {
			return false, nil
		}
		off += n
		length -= n
	}
	return true, nil
}

// AreaIsBlank tells whether the whole reserved area of dev (write log and
// both slots) is zeroes, as creating a set on it requires unless the
// operator asked to overwrite.
func AreaIsBlank(dev Device) (bool, error) {
	_, area, err := Layout(dev.Size())
	if err != nil {
		return false, err
	}
	return IsBlank(dev, area.Offset, area.Length)
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
