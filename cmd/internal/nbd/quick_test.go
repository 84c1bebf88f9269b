package nbd

import (
	"bytes"
	"testing"
)

// TestQuickPathAroundAHeldRequest: the reader serves reads and writes
// itself while a request it handed to a worker is held in the backend;
// their replies, batched, reach the client before the held one completes.
func TestQuickPathAroundAHeldRequest(t *testing.T) {
	b := newMemBackend(testExportSize)
	b.Fill(0, pattern(testExportSize, 5))
	release := newGate()
	b.writeGate = release.holdOffsetZero
	b.quickDecline = func(op string, off int64) bool { return off == 0 }
	ts := startTestServer(t, testOptions(t), Export{Name: "DSA1", Backend: b})
	release.openOnCleanup(t)
	c, _ := ts.goClient(t, "DSA1")

	check(t, c.sendRequest(0, cmdWrite, 0, 0, 4096, pattern(4096, 9)))
	release.waitHeld(t, 1)
	const n = 64
	want := map[uint64][]byte{}
	for i := uint64(1); i <= n; i++ {
		off := i * 8192
		if i%2 == 0 {
			check(t, c.sendRequest(0, cmdWrite, i, off, 4096, pattern(4096, byte(i))))
			want[i] = nil
		} else {
			check(t, c.sendRequest(0, cmdRead, i, off, 4096, nil))
			want[i] = pattern(testExportSize, 5)[off : off+4096]
		}
	}
	expectReplies(t, c, want)
	if got := b.quickReads.Load() + b.quickWrites.Load(); got != n {
		t.Fatalf("%d requests took the quick path, want %d", got, n)
	}
	release.open()
	if r := must(c.readReply())(t); r.Cookie != 0 || r.Error != 0 {
		t.Fatalf("held write: %+v", r)
	}
	data := b.Bytes()
	if !bytes.Equal(data[:4096], pattern(4096, 9)) {
		t.Fatal("held write not applied")
	}
	for i := 2; i <= n; i += 2 {
		if !bytes.Equal(data[i*8192:i*8192+4096], pattern(4096, byte(i))) {
			t.Fatalf("quick write %d not applied", i)
		}
	}
}

// TestQuickPathLimits: FUA writes, requests larger than quickMax and a
// backend that declines all go to workers, with the same results.
func TestQuickPathLimits(t *testing.T) {
	for _, declineAll := range []bool{false, true} {
		b := newMemBackend(testExportSize)
		b.noQuick = declineAll
		ts := startTestServer(t, testOptions(t), Export{Name: "DSA1", Backend: b})
		c, _ := ts.goClient(t, "DSA1")
		big := pattern(quickMax*2, 1)
		expectReply(c.do(cmdFlagFUA, cmdWrite, 0, 4096, pattern(4096, 2)))(t, "FUA write", 0)
		expectReply(c.do(0, cmdWrite, 8192, uint32(len(big)), big))(t, "large write", 0)
		r := expectReply(c.do(0, cmdRead, 8192, uint32(len(big)), nil))(t, "large read", 0)
		if !bytes.Equal(r.Data, big) {
			t.Fatal("large read returned other data")
		}
		if w, r := b.quickWrites.Load(), b.quickReads.Load(); w != 0 || r != 0 {
			t.Fatalf("quick path took %d writes and %d reads, want none", w, r)
		}
		expectReply(c.do(0, cmdWrite, 4096, 4096, pattern(4096, 3)))(t, "small write", 0)
		r = expectReply(c.do(0, cmdRead, 0, 8192, nil))(t, "small read", 0)
		if !bytes.Equal(r.Data, append(pattern(4096, 2), pattern(4096, 3)...)) {
			t.Fatal("small read returned other data")
		}
		quick := b.quickWrites.Load() + b.quickReads.Load()
		if declineAll && quick != 0 || !declineAll && quick != 2 {
			t.Fatalf("declining %v: %d quick requests", declineAll, quick)
		}
	}
}
