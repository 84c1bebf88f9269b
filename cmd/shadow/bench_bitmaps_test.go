package main

// The bitmap side of `make bench` (issue 4): the cost of HBMM and of
// write logs on 4 KiB random writes over a 4 GiB volume, and the time of
// a minimerge and a minicopy of 1% of the chunks against a full merge and
// a full copy of the same set. Same rules as TestPerformanceComparison:
// alternating A B A B five times, medians, ratios only, nothing asserted.

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const (
	bitmapBenchSize = 4 << 30
	bitmapChunk     = 64 << 10
)

// randomChunks picks n distinct chunks of a volume.
func randomChunks(n, of int, seed uint64) []int {
	rng := rand.New(rand.NewPCG(seed, 1))
	seen := map[int]bool{}
	var out []int
	for len(out) < n {
		c := rng.IntN(of)
		if !seen[c] {
			seen[c] = true
			out = append(out, c)
		}
	}
	slices.Sort(out)
	return out
}

// elapsedOf waits for the set to become idle and returns the engine time
// of the op it last completed (recovery delays excluded).
func elapsedOf(t *testing.T, h *host, set, kind string) float64 {
	t.Helper()
	h.waitIdle(set)
	for _, s := range h.show().Sets {
		if s.Name != set || len(s.Completed) == 0 {
			continue
		}
		w := s.Completed[len(s.Completed)-1]
		if w.Kind != kind {
			t.Fatalf("%s: last op %s, want %s", set, w.Kind, kind)
		}
		return float64(max(w.ElapsedMS, 1))
	}
	t.Fatalf("%s: no completed op", set)
	return 0
}

func TestPerformanceBitmaps(t *testing.T) {
	if os.Getenv("SHADOW_BENCH") != "1" {
		t.Skip("set SHADOW_BENCH=1 (make bench)")
	}
	requireTools(t, "fio", "nbdsh", "dd")
	h := newHost(t)
	d := h.dir
	for _, n := range []string{"m1", "m2", "w1", "w2"} {
		filled(t, filepath.Join(d, n), bitmapBenchSize+1<<20)
	}
	h.start("--min-rate", "0", "--clean-after", "1h")
	h.mustCLI("mount", "DSA1", "--member", filepath.Join(d, "m1"), "--member", filepath.Join(d, "m2"), "--confirm")
	h.mustCLI("mount", "DSA2", "--member", filepath.Join(d, "w1"), "--member", filepath.Join(d, "w2"), "--confirm", "--write-log")
	h.waitIdle("DSA1")
	h.waitIdle("DSA2")
	h.mustCLI("set", "DSA1", "--policy", "hbmm=(master_list=(*))")

	fio := func(set string) float64 {
		return fioIOPSSized(t, h.uri(set), "4g")
	}
	var off, on, plain, logged []float64
	for range benchRounds {
		h.mustCLI("set", "DSA1", "--disable", "hbmm")
		off = append(off, fio("DSA1"))
		h.mustCLI("set", "DSA1", "--enable", "hbmm")
		on = append(on, fio("DSA1"))
	}
	h.mustCLI("set", "DSA1", "--disable", "hbmm")
	for range benchRounds {
		plain = append(plain, fio("DSA1"))
		logged = append(logged, fio("DSA2"))
	}

	// Minimerge of 1% of the chunks against a full merge of the set.
	all := bitmapBenchSize / bitmapChunk
	var mini, full []float64
	for i := range benchRounds {
		h.mustCLI("set", "DSA1", "--enable", "hbmm") // a fresh bitmap
		nbdWriteChunks(t, h.uri("DSA1"), randomChunks(all/100, all, uint64(i)))
		settle(t)
		h.mustCLI("set", "DSA1", "--demand-merge")
		mini = append(mini, elapsedOf(t, h, "DSA1", "minimerge"))
		h.mustCLI("set", "DSA1", "--disable", "hbmm")
		settle(t)
		h.mustCLI("set", "DSA1", "--demand-merge")
		full = append(full, elapsedOf(t, h, "DSA1", "full-merge"))
	}

	// Minicopy of 1% against a full copy of the same member.
	m2 := filepath.Join(d, "m2")
	var minicopy, fullcopy []float64
	for i := range benchRounds {
		h.mustCLI("dismount", "DSA1", "--member", m2, "--policy", "minicopy")
		nbdWriteChunks(t, h.uri("DSA1"), randomChunks(all/100, all, uint64(100+i)))
		settle(t)
		h.mustCLI("mount", "DSA1", "--member", m2, "--policy", "minicopy")
		minicopy = append(minicopy, elapsedOf(t, h, "DSA1", "minicopy"))
		h.mustCLI("dismount", "DSA1", "--member", m2)
		settle(t)
		h.mustCLI("mount", "DSA1", "--member", m2)
		fullcopy = append(fullcopy, elapsedOf(t, h, "DSA1", "full-copy"))
	}

	var b strings.Builder
	fmt.Fprintf(&b, "| measure | A (median) | B (median) | A/B |\n|---|---|---|---|\n")
	fmt.Fprintf(&b, "| 4 KiB random writes (IOPS): HBMM on / off | %.0f | %.0f | %.2f× |\n", median(on), median(off), median(on)/median(off))
	fmt.Fprintf(&b, "| 4 KiB random writes (IOPS): write logs on / off | %.0f | %.0f | %.2f× |\n", median(logged), median(plain), median(logged)/median(plain))
	fmt.Fprintf(&b, "| merge time (ms): minimerge of 1%% / full merge | %.0f | %.0f | %.1f%% |\n", median(mini), median(full), 100*median(mini)/median(full))
	fmt.Fprintf(&b, "| copy time (ms): minicopy of 1%% / full copy | %.0f | %.0f | %.1f%% |\n", median(minicopy), median(fullcopy), 100*median(minicopy)/median(fullcopy))
	t.Logf("samples: hbmm on %v off %v; logs on %v off %v; minimerge %v full %v; minicopy %v full %v", on, off, logged, plain, mini, full, minicopy, fullcopy)
	fmt.Println(b.String())
	appendBenchOut(t, b.String())
}
