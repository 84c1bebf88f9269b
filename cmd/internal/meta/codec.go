package meta

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// Slot format, version 1. All integers little-endian; every variable part
// has an explicit length, bounded on decode.
//
//	off   len  field
//	0     8    magic "SHDWMETA"
//	8     4    format version
//	12    4    flags (bit 0: dirty; bit 1: merge underway; other bits must be 0)
//	16    8    seq
//	24    16   set UUID
//	40    16   member UUID
//	56    8    generation number
//	64    8    generation ID
//	72    8    copy checkpoint LBN
//	80    8    write-log offset
//	88    8    write-log length
//	96    4    write-log flags
//	100   1    set name length (≤ 64)
//	101   1    history count (≤ 16)
//	102   1    member count (≤ 16)
//	103   1    reserved, 0
//	104   ...  set name; history entries (number 8, ID 8); members
//	           (UUID 16, role 1, path hint length 1 (≤ 200), path hint)
//	...        version 2 only: cluster UUID 16 (non-zero), incarnation 8,
//	           log index 8
//	...        zeroes up to 4092
//	4092  4    CRC32C (Castagnoli) of bytes 0–4091
//
// The encoding is canonical: a slot that decodes re-encodes to the same
// bytes (padding and reserved bytes must be zero, flags known, roles
// valid, member UUIDs distinct).
const (
	headerSize = 104
	crcOffset  = SlotSize - 4
	flagDirty  = 1 << 0
	flagMerge  = 1 << 1
)

var magic = [8]byte{'S', 'H', 'D', 'W', 'M', 'E', 'T', 'A'}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// corruptError says why a slot is corrupt; it matches ErrCorrupt.
type corruptError struct{ reason string }

func (e *corruptError) Error() string        { return "meta: corrupt slot: " + e.reason }
func (e *corruptError) Is(target error) bool { return target == ErrCorrupt }

func corrupt(format string, args ...any) error {
	return &corruptError{reason: fmt.Sprintf(format, args...)}
}

// reason is the short cause of a slot error, for warnings.
func reason(err error) string {
	var ce *corruptError
	if errors.As(err, &ce) {
		return ce.reason
	}
	return err.Error()
}

// validate checks the bounds Encode and Decode share.
func (m *Metadata) validate() error {
	if len(m.SetName) > MaxSetName {
		return fmt.Errorf("set name of %d bytes, at most %d", len(m.SetName), MaxSetName)
	}
	if len(m.History) > MaxHistory {
		return fmt.Errorf("%d history entries, at most %d", len(m.History), MaxHistory)
	}
	if len(m.Members) > MaxMembers {
		return fmt.Errorf("%d members, at most %d", len(m.Members), MaxMembers)
	}
	for i, x := range m.Members {
		if len(x.PathHint) > MaxPathHint {
			return fmt.Errorf("member %d: path hint of %d bytes, at most %d", i, len(x.PathHint), MaxPathHint)
		}
		if !x.Role.valid() {
			return fmt.Errorf("member %d: invalid role %d", i, x.Role)
		}
		for _, y := range m.Members[:i] {
			if y.UUID == x.UUID {
				return fmt.Errorf("member %d: UUID %s listed twice", i, x.UUID)
			}
		}
	}
	return nil
}

// Encode returns the slot image of m, with m.Seq as its seq and
// FormatVersion as its version.
func Encode(m *Metadata) ([]byte, error) {
	if err := m.validate(); err != nil {
		return nil, fmt.Errorf("meta: encode: %w: %w", ErrInvalid, err)
	}
	b := make([]byte, SlotSize)
	le := binary.LittleEndian
	copy(b[0:8], magic[:])
	version := uint32(FormatVersionSingle)
	if !m.Cluster.IsZero() {
		version = FormatVersion
	}
	le.PutUint32(b[8:], version)
	var flags uint32
	if m.Dirty {
		flags |= flagDirty
	}
	if m.MergeUnderway {
		flags |= flagMerge
	}
	le.PutUint32(b[12:], flags)
	le.PutUint64(b[16:], m.Seq)
	copy(b[24:40], m.SetUUID[:])
	copy(b[40:56], m.MemberUUID[:])
	le.PutUint64(b[56:], m.Generation.Number)
	le.PutUint64(b[64:], m.Generation.ID)
	le.PutUint64(b[72:], m.CopyCheckpoint)
	le.PutUint64(b[80:], m.WriteLog.Offset)
	le.PutUint64(b[88:], m.WriteLog.Length)
	le.PutUint32(b[96:], m.WriteLog.Flags)
	b[100] = byte(len(m.SetName))
	b[101] = byte(len(m.History))
	b[102] = byte(len(m.Members))
	p := headerSize
	p += copy(b[p:], m.SetName)
	for _, g := range m.History {
		le.PutUint64(b[p:], g.Number)
		le.PutUint64(b[p+8:], g.ID)
		p += 16
	}
	for _, x := range m.Members {
		p += copy(b[p:], x.UUID[:])
		b[p] = byte(x.Role)
		b[p+1] = byte(len(x.PathHint))
		p += 2
		p += copy(b[p:], x.PathHint)
	}
	if version == FormatVersion {
		p += copy(b[p:], m.Cluster.UUID[:])
		le.PutUint64(b[p:], m.Cluster.Incarnation)
		le.PutUint64(b[p+8:], m.Cluster.LogIndex)
		p += 16
	}
	// The bounds keep p far below crcOffset (see MaxPathHint); checked
	// anyway, so a future field cannot silently overrun the checksum.
	if p > crcOffset {
		return nil, fmt.Errorf("meta: encode: %w: %d bytes do not fit a slot", ErrInvalid, p)
	}
	le.PutUint32(b[crcOffset:], crc32.Checksum(b[:crcOffset], castagnoli))
	return b, nil
}

// Decode parses a slot image. A bad magic, checksum or field is an error
// matching ErrCorrupt; an unknown version one matching ErrVersion.
// Decode never trusts a length it read: each is bounded and checked
// against what is left of the slot before use.
func Decode(b []byte) (*Metadata, error) {
	if len(b) != SlotSize {
		return nil, corrupt("slot is %d bytes, want %d", len(b), SlotSize)
	}
	le := binary.LittleEndian
	if [8]byte(b[0:8]) != magic {
		return nil, corrupt("bad magic")
	}
	if got, want := le.Uint32(b[crcOffset:]), crc32.Checksum(b[:crcOffset], castagnoli); got != want {
		return nil, corrupt("checksum mismatch")
	}
	m := &Metadata{Version: le.Uint32(b[8:])}
	if m.Version != FormatVersion && m.Version != FormatVersionSingle {
		return nil, fmt.Errorf("%w %d (this program reads %d and %d)", ErrVersion, m.Version, FormatVersionSingle, FormatVersion)
	}
	flags := le.Uint32(b[12:])
	if flags&^(flagDirty|flagMerge) != 0 {
		return nil, corrupt("unknown flags %#x", flags)
	}
	m.Dirty = flags&flagDirty != 0
	m.MergeUnderway = flags&flagMerge != 0
	m.Seq = le.Uint64(b[16:])
	m.SetUUID = UUID(b[24:40])
	m.MemberUUID = UUID(b[40:56])
	m.Generation = Generation{Number: le.Uint64(b[56:]), ID: le.Uint64(b[64:])}
	m.CopyCheckpoint = le.Uint64(b[72:])
	m.WriteLog = WriteLog{Offset: le.Uint64(b[80:]), Length: le.Uint64(b[88:]), Flags: le.Uint32(b[96:])}
	nameLen, nHist, nMembers := int(b[100]), int(b[101]), int(b[102])
	if b[103] != 0 {
		return nil, corrupt("reserved byte is %#x", b[103])
	}
	if nameLen > MaxSetName || nHist > MaxHistory || nMembers > MaxMembers {
		return nil, corrupt("counts out of bounds: name %d, history %d, members %d", nameLen, nHist, nMembers)
	}

	p := headerSize
	body := b[:crcOffset]
	take := func(n int, what string) ([]byte, error) {
		if n > len(body)-p {
			return nil, corrupt("%s runs past the end of the slot", what)
		}
		s := body[p : p+n]
		p += n
		return s, nil
	}
	name, err := take(nameLen, "set name")
	if err != nil {
		return nil, err
	}
	m.SetName = string(name)
	for range nHist {
		g, err := take(16, "history")
		if err != nil {
			return nil, err
		}
		m.History = append(m.History, Generation{Number: le.Uint64(g), ID: le.Uint64(g[8:])})
	}
	for i := range nMembers {
		h, err := take(18, "member table")
		if err != nil {
			return nil, err
		}
		x := Member{UUID: UUID(h[0:16]), Role: Role(h[16])}
		if int(h[17]) > MaxPathHint {
			return nil, corrupt("member %d: path hint length %d out of bounds", i, h[17])
		}
		path, err := take(int(h[17]), "member path hint")
		if err != nil {
			return nil, err
		}
		x.PathHint = string(path)
		m.Members = append(m.Members, x)
	}
	if m.Version == FormatVersion {
		c, err := take(32, "cluster stamp")
		if err != nil {
			return nil, err
		}
		m.Cluster = ClusterStamp{UUID: UUID(c[0:16]), Incarnation: le.Uint64(c[16:]), LogIndex: le.Uint64(c[24:])}
		if m.Cluster.IsZero() {
			return nil, corrupt("version 2 slot without a cluster UUID")
		}
	}
	if !allZero(body[p:]) {
		return nil, corrupt("non-zero bytes after the member table")
	}
	if err := m.validate(); err != nil {
		return nil, corrupt("%v", err)
	}
	return m, nil
}
