package replay_test

import (
	"reflect"
	"strings"
	"testing"

	"github.com/shadow-project/shadow/shadowset"
	"github.com/shadow-project/shadow/shadowset/replay"
)

// accepted runs a script's events through a core and returns those it
// accepted, in order (what an agent's log records), with the core.
func accepted(t *testing.T, dirs []replay.Directive) ([]shadowset.Event, *shadowset.Core) {
	c := shadowset.New()
	var evs []shadowset.Event
	for _, d := range dirs {
		for _, ev := range d.Events {
			if err := c.Step(ev); err == nil {
				evs = append(evs, ev)
			}
			c.Advance()
		}
	}
	return evs, c
}

// TestFormatRoundTrip: every script's accepted events, printed by Format
// and parsed again, drive a fresh core to the same state (sets, ops,
// hosts, clock and delay window), and the printed script parses without
// error: `show --events` output replays to the decisions it records.
func TestFormatRoundTrip(t *testing.T) {
	for _, file := range scripts(t) {
		evs, want := accepted(t, parseFile(t, file))
		script, err := replay.Format(evs)
		if err != nil {
			t.Fatalf("%s: Format: %v", file, err)
		}
		dirs, err := replay.Parse("formatted", strings.NewReader(script))
		if err != nil {
			t.Fatalf("%s: the formatted script does not parse: %v\n%s", file, err, script)
		}
		r := replay.NewRunner(nil)
		if err := r.Run(dirs); err != nil {
			t.Fatalf("%s: the formatted script does not replay: %v\n%s", file, err, script)
		}
		got := r.Core
		if !reflect.DeepEqual(got.Sets(), want.Sets()) || !reflect.DeepEqual(got.Hosts(), want.Hosts()) || got.Now() != want.Now() {
			t.Fatalf("%s: replaying the formatted events reached another state\ngot  %+v\nwant %+v\nscript:\n%s", file, got.Sets(), want.Sets(), script)
		}
		go1, ge := got.Window()
		wo, we := want.Window()
		if go1 != wo || ge != we {
			t.Fatalf("%s: delay window %v/%s after replay, want %v/%s", file, go1, ge, wo, we)
		}
	}
}

// TestFormatStaleReports: a report of an op run the core already stopped
// is written as a comment (the language's progress names the running op,
// so writing it would move another run's checkpoint).
func TestFormatStaleReports(t *testing.T) {
	evs := []shadowset.Event{
		{Kind: shadowset.EvHostUp, Host: "A"},
		{Kind: shadowset.EvHostUp, Host: "B"},
		{Kind: shadowset.EvSetDelay},
		{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA1", Members: []string{"M1", "M2"}, Mounted: []string{"A", "B"}, Dirty: true}},
	}
	c := shadowset.New()
	for _, ev := range evs {
		if err := c.Step(ev); err != nil {
			t.Fatal(err)
		}
	}
	var start shadowset.Action
	for _, a := range c.Ready().Actions {
		if a.Kind == shadowset.ActStart {
			start = a
		}
	}
	if start.Kind == 0 {
		t.Fatalf("no merge started: %+v", c.Ready())
	}
	// The merge's host fails; a late report of that run follows.
	evs = append(evs,
		shadowset.Event{Kind: shadowset.EvHostFailed, Host: start.Host},
		shadowset.Event{Kind: shadowset.EvProgress, Set: "DSA1", Op: start.Op, Attempt: start.Attempt, Host: start.Host, LBN: 64})
	script, err := replay.Format(evs)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(script, "# stale progress") || strings.Contains(script, "\nprogress DSA1") {
		t.Fatalf("the stale report is not a comment:\n%s", script)
	}
	if _, err := replay.Format([]shadowset.Event{{Kind: shadowset.EvHostUp, Host: "a b"}}); err == nil {
		t.Fatal("a host name with a space was written into a script")
	}
}

// TestFormatMasterLists: an agent's policy sends master lists
// (HBMMLists), not the one-list form; Format must keep every list and
// count, so that a replay of `show --events` chooses the same masters.
func TestFormatMasterLists(t *testing.T) {
	for i, lists := range [][]shadowset.MasterList{
		{{Hosts: []string{"A", "B"}}},
		{{Hosts: []string{"A", "B", "C"}, Count: 2}},
		{{Hosts: []string{"A", "B"}, Count: 1}, {Hosts: []string{"C", "*"}, Count: 1}},
		{{Hosts: []string{"A", "B"}, Count: 1}, {Hosts: []string{"C", "*"}, Count: 1}},
		{{Hosts: []string{"A", "B"}}},
	} {
		// The last two carry a reset threshold too.
		reset := uint64(0)
		if i >= 3 {
			reset = 4096 * uint64(i)
		}
		dirs, err := replay.Parse("setup", strings.NewReader("nodes A B C D\nset DSA1 members=M1,M2 mounted=A,B,C,D\n"))
		if err != nil {
			t.Fatal(err)
		}
		dirs = append(dirs, replay.Directive{Events: []shadowset.Event{{Kind: shadowset.EvHBMM, Set: "DSA1", Spec: &shadowset.SetSpec{Name: "DSA1", HBMMLists: lists, HBMMReset: reset}}}})
		evs, want := accepted(t, dirs)
		if evs[len(evs)-1].Kind != shadowset.EvHBMM {
			t.Fatalf("lists %+v refused", lists)
		}
		script, err := replay.Format(evs)
		if err != nil {
			t.Fatal(err)
		}
		dirs, err = replay.Parse("formatted", strings.NewReader(script))
		if err != nil {
			t.Fatalf("%v\n%s", err, script)
		}
		r := replay.NewRunner(nil)
		if err := r.Run(dirs); err != nil {
			t.Fatalf("%v\n%s", err, script)
		}
		gv, _ := r.Core.Set("DSA1")
		wv, _ := want.Set("DSA1")
		if gv.HBMMReset != reset || wv.HBMMReset != reset {
			t.Errorf("lists %+v: reset threshold %d after the replay of\n%s\nand %d in the core, want %d", lists, gv.HBMMReset, script, wv.HBMMReset, reset)
		}
		if !reflect.DeepEqual(gv.Masters, wv.Masters) || !reflect.DeepEqual(gv.Lists, wv.Lists) || len(wv.Masters) == 0 {
			t.Errorf("lists %+v: replay of\n%s\nchose masters %v (lists %+v), the core %v (lists %+v)", lists, script, gv.Masters, gv.Lists, wv.Masters, wv.Lists)
		}
	}
}

// TestMinicopyHostRules: a minicopy runs on the host holding its bitmap,
// unless the rules of an older core level are in force (a cluster in a
// rolling upgrade), where the highest-priority host runs it.
func TestMinicopyHostRules(t *testing.T) {
	const script = `nodes A B
set DSA1 members=m1a,m1b,m1c mounted=A,B
remove DSA1 m1c minicopy on=B
add DSA1 m1c
`
	for _, c := range []struct {
		rules shadowset.Rules
		want  string
	}{{shadowset.Rules{}, "B"}, {shadowset.Rules{MinicopyAnyHost: true}, "A"}} {
		dirs, err := replay.Parse("rules", strings.NewReader(script))
		if err != nil {
			t.Fatal(err)
		}
		r := replay.NewRunner(nil)
		r.Core.SetRules(c.rules)
		if err := r.Run(dirs); err != nil {
			t.Fatal(err)
		}
		sv, _ := r.Core.Set("DSA1")
		if len(sv.Ops) != 1 || sv.Ops[0].Kind != shadowset.Minicopy || sv.Ops[0].Host != c.want {
			t.Errorf("rules %+v: ops %+v, want a minicopy running on %s", c.rules, sv.Ops, c.want)
		}
	}
}
