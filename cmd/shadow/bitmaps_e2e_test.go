package main

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/shadow-project/shadow/cmd/internal/report"
)

// nbdWriteChunks writes 4 KiB of random data into each of the given
// 64 KiB chunks, at a random place inside it, through NBD (nbdsh), and
// flushes.
func nbdWriteChunks(t *testing.T, uri string, chunks []int) {
	t.Helper()
	var b strings.Builder
	b.WriteString("import os, random\nrandom.seed(7)\n")
	fmt.Fprintf(&b, "for c in %s:\n", strings.ReplaceAll(fmt.Sprint(chunks), " ", ","))
	b.WriteString("    h.pwrite(os.urandom(4096), c*65536 + random.randrange(16)*4096)\n")
	b.WriteString("h.flush()\n")
	mustRun(t, 2*time.Minute, "nbdsh", "-u", uri, "-c", b.String())
}

// spread picks n distinct chunks spread over the volume.
func spread(n, of int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = (i*of/n + i*7) % of
	}
	return out
}

func lastDone(t *testing.T, h *host) report.OpWorkShow {
	t.Helper()
	r := h.show()
	c := r.Sets[0].Completed
	if len(c) == 0 {
		t.Fatalf("no completed op in show --json: %+v", r.Sets[0])
	}
	return c[len(c)-1]
}

// TestE2EMinicopy: dismount a member with minicopy, write 1% of the
// volume through NBD, add it back: the minicopy copies exactly the chunks
// written (show --json), and the members end identical. Then a member
// written outside the set meanwhile is refused a minicopy and gets a full
// copy.
func TestE2EMinicopy(t *testing.T) {
	requireTools(t, "nbdsh")
	const size = 256 << 20
	h, ms := mirrored(t, 2, size)
	h.mustCLI("dismount", "DSA1", "--member", ms[1], "--policy", "minicopy")
	chunks := spread(size/65536/100, size/65536) // 1% of the chunks
	nbdWriteChunks(t, h.uri("DSA1"), chunks)
	r := h.show()
	if len(r.Sets[0].Minicopy) != 1 || r.Sets[0].Minicopy[0].Chunks != uint64(len(chunks)) {
		t.Fatalf("minicopy bitmaps %+v, want one of %d chunks", r.Sets[0].Minicopy, len(chunks))
	}
	out := h.mustCLI("mount", "DSA1", "--member", ms[1], "--policy", "minicopy")
	if !strings.Contains(out, "minicopy operation") {
		t.Fatalf("mount output: %s", out)
	}
	h.waitIdle("DSA1")
	if w := lastDone(t, h); w.Kind != "minicopy" || w.BitmapChunks != uint64(len(chunks)) || w.ChunksDone != uint64(len(chunks)) {
		t.Fatalf("completed %+v, want a minicopy of exactly %d chunks", w, len(chunks))
	}
	sameData(t, size, ms...)

	// Away again; meanwhile a second agent mounts the member alone and
	// writes to it.
	h.mustCLI("dismount", "DSA1", "--member", ms[1], "--policy", "minicopy")
	nbdWriteChunks(t, h.uri("DSA1"), chunks[:3])
	other := newHost(t)
	other.start()
	other.mustCLI("mount", "DSA1", "--member", ms[1])
	nbdWriteChunks(t, other.uri("DSA1"), []int{1, 2})
	other.stop()
	out, err := h.cli("mount", "DSA1", "--member", ms[1], "--policy", "minicopy")
	if err == nil || !strings.Contains(out, "written outside the set") {
		t.Fatalf("strict minicopy of a member written outside the set: %v\n%s", err, out)
	}
	out = h.mustCLI("mount", "DSA1", "--member", ms[1])
	if !strings.Contains(out, "with a copy operation") {
		t.Fatalf("mount output: %s", out)
	}
	h.waitIdle("DSA1")
	if w := lastDone(t, h); w.Kind != "full-copy" {
		t.Fatalf("completed %+v, want a full copy", w)
	}
	sameData(t, size, ms...)
}

// TestE2EHBMMDemandMerge: with an HBMM policy, a demand merge merges
// exactly the chunks written since the bitmap was created, and show
// reports the policy and the modified blocks.
func TestE2EHBMMDemandMerge(t *testing.T) {
	requireTools(t, "nbdsh")
	const size = 64 << 20
	h, ms := mirrored(t, 2, size)
	nbdWriteChunks(t, h.uri("DSA1"), []int{5, 6}) // before HBMM
	h.mustCLI("set", "--policy", "hbmm=(master_list=(*),reset_threshold=1000000)", "--name", "DEFAULT")
	h.mustCLI("set", "DSA1", "--enable", "hbmm")
	chunks := spread(30, size/65536)
	nbdWriteChunks(t, h.uri("DSA1"), chunks)
	out := h.mustCLI("show", "DSA1")
	for _, want := range []string{"Host-Based Minimerge (HBMM)", "HBMM Reset Threshold: 1000000", "HBMM bitmaps are active on local",
		fmt.Sprintf("Modified blocks since bitmap creation: %d", len(chunks)*128)} {
		if !strings.Contains(out, want) {
			t.Fatalf("show lacks %q:\n%s", want, out)
		}
	}
	if out := h.mustCLI("show", "--policy", "hbmm"); !strings.Contains(out, "DEFAULT") {
		t.Fatalf("show --policy hbmm: %s", out)
	}
	h.mustCLI("set", "DSA1", "--demand-merge")
	h.waitIdle("DSA1")
	if w := lastDone(t, h); w.Kind != "minimerge" || w.ChunksDone != uint64(len(chunks)) {
		t.Fatalf("completed %+v, want a minimerge of exactly %d chunks", w, len(chunks))
	}
	if out, err := h.cli("set", "DSA1", "--policy", "hbmm=(count=2)"); err == nil {
		t.Fatalf("bad policy accepted: %s", out)
	}
	sameData(t, size, ms...)
}
