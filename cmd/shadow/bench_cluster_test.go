package main

// The cluster half of make bench (SHADOW_BENCH=1): what sharing a set with
// other hosts costs one host's writes, how long a host's SIGKILL takes to
// become a merge on a survivor, and how a merge and other hosts' writes
// share the disk. Ratios and distributions, measured side by side in one
// run; nothing here asserts a speed.

import (
	cryptorand "crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shadow-project/shadow/cluster"
)

func TestPerformanceCluster(t *testing.T) {
	if os.Getenv("SHADOW_BENCH") != "1" {
		t.Skip("make bench runs this (SHADOW_BENCH=1)")
	}
	requireTools(t, "fio")
	var b strings.Builder
	fmt.Fprintf(&b, "## Cluster (3 hosts on 127.0.0.1, members opened O_DIRECT by every host)\n\n")
	benchClusterWrites(t, &b)
	benchFailover(t, &b)
	benchMergeUnderWrites(t, &b)
	fmt.Println(b.String())
	appendBenchOut(t, b.String())
}

// benchClusterWrites: 4 KiB random writes through A's export, DSA1 mounted
// on A alone, then on A, B and C, alternating.
func benchClusterWrites(t *testing.T, b *strings.Builder) {
	c := newCluster(t, 3*time.Second, []string{"A", "B", "C"})
	ms := c.members(2, benchSize)
	a := c.node("A")
	a.mustCLI(mountArgs("DSA1", ms)...)
	c.waitIdleEverywhere("DSA1", 10*time.Minute)
	var alone, shared []float64
	for range benchRounds {
		alone = append(alone, fioIOPSSized(t, a.uri("DSA1"), "1g"))
		for _, n := range c.nodes[1:] {
			n.mustCLI(mountArgs("DSA1", ms)...)
		}
		shared = append(shared, fioIOPSSized(t, a.uri("DSA1"), "1g"))
		for _, n := range c.nodes[1:] {
			n.mustCLI("dismount", "DSA1")
		}
	}
	fmt.Fprintf(b, "4 KiB random writes through A (fio nbd, iodepth 16, %ss, %d alternating rounds, medians):\n\n", benchRuntime, benchRounds)
	fmt.Fprintf(b, "| DSA1 mounted on | IOPS | ratio |\n|---|---|---|\n")
	fmt.Fprintf(b, "| A alone | %.0f | 1.00 |\n", median(alone))
	fmt.Fprintf(b, "| A, B and C | %.0f | %.2f |\n\n", median(shared), median(shared)/median(alone))
	t.Logf("alone %v shared %v", alone, shared)
}

// benchFailover: ten SIGKILLs (every other one the raft leader), each
// timed to the moment a survivor runs the merge.
func benchFailover(t *testing.T, b *strings.Builder) {
	const delay = 3 * time.Second
	c := newCluster(t, delay, []string{"A", "B", "C"})
	ms := c.members(2, 64<<20)
	c.nodes[0].mustCLI(mountArgs("DSA1", ms)...)
	c.waitIdleEverywhere("DSA1", 2*time.Minute)
	for _, n := range c.nodes[1:] {
		n.mustCLI(mountArgs("DSA1", ms)...)
	}
	var took []time.Duration
	var killedLeader []bool
	for i := range 10 {
		leader := c.leader()
		victim := leader
		if i%2 == 0 {
			for _, n := range c.live() {
				if n != leader {
					victim = n
					break
				}
			}
		}
		at := victim.crash()
		survivor := c.live()[0]
		waitFor(t, time.Minute, "the merge on a survivor", func() (bool, string) {
			r, err := survivor.tryShow()
			if err != nil {
				return false, err.Error()
			}
			s, _ := setOf(r, "DSA1")
			for _, op := range s.Ops {
				if op.Kind == "full-merge" && op.State == "running" {
					return true, ""
				}
			}
			return false, fmt.Sprintf("%+v", s.Ops)
		})
		took = append(took, time.Since(at))
		killedLeader = append(killedLeader, victim == leader)
		c.waitIdleEverywhere("DSA1", 2*time.Minute)
		c.restart(victim)
		c.waitHosts(3)
		victim.mustCLI(mountArgs("DSA1", ms)...)
		c.waitIdleEverywhere("DSA1", 2*time.Minute)
	}
	sorted := slices.Clone(took)
	slices.Sort(sorted)
	fmt.Fprintf(b, "SIGKILL of a host to a merge running on a survivor, 10 failures (5 of the raft leader), recovery delay %s, probe interval %s, probe timeout %s, suspicion ×%d, raft heartbeat %s:\n\n",
		delay, cluster.DefaultTiming.ProbeInterval, cluster.DefaultTiming.ProbeTimeout, cluster.DefaultTiming.SuspicionMult, cluster.DefaultTiming.RaftHeartbeat)
	fmt.Fprintf(b, "| | min | median | max | minus the delay (median) |\n|---|---|---|---|---|\n")
	fmt.Fprintf(b, "| all | %s | %s | %s | %s |\n", sorted[0].Round(10*time.Millisecond), sorted[len(sorted)/2].Round(10*time.Millisecond),
		sorted[len(sorted)-1].Round(10*time.Millisecond), (sorted[len(sorted)/2] - delay).Round(10*time.Millisecond))
	var lead, foll []time.Duration
	for i, d := range took {
		if killedLeader[i] {
			lead = append(lead, d)
		} else {
			foll = append(foll, d)
		}
	}
	for _, g := range []struct {
		name string
		ds   []time.Duration
	}{{"leader killed", lead}, {"follower killed", foll}} {
		if len(g.ds) == 0 {
			continue
		}
		slices.Sort(g.ds)
		fmt.Fprintf(b, "| %s | %s | %s | %s | %s |\n", g.name, g.ds[0].Round(10*time.Millisecond), g.ds[len(g.ds)/2].Round(10*time.Millisecond),
			g.ds[len(g.ds)-1].Round(10*time.Millisecond), (g.ds[len(g.ds)/2] - delay).Round(10*time.Millisecond))
	}
	b.WriteString("\n")
	t.Logf("failover times %v (leader killed %v)", took, killedLeader)
}

// benchMergeUnderWrites: a demanded full merge of a 1 GiB set by one host,
// alone, then while the two other hosts write through their exports.
func benchMergeUnderWrites(t *testing.T, b *strings.Builder) {
	c := newCluster(t, 3*time.Second, []string{"A", "B", "C"})
	ms := c.members(2, benchSize)
	c.nodes[0].mustCLI(mountArgs("DSA1", ms)...)
	c.waitIdleEverywhere("DSA1", 10*time.Minute)
	for _, n := range c.nodes[1:] {
		n.mustCLI(mountArgs("DSA1", ms)...)
	}
	merge := func(load bool) (mbps float64, iops []float64) {
		settle(t)
		c.nodes[0].mustCLI("set", "DSA1", "--demand-merge")
		host := ""
		waitFor(t, time.Minute, "the demanded merge to run", func() (bool, string) {
			r, err := c.nodes[0].tryShow()
			if err != nil {
				return false, err.Error()
			}
			s, _ := setOf(r, "DSA1")
			for _, op := range s.Ops {
				if op.Kind == "full-merge" && op.State == "running" {
					host = op.Host
					return true, ""
				}
			}
			return false, fmt.Sprintf("%+v", s.Ops)
		})
		var writers []*cnode
		for _, n := range c.nodes {
			if n.name != host {
				writers = append(writers, n)
			}
		}
		outs := make(chan string, len(writers))
		if load {
			for _, w := range writers {
				go func() {
					out, _ := runCmd(t, 5*time.Minute, "fio", "--thread", "--name=load", "--ioengine=nbd", "--uri="+w.uri("DSA1"), "--rw=randwrite", "--bs=4k",
						"--iodepth=16", "--size=1g", "--time_based", "--runtime=15", "--output-format=terse", "--terse-version=3")
					outs <- out
				}()
			}
		}
		ms := elapsedOf(t, c.node(host).host, "DSA1", "full-merge")
		if load {
			for range writers {
				iops = append(iops, terseWriteIOPS(t, <-outs))
			}
		}
		return float64(benchSize) / (1 << 20) / (ms / 1000), iops
	}
	alone, _ := merge(false)
	loaded, iops := merge(true)
	fmt.Fprintf(b, "Full merge of a 1 GiB set by one host (demanded; engine rates unlimited but the minimum while the VU is busy, 16 MiB/s):\n\n")
	fmt.Fprintf(b, "| | merge MiB/s | writers' 4 KiB random-write IOPS (each of 2 hosts, 15 s) |\n|---|---|---|\n")
	fmt.Fprintf(b, "| no writers | %.0f | |\n", alone)
	fmt.Fprintf(b, "| two hosts writing | %.0f | %s |\n\n", loaded, fmtIOPS(iops))
}

func terseWriteIOPS(t *testing.T, out string) float64 {
	t.Helper()
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(line, ";")
		if len(f) >= 50 {
			v, err := strconv.ParseFloat(f[48], 64)
			if err == nil {
				return v
			}
		}
	}
	t.Logf("no fio result in: %s", out)
	return 0
}

func fmtIOPS(xs []float64) string {
	var s []string
	for _, x := range xs {
		s = append(s, fmt.Sprintf("%.0f", x))
	}
	return strings.Join(s, ", ")
}

// TestPerformanceClusterFencing is make bench's measure of what fencing
// costs writes (the target: at most 5%).
func TestPerformanceClusterFencing(t *testing.T) {
	if os.Getenv("SHADOW_BENCH") != "1" {
		t.Skip("make bench runs this (SHADOW_BENCH=1)")
	}
	requireTools(t, "fio")
	var b strings.Builder
	benchFencingCost(t, &b)
	fmt.Println(b.String())
	appendBenchOut(t, b.String())
}

// benchFencingCost: the same 3-host cluster twice, side by side: one with
// leases, the watchdog and mutual TLS keyed by the cluster key (the
// default, plus a key), one with fencing off (--no-fencing, benchmarks
// only) and no key. 4 KiB random writes through A of each, alternating,
// with DSA1 mounted on all three hosts of each.
func benchFencingCost(t *testing.T, b *strings.Builder) {
	k := make([]byte, 32)
	if _, err := cryptorand.Read(k); err != nil {
		t.Fatal(err)
	}
	key := filepath.Join(t.TempDir(), "gossip.key")
	if err := os.WriteFile(key, []byte(base64.StdEncoding.EncodeToString(k)), 0o600); err != nil {
		t.Fatal(err)
	}
	fenced := newCluster(t, 3*time.Second, []string{"A", "B", "C"}, "--gossip-key-file", key)
	open := newCluster(t, 3*time.Second, []string{"A", "B", "C"}, "--no-fencing")
	for _, c := range []*testCluster{fenced, open} {
		ms := c.members(2, benchSize)
		c.mountEverywhere(c.node("A"), "DSA1", ms, nil)
	}
	if r := fenced.node("A").show(); r.Cluster == nil || !r.Cluster.Authenticated || r.Cluster.Fence == nil {
		t.Fatalf("the fenced cluster is not fenced and authenticated: %+v", r.Cluster)
	}
	var on, off []float64
	for range benchRounds {
		on = append(on, fioIOPSSized(t, fenced.node("A").uri("DSA1"), "1g"))
		off = append(off, fioIOPSSized(t, open.node("A").uri("DSA1"), "1g"))
	}
	renewals := fenced.node("A").show().Cluster.Fence
	fmt.Fprintf(b, "Fencing's cost: 4 KiB random writes through A, DSA1 mounted on A, B and C, two clusters side by side (%d alternating rounds of %ss, medians):\n\n", benchRounds, benchRuntime)
	fmt.Fprintf(b, "| cluster | IOPS | ratio |\n|---|---|---|\n")
	fmt.Fprintf(b, "| fencing off, transport plaintext | %.0f | 1.00 |\n", median(off))
	fmt.Fprintf(b, "| leases (1.5 s, renewed every 375 ms) + watchdog + mutual TLS | %.0f | %.2f |\n\n", median(on), median(on)/median(off))
	t.Logf("fenced %v open %v (A's fence: %+v)", on, off, renewals)
}
