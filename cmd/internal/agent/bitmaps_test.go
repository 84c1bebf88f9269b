package agent

import (
	"bytes"
	"context"
	"errors"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/cmd/internal/device"
	"github.com/shadow-project/shadow/cmd/internal/memberlog"
	"github.com/shadow-project/shadow/cmd/internal/meta"
	"github.com/shadow-project/shadow/cmd/internal/report"
)

// twoMemberSet mounts DSA1 on two fresh members and waits for its copy.
func twoMemberSet(t *testing.T, open func(string, device.Options) (device.Device, error)) (a *Agent, m1, m2 string) {
	t.Helper()
	dir := shortDir(t)
	m1, m2 = filepath.Join(dir, "m1"), filepath.Join(dir, "m2")
	makeMember(t, m1)
	makeMember(t, m2)
	a = startAgent(t, dir, open)
	t.Cleanup(func() { _ = a.Shutdown(context.Background()) })
	if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}}); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, a, "DSA1")
	return a, m1, m2
}

// writeChunks writes random data to n distinct random chunks (some
// writes smaller than a chunk, some crossing nothing) and returns the
// chunk numbers written.
func writeChunks(t *testing.T, a *Agent, n int, rng *rand.Rand) map[uint64]bool {
	t.Helper()
	v := a.sets["DSA1"].vu
	cs := int64(bitmap.DefaultChunkSize)
	chunks := testData / cs
	written := map[uint64]bool{}
	for len(written) < n {
		c := uint64(rng.Int64N(chunks))
		if written[c] {
			continue
		}
		written[c] = true
		// A write inside the chunk, not at its start: the whole chunk
		// must still be tracked.
		buf := make([]byte, 4096*(1+rng.IntN(4)))
		for i := range buf {
			buf[i] = byte(rng.Uint32())
		}
		off := int64(c)*cs + int64(rng.IntN(int(cs)-len(buf)+1))&^511
		if err := v.WriteAt(buf, off, false); err != nil {
			t.Fatal(err)
		}
	}
	return written
}

// sameMembers flushes the set and fails the test with msg if the members'
// data differ.
func sameMembers(t *testing.T, a *Agent, msg string, m1, m2 string) {
	t.Helper()
	if err := a.sets["DSA1"].vu.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dataOf(t, m1), dataOf(t, m2)) {
		t.Fatal(msg)
	}
}

// minicopyBack mounts member back into DSA1, which must bring it back by
// minicopy, waits for the copy and returns what it did.
func minicopyBack(t *testing.T, a *Agent, member string) report.OpWorkShow {
	t.Helper()
	res, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{member}, Policy: "minicopy"})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Minicopies) != 1 {
		t.Fatalf("mount result %+v: want a minicopy", res)
	}
	waitIdle(t, a, "DSA1")
	w := lastCompleted(t, a)
	if w.Kind != "minicopy" {
		t.Fatalf("completed %+v, want a minicopy", w)
	}
	return w
}

func lastCompleted(t *testing.T, a *Agent) report.OpWorkShow {
	t.Helper()
	r, err := a.Show("DSA1")
	if err != nil {
		t.Fatal(err)
	}
	c := r.Sets[0].Completed
	if len(c) == 0 {
		t.Fatal("no completed op recorded")
	}
	return c[len(c)-1]
}

// A member dismounted with minicopy comes back with a copy of exactly the
// chunks written meanwhile, and the members end identical.
func TestMinicopyCopiesExactlyTheChunksWritten(t *testing.T) {
	a, m1, m2 := twoMemberSet(t, nil)
	if err := a.dismountMember("DSA1", m2, "minicopy"); err != nil {
		t.Fatal(err)
	}
	// 1% of the volume's chunks.
	written := writeChunks(t, a, int(testData/bitmap.DefaultChunkSize/100)+1, rand.New(rand.NewPCG(1, 2)))
	r, _ := a.Show("DSA1")
	if len(r.Sets[0].Minicopy) != 1 || r.Sets[0].Minicopy[0].Chunks != uint64(len(written)) {
		t.Fatalf("minicopy bitmaps %+v, want one of %d chunks", r.Sets[0].Minicopy, len(written))
	}
	w := minicopyBack(t, a, m2)
	if w.BitmapChunks != uint64(len(written)) || w.ChunksDone != uint64(len(written)) {
		t.Fatalf("completed %+v, want a minicopy of exactly %d chunks", w, len(written))
	}
	if r, _ := a.Show("DSA1"); len(r.Sets[0].Minicopy) != 0 {
		t.Fatalf("the bitmap outlived its minicopy: %+v", r.Sets[0].Minicopy)
	}
	sameMembers(t, a, "members differ after the minicopy", m1, m2)
}

// A member written outside the set while away is refused a minicopy (and
// with minicopy=optional gets a full copy).
func TestMinicopyRefusedAfterWritesOutsideTheSet(t *testing.T) {
	a, m1, m2 := twoMemberSet(t, nil)
	if err := a.dismountMember("DSA1", m2, "minicopy"); err != nil {
		t.Fatal(err)
	}
	writeChunks(t, a, 3, rand.New(rand.NewPCG(3, 4)))
	// A second agent mounts the departed member alone: a new generation,
	// and a write there.
	dir2 := shortDir(t)
	b := startAgent(t, dir2, nil)
	if _, err := b.Mount(MountArgs{Set: "DSA1", Members: []string{m2}}); err != nil {
		t.Fatal(err)
	}
	if err := b.sets["DSA1"].vu.WriteAt([]byte("outside"), 0, true); err != nil {
		t.Fatal(err)
	}
	if err := b.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	_, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m2}, Policy: "minicopy"})
	if err == nil || !strings.Contains(err.Error(), "written outside the set") {
		t.Fatalf("strict minicopy of a member written outside: %v", err)
	}
	res, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m2}, Policy: "minicopy=optional"})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Minicopies) != 0 || len(res.Warnings) == 0 {
		t.Fatalf("mount result %+v: want a full copy with a warning", res)
	}
	waitIdle(t, a, "DSA1")
	if w := lastCompleted(t, a); w.Kind != "full-copy" {
		t.Fatalf("completed %+v, want a full copy", w)
	}
	sameMembers(t, a, "members differ after the full copy", m1, m2)
}

// A demand merge on an HBMM set merges exactly the chunks written since
// the bitmap was created, or since its last reset.
func TestDemandMergeIsAMinimergeOfTheBitmap(t *testing.T) {
	a, _, _ := twoMemberSet(t, nil)
	writeChunks(t, a, 5, rand.New(rand.NewPCG(5, 6))) // before HBMM: not in the bitmap
	if err := a.setVerb(SetArgs{Set: "DSA1", Policy: "hbmm=(master_list=(A),reset_threshold=100000)", Enable: "hbmm"}); err != nil {
		t.Fatal(err)
	}
	written := writeChunks(t, a, 20, rand.New(rand.NewPCG(7, 8)))
	r, _ := a.Show("DSA1")
	h := r.Sets[0].HBMM
	if h == nil || !h.Enabled || h.ModifiedChunks != 20 || h.ModifiedBlocks != uint64(20*bitmap.DefaultChunkSize/512) || len(h.ActiveOn) != 1 {
		t.Fatalf("hbmm show %+v", h)
	}
	if !strings.Contains(report.FormatShow(r, false), "Modified blocks since bitmap creation: 2560") {
		t.Fatalf("show lacks the modified count:\n%s", report.FormatShow(r, false))
	}
	if err := a.setVerb(SetArgs{Set: "DSA1", DemandMerge: true}); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, a, "DSA1")
	w := lastCompleted(t, a)
	if w.Kind != "minimerge" || w.BitmapChunks != uint64(len(written)) || w.ChunksDone != uint64(len(written)) {
		t.Fatalf("completed %+v, want a minimerge of exactly %d chunks", w, len(written))
	}
	// Past the threshold the bitmap is reset, and show's count drops.
	if err := a.setVerb(SetArgs{Set: "DSA1", Policy: "hbmm=(master_list=(A),reset_threshold=1000)"}); err != nil {
		t.Fatal(err)
	}
	a.maybeReset(a.sets["DSA1"])
	r, _ = a.Show("DSA1")
	if h := r.Sets[0].HBMM; h.ModifiedChunks != 0 || h.Resets != 1 {
		t.Fatalf("after the reset: %+v", h)
	}
	written = writeChunks(t, a, 4, rand.New(rand.NewPCG(9, 10)))
	if err := a.setVerb(SetArgs{Set: "DSA1", DemandMerge: true}); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, a, "DSA1")
	if w := lastCompleted(t, a); w.Kind != "minimerge" || w.ChunksDone != uint64(len(written)) {
		t.Fatalf("completed %+v, want a minimerge of the %d chunks since the reset", w, len(written))
	}
	// Disabled: a demand merge is a full merge again.
	if err := a.setVerb(SetArgs{Set: "DSA1", Disable: "hbmm"}); err != nil {
		t.Fatal(err)
	}
	if err := a.setVerb(SetArgs{Set: "DSA1", DemandMerge: true}); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, a, "DSA1")
	if w := lastCompleted(t, a); w.Kind != "full-merge" {
		t.Fatalf("completed %+v, want a full merge", w)
	}
}

// A member expelled for I/O errors gets an automatic minicopy bitmap,
// covering the failing write and everything since the last flush, and
// comes back by minicopy.
func TestExpelledMemberComesBackByMinicopy(t *testing.T) {
	open, faulty := faultyOpener(false)
	a, m1, m2 := twoMemberSet(t, open)
	v := a.sets["DSA1"].vu
	flushed := writeChunks(t, a, 3, rand.New(rand.NewPCG(11, 12)))
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	unflushed := writeChunks(t, a, 4, rand.New(rand.NewPCG(13, 14)))
	eio := errors.New("injected EIO")
	faulty()[m2].Inject(device.When(func(op device.Op, off, n int64) bool { return op == device.OpWrite && off < testData }, eio, 0))
	failing := int64(testData - bitmap.DefaultChunkSize)
	if err := v.WriteAt([]byte("the failing write"), failing, false); err != nil {
		t.Fatal(err)
	}
	r, _ := a.Show("DSA1")
	if len(r.Sets[0].Minicopy) != 1 || !r.Sets[0].Minicopy[0].Automatic {
		t.Fatalf("minicopy bitmaps after the expel: %+v", r.Sets[0].Minicopy)
	}
	after := writeChunks(t, a, 2, rand.New(rand.NewPCG(15, 16)))
	// Exactly: the unflushed chunks, the failing write's, and every
	// chunk written after; none of the flushed ones (unless written again).
	want := map[uint64]bool{uint64(failing / bitmap.DefaultChunkSize): true}
	for _, set := range []map[uint64]bool{unflushed, after} {
		for c := range set {
			want[c] = true
		}
	}
	mc := a.sets["DSA1"].bm.minicopyFor(m2)
	got := map[uint64]bool{}
	for c := range mc.bm.Chunks() {
		got[c] = true
	}
	if !maps.Equal(got, want) {
		t.Fatalf("automatic bitmap %v, want %v (flushed before: %v)", got, want, flushed)
	}
	// The fault is repaired; the member comes back.
	faulty()[m2].Inject(nil)
	if w := minicopyBack(t, a, m2); w.ChunksDone != mc.bm.Count() {
		t.Fatalf("completed %+v, want a minicopy of %d chunks", w, mc.bm.Count())
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dataOf(t, m1), dataOf(t, m2)) {
		t.Fatal("members differ after the minicopy")
	}
}

func TestPolicyVerbs(t *testing.T) {
	a, _, _ := twoMemberSet(t, nil)
	bad := []SetArgs{
		{Set: "DSA1", Enable: "hbmm"}, // no policy, no DEFAULT
		{Set: "DSA1", Policy: "hbmm=NOSUCH"},
		{Name: "X"}, // a name without a policy
		{Set: "DSA1", Policy: "hbmm=(count=2)"},
		{Set: "DSA1", Policy: "hbmm=(master_list=(A)", Enable: "hbmm"},
		{Set: "DSA1", Enable: "minicopy"},
		{Name: "NODEFAULT", Policy: "hbmm=(master_list=*)"},
		{Set: "DSA1", Policy: "hbmm=(master_list=(A))", DemandMerge: true},
	}
	for _, args := range bad {
		if err := a.setVerb(args); err == nil {
			t.Errorf("%+v accepted", args)
		}
	}
	if r, _ := a.Show("DSA1"); r.Sets[0].HBMM != nil {
		t.Fatalf("refused commands changed the set: %+v", r.Sets[0].HBMM)
	}
	if err := a.setVerb(SetArgs{Name: "default", Policy: "hbmm=(master_list=*, reset_threshold=500000)"}); err != nil {
		t.Fatal(err)
	}
	if err := a.setVerb(SetArgs{Set: "DSA1", Enable: "hbmm"}); err != nil {
		t.Fatal(err)
	}
	r, _ := a.Show("DSA1")
	if h := r.Sets[0].HBMM; h == nil || !h.Enabled || h.Policy != "DEFAULT" || h.ResetThreshold != 500000 || len(h.ActiveOn) != 1 {
		t.Fatalf("DEFAULT applied: %+v", h)
	}
	if ps := a.Policies(); len(ps) != 1 || ps[0].Name != "DEFAULT" {
		t.Fatalf("policies %+v", ps)
	}
	// NODEFAULT turns HBMM off for the set.
	if err := a.setVerb(SetArgs{Set: "DSA1", Policy: "hbmm=NODEFAULT"}); err != nil {
		t.Fatal(err)
	}
	if r, _ := a.Show("DSA1"); r.Sets[0].HBMM.Enabled {
		t.Fatal("NODEFAULT left HBMM on")
	}
	if err := a.setVerb(SetArgs{Set: "DSA1", Enable: "hbmm"}); err == nil {
		t.Fatal("enable with NODEFAULT accepted")
	}
	// A policy whose master list excludes this host: enabled, no bitmap.
	if err := a.setVerb(SetArgs{Set: "DSA1", Policy: "hbmm=(master_list=(B,C),count=1)", Enable: "hbmm"}); err != nil {
		t.Fatal(err)
	}
	if r, _ := a.Show("DSA1"); !r.Sets[0].HBMM.Enabled || len(r.Sets[0].HBMM.ActiveOn) != 0 {
		t.Fatalf("foreign master list: %+v", r.Sets[0].HBMM)
	}
}

// A torn or unreadable write log costs a full merge, never a refusal.
func TestTornWriteLogCostsAFullMerge(t *testing.T) {
	dir := shortDir(t)
	m1, m2 := filepath.Join(dir, "m1"), filepath.Join(dir, "m2")
	makeMember(t, m1)
	makeMember(t, m2)
	a := startAgent(t, dir, nil)
	if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}, WriteLog: true}); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, a, "DSA1")
	if err := a.sets["DSA1"].vu.WriteAt([]byte("logged"), 8192, false); err != nil {
		t.Fatal(err)
	}
	a.kill()
	// Tear the first bitmap block of m2's log.
	_, area, err := meta.Layout(testData + meta.ReservedSize)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(m2, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xa5}, 512), area.LogOffset+4096+100); err != nil {
		t.Fatal(err)
	}
	f.Close()
	a = startAgent(t, dir, nil)
	defer a.Shutdown(context.Background())
	res, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}})
	if err != nil {
		t.Fatalf("mount with a torn log: %v", err)
	}
	if res.Merge != "full-merge" || !slices.ContainsFunc(res.Warnings, func(w string) bool { return strings.Contains(w, "write log unusable") }) {
		t.Fatalf("mount with a torn log: %+v, want a full merge with a warning", res)
	}
	waitIdle(t, a, "DSA1")
	if !bytes.Equal(dataOf(t, m1), dataOf(t, m2)) {
		t.Fatal("members differ after the full merge")
	}
}

// Direct I/O is a per-member option.
func TestDirectIsPerMember(t *testing.T) {
	dir := shortDir(t)
	m1, m2 := filepath.Join(dir, "m1"), filepath.Join(dir, "m2")
	makeMember(t, m1)
	makeMember(t, m2)
	got := map[string]bool{}
	open := func(p string, o device.Options) (device.Device, error) {
		got[p] = o.Direct
		return device.Open(p, o)
	}
	a := startAgent(t, dir, open)
	defer a.Shutdown(context.Background())
	if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}, DirectMembers: []string{m2}}); err != nil {
		t.Fatal(err)
	}
	if got[m1] || !got[m2] {
		t.Fatalf("O_DIRECT by member: %v, want only %s", got, m2)
	}
	waitIdle(t, a, "DSA1")
	if err := a.sets["DSA1"].vu.WriteAt([]byte("unaligned write"), 4099, true); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dataOf(t, m1), dataOf(t, m2)) {
		t.Fatal("members differ")
	}
}

// A minimerge's read consistency covers exactly its bitmap's chunks that
// the merge has not reached.
func TestBitmapFencePending(t *testing.T) {
	bm, _ := bitmap.New(64 << 10)
	bm.Add(3)
	bm.Add(10)
	f := &bitmapFence{bm: bm}
	cases := []struct {
		off, n int64
		want   bool
	}{
		{0, 4096, false},           // chunk 0: not in the bitmap
		{3 << 16, 4096, true},      // chunk 3
		{3<<16 - 512, 1024, true},  // crosses into chunk 3
		{4 << 16, 6 << 16, false},  // chunks 4–9
		{9 << 16, 2 << 16, true},   // chunks 9–10
		{11 << 16, 1 << 20, false}, // beyond
		{3 << 16, 0, false},        // empty
	}
	for _, c := range cases {
		if got := f.Pending(c.off, c.n); got != c.want {
			t.Errorf("Pending(%d, %d) = %v before the merge, want %v", c.off, c.n, got, c.want)
		}
	}
	f.advance(4 << 16) // chunk 3 merged
	if f.Pending(3<<16, 4096) || !f.Pending(10<<16, 4096) {
		t.Error("after the fence passed chunk 3: chunk 3 must be settled, chunk 10 still owed")
	}
}

// TestLoggedDeviceQuickWrites: a member with a write log takes a write
// from memory only once the write's extent is durable in the log; before
// that it declines without writing anything, so the reader hands the
// write to a worker, which waits for the log.
func TestLoggedDeviceQuickWrites(t *testing.T) {
	p := filepath.Join(t.TempDir(), "m1")
	makeMember(t, p)
	dev, err := device.Open(p, device.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ld, err := memberlog.Attach(dev, testData, false, &memberlog.State{})
	if err != nil {
		t.Fatal(err)
	}
	defer ld.Close()
	data := bytes.Repeat([]byte{7}, 4096)
	if ok, err := ld.TryWriteAt(data, 8192); ok || err != nil {
		t.Fatalf("TryWriteAt to an extent not yet logged = %v, %v; want a decline", ok, err)
	}
	got := make([]byte, 4096)
	if _, err := ld.ReadAt(got, 8192); err != nil || bytes.Equal(got, data) {
		t.Fatalf("a declined TryWriteAt wrote data (err %v)", err)
	}
	if _, err := ld.WriteAt(data, 0); err != nil { // logs the extent
		t.Fatal(err)
	}
	if ok, err := ld.TryWriteAt(data, 8192); !ok || err != nil {
		t.Fatalf("TryWriteAt to a logged extent = %v, %v", ok, err)
	}
	if !ld.TryReadAt(got, 8192) || !bytes.Equal(got, data) {
		t.Fatal("TryReadAt after the quick write")
	}
	if s := ld.Log().Stats(); s.Set != 1 || s.Misses != 1 {
		t.Fatalf("log stats %+v: the quick write should have found its extent set", s)
	}
}
