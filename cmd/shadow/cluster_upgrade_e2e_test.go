package main

import (
	"fmt"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shadow-project/shadow/cluster"
	"github.com/shadow-project/shadow/cmd/internal/report"
)

// buildOlderAgent builds the agent at core level 1: the build before
// leases, as far as the log is concerned.
func buildOlderAgent(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "shadow-level1")
	cmd := exec.Command("go", "build", "-ldflags", "-X github.com/shadow-project/shadow/cluster.buildCoreLevel=1", "-o", bin, ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the level-1 agent: %v\n%s", err, out)
	}
	return bin
}

// levels reads every live host's view of the cluster's core level and of
// the hosts' leases.
func levels(t *testing.T, c *testCluster) (core map[string]int, leases map[string][]string) {
	t.Helper()
	core, leases = map[string]int{}, map[string][]string{}
	for _, nd := range c.live() {
		r, err := nd.tryShow()
		if err != nil || r.Cluster == nil {
			continue
		}
		core[nd.name] = r.Cluster.CoreLevel
		for _, h := range r.Cluster.Hosts {
			leases[nd.name] = append(leases[nd.name], h.Host+"="+h.Lease)
		}
	}
	return core, leases
}

// A rolling upgrade: three hosts run the level-1 build and mount a set;
// one at a time, each is stopped cleanly, started with this build (level
// 3: leases and HBMM across hosts) and mounts the set again, while another
// host writes and verifies through its export. The new levels switch on
// only when the last host runs the new build; nothing fio acknowledged is lost, and the members
// end identical.
func TestClusterE2ERollingUpgrade(t *testing.T) {
	requireTools(t, "fio")
	const size = 64 << 20
	old := buildOlderAgent(t)
	for round := range repeats(t) {
		t.Run(fmt.Sprintf("round%d", round), func(t *testing.T) {
			c := newClusterBin(t, 3*time.Second, []string{"A", "B", "C"}, nil, old)
			ms := c.members(3, size)
			c.mountEverywhere(c.nodes[0], "DSA1", ms, nil)
			core, leases := levels(t, c)
			for h, n := range core {
				if n != 1 {
					t.Fatalf("%s sees core level %d in a cluster of level-1 builds (%v)", h, n, leases)
				}
			}
			order := slices.Clone(c.nodes)
			rand.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
			for i, nd := range order {
				// The writer is a host that stays up through this step.
				writer := order[(i+1)%len(order)]
				region := strconv.Itoa(i*16) + "m"
				load := background(t, "fio", fioArgs(fmt.Sprintf("up%d", i), writer.uri("DSA1"), region, "16m",
					"--verify=crc32c", "--do_verify=1", "--randseed="+strconv.Itoa(round*10+i+1))...)
				time.Sleep(time.Duration(100+rand.IntN(700)) * time.Millisecond)
				nd.stop()
				nd.bin = "" // the new build
				c.restart(nd)
				nd.mustCLI(mountArgs("DSA1", ms)...)
				if err := waitCmd(t, load, 2*time.Minute, "fio through "+writer.name); err != nil {
					t.Fatalf("step %d (%s upgraded): fio writing and verifying through %s failed: %v", i, nd.name, writer.name, err)
				}
				if i < len(order)-1 {
					core, leases := levels(t, c)
					for h, n := range core {
						if n != 1 {
							t.Fatalf("after upgrading %d of 3 hosts, %s runs core level %d, want 1 until the last host runs the new build (leases %v)", i+1, h, n, leases)
						}
					}
					r := nd.show()
					if r.Cluster.BuildLevel != cluster.CoreLevel() || !slices.Contains(r.Cluster.Behind, order[len(order)-1].name) {
						t.Fatalf("the upgraded %s reports build level %d, behind %v", nd.name, r.Cluster.BuildLevel, r.Cluster.Behind)
					}
					continue
				}
				waitFor(t, 20*time.Second, "this build's core level and valid leases on every host once the last one runs it", func() (bool, string) {
					core, leases := levels(t, c)
					ok := len(core) == 3
					for _, n := range core {
						ok = ok && n == cluster.CoreLevel()
					}
					for _, ls := range leases {
						for _, l := range ls {
							ok = ok && strings.HasSuffix(l, "=valid")
						}
					}
					return ok, fmt.Sprintf("levels %v leases %v", core, leases)
				})
			}
			// Under leases, one more write and verify through each host.
			for _, nd := range c.nodes {
				mustRun(t, 2*time.Minute, "fio", fioArgs("after"+nd.name, nd.uri("DSA1"), "48m", "4m", "--verify=crc32c", "--do_verify=1")...)
			}
			c.waitIdleEverywhere("DSA1", 2*time.Minute)
			for _, nd := range c.nodes {
				nd.mustCLI("dismount", "DSA1")
			}
			sameData(t, size, ms...)
			// An older build can no longer join.
			c.nodes[0].stop()
			c.nodes[0].bin = old
			var join []string
			for _, o := range c.nodes[1:] {
				join = append(join, o.gossip)
			}
			args := []string{"agent", "--socket", c.nodes[0].sock, "--nbd-unix", c.nodes[0].nbdSock, "--nbd-listen", "",
				"--host", "A", "--cluster-listen", c.nodes[0].gossip, "--state-dir", c.nodes[0].state, "--join", strings.Join(join, ",")}
			out, err := runCmdTimeout(exec.Command(old, append(args, testLeaseFlags...)...), 90*time.Second)
			if err == nil || !strings.Contains(out, "core level") {
				t.Fatalf("a level-1 agent joined a cluster of this build's level (err %v):\n%s", err, lastLines(out, 10))
			}
			var rep report.ShowReport = c.nodes[1].show()
			if rep.Cluster.CoreLevel != cluster.CoreLevel() {
				t.Fatalf("core level %d after an older build tried to join", rep.Cluster.CoreLevel)
			}
		})
	}
}
