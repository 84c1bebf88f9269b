package cluster

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// A voter gossip reports dead for longer than the grace is taken out of
// raft by the leader; a live non-voter replaces it when there is one; the
// voters never drop below three; a removed host that comes back is added
// again.

func othersT(xs []*tnode, not *tnode) []*tnode {
	var out []*tnode
	for _, x := range xs {
		if x != not {
			out = append(out, x)
		}
	}
	return out
}

func namesT(xs []*tnode) []string {
	var out []string
	for _, x := range xs {
		out = append(out, x.name)
	}
	slices.Sort(out)
	return out
}

// pickDeadVoter returns a voter that neither leads nor is excluded.
func pickDeadVoter(t testing.TB, xs []*tnode, leader *tnode, exclude ...string) *tnode {
	t.Helper()
	voters := voterNames(leader.node.Servers())
	for _, x := range xs {
		if x != leader && slices.Contains(voters, x.name) && !slices.Contains(exclude, x.name) {
			return x
		}
	}
	t.Fatalf("no follower voter among %v", voters)
	return nil
}

func TestFailedVoterIsRemoved(t *testing.T) {
	xs := startTNodes(t, "v", 4, nil)
	leader := leaderT(xs)
	if leader == nil {
		t.Fatal("no single leader")
	}
	if got := voterNames(leader.node.Servers()); len(got) != 4 {
		t.Fatalf("voters %v, want all four", got)
	}
	dead := pickDeadVoter(t, xs, leader)
	survivors := othersT(xs, dead)
	// The grace: 10 probe intervals, so that a quick restart is
	// not churned.
	grace := 10 * testTiming.ProbeInterval
	dead.node.Shutdown()
	start := time.Now()
	// When the leader's gossip stopped seeing it: the grace counts from
	// there.
	var gone time.Time
	waitForState(t, 10*time.Second+grace, "the leader to remove the dead voter "+dead.name+" from raft", func() (bool, string) {
		l := leaderT(survivors)
		if l == nil {
			return false, "no single leader"
		}
		if gone.IsZero() && !slices.ContainsFunc(l.node.Alive(), func(p Peer) bool { return p.Host == dead.name }) {
			gone = time.Now()
		}
		ss := l.node.Servers()
		return slices.Equal(serverNames(ss), namesT(survivors)) && slices.Equal(voterNames(ss), namesT(survivors)),
			fmt.Sprintf("%s: servers %v voters %v", l.name, serverNames(ss), voterNames(ss))
	})
	took := time.Since(start)
	t.Logf("%s removed %v after its shutdown, %v after gossip reported it gone (grace %v)", dead.name,
		took.Round(time.Millisecond), time.Since(gone).Round(time.Millisecond), grace)
	// The poll sees gossip's report up to 20 ms late.
	if gone.IsZero() || time.Since(gone) < grace-50*time.Millisecond {
		t.Fatalf("%s removed %v after gossip reported it gone, before the grace (%v)", dead.name, time.Since(gone), grace)
	}
	// The configuration changes before the leader's log line is written,
	// and leadership may have moved since: any survivor that led logs it.
	waitForState(t, 2*time.Second, "a survivor to log the removal", func() (bool, string) {
		for _, x := range survivors {
			if strings.Contains(x.logs.String(), "failed voter removed from raft") {
				return true, ""
			}
		}
		return false, "no line yet"
	})
	// The three left still commit.
	if err := survivors[0].propose("after-removal"); err != nil {
		t.Fatalf("after the removal: %v", err)
	}

	// It comes back (same name, state and ports): the join path adds it
	// again, as a voter.
	dead.start(survivors[0].listen)
	waitForState(t, 20*time.Second, dead.name+" to be a voter again", func() (bool, string) {
		l := leaderT(xs)
		if l == nil {
			return false, "no single leader"
		}
		ss := l.node.Servers()
		return slices.Equal(voterNames(ss), namesT(xs)), fmt.Sprintf("%s: voters %v", l.name, voterNames(ss))
	})
	if err := dead.propose("back"); err != nil {
		t.Fatalf("%s, back: propose: %v", dead.name, err)
	}
	waitFor(t, 10*time.Second, "every node to apply the returning host's proposal", func() bool {
		for _, x := range xs {
			if !x.fsm.has("back") {
				return false
			}
		}
		return true
	})
}

func TestFailedVoterIsReplacedByANonVoter(t *testing.T) {
	// With a key: the membership changes run over the TLS transport.
	xs := startTNodes(t, "r", MaxVoters+1, testKey(8))
	leader := leaderT(xs)
	if leader == nil {
		t.Fatal("no single leader")
	}
	ss := leader.node.Servers()
	voters := voterNames(ss)
	if len(voters) != MaxVoters {
		t.Fatalf("voters %v, want %d", voters, MaxVoters)
	}
	var spare string
	for _, s := range ss {
		if !s.Voter {
			spare = s.Host
		}
	}
	dead := pickDeadVoter(t, xs, leader)
	survivors := othersT(xs, dead)
	dead.node.Shutdown()
	waitForState(t, 10*time.Second+leader.node.voterGrace(), fmt.Sprintf("the leader to replace the dead voter %s by the non-voter %s", dead.name, spare), func() (bool, string) {
		l := leaderT(survivors)
		if l == nil {
			return false, "no single leader"
		}
		ss := l.node.Servers()
		return slices.Equal(serverNames(ss), namesT(survivors)) && slices.Equal(voterNames(ss), namesT(survivors)),
			fmt.Sprintf("%s: servers %v voters %v", l.name, serverNames(ss), voterNames(ss))
	})
	l := leaderT(survivors)
	if l == nil || !strings.Contains(l.logs.String(), "non-voter promoted to replace a failed voter") {
		t.Fatal("the leader did not log the promotion")
	}
	if err := survivors[0].propose("after-replacement"); err != nil {
		t.Fatalf("after the replacement: %v", err)
	}
}

func TestDeadVoterIsKeptWhenOnlyThreeVote(t *testing.T) {
	xs := startTNodes(t, "t", 3, nil)
	leader := leaderT(xs)
	if leader == nil {
		t.Fatal("no single leader")
	}
	dead := pickDeadVoter(t, xs, leader)
	survivors := othersT(xs, dead)
	dead.node.Shutdown()
	waitFor(t, 10*time.Second, "the leader's gossip to see "+dead.name+" gone", func() bool {
		return !slices.ContainsFunc(leader.node.Alive(), func(p Peer) bool { return p.Host == dead.name })
	})
	// Well past the grace: still three voters, the dead one among them.
	until := time.Now().Add(2*leader.node.voterGrace() + time.Second)
	for time.Now().Before(until) {
		l := leaderT(survivors)
		if l == nil {
			t.Fatal("the survivors lost their leader")
		}
		if got := voterNames(l.node.Servers()); !slices.Equal(got, namesT(xs)) {
			t.Fatalf("%s: voters %v, want %v: a dead voter was removed with only three voting", l.name, got, namesT(xs))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := survivors[0].propose("two-of-three"); err != nil {
		t.Fatalf("two of three voters no longer commit: %v", err)
	}
}
