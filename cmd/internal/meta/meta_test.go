package meta

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/shadow-project/shadow/cmd/internal/device"
)

// memDev is an in-memory member. write, when set, sees every write and
// says how many bytes of it reach the medium and what error to return,
// so tests can tear or fail a slot write.
type memDev struct {
	mu      sync.Mutex
	b       []byte
	flushes int
	write   func(off int64, n int) (keep int, err error)
	readErr func(off int64) error
}

func newMem(size int) *memDev { return &memDev{b: make([]byte, size)} }

func (d *memDev) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.readErr != nil {
		if err := d.readErr(off); err != nil {
			return 0, err
		}
	}
	if off >= int64(len(d.b)) {
		return 0, io.EOF
	}
	n := copy(p, d.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (d *memDev) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	keep, err := len(p), error(nil)
	if d.write != nil {
		keep, err = d.write(off, len(p))
	}
	return copy(d.b[off:], p[:keep]), err
}

func (d *memDev) Flush() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.flushes++
	return nil
}

func (d *memDev) Size() int64 { return int64(len(d.b)) }

const testSize = 4<<20 + 1000 // a ragged end, on purpose

// sample is metadata with every field set, for a device of dev's size.
func sample(t testing.TB, dev Device) *Metadata {
	t.Helper()
	_, area, err := Layout(dev.Size())
	if err != nil {
		t.Fatal(err)
	}
	self := NewUUID()
	m := &Metadata{
		SetUUID:        NewUUID(),
		SetName:        "DSA1",
		MemberUUID:     self,
		Generation:     Generation{Number: 3, ID: 0xabcdef},
		History:        []Generation{{2, 0x22}, {1, 0x11}},
		Members:        []Member{{self, RoleFull, "/dev/loop0"}, {NewUUID(), RoleCopyTarget, "/srv/m2.img"}, {NewUUID(), RoleRemoved, ""}},
		Dirty:          true,
		MergeUnderway:  true,
		CopyCheckpoint: 123456,
		WriteLog:       area.WriteLog(),
	}
	return m
}

func TestLayout(t *testing.T) {
	if _, _, err := Layout(MinMemberSize - 1); !errors.Is(err, ErrTooSmall) {
		t.Fatalf("too small: %v", err)
	}
	for _, size := range []int64{MinMemberSize, testSize, 1 << 40, 1<<40 + 4095} {
		data, a, err := Layout(size)
		if err != nil {
			t.Fatal(err)
		}
		end := size &^ 4095
		switch {
		case data%BlockSize != 0 || data < ReservedSize:
			t.Errorf("size %d: data size %d", size, data)
		case a.Offset != data || a.Offset+a.Length != end:
			t.Errorf("size %d: area %+v does not run from the data end to %d", size, a, end)
		case a.LogOffset != a.Offset || a.LogOffset+a.LogLength != a.Slots[0]:
			t.Errorf("size %d: log region %+v", size, a)
		case a.Slots[1] != a.Slots[0]+SlotSize || a.Slots[1]+SlotSize != end:
			t.Errorf("size %d: slots %v", size, a.Slots)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	dev := newMem(testSize)
	m := sample(t, dev)
	if err := Write(dev, m); err != nil {
		t.Fatal(err)
	}
	if m.Seq != 1 || m.Slot != SlotA || m.Version != FormatVersionSingle {
		t.Fatalf("after Write: seq %d slot %v version %d", m.Seq, m.Slot, m.Version)
	}
	got, warnings, err := Read(dev)
	if err != nil || len(warnings) != 0 {
		t.Fatalf("read: %v %v", err, warnings)
	}
	if !reflect.DeepEqual(got, m) {
		t.Fatalf("read back:\n%+v\nwant\n%+v", got, m)
	}
	// The data region is untouched: members are plain images.
	data, _, _ := Layout(dev.Size())
	if !allZero(dev.b[:data]) {
		t.Fatal("Write touched the data region")
	}
}

func TestAlternatingSlots(t *testing.T) {
	dev := newMem(testSize)
	m := sample(t, dev)
	for i := 1; i <= 5; i++ {
		m.CopyCheckpoint = uint64(i)
		flushes := dev.flushes
		if err := Write(dev, m); err != nil {
			t.Fatal(err)
		}
		want := SlotA
		if i%2 == 0 {
			want = SlotB
		}
		if m.Seq != uint64(i) || m.Slot != want {
			t.Fatalf("write %d: seq %d slot %v, want seq %d slot %v", i, m.Seq, m.Slot, i, want)
		}
		if dev.flushes-flushes != 2 {
			t.Fatalf("write %d: %d flushes, want one before and one after", i, dev.flushes-flushes)
		}
		got, warnings, err := Read(dev)
		if err != nil || len(warnings) != 0 || got.Seq != uint64(i) || got.CopyCheckpoint != uint64(i) {
			t.Fatalf("read after write %d: %+v %v %v", i, got, warnings, err)
		}
	}
}

func slotOffset(t *testing.T, dev Device, s Slot) int64 {
	_, a, err := Layout(dev.Size())
	if err != nil {
		t.Fatal(err)
	}
	return a.Slots[s-1]
}

func TestCorruptSlotFallsBack(t *testing.T) {
	for _, at := range []int{0, 20, 200, crcOffset - 1, crcOffset + 1} {
		dev := newMem(testSize)
		m := sample(t, dev)
		for range 2 { // seq 1 in A, seq 2 in B
			if err := Write(dev, m); err != nil {
				t.Fatal(err)
			}
		}
		dev.b[slotOffset(t, dev, SlotB)+int64(at)] ^= 0x40
		got, warnings, err := Read(dev)
		if err != nil {
			t.Fatal(err)
		}
		if got.Seq != 1 || got.Slot != SlotA {
			t.Fatalf("byte %d: read seq %d slot %v, want seq 1 from A", at, got.Seq, got.Slot)
		}
		wantWarn := "slot B corrupt (checksum mismatch), using slot A seq 1"
		if at == 0 {
			wantWarn = "slot B corrupt (bad magic), using slot A seq 1"
		}
		if len(warnings) != 1 || warnings[0] != wantWarn {
			t.Fatalf("byte %d: warnings %q, want %q", at, warnings, wantWarn)
		}
		// The next Write replaces the corrupt slot, not the good one.
		if err := Write(dev, m); err != nil || m.Slot != SlotB || m.Seq != 2 {
			t.Fatalf("write after corruption: %v slot %v seq %d", err, m.Slot, m.Seq)
		}
		if _, warnings, err := Read(dev); err != nil || len(warnings) != 0 {
			t.Fatalf("read after repair: %v %v", warnings, err)
		}
	}
}

func TestBothCorrupt(t *testing.T) {
	dev := newMem(testSize)
	m := sample(t, dev)
	for range 2 {
		if err := Write(dev, m); err != nil {
			t.Fatal(err)
		}
	}
	dev.b[slotOffset(t, dev, SlotA)+100] ^= 1
	dev.b[slotOffset(t, dev, SlotB)+100] ^= 1
	_, _, err := Read(dev)
	if !errors.Is(err, ErrCorrupt) || errors.Is(err, ErrBlank) {
		t.Fatalf("both corrupt: %v, want ErrCorrupt", err)
	}
	if !strings.Contains(err.Error(), "slot A corrupt (checksum mismatch), slot B corrupt (checksum mismatch)") {
		t.Fatalf("error does not say why: %v", err)
	}

	// One corrupt and one blank: something was written, so corrupt.
	dev = newMem(testSize)
	if err := Write(dev, m); err != nil {
		t.Fatal(err)
	}
	dev.b[slotOffset(t, dev, SlotA)+100] ^= 1
	if _, _, err := Read(dev); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("corrupt + blank: %v, want ErrCorrupt", err)
	}
}

func TestBlank(t *testing.T) {
	dev := newMem(testSize)
	if _, _, err := Read(dev); !errors.Is(err, ErrBlank) || errors.Is(err, ErrCorrupt) {
		t.Fatalf("blank: %v, want ErrBlank", err)
	}
	blank, err := AreaIsBlank(dev)
	if err != nil || !blank {
		t.Fatalf("AreaIsBlank on a fresh device: %v %v", blank, err)
	}
	// One stray byte in the log region makes the area non-blank.
	_, a, _ := Layout(dev.Size())
	dev.b[a.LogOffset+12345] = 1
	if blank, err := AreaIsBlank(dev); err != nil || blank {
		t.Fatalf("AreaIsBlank with a byte in the log region: %v %v", blank, err)
	}
	dev.b[a.LogOffset+12345] = 0
	if err := Write(dev, sample(t, dev)); err != nil {
		t.Fatal(err)
	}
	if blank, err := AreaIsBlank(dev); err != nil || blank {
		t.Fatalf("AreaIsBlank after Write: %v %v", blank, err)
	}
	if blank, err := IsBlank(dev, 0, 0); err != nil || !blank {
		t.Fatalf("empty range: %v %v", blank, err)
	}
	if _, err := IsBlank(dev, dev.Size()-10, 20); err == nil {
		t.Fatal("IsBlank past the end succeeded")
	}
	if _, err := AreaIsBlank(newMem(1 << 20)); !errors.Is(err, ErrTooSmall) {
		t.Fatalf("AreaIsBlank on a small device: %v", err)
	}
}

// TestTornWrite: the third Write (to slot A) is torn, with or without an
// error reported; seq 2 in slot B stays readable.
func TestTornWrite(t *testing.T) {
	for _, tc := range []struct {
		name string
		keep int
		err  error
	}{
		{"half, with error", SlotSize / 2, syscall.EIO},
		{"half, silent", SlotSize / 2, nil},
		{"one sector, silent", 512, nil},
		{"nothing, with error", 0, syscall.EIO},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := newMem(testSize)
			m := sample(t, dev)
			for range 2 {
				if err := Write(dev, m); err != nil {
					t.Fatal(err)
				}
			}
			slotA := slotOffset(t, dev, SlotA)
			dev.write = func(off int64, n int) (int, error) {
				if off == slotA {
					return tc.keep, tc.err
				}
				return n, nil
			}
			m.Dirty = false
			m.CopyCheckpoint = 999
			err := Write(dev, m)
			if tc.err != nil && !errors.Is(err, tc.err) {
				t.Fatalf("torn write returned %v, want %v", err, tc.err)
			}
			got, warnings, err := Read(dev)
			if err != nil {
				t.Fatal(err)
			}
			if got.Seq != 2 || got.Slot != SlotB || got.CopyCheckpoint != 123456 || !got.Dirty {
				t.Fatalf("after torn write: %+v", got)
			}
			if tc.keep > 0 && len(warnings) != 1 {
				t.Fatalf("warnings %q, want one about slot A", warnings)
			}
		})
	}
}

// TestPowerLossDuringWrite runs Write on a real file behind a Faulty
// whose flush after the slot write fails; the machine then loses power.
// The previous metadata must be what a reopen finds.
func TestPowerLossDuringWrite(t *testing.T) {
	p := filepath.Join(t.TempDir(), "member.img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, testSize); err != nil {
		t.Fatal(err)
	}
	dev, err := device.Open(p, device.Options{})
	if err != nil {
		t.Fatal(err)
	}
	f := device.NewFaulty(dev)
	m := sample(t, f)
	if err := Write(f, m); err != nil {
		t.Fatal(err)
	}
	f.PowerLoss()
	flushes := 0
	f.Inject(device.When(func(op device.Op, _, _ int64) bool {
		if op == device.OpFlush {
			flushes++
			return flushes == 2 // the flush after the slot write
		}
		return false
	}, syscall.EIO, 0))
	m.Dirty = false
	if err := Write(f, m); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write: %v, want the injected EIO", err)
	}
	if f.Unflushed() != 1 {
		t.Fatalf("%d unflushed writes, want the slot write", f.Unflushed())
	}
	if err := f.Crash(); err != nil {
		t.Fatal(err)
	}
	f.Close()

	dev, err = device.Open(p, device.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	got, warnings, err := Read(dev)
	if err != nil {
		t.Fatal(err)
	}
	if got.Seq != 1 || !got.Dirty || len(warnings) != 0 {
		t.Fatalf("after power loss: seq %d dirty %v warnings %q", got.Seq, got.Dirty, warnings)
	}
}

func TestUnreadableSlot(t *testing.T) {
	dev := newMem(testSize)
	m := sample(t, dev)
	for range 2 {
		if err := Write(dev, m); err != nil {
			t.Fatal(err)
		}
	}
	slotB := slotOffset(t, dev, SlotB)
	dev.readErr = func(off int64) error {
		if off == slotB {
			return syscall.EIO
		}
		return nil
	}
	got, warnings, err := Read(dev)
	if err != nil || got.Seq != 1 || len(warnings) != 1 || !strings.Contains(warnings[0], "slot B unreadable") {
		t.Fatalf("one unreadable slot: %v %q %v", got, warnings, err)
	}
	dev.readErr = func(int64) error { return syscall.EIO }
	if _, _, err := Read(dev); !errors.Is(err, syscall.EIO) || errors.Is(err, ErrBlank) || errors.Is(err, ErrCorrupt) {
		t.Fatalf("both unreadable: %v, want EIO", err)
	}
	if err := Write(dev, m); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write with both unreadable: %v", err)
	}
}

func TestSameSeqDiffer(t *testing.T) {
	dev := newMem(testSize)
	m := sample(t, dev)
	m.Seq = 7
	a, _ := Encode(m)
	m.SetName = "DSA2"
	b, _ := Encode(m)
	copy(dev.b[slotOffset(t, dev, SlotA):], a)
	copy(dev.b[slotOffset(t, dev, SlotB):], b)
	got, warnings, err := Read(dev)
	if err != nil || got.SetName != "DSA1" || len(warnings) != 1 || !strings.Contains(warnings[0], "both hold seq 7 but differ") {
		t.Fatalf("%v %q %v", got, warnings, err)
	}
}

// withVersion re-encodes a slot image with another format version.
func withVersion(img []byte, v uint32) []byte {
	img = bytes.Clone(img)
	binary.LittleEndian.PutUint32(img[8:], v)
	binary.LittleEndian.PutUint32(img[crcOffset:], crc32.Checksum(img[:crcOffset], castagnoli))
	return img
}

func TestUnknownVersionRefused(t *testing.T) {
	dev := newMem(testSize)
	m := sample(t, dev)
	for range 2 {
		if err := Write(dev, m); err != nil {
			t.Fatal(err)
		}
	}
	off := slotOffset(t, dev, SlotB)
	copy(dev.b[off:], withVersion(dev.b[off:off+SlotSize], FormatVersion+1))
	before := bytes.Clone(dev.b)
	if _, _, err := Read(dev); !errors.Is(err, ErrVersion) {
		t.Fatalf("read: %v, want ErrVersion", err)
	}
	if err := Write(dev, m); !errors.Is(err, ErrVersion) {
		t.Fatalf("write: %v, want ErrVersion", err)
	}
	if !bytes.Equal(before, dev.b) {
		t.Fatal("a refused Write changed the device")
	}
}

func TestEncodeBounds(t *testing.T) {
	dev := newMem(testSize)
	// The largest metadata the bounds allow fits a slot.
	big := sample(t, dev)
	big.SetName = strings.Repeat("n", MaxSetName)
	big.History = make([]Generation, MaxHistory)
	big.Members = nil
	for range MaxMembers {
		big.Members = append(big.Members, Member{NewUUID(), RoleFull, strings.Repeat("p", MaxPathHint)})
	}
	big.Cluster = ClusterStamp{UUID: NewUUID(), Incarnation: 1 << 63, LogIndex: 1<<64 - 1}
	if err := Write(dev, big); err != nil {
		t.Fatalf("largest metadata: %v", err)
	}
	if got, _, err := Read(dev); err != nil || !reflect.DeepEqual(got, big) {
		t.Fatalf("largest metadata read back: %v", err)
	}

	u := NewUUID()
	for name, mut := range map[string]func(m *Metadata){
		"name":      func(m *Metadata) { m.SetName = strings.Repeat("n", MaxSetName+1) },
		"history":   func(m *Metadata) { m.History = make([]Generation, MaxHistory+1) },
		"members":   func(m *Metadata) { m.Members = make([]Member, MaxMembers+1) },
		"path":      func(m *Metadata) { m.Members[0].PathHint = strings.Repeat("p", MaxPathHint+1) },
		"role":      func(m *Metadata) { m.Members[0].Role = 0 },
		"duplicate": func(m *Metadata) { m.Members[0].UUID, m.Members[1].UUID = u, u },
		"write log": func(m *Metadata) { m.WriteLog.Offset = 0 },
	} {
		m := sample(t, dev)
		mut(m)
		before := bytes.Clone(dev.b)
		if err := Write(dev, m); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
		if !bytes.Equal(before, dev.b) {
			t.Errorf("%s: a refused Write changed the device", name)
		}
	}
}

func TestDecodeRefuses(t *testing.T) {
	m := sample(t, newMem(testSize))
	img, err := Encode(m)
	if err != nil {
		t.Fatal(err)
	}
	fix := func(b []byte) []byte {
		binary.LittleEndian.PutUint32(b[crcOffset:], crc32.Checksum(b[:crcOffset], castagnoli))
		return b
	}
	for name, mut := range map[string]func(b []byte) []byte{
		"short":        func(b []byte) []byte { return b[:100] },
		"padding":      func(b []byte) []byte { b[crcOffset-1] = 1; return fix(b) },
		"flags":        func(b []byte) []byte { b[12] |= 4; return fix(b) },
		"reserved":     func(b []byte) []byte { b[103] = 1; return fix(b) },
		"name length":  func(b []byte) []byte { b[100] = MaxSetName + 1; return fix(b) },
		"member count": func(b []byte) []byte { b[102] = MaxMembers + 1; return fix(b) },
		"role":         func(b []byte) []byte { b[headerSize+4+2*16+16] = 9; return fix(b) },
	} {
		if _, err := Decode(mut(bytes.Clone(img))); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v, want ErrCorrupt", name, err)
		}
	}
}

func TestGenerations(t *testing.T) {
	a := &Metadata{SetUUID: NewUUID(), Generation: Generation{Number: 1, ID: 1}}
	b := *a
	if Relate(a, &b) != Same {
		t.Fatal("same generation")
	}
	a.NextGeneration()
	if a.Generation.Number != 2 || a.Generation.ID == 0 || a.History[0] != (Generation{1, 1}) {
		t.Fatalf("after NextGeneration: %v %v", a.Generation, a.History)
	}
	if Relate(a, &b) != Newer || Relate(&b, a) != Older {
		t.Fatalf("ahead/behind: %v %v", Relate(a, &b), Relate(&b, a))
	}
	// b was used outside the set: it bumped on its own, from the same
	// number, and got a different ID.
	b.NextGeneration()
	if b.Generation.Number != a.Generation.Number || Relate(a, &b) != Diverged {
		t.Fatalf("split: %v vs %v: %v", a.Generation, b.Generation, Relate(a, &b))
	}
	other := &Metadata{SetUUID: NewUUID()}
	if Relate(a, other) != Unrelated {
		t.Fatal("different sets")
	}
	for range 3 * MaxHistory {
		a.NextGeneration()
	}
	if len(a.History) != MaxHistory || a.History[0].Number != a.Generation.Number-1 {
		t.Fatalf("history not trimmed: %d entries, newest %v", len(a.History), a.History[0])
	}
}

func TestUUID(t *testing.T) {
	u := NewUUID()
	if u.IsZero() || u[6]>>4 != 4 || u[8]>>6 != 2 {
		t.Fatalf("not a v4 UUID: %s", u)
	}
	v, err := ParseUUID(u.String())
	if err != nil || v != u {
		t.Fatalf("parse %s: %s %v", u, v, err)
	}
	for _, bad := range []string{"", "not-a-uuid", strings.Repeat("z", 36), "01234567-89ab-cdef-0123-456789abcdeg"} {
		if _, err := ParseUUID(bad); err == nil {
			t.Errorf("ParseUUID(%q) succeeded", bad)
		}
	}
}

func TestExamine(t *testing.T) {
	dev := newMem(testSize)
	m := sample(t, dev)
	m.Members[1].PathHint = "evil\nSet Name : forged"
	for range 2 {
		if err := Write(dev, m); err != nil {
			t.Fatal(err)
		}
	}
	dev.b[slotOffset(t, dev, SlotB)+50] ^= 1
	got, warnings, err := Read(dev)
	if err != nil {
		t.Fatal(err)
	}
	out := Examine(got, warnings)
	for _, want := range []string{
		"Magic : SHDWMETA",
		"Version : 1",
		"Set Name : DSA1",
		"Set UUID : " + m.SetUUID.String(),
		"Member UUID : " + m.MemberUUID.String(),
		"Generation : 3/0000000000abcdef",
		"History : 2/0000000000000022, 1/0000000000000011",
		"State : dirty",
		"Copy Checkpoint : LBN 123456",
		"Slot Used : A (seq 1)",
		"copy-target",
		"removed",
		"(this member)",
		`"evil\nSet Name : forged"`,
		"slot B corrupt (checksum mismatch), using slot A seq 1",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("Examine lacks %q:\n%s", want, out)
		}
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "Set Name :") && !strings.Contains(line, "DSA1") {
			t.Errorf("a path hint forged a line: %q", line)
		}
		if strings.TrimRight(line, " ") != line {
			t.Errorf("trailing blanks: %q", line)
		}
	}
	t.Logf("\n%s", out)
}

// FuzzDecode: any bytes given to the slot decoder fail cleanly or decode
// to metadata that re-encodes to the same bytes (the format is
// canonical) and decodes equal. Each input is tried as is and with a
// valid magic and checksum forced on, so the fuzzer reaches the field
// parser past the checksum.
func FuzzDecode(f *testing.F) {
	dev := newMem(testSize)
	stamped := sample(f, dev)
	stamped.Cluster = ClusterStamp{UUID: NewUUID(), Incarnation: 7, LogIndex: 9}
	for _, m := range []*Metadata{{}, sample(f, dev), stamped} {
		img, err := Encode(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(img)
		f.Add(img[:headerSize+10])
	}
	f.Add([]byte("SHDWMETA"))
	f.Fuzz(func(t *testing.T, data []byte) {
		check(t, data)
		b := make([]byte, SlotSize)
		copy(b, data)
		copy(b[0:8], magic[:])
		binary.LittleEndian.PutUint32(b[8:], FormatVersion)
		binary.LittleEndian.PutUint32(b[crcOffset:], crc32.Checksum(b[:crcOffset], castagnoli))
		check(t, b)
	})
}

func check(t *testing.T, b []byte) {
	m, err := Decode(b)
	if err != nil {
		if m != nil {
			t.Fatal("Decode returned metadata with an error")
		}
		if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrVersion) {
			t.Fatalf("Decode error is neither corrupt nor version: %v", err)
		}
		return
	}
	img, err := Encode(m)
	if err != nil {
		t.Fatalf("decoded metadata does not encode: %v", err)
	}
	if !bytes.Equal(img, b) {
		t.Fatal("re-encoding differs from the decoded bytes")
	}
	m2, err := Decode(img)
	if err != nil || !reflect.DeepEqual(m, m2) {
		t.Fatalf("re-decoding: %v", err)
	}
}

// TestClusterStamp: a slot with a cluster stamp is version 2 and reads
// back with it; without one it stays version 1 (readable by programs that
// know only that); a version 2 slot without a cluster UUID is corrupt.
func TestClusterStamp(t *testing.T) {
	dev := newMem(testSize)
	m := sample(t, dev)
	m.Cluster = ClusterStamp{UUID: NewUUID(), Incarnation: 0xfeed, LogIndex: 42}
	if err := Write(dev, m); err != nil {
		t.Fatal(err)
	}
	got, _, err := Read(dev)
	if err != nil || got.Version != FormatVersion || got.Cluster != m.Cluster {
		t.Fatalf("read back %+v, %v", got, err)
	}
	if !strings.Contains(Examine(got, nil), "log index 42") {
		t.Fatalf("examine does not show the stamp:\n%s", Examine(got, nil))
	}
	m.Cluster = ClusterStamp{}
	if err := Write(dev, m); err != nil {
		t.Fatal(err)
	}
	if got, _, err = Read(dev); err != nil || got.Version != FormatVersionSingle || !got.Cluster.IsZero() {
		t.Fatalf("read back without a stamp: %+v, %v", got, err)
	}
	img, err := Encode(&Metadata{Cluster: ClusterStamp{UUID: NewUUID()}})
	if err != nil {
		t.Fatal(err)
	}
	// Zero the UUID and fix the checksum: well formed, but not canonical.
	p := headerSize
	for i := range 16 {
		img[p+i] = 0
	}
	binary.LittleEndian.PutUint32(img[crcOffset:], crc32.Checksum(img[:crcOffset], castagnoli))
	if _, err := Decode(img); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("version 2 without a cluster UUID: %v, want ErrCorrupt", err)
	}
}
