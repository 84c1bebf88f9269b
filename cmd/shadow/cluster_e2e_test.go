package main

// Cluster end-to-end tests: several agent processes on 127.0.0.1, each
// with its own gossip and raft ports, sockets and state directory, sharing
// member files as hosts share a SAN. Each scenario runs once in make test;
// make clustertest repeats it SHADOW_CLUSTER_REPEAT times (10) with random
// timing.

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shadow-project/shadow/cmd/internal/agent"
)

// repeats is how many times each randomized cluster scenario runs.
func repeats(t *testing.T) int {
	if v := os.Getenv("SHADOW_CLUSTER_REPEAT"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("SHADOW_CLUSTER_REPEAT=%q: want a positive count", v)
		}
		return n
	}
	return 1
}

// freeGossipPort finds P such that UDP and TCP P and TCP P+1 (raft) are
// free on 127.0.0.1.
func freeGossipPort(t *testing.T) int {
	t.Helper()
	for range 200 {
		p := 20000 + rand.IntN(40000)
		ok := true
		var closers []func() error
		for _, try := range []func() (func() error, error){
			func() (func() error, error) { l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p)); return closeOf(l), err },
			func() (func() error, error) {
				l, err := net.ListenPacket("udp", "127.0.0.1:"+strconv.Itoa(p))
				return closeOf(l), err
			},
			func() (func() error, error) { l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p+1)); return closeOf(l), err },
		} {
			c, err := try()
			if err != nil {
				ok = false
				break
			}
			closers = append(closers, c)
		}
		for _, c := range closers {
			c()
		}
		if ok {
			return p
		}
	}
	t.Fatal("no free pair of loopback ports found")
	return 0
}

func closeOf(c interface{ Close() error }) func() error {
	if c == nil || (fmt.Sprint(c) == "<nil>") {
		return func() error { return nil }
	}
	return c.Close
}

// cnode is one cluster host: an agent process with its gossip address and
// raft state.
type cnode struct {
	*host
	name   string
	gossip string
	state  string
	extra  []string
}

// testCluster is a set of hosts and the member files they share.
type testCluster struct {
	t     *testing.T
	nodes []*cnode
	dir   string
	delay time.Duration
}

// newCluster starts hosts by name: the first forms the cluster, the others
// join it. extra flags go to every agent.
func newCluster(t *testing.T, delay time.Duration, names []string, extra ...string) *testCluster {
	t.Helper()
	c := &testCluster{t: t, dir: t.TempDir(), delay: delay}
	for i, n := range names {
		nd := &cnode{host: newHost(t), name: n, gossip: fmt.Sprintf("127.0.0.1:%d", freeGossipPort(t)), extra: extra}
		nd.state = filepath.Join(nd.dir, "state")
		c.nodes = append(c.nodes, nd)
		var join []string
		if i > 0 {
			join = []string{c.nodes[0].gossip}
		}
		c.start(nd, join)
	}
	c.waitHosts(len(names))
	return c
}

func (c *testCluster) start(nd *cnode, join []string) {
	c.t.Helper()
	args := []string{"--host", nd.name, "--cluster-listen", nd.gossip, "--state-dir", nd.state,
		"--recovery-delay", c.delay.String()}
	if len(join) > 0 {
		args = append(args, "--join", strings.Join(join, ","))
	}
	nd.start(append(args, nd.extra...)...)
}

// restart starts a stopped or killed host again, joining any live one.
func (c *testCluster) restart(nd *cnode) {
	c.t.Helper()
	var join []string
	for _, o := range c.nodes {
		if o != nd && o.cmd != nil {
			join = append(join, o.gossip)
		}
	}
	c.start(nd, join)
}

func (c *testCluster) node(name string) *cnode {
	for _, n := range c.nodes {
		if n.name == name {
			return n
		}
	}
	c.t.Fatalf("no host %s", name)
	return nil
}

// live returns the hosts whose process runs.
func (c *testCluster) live() []*cnode {
	var out []*cnode
	for _, n := range c.nodes {
		if n.cmd != nil {
			out = append(out, n)
		}
	}
	return out
}

// waitFor polls cond until it holds or the deadline passes; what names
// what was awaited, and cond's text says what was seen last.
func waitFor(t *testing.T, within time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(within)
	last := ""
	for {
		ok, seen := cond()
		if ok {
			return
		}
		last = seen
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s; last seen: %s", within, what, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// tryShow asks a host for show --json without failing the test.
func (n *cnode) tryShow() (agent.ShowReport, error) {
	var r agent.ShowReport
	err := (&agent.Client{Path: n.sock, Timeout: 5 * time.Second}).Call("show", agent.ShowArgs{}, &r)
	return r, err
}

// waitHosts waits until every live host sees n hosts up and one leader.
func (c *testCluster) waitHosts(n int) {
	c.t.Helper()
	for _, nd := range c.live() {
		waitFor(c.t, 30*time.Second, fmt.Sprintf("%s to see %d hosts up and a leader", nd.name, n), func() (bool, string) {
			r, err := nd.tryShow()
			if err != nil || r.Cluster == nil {
				return false, fmt.Sprint(err)
			}
			up := 0
			for _, h := range r.Cluster.Hosts {
				if h.State == "up" && h.Gossip {
					up++
				}
			}
			return up == n && r.Cluster.Leader != "", fmt.Sprintf("%+v", *r.Cluster)
		})
	}
}

// leader returns the host the live hosts agree leads.
func (c *testCluster) leader() *cnode {
	c.t.Helper()
	var name string
	waitFor(c.t, 20*time.Second, "a raft leader", func() (bool, string) {
		r, err := c.live()[0].tryShow()
		if err != nil || r.Cluster == nil || r.Cluster.Leader == "" {
			return false, fmt.Sprint(err)
		}
		name = r.Cluster.Leader
		return true, ""
	})
	return c.node(name)
}

// members makes n member files of size data bytes in the shared folder.
func (c *testCluster) members(n int, size int64) []string {
	var ms []string
	for i := range n {
		p := filepath.Join(c.dir, fmt.Sprintf("m%d", i+1))
		makeFile(c.t, p, size)
		ms = append(ms, p)
	}
	return ms
}

func mountArgs(set string, members []string) []string {
	args := []string{"mount", set}
	for _, m := range members {
		args = append(args, "--member", m)
	}
	return args
}

// setOf returns a host's view of a set.
func setOf(r agent.ShowReport, set string) (agent.SetShow, bool) {
	for _, s := range r.Sets {
		if s.Name == set {
			return s, true
		}
	}
	return agent.SetShow{}, false
}

// waitIdleEverywhere waits until every live host that mounts the set sees
// no op left (hosts that do not mount it are skipped).
func (c *testCluster) waitIdleEverywhere(set string, within time.Duration) {
	c.t.Helper()
	for _, nd := range c.live() {
		waitFor(c.t, within, set+" idle on "+nd.name, func() (bool, string) {
			r, err := nd.tryShow()
			if err != nil {
				return false, err.Error()
			}
			s, ok := setOf(r, set)
			if !ok {
				return true, "" // not mounted there
			}
			return len(s.Ops) == 0, fmt.Sprintf("%+v", s.Ops)
		})
	}
}

// kill SIGKILLs a host (the process-crash model) and returns when.
func (nd *cnode) crash() time.Time {
	at := time.Now()
	nd.kill()
	return at
}

// falseFailures counts "host failed" decisions in a host's log: in a run
// without kills there must be none.
func falseFailures(nd *cnode) int {
	if nd.log == nil {
		return 0
	}
	return strings.Count(nd.log.String(), `"message":"host failed: recorded in the log"`)
}

// fioArgs is a 4 KiB random-write job over [off, off+size) of a host's
// export.
func fioArgs(name, uri string, off, size string, extra ...string) []string {
	return append([]string{"--thread", "--name=" + name, "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite", "--bs=4k",
		"--iodepth=16", "--offset=" + off, "--size=" + size}, extra...)
}

// replayEvents prints a host's event log as a replay script, appends
// expectations, and checks that shadow replay reaches them.
func replayEvents(t *testing.T, nd *cnode, expect ...string) {
	t.Helper()
	script := nd.mustCLI("show", "--events")
	p := filepath.Join(t.TempDir(), "events.txt")
	if err := os.WriteFile(p, []byte(script+strings.Join(expect, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runCmd(t, time.Minute, shadowBin, "replay", p); err != nil {
		t.Fatalf("replay of %s's event log: %v\n%s\nscript:\n%s", nd.name, err, out, lastLines(script, 40))
	}
}

// TestClusterE2EHostFailureDuringWrites: three hosts mount DSA1 with three
// members; fio writes through B's and C's exports to disjoint ranges; C
// (the raft leader in odd rounds) is SIGKILLed mid-write. The survivors
// declare it failed, wait the recovery delay, and one of them merges
// while B keeps writing. Two hosts read C's last writes during the merge
// and agree; afterwards the members are identical, fio verifies what B
// wrote through A's export, and the event log replays to the same end.
func TestClusterE2EHostFailureDuringWrites(t *testing.T) {
	requireTools(t, "fio", "nbdcopy")
	const size = 96 << 20
	delay := 3 * time.Second
	for round := range repeats(t) {
		t.Run(fmt.Sprintf("round%d", round), func(t *testing.T) {
			c := newCluster(t, delay, []string{"A", "B", "C"}, "--max-rate", strconv.Itoa(32<<20))
			ms := c.members(3, size)
			c.nodes[0].mustCLI(mountArgs("DSA1", ms)...)
			c.waitIdleEverywhere("DSA1", 2*time.Minute)
			for _, nd := range c.nodes[1:] {
				nd.mustCLI(mountArgs("DSA1", ms)...)
			}
			for _, nd := range c.live() {
				r, err := nd.tryShow()
				if s, ok := setOf(r, "DSA1"); err != nil || !ok || len(s.Mounted) != 3 {
					t.Fatalf("%s: DSA1 not mounted on all three hosts: %+v %v", nd.name, s, err)
				}
			}
			// The victim is the raft leader in odd rounds, a follower in
			// even ones; b is a survivor that writes, other the third.
			leader := c.leader()
			var victim, b, other *cnode
			for _, nd := range c.nodes {
				switch {
				case victim == nil && (nd == leader) == (round%2 == 1):
					victim = nd
				case b == nil:
					b = nd
				default:
					other = nd
				}
			}
			verify := fioArgs("bverify", b.uri("DSA1"), "0", "16m", "--verify=crc32c", "--do_verify=1", "--randseed="+strconv.Itoa(round+1))
			bfio := background(t, "fio", verify...)
			vfio := background(t, "fio", fioArgs("victim", victim.uri("DSA1"), "64m", "32m", "--time_based", "--runtime=60")...)
			time.Sleep(time.Duration(300+rand.IntN(1200)) * time.Millisecond)
			killedAt := victim.crash()
			endGroup(vfio)
			t.Logf("killed %s (leader: %v)", victim.name, round%2 == 1)
			// B keeps writing elsewhere through the delay and the merge.
			b2 := background(t, "fio", fioArgs("bload", b.uri("DSA1"), "32m", "16m", "--time_based", "--runtime=8")...)
			if err := bfio.Wait(); err != nil {
				t.Fatalf("B's fio (write then verify through B) failed: %v", err)
			}
			survivors := c.live()
			var started time.Duration
			var mergeHost string
			waitFor(t, delay+30*time.Second, "a merge running on a survivor", func() (bool, string) {
				r, err := survivors[0].tryShow()
				if err != nil {
					return false, err.Error()
				}
				s, _ := setOf(r, "DSA1")
				for _, op := range s.Ops {
					if op.Kind == "full-merge" && op.State == "running" {
						started, mergeHost = time.Since(killedAt), op.Host
						return true, ""
					}
				}
				return false, fmt.Sprintf("%+v", s.Ops)
			})
			t.Logf("merge started on %s %s after the kill (recovery delay %s)", mergeHost, started.Round(time.Millisecond), delay)
			if started > delay+2*time.Second {
				t.Errorf("merge started %s after the kill, want at most the recovery delay plus 2 s (%s)", started, delay+2*time.Second)
			}
			if mergeHost == victim.name {
				t.Fatalf("merge runs on the failed host %s", victim.name)
			}
			// Invariant 4: during the merge, two hosts read what the
			// victim wrote last and agree.
			ra, rb := filepath.Join(c.dir, "ra.bin"), filepath.Join(c.dir, "rb.bin")
			mustRun(t, time.Minute, "nbdcopy", survivors[0].uri("DSA1"), ra)
			mustRun(t, time.Minute, "nbdcopy", survivors[1].uri("DSA1"), rb)
			sameRange(t, ra, rb, 64<<20, 96<<20)
			c.waitIdleEverywhere("DSA1", 3*time.Minute)
			_ = b2.Wait()
			for _, nd := range survivors {
				nd.mustCLI("dismount", "DSA1")
			}
			sameData(t, size, ms...)
			// Everything B's fio acknowledged, read back through the other
			// survivor's export, mounted there alone.
			other.mustCLI(mountArgs("DSA1", ms)...)
			mustRun(t, 2*time.Minute, "fio", fioArgs("bverify", other.uri("DSA1"), "0", "16m", "--verify=crc32c", "--verify_only", "--randseed="+strconv.Itoa(round+1))...)
			replayEvents(t, other, "expect DSA1 idle")
			for _, nd := range survivors {
				if n := falseFailures(nd); n > 1 {
					t.Errorf("%s recorded %d host failures, want at most the one of %s", nd.name, n, victim.name)
				}
			}
		})
	}
}

// sameRange compares [from, to) of two files.
func sameRange(t *testing.T, p, q string, from, to int64) {
	t.Helper()
	a, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(q)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(a)) < to || int64(len(b)) < to {
		t.Fatalf("%s or %s shorter than %d", p, q, to)
	}
	for i := from; i < to; i++ {
		if a[i] != b[i] {
			t.Fatalf("two hosts read different data at byte %d during the merge (invariant 4)", i)
		}
	}
}

