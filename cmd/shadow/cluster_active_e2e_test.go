package main

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/shadow-project/shadow/cmd/internal/report"
)

// waitActive waits until each node in want sees set's masters as masters
// under write policy active, with want[node] as its active master and
// every standby in step (copies: at least that many copies each).
func waitActive(t *testing.T, set string, masters []string, want map[*cnode]string, copies uint64, within time.Duration) {
	t.Helper()
	for nd, active := range want {
		waitFor(t, within, fmt.Sprintf("%s: masters %v, active master %s, every standby in step with %d copies", nd.name, masters, active, copies), func() (bool, string) {
			r, err := nd.tryShow()
			if err != nil {
				return false, err.Error()
			}
			s, ok := setOf(r, set)
			if !ok || s.HBMM == nil {
				return false, "no hbmm section"
			}
			h := s.HBMM
			ok = h.WritePolicy == "active" && slices.Equal(h.ActiveOn, masters) && h.ActiveMaster == active
			for _, sb := range h.Standbys {
				ok = ok && sb.State == "in_step" && sb.Copies >= copies
			}
			return ok, fmt.Sprintf("write policy %s, masters %v, active %q, standbys %+v", h.WritePolicy, h.ActiveOn, h.ActiveMaster, h.Standbys)
		})
	}
}

// standbyOf is nd's view of its standby host.
func standbyOf(nd *cnode, set, host string) (report.StandbyShow, error) {
	r, err := nd.tryShow()
	if err != nil {
		return report.StandbyShow{}, err
	}
	s, _ := setOf(r, set)
	if s.HBMM == nil {
		return report.StandbyShow{}, fmt.Errorf("no hbmm section")
	}
	for _, sb := range s.HBMM.Standbys {
		if sb.Host == host {
			return sb, nil
		}
	}
	return report.StandbyShow{}, fmt.Errorf("%s is no standby of %s's", host, nd.name)
}

// TestClusterE2EHBMMActive: hosts A, B, C, D (and a witness W, so that
// two deaths leave a quorum) mount DSA1 with HBMM masters A, B, D, write
// policy active. The victim V writes through its own export: C (a writer
// only) in rounds 0, 1 mod 4, B (a writer and a master) in rounds 2, 3;
// the other of B and C writes elsewhere with fio throughout.
//
//  1. D, one of V's standbys, is SIGSTOPped while V writes: V reports it
//     not in step; resumed, it copies the active bitmap and is in step.
//  2. A, V's active master, is SIGKILLed mid-stream: V makes a standby in
//     step its active master without a flush (a takeover).
//  3. V is SIGKILLed, after its writes completed in even rounds (the
//     minimerge then covers exactly the distinct chunks V wrote, all of
//     them since the policy was set), mid-stream in odd rounds (between
//     the chunks of V's acknowledged writes and those of every write it
//     sent). No chunk V wrote is missed, though its first active master
//     is dead, and the members end identical.
func TestClusterE2EHBMMActive(t *testing.T) {
	requireTools(t, "fio")
	// V writes at random in 1536 chunks, slowly enough to leave many
	// unwritten, so that a merge of too many is seen.
	const size, span = 128 << 20, 96 << 20
	delay := 3 * time.Second
	for round := range repeats(t) {
		t.Run(fmt.Sprintf("round%d", round), func(t *testing.T) {
			c := newCluster(t, delay, []string{"A", "B", "C", "D"}, "--hbmm-standby-timeout", "200ms")
			ms := c.members(3, size)
			a, b, cw, d := c.node("A"), c.node("B"), c.node("C"), c.node("D")
			c.mountEverywhere(a, "DSA1", ms, nil)
			c.addWitnessWith("W", "--hbmm-standby-timeout", "200ms")
			victim, other := cw, b
			next := b // V's active master after A's death
			if round%4 >= 2 {
				victim, other, next = b, cw, d
			}
			masters := []string{"A", "B", "D"}
			c.nodes[rand.IntN(4)].mustCLI("set", "DSA1", "--policy", "hbmm=(master_list=(A,B,D),write_policy=active)", "--enable", "hbmm")
			// Each writer's active master is the first master on another
			// host: B for A, A for the others.
			waitActive(t, "DSA1", masters, map[*cnode]string{a: "B", b: "A", cw: "A", d: "A"}, 1, 30*time.Second)

			ofio := background(t, "fio", fioArgs("oload", other.uri("DSA1"), "96m", "32m", "--time_based", "--runtime=60")...)
			defer endGroup(ofio)
			cl := dialFence(t, victim, "DSA1")
			w := &hbmmWrites{sent: map[int64]bool{}, acked: map[int64]bool{}}
			var stop atomic.Bool
			w.write(cl, 0, span, 50+rand.IntN(100), 4, &stop)
			w.pace = 8 * time.Millisecond

			// 1. D stalls while V writes (new chunks: bit-sets to D).
			done := make(chan struct{})
			go func() {
				w.write(cl, 0, span, 1<<30, 2, &stop)
				close(done)
			}()
			defer func() { stop.Store(true); <-done }()
			fenceSignal(t, d, syscall.SIGSTOP)
			stopped := true
			defer func() {
				if stopped {
					fenceSignal(t, d, syscall.SIGCONT)
				}
			}()
			waitFor(t, 5*time.Second, victim.name+" reports its stopped standby D not in step", func() (bool, string) {
				sb, err := standbyOf(victim, "DSA1", "D")
				if err != nil {
					return false, err.Error()
				}
				return sb.State != "in_step", fmt.Sprintf("%+v", sb)
			})
			time.Sleep(time.Duration(rand.IntN(300)) * time.Millisecond)
			fenceSignal(t, d, syscall.SIGCONT)
			stopped = false
			waitFor(t, 20*time.Second, victim.name+"'s standby D in step again after a second copy", func() (bool, string) {
				sb, err := standbyOf(victim, "DSA1", "D")
				if err != nil {
					return false, err.Error()
				}
				return sb.State == "in_step" && sb.Copies >= 2, fmt.Sprintf("%+v", sb)
			})

			// 2. A, V's active master, dies mid-stream.
			time.Sleep(time.Duration(100+rand.IntN(500)) * time.Millisecond)
			completed := func() map[uint64]string {
				all := map[uint64]string{}
				for _, nd := range []*cnode{b, cw, d} {
					if nd.cmd != nil {
						maps.Copy(all, completedKinds(t, nd, "DSA1"))
					}
				}
				return all
			}
			before := completed()
			a.crash()
			waitFor(t, delay+time.Minute, fmt.Sprintf("%s's active master is %s, taken over in step (no flush)", victim.name, next.name), func() (bool, string) {
				r, err := victim.tryShow()
				if err != nil {
					return false, err.Error()
				}
				s, _ := setOf(r, "DSA1")
				if s.HBMM == nil {
					return false, "no hbmm section"
				}
				return s.HBMM.ActiveMaster == next.name, fmt.Sprintf("active %q, takeovers %d, handshakes %d", s.HBMM.ActiveMaster, s.HBMM.Takeovers, s.HBMM.Handshakes)
			})
			if r, err := victim.tryShow(); err == nil {
				if s, _ := setOf(r, "DSA1"); s.HBMM == nil || s.HBMM.Takeovers < 1 {
					t.Errorf("%s made %s its active master without a takeover in step: %+v", victim.name, next.name, s.HBMM)
				}
			}
			// A's own merge (A wrote nothing) completes before V dies.
			waitFor(t, delay+time.Minute, "the merge for A's failure completed", func() (bool, string) {
				now := completed()
				for k, v := range now {
					if _, old := before[k]; !old && strings.Contains(v, "merge") {
						before[k] = v
						return true, ""
					}
				}
				return false, fmt.Sprintf("completed %v", now)
			})

			// 3. V dies, its writes complete (even rounds) or mid-stream.
			complete := round%2 == 0
			if complete {
				stop.Store(true)
				<-done
				time.Sleep(time.Duration(rand.IntN(500)) * time.Millisecond)
			} else {
				time.Sleep(time.Duration(200+rand.IntN(800)) * time.Millisecond)
			}
			stop.Store(true)
			victim.crash()
			w.mu.Lock()
			sent, acked := len(w.sent), len(w.acked)
			w.mu.Unlock()
			var work report.OpWorkShow
			var on string
			waitFor(t, delay+time.Minute, "the minimerge for "+victim.name+"'s failure completed on a survivor", func() (bool, string) {
				var seen []string
				for _, nd := range []*cnode{other, d} {
					r, err := nd.tryShow()
					if err != nil {
						seen = append(seen, nd.name+": "+err.Error())
						continue
					}
					s, _ := setOf(r, "DSA1")
					for _, wk := range s.Completed {
						if _, old := before[wk.ID]; !old && strings.Contains(wk.Kind, "merge") {
							work, on = wk, nd.name
							return true, ""
						}
					}
					seen = append(seen, fmt.Sprintf("%s: %d ops", nd.name, len(s.Ops)))
				}
				return false, strings.Join(seen, "; ")
			})
			t.Logf("round %d: %s sent writes to %d chunks, %d acknowledged (complete: %v); op%d %s on %s merged %d chunks",
				round, victim.name, sent, acked, complete, work.ID, work.Kind, on, work.BitmapChunks)
			if work.Kind != "minimerge" {
				t.Fatalf("%s's failure was covered by a %s; its active master %s was in step: want a minimerge", victim.name, work.Kind, next.name)
			}
			if complete && (int(work.BitmapChunks) != acked || sent != acked) {
				t.Errorf("minimerge covered %d chunks; %s wrote exactly %d distinct chunks, all completed before the kill", work.BitmapChunks, victim.name, acked)
			}
			if !complete && (int(work.BitmapChunks) < acked || int(work.BitmapChunks) > sent) {
				t.Errorf("minimerge covered %d chunks; want between %s's acknowledged chunks (%d) and every chunk it sent to (%d)", work.BitmapChunks, victim.name, acked, sent)
			}
			endGroup(ofio)
			c.waitIdleEverywhere("DSA1", 2*time.Minute)
			other.mustCLI("dismount", "DSA1")
			d.mustCLI("dismount", "DSA1")
			sameData(t, size, ms...)
		})
	}
}
