package main

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestClusterE2ETwoHostsAndWitness: two hosts and a witness, gossip
// encrypted. The witness votes but refuses to mount; a host with another
// gossip key does not get in. B is SIGKILLed: A and the witness keep a
// quorum, A merges, show warns that one more loss would stop the cluster,
// and the members end identical.
func TestClusterE2ETwoHostsAndWitness(t *testing.T) {
	requireTools(t, "fio")
	const size = 64 << 20
	keyFile := func() string {
		k := make([]byte, 32)
		if _, err := rand.Read(k); err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(t.TempDir(), "gossip.key")
		if err := os.WriteFile(p, []byte(base64.StdEncoding.EncodeToString(k)), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	key := keyFile()
	c := newCluster(t, 3*time.Second, []string{"A", "B"}, "--gossip-key-file", key)
	w := c.addWitnessWith("W", "--gossip-key-file", key)
	a, b := c.node("A"), c.node("B")
	if out, err := w.cli("mount", "DSA1", "--member", filepath.Join(c.dir, "x")); err == nil || !strings.Contains(out, "witness") {
		t.Fatalf("a witness mounted a set: %v\n%s", err, out)
	}
	// A stranger with another key stays out.
	stranger := newHost(t)
	cmd := exec.Command(shadowBin, "agent", "--host", "X", "--socket", stranger.sock, "--nbd-unix", stranger.nbdSock, "--nbd-listen", "",
		"--cluster-listen", fmt.Sprintf("127.0.0.1:%d", freeGossipPort(t)), "--join", a.gossip, "--state-dir", filepath.Join(stranger.dir, "state"),
		"--gossip-key-file", keyFile())
	out, err := runCmdTimeout(cmd, 40*time.Second)
	if err == nil {
		t.Fatalf("an agent with another gossip key joined:\n%s", lastLines(out, 10))
	}
	if r, err := a.tryShow(); err != nil || len(r.Cluster.Hosts) != 3 {
		t.Fatalf("after the stranger: %+v %v", r.Cluster, err)
	}

	ms := c.members(2, size)
	a.mustCLI(mountArgs("DSA1", ms)...)
	c.waitIdleEverywhere("DSA1", 2*time.Minute)
	b.mustCLI(mountArgs("DSA1", ms)...)
	if r, _ := a.tryShow(); len(r.Cluster.Warnings) != 0 {
		t.Fatalf("three voters up, yet show warns: %v", r.Cluster.Warnings)
	}
	load := background(t, "fio", fioArgs("b", b.uri("DSA1"), "0", "16m", "--time_based", "--runtime=30")...)
	time.Sleep(time.Second)
	b.crash()
	endGroup(load)
	waitFor(t, 30*time.Second, "A to merge after B's failure", func() (bool, string) {
		r, err := a.tryShow()
		if err != nil {
			return false, err.Error()
		}
		s, _ := setOf(r, "DSA1")
		for _, op := range s.Ops {
			if op.Kind == "full-merge" && op.Host == "A" && op.State == "running" {
				return true, ""
			}
		}
		return false, fmt.Sprintf("%+v", s.Ops)
	})
	c.waitIdleEverywhere("DSA1", 2*time.Minute)
	r, err := a.tryShow()
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Cluster.Warnings) == 0 || !strings.Contains(r.Cluster.Warnings[0], "cannot survive the loss of one host") {
		t.Fatalf("with B dead, show does not warn: %+v", r.Cluster)
	}
	a.mustCLI("dismount", "DSA1")
	sameData(t, size, ms...)
}

// addWitnessWith is addWitness with more flags.
func (c *testCluster) addWitnessWith(name string, extra ...string) *cnode {
	c.t.Helper()
	nd := &cnode{host: newHost(c.t), name: name, gossip: fmt.Sprintf("127.0.0.1:%d", freeGossipPort(c.t)), extra: append([]string{"--witness"}, extra...)}
	nd.state = nd.dir + "/state"
	c.nodes = append(c.nodes, nd)
	c.start(nd, []string{c.nodes[0].gossip})
	waitFor(c.t, 30*time.Second, "the witness "+name+" to be a raft voter", func() (bool, string) {
		r, err := c.nodes[0].tryShow()
		if err != nil || r.Cluster == nil {
			return false, fmt.Sprint(err)
		}
		for _, s := range r.Cluster.Servers {
			if s.Host == name && s.Voter {
				return true, ""
			}
		}
		return false, fmt.Sprintf("%+v", r.Cluster.Servers)
	})
	return nd
}

// runCmdTimeout runs cmd to its end (or kills it after d) and returns its
// output.
func runCmdTimeout(cmd *exec.Cmd, d time.Duration) (string, error) {
	var buf strings.Builder
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Start(); err != nil {
		return "", err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return buf.String(), err
	case <-time.After(d):
		_ = cmd.Process.Kill()
		<-done
		return buf.String(), fmt.Errorf("still running after %s", d)
	}
}
