package main

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shadow-project/shadow/cmd/internal/nbd/nbdtest"
	"github.com/shadow-project/shadow/cmd/internal/report"
)

// hbmmChunk is the sets' chunk size (the default): one bit per 64 KiB.
const hbmmChunk = 64 << 10

// hbmmPolicy makes masters the masters of set (write policy all) and
// waits until every host sees them covering every writer.
func hbmmPolicy(t *testing.T, c *testCluster, on *cnode, set string, masters ...string) {
	t.Helper()
	hbmmPolicyText(t, c, on, set, "hbmm=(master_list=("+strings.Join(masters, ",")+"),write_policy=all)", masters...)
}

// hbmmPolicyText sets the policy text on set through on, then waits until
// every live host sees masters as the set's masters, covering every
// writer (the handshakes done).
func hbmmPolicyText(t *testing.T, c *testCluster, on *cnode, set, policy string, masters ...string) {
	t.Helper()
	on.mustCLI("set", set, "--policy", policy, "--enable", "hbmm")
	for _, nd := range c.live() {
		waitFor(t, 20*time.Second, fmt.Sprintf("%s's view of %s: masters %v, no handshake pending", nd.name, set, masters), func() (bool, string) {
			r, err := nd.tryShow()
			if err != nil {
				return false, err.Error()
			}
			s, ok := setOf(r, set)
			if !ok && r.Cluster != nil && slices.ContainsFunc(r.Cluster.Hosts, func(h report.HostShow) bool { return h.Host == nd.name && h.Witness }) {
				return true, "" // a witness mounts nothing
			}
			if !ok || s.HBMM == nil {
				return false, "no hbmm section"
			}
			return slices.Equal(s.HBMM.ActiveOn, masters) && len(s.HBMM.Gaps) == 0, fmt.Sprintf("masters %v, gaps %v", s.HBMM.ActiveOn, s.HBMM.Gaps)
		})
	}
}

// hbmmWrites is what a writer sent and had acknowledged, by chunk.
type hbmmWrites struct {
	// pace: each writer sleeps this long after each write (0: none).
	pace  time.Duration
	mu    sync.Mutex
	sent  map[int64]bool
	acked map[int64]bool
	errs  int
}

// write sends n random 4 KiB writes in [from, from+span) through cl,
// depth at a time, until n are done or stop is set.
func (w *hbmmWrites) write(cl *nbdtest.Client, from, span int64, n, depth int, stop *atomic.Bool) {
	var wg sync.WaitGroup
	var next atomic.Int64
	for range depth {
		wg.Go(func() {
			buf := make([]byte, 4096)
			for next.Add(1) <= int64(n) && !stop.Load() {
				off := from + rand.Int64N(span/4096)*4096
				for i := range buf {
					buf[i] = byte(rand.Uint32())
				}
				w.mu.Lock()
				w.sent[off/hbmmChunk] = true
				w.mu.Unlock()
				err := cl.WriteAt(buf, off, 0)
				w.mu.Lock()
				if err == nil {
					w.acked[off/hbmmChunk] = true
				} else {
					w.errs++
				}
				w.mu.Unlock()
				time.Sleep(w.pace)
			}
		})
	}
	wg.Wait()
}

// hbmmMinimerge waits for a minimerge to complete on a survivor and
// returns its counters (from show --json's completed work).
func hbmmMinimerge(t *testing.T, survivors []*cnode, set string, within time.Duration) (report.OpWorkShow, string) {
	t.Helper()
	var got report.OpWorkShow
	var on string
	waitFor(t, within, "a minimerge completed on a survivor", func() (bool, string) {
		var seen []string
		for _, nd := range survivors {
			r, err := nd.tryShow()
			if err != nil {
				seen = append(seen, nd.name+": "+err.Error())
				continue
			}
			s, _ := setOf(r, set)
			for _, w := range s.Completed {
				if w.Kind == "minimerge" {
					got, on = w, nd.name
					return true, ""
				}
			}
			for _, op := range s.Ops {
				seen = append(seen, fmt.Sprintf("%s: op%d %s %s on %s", nd.name, op.ID, op.Kind, op.State, op.Host))
			}
		}
		return false, strings.Join(seen, "; ")
	})
	return got, on
}

// TestClusterE2EHBMMWriterKilled: hosts A, B, C mount DSA1 with HBMM
// masters on A and B, write policy all. B and C write to disjoint
// ranges; the victim V, C (a writer only) in rounds 0, 1 mod 4 and B (a
// writer and a master) in rounds 2, 3, is SIGKILLed. The minimerge a
// survivor runs covers exactly V's chunks: in even rounds V's writes have
// all completed before the kill, so the merged chunk count equals the
// distinct chunks V wrote; in odd rounds V is killed mid-stream, so the
// count lies between the chunks of V's acknowledged writes and those of
// every write it sent. The other writer's chunks (fio, elsewhere) are
// never merged. The members end identical.
func TestClusterE2EHBMMWriterKilled(t *testing.T) {
	requireTools(t, "fio")
	const size = 64 << 20
	delay := 3 * time.Second
	for round := range repeats(t) {
		t.Run(fmt.Sprintf("round%d", round), func(t *testing.T) {
			c := newCluster(t, delay, []string{"A", "B", "C"})
			ms := c.members(3, size)
			a, other, victim := c.node("A"), c.node("B"), c.node("C")
			if round%4 >= 2 {
				other, victim = victim, other
			}
			c.mountEverywhere(a, "DSA1", ms, nil)
			hbmmPolicy(t, c, c.nodes[rand.IntN(3)], "DSA1", "A", "B")
			// The other writer writes its own range (chunks never V's)
			// through the kill.
			bfio := background(t, "fio", fioArgs("bload", other.uri("DSA1"), "32m", "16m", "--time_based", "--runtime=30")...)
			defer endGroup(bfio)
			cl := dialFence(t, victim, "DSA1")
			w := &hbmmWrites{sent: map[int64]bool{}, acked: map[int64]bool{}}
			var stop atomic.Bool
			complete := round%2 == 0
			n := 100 + rand.IntN(400)
			if complete {
				w.write(cl, 0, 32<<20, n, 4, &stop)
				time.Sleep(time.Duration(rand.IntN(500)) * time.Millisecond)
			} else {
				done := make(chan struct{})
				go func() {
					w.write(cl, 0, 32<<20, 1<<30, 4, &stop)
					close(done)
				}()
				time.Sleep(time.Duration(300+rand.IntN(1200)) * time.Millisecond)
				defer func() { stop.Store(true); <-done }()
			}
			// No new write after this point: those in flight at the kill
			// are the only ones sent and not acknowledged.
			stop.Store(true)
			killedAt := victim.crash()
			w.mu.Lock()
			sent, acked := len(w.sent), len(w.acked)
			w.mu.Unlock()
			work, on := hbmmMinimerge(t, []*cnode{a, other}, "DSA1", delay+time.Minute)
			t.Logf("round %d: %s sent writes to %d chunks, %d acknowledged (complete: %v); minimerge on %s merged %d chunks, %s after the kill",
				round, victim.name, sent, acked, complete, on, work.BitmapChunks, time.Since(killedAt).Round(time.Millisecond))
			if complete && (int(work.BitmapChunks) != acked || sent != acked) {
				t.Errorf("minimerge covered %d chunks; %s wrote exactly %d distinct chunks, all completed before the kill", work.BitmapChunks, victim.name, acked)
			}
			if !complete && (int(work.BitmapChunks) < acked || int(work.BitmapChunks) > sent) {
				t.Errorf("minimerge covered %d chunks; want between %s's acknowledged chunks (%d) and every chunk it sent to (%d)", work.BitmapChunks, victim.name, acked, sent)
			}
			if work.ChunksDone != work.BitmapChunks {
				t.Errorf("minimerge moved %d of its %d chunks", work.ChunksDone, work.BitmapChunks)
			}
			endGroup(bfio)
			c.waitIdleEverywhere("DSA1", 2*time.Minute)
			a.mustCLI("dismount", "DSA1")
			other.mustCLI("dismount", "DSA1")
			sameData(t, size, ms...)
		})
	}
}

// completedKinds lists the kinds of the ops nd's show reports completed on
// set, by op ID.
func completedKinds(t *testing.T, nd *cnode, set string) map[uint64]string {
	t.Helper()
	r, err := nd.tryShow()
	if err != nil {
		return nil
	}
	s, _ := setOf(r, set)
	kinds := map[uint64]string{}
	for _, w := range s.Completed {
		kinds[w.ID] = w.Kind
	}
	return kinds
}

// TestClusterE2EHBMMMastersGone: hosts A, B, C, D mount DSA1 with HBMM
// masters A and B only (no other host is eligible), and a witness W keeps
// the voters at five. A and B are SIGKILLed together: whatever merge
// their failures need runs and completes on C or D, and the set is left
// with no master (HBMM off). C then writes without masters and is
// SIGKILLed: with no bitmap of C's writes anywhere, the merge that covers
// it is a full merge, and the members end identical.
func TestClusterE2EHBMMMastersGone(t *testing.T) {
	requireTools(t, "fio")
	const size = 32 << 20
	delay := 3 * time.Second
	for round := range repeats(t) {
		t.Run(fmt.Sprintf("round%d", round), func(t *testing.T) {
			c := newCluster(t, delay, []string{"A", "B", "C", "D"})
			ms := c.members(2, size)
			a, b, cw, d := c.node("A"), c.node("B"), c.node("C"), c.node("D")
			c.mountEverywhere(a, "DSA1", ms, nil)
			c.addWitnessWith("W")
			hbmmPolicy(t, c, c.nodes[rand.IntN(4)], "DSA1", "A", "B")
			// C and D write to their own ranges while the masters die.
			cfio := background(t, "fio", fioArgs("cload", cw.uri("DSA1"), "0", "16m", "--time_based", "--runtime=60")...)
			defer endGroup(cfio)
			dfio := background(t, "fio", fioArgs("dload", d.uri("DSA1"), "16m", "16m", "--time_based", "--runtime=60")...)
			defer endGroup(dfio)
			time.Sleep(time.Duration(200+rand.IntN(800)) * time.Millisecond)
			a.crash()
			b.crash()
			waitFor(t, delay+time.Minute, "DSA1 without masters and with no op left, and voters C, D, W, as C and D see it", func() (bool, string) {
				var seen []string
				ok := true
				for _, nd := range []*cnode{cw, d} {
					r, err := nd.tryShow()
					if err != nil {
						return false, err.Error()
					}
					s, _ := setOf(r, "DSA1")
					var masters []string
					if s.HBMM != nil {
						masters = s.HBMM.ActiveOn
					}
					// The leader must have removed A and B from the voters, or
					// C's death would leave no quorum.
					var voters []string
					for _, sv := range r.Cluster.Servers {
						if sv.Voter {
							voters = append(voters, sv.Host)
						}
					}
					slices.Sort(voters)
					ok = ok && len(masters) == 0 && len(s.Ops) == 0 && slices.Equal(s.Mounted, []string{"C", "D"}) && slices.Equal(voters, []string{"C", "D", "W"})
					seen = append(seen, fmt.Sprintf("%s: masters %v mounted %v ops %d voters %v", nd.name, masters, s.Mounted, len(s.Ops), voters))
				}
				return ok, strings.Join(seen, "; ")
			})
			before := completedKinds(t, d, "DSA1")
			// C writes on without masters, then dies mid-write.
			time.Sleep(time.Duration(300+rand.IntN(1200)) * time.Millisecond)
			cw.crash()
			endGroup(cfio)
			var kind string
			var id uint64
			waitFor(t, delay+time.Minute, "the merge for C's failure completed on D", func() (bool, string) {
				for k, v := range completedKinds(t, d, "DSA1") {
					if _, old := before[k]; !old && strings.Contains(v, "merge") {
						id, kind = k, v
						return true, ""
					}
				}
				return false, fmt.Sprintf("completed %v", completedKinds(t, d, "DSA1"))
			})
			t.Logf("round %d: after A and B (the masters) died, C's failure was covered by op%d, a %s", round, id, kind)
			if kind != "full-merge" {
				t.Errorf("with every master dead, the merge for writer C's failure was op%d, a %s: want a full merge (no surviving bitmap holds C's writes)", id, kind)
			}
			endGroup(dfio)
			c.waitIdleEverywhere("DSA1", 2*time.Minute)
			d.mustCLI("dismount", "DSA1")
			sameData(t, size, ms...)
		})
	}
}
