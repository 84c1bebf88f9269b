package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shadow-project/shadow/cmd/internal/report"
)

// TestClusterE2EWriteLogs: a set with write logs mounted on three hosts,
// each logging its writes in its own slot of the members' write-log
// regions. C is SIGKILLed while it writes: a survivor runs a controller
// minimerge of C's logged extents only (not B's, which is alive, nor the
// whole volume). Its host is then stopped gracefully mid-merge (it leaves
// the raft configuration, so the survivor and a witness keep a quorum): the
// controller minimerge restarts on the last host (Table 8-1 row 4), from
// C's slot, which no merge has emptied yet. The members end identical.
func TestClusterE2EWriteLogs(t *testing.T) {
	requireTools(t, "fio")
	const size = 256 << 20
	delay := 3 * time.Second
	for round := range repeats(t) {
		t.Run(fmt.Sprintf("round%d", round), func(t *testing.T) {
			// B merges slowly, so that it can be stopped midway; A, which
			// makes the initial copy and finishes the merge, does not.
			// A witness keeps a quorum once C is dead and B has left: A
			// and W of the voters A, C, W.
			slow := []string{"--max-rate", strconv.Itoa(2 << 20), "--min-rate", strconv.Itoa(2 << 20)}
			c := newClusterPer(t, delay, []string{"A", "B", "C"}, map[string][]string{"B": slow, "C": slow})
			c.addWitness("W")
			ms := c.members(2, size)
			a, b, v := c.node("A"), c.node("B"), c.node("C")
			a.mustCLI(append(mountArgs("DSA1", ms), "--write-log")...)
			c.waitIdleEverywhere("DSA1", 5*time.Minute)
			b.mustCLI(mountArgs("DSA1", ms)...)
			v.mustCLI(mountArgs("DSA1", ms)...)
			// The merge after C's failure runs on B: A never takes it
			// while its priority for the set is 0.
			a.mustCLI("set", "DSA1", "--priority", "0")
			for _, nd := range []*cnode{a, b, v} {
				waitFor(t, 10*time.Second, nd.name+" to see DSA1 mounted with write logs on three hosts", func() (bool, string) {
					r, err := nd.tryShow()
					s, ok := setOf(r, "DSA1")
					return err == nil && ok && s.WriteLog && len(s.Mounted) == 3, fmt.Sprintf("%+v %v", s, err)
				})
			}
			bfio := background(t, "fio", fioArgs("b", b.uri("DSA1"), "64m", "8m", "--time_based", "--runtime=4")...)
			vfio := background(t, "fio", fioArgs("c", v.uri("DSA1"), "192m", "8m", "--time_based", "--runtime=60")...)
			time.Sleep(time.Duration(500+rand.IntN(1000)) * time.Millisecond)
			v.crash()
			endGroup(vfio)
			_ = bfio.Wait()
			var first report.OpShow
			waitFor(t, delay+30*time.Second, "a controller minimerge on a survivor", func() (bool, string) {
				r, err := a.tryShow()
				if err != nil {
					return false, err.Error()
				}
				s, _ := setOf(r, "DSA1")
				for _, op := range s.Ops {
					if op.State == "running" && op.Kind == "controller-minimerge" {
						first = op
						return true, ""
					}
				}
				return false, fmt.Sprintf("%+v", s.Ops)
			})
			mergeHost, other := c.node(first.Host), a
			if mergeHost != b {
				t.Fatalf("the controller minimerge runs on %s, want B (A's priority is 0)", mergeHost.name)
			}
			a.mustCLI("set", "DSA1", "--priority", "5000")
			t.Logf("controller minimerge op%d on %s; stopping it gracefully", first.ID, mergeHost.name)
			mergeHost.stop()
			c.waitIdleEverywhere("DSA1", 3*time.Minute)
			// A runs it at full speed, too fast to watch: the core's
			// decision is in the event log's replay trace.
			script := filepath.Join(t.TempDir(), "events.txt")
			if err := os.WriteFile(script, []byte(a.mustCLI("show", "--events")), 0o600); err != nil {
				t.Fatal(err)
			}
			trace := mustRun(t, time.Minute, shadowBin, "replay", "-v", script)
			want := fmt.Sprintf("restart DSA1 op%d controller-minimerge on=A lbn=0", first.ID)
			if !strings.Contains(trace, want) {
				t.Fatalf("the replay trace lacks %q (Table 8-1 row 4: the controller minimerge restarts elsewhere):\n%s", want, lastLines(trace, 40))
			}
			r, err := other.tryShow()
			if err != nil {
				t.Fatal(err)
			}
			s, _ := setOf(r, "DSA1")
			if len(s.Completed) == 0 {
				t.Fatalf("%s completed no op: %+v", other.name, s)
			}
			w := s.Completed[len(s.Completed)-1]
			// C wrote 8 MiB (two 4 MiB extents) that must be merged. B
			// stopped while it ran: the restart on A, decided as B's
			// dismount applied, also reads B's slot, which B empties only
			// after its final flush (8 MiB more). Nothing else: not the
			// volume.
			if w.Kind != "controller-minimerge" || w.BytesDone < 8<<20 || w.BytesDone > 20<<20 {
				t.Fatalf("the merge after C's failure: %+v, want a controller minimerge of the departed hosts' logged extents (8–20 MiB)", w)
			}
			t.Logf("controller minimerge moved %d bytes of %d", w.BytesDone, size)
			other.mustCLI("dismount", "DSA1")
			sameData(t, size, ms...)
		})
	}
}

// addWitness starts a witness host (a raft voter that mounts nothing)
// joining the cluster.
func (c *testCluster) addWitness(name string) *cnode { return c.addWitnessWith(name) }

// newClusterPer is newCluster with flags per host.
func newClusterPer(t *testing.T, delay time.Duration, names []string, per map[string][]string) *testCluster {
	return newClusterBin(t, delay, names, per, "")
}

// newClusterBin is newClusterPer with every agent run from bin (empty:
// shadowBin).
func newClusterBin(t *testing.T, delay time.Duration, names []string, per map[string][]string, bin string) *testCluster {
	t.Helper()
	c := &testCluster{t: t, dir: t.TempDir(), delay: delay}
	for i, n := range names {
		nd := &cnode{host: newHost(t), name: n, gossip: fmt.Sprintf("127.0.0.1:%d", freeGossipPort(t)), extra: per[n]}
		nd.bin = bin
		nd.state = nd.dir + "/state"
		c.nodes = append(c.nodes, nd)
		var join []string
		if i > 0 {
			join = []string{c.nodes[0].gossip}
		}
		c.start(nd, join)
	}
	t.Cleanup(func() {
		if t.Failed() {
			c.dumpEvents()
		}
	})
	c.waitHosts(len(names))
	return c
}
