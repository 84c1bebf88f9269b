package main

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestClusterE2EMinicopyAcrossHosts: hosts A, B, C mount DSA1 with three
// members. The holder H (a random host) removes the third member with a
// minicopy policy; H and a second host W write through their exports
// (every write completes, and W fills a region it then keeps writing
// through what follows); the member returns on the third host R with
// --policy minicopy (required). The minicopy runs on H and copies exactly
// the distinct chunks H and W wrote, and the members end identical. A second round removes it again the
// same way, writes, returns it on R while H keeps writing (so H's engine
// runs at its min rate), and SIGKILLs H mid-minicopy: the op continues as
// a full copy on a survivor. The members end identical both times. Last,
// one survivor expels a member: the other's writes go on, every host's
// chunks not yet flushed reach the automatic minicopy bitmap, and the
// member comes back by minicopy.
func TestClusterE2EMinicopyAcrossHosts(t *testing.T) {
	requireTools(t, "fio")
	const size = 64 << 20
	delay := 3 * time.Second
	for round := range repeats(t) {
		t.Run(fmt.Sprintf("round%d", round), func(t *testing.T) {
			c := newCluster(t, delay, []string{"A", "B", "C"})
			ms := c.members(3, size)
			order := rand.Perm(3)
			h, w, r := c.nodes[order[0]], c.nodes[order[1]], c.nodes[order[2]]
			c.mountEverywhere(c.nodes[0], "DSA1", ms, nil)
			away := ms[2]

			// Round 1: an exact minicopy of both writers' chunks.
			h.mustCLI("dismount", "DSA1", "--member", away, "--policy", "minicopy")
			writes := &hbmmWrites{sent: map[int64]bool{}, acked: map[int64]bool{}}
			var never atomic.Bool
			hc, wc := dialFence(t, h, "DSA1"), dialFence(t, w, "DSA1")
			// Overlapping spans: chunks both wrote count once.
			writes.write(hc, 0, 40<<20, 50+rand.IntN(300), 4, &never)
			writes.write(wc, 24<<20, 24<<20, 50+rand.IntN(300), 4, &never)
			if writes.errs != 0 || len(writes.sent) != len(writes.acked) {
				t.Fatalf("%d writes failed while the member was away", writes.errs)
			}
			// W also writes all of [48m, 64m) once, then keeps writing
			// there through the member's return and its minicopy: those
			// writes reach the member or its bitmap, never neither, and
			// count no chunk twice.
			mustRun(t, time.Minute, "fio", fioArgs("wfill", w.uri("DSA1"), "48m", "16m", "--rw=write", "--bs=64k")...)
			for ch := int64(48<<20) / hbmmChunk; ch < size/hbmmChunk; ch++ {
				writes.acked[ch] = true
			}
			wload := background(t, "fio", fioArgs("wload", w.uri("DSA1"), "48m", "16m", "--time_based", "--runtime=60")...)
			defer endGroup(wload)
			time.Sleep(time.Duration(rand.IntN(500)) * time.Millisecond)
			before := completedKinds(t, h, "DSA1")
			out := r.mustCLI("mount", "DSA1", "--member", away, "--policy", "minicopy")
			if !strings.Contains(out, "minicopy") {
				t.Fatalf("%s's mount of the returning member does not report a minicopy:\n%s", r.name, out)
			}
			var got uint64
			waitFor(t, time.Minute, "the minicopy completed on the holder "+h.name, func() (bool, string) {
				rep, err := h.tryShow()
				if err != nil {
					return false, err.Error()
				}
				s, _ := setOf(rep, "DSA1")
				for _, wk := range s.Completed {
					if _, old := before[wk.ID]; !old && wk.Kind == "minicopy" {
						got = wk.BitmapChunks
						return true, ""
					}
				}
				return false, fmt.Sprintf("ops %+v completed %+v", s.Ops, s.Completed)
			})
			t.Logf("round %d: removed on %s, written through %s and %s (%d distinct chunks), returned on %s: the minicopy copied %d chunks",
				round, h.name, h.name, w.name, len(writes.acked), r.name, got)
			if int(got) != len(writes.acked) {
				t.Errorf("the minicopy copied %d chunks; %s and %s wrote exactly %d distinct chunks while the member was away", got, h.name, w.name, len(writes.acked))
			}
			endGroup(wload)
			c.waitIdleEverywhere("DSA1", 2*time.Minute)
			sameData(t, size, ms...) // (no write in flight: files compare)

			// Round 2: the holder dies during the minicopy.
			h.mustCLI("dismount", "DSA1", "--member", away, "--policy", "minicopy")
			writes = &hbmmWrites{sent: map[int64]bool{}, acked: map[int64]bool{}}
			writes.write(hc, 0, size, 600, 8, &never)
			writes.write(wc, 0, size, 600, 8, &never)
			hload := background(t, "fio", fioArgs("hload", h.uri("DSA1"), "0", "8m", "--time_based", "--runtime=60")...)
			defer endGroup(hload)
			time.Sleep(300 * time.Millisecond)
			before = completedKinds(t, w, "DSA1")
			r.mustCLI("mount", "DSA1", "--member", away, "--policy", "minicopy")
			time.Sleep(time.Duration(200+rand.IntN(600)) * time.Millisecond)
			h.crash()
			endGroup(hload)
			var kind string
			waitFor(t, delay+time.Minute, "the copy of the returning member completed on a survivor", func() (bool, string) {
				var seen []string
				for _, nd := range []*cnode{w, r} {
					rep, err := nd.tryShow()
					if err != nil {
						return false, err.Error()
					}
					s, _ := setOf(rep, "DSA1")
					for _, wk := range s.Completed {
						if _, old := before[wk.ID]; !old && strings.HasSuffix(wk.Kind, "copy") {
							kind = wk.Kind
							return true, ""
						}
					}
					seen = append(seen, fmt.Sprintf("%s: ops %+v", nd.name, s.Ops))
				}
				return false, strings.Join(seen, "; ")
			})
			if kind != "full-copy" {
				t.Errorf("after the holder %s of the minicopy bitmap died mid-minicopy, the member's copy completed as a %s, want a full copy", h.name, kind)
			}
			c.waitIdleEverywhere("DSA1", 2*time.Minute)

			// An expulsion on one host: both hosts wrote just before (their
			// chunks not yet flushed go to the expelling host's automatic
			// minicopy bitmap), the other host's writes go on without
			// error, and the member comes back by minicopy: at least every
			// chunk written after the expulsion.
			gone := ms[rand.IntN(3)]
			pre := &hbmmWrites{sent: map[int64]bool{}, acked: map[int64]bool{}}
			pre.write(dialFence(t, w, "DSA1"), 0, size, 50, 4, &never)
			pre.write(dialFence(t, r, "DSA1"), 0, size, 50, 4, &never)
			w.mustCLI("set", "DSA1", "--force-removal", gone)
			writes = &hbmmWrites{sent: map[int64]bool{}, acked: map[int64]bool{}}
			writes.write(dialFence(t, r, "DSA1"), 0, size, 200, 4, &never)
			if writes.errs != 0 {
				t.Fatalf("%d of %s's writes failed after %s expelled %s", writes.errs, r.name, w.name, gone)
			}
			before = completedKinds(t, w, "DSA1")
			waitFor(t, 40*time.Second, w.name+"'s automatic minicopy bitmap has every host's chunks not yet flushed", func() (bool, string) {
				rep, err := w.tryShow()
				if err != nil {
					return false, err.Error()
				}
				s, _ := setOf(rep, "DSA1")
				for _, m := range s.Minicopy {
					if m.Member == gone {
						return m.Automatic && len(m.Gathering) == 0, fmt.Sprintf("%+v", m)
					}
				}
				return false, fmt.Sprintf("no minicopy bitmap of %s: %+v", gone, s.Minicopy)
			})
			out = r.mustCLI("mount", "DSA1", "--member", gone, "--policy", "minicopy")
			if strings.Contains(out, "full copy") {
				t.Errorf("the expelled member came back on %s by full copy:\n%s", r.name, out)
			}
			var auto uint64
			waitFor(t, time.Minute, "the expelled member's minicopy completed on "+w.name, func() (bool, string) {
				rep, err := w.tryShow()
				if err != nil {
					return false, err.Error()
				}
				s, _ := setOf(rep, "DSA1")
				for _, wk := range s.Completed {
					if _, old := before[wk.ID]; !old && strings.HasSuffix(wk.Kind, "copy") {
						auto = wk.BitmapChunks
						return wk.Kind == "minicopy", "completed as a " + wk.Kind
					}
				}
				return false, fmt.Sprintf("ops %+v", s.Ops)
			})
			covered := 0
			for ch := range pre.acked {
				if !writes.acked[ch] {
					covered++
				}
			}
			t.Logf("round %d: %s expelled %s; %s wrote %d chunks after; the minicopy copied %d chunks (those plus at most %d written just before, not yet flushed)",
				round, w.name, gone, r.name, len(writes.acked), auto, covered)
			if int(auto) < len(writes.acked) {
				t.Errorf("the expelled member's minicopy copied %d chunks; %s wrote %d distinct chunks after the expulsion", auto, r.name, len(writes.acked))
			}
			c.waitIdleEverywhere("DSA1", 2*time.Minute)
			w.mustCLI("dismount", "DSA1")
			r.mustCLI("dismount", "DSA1")
			sameData(t, size, ms...)
		})
	}
}
