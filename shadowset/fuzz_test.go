package shadowset_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/shadow-project/shadow/shadowset"
)

// universe is the small cluster the fuzzer plays with: enough hosts, sets
// and members for every row of Table 8-1 to fire.
var (
	fuzzHosts = []string{"A", "B", "C", "D"}
	fuzzSets  = []string{"DSA1", "DSA2", "DSA3"}
	fuzzKinds = []shadowset.OpKind{shadowset.FullMerge, shadowset.Minimerge, shadowset.ControllerMinimerge, shadowset.FullCopy, shadowset.Minicopy}
)

func fuzzMember(set int, i int) string { return fmt.Sprintf("m%d%d", set+1, i%4+1) }

func fuzzSetup(t testing.TB) *shadowset.Core {
	c := shadowset.New()
	for _, h := range fuzzHosts {
		mustStep(t, c, shadowset.Event{Kind: shadowset.EvHostUp, Host: h})
	}
	mustStep(t, c, shadowset.Event{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA1", Members: []string{"m11", "m12"}, Mounted: []string{"A", "B"}, HBMM: []string{"A", "B"}}})
	mustStep(t, c, shadowset.Event{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA2", Members: []string{"m21", "m22"}, Mounted: []string{"B", "C"}, Controller: true}})
	mustStep(t, c, shadowset.Event{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA3", Members: []string{"m31", "m32", "m33"}, Mounted: []string{"C", "D"}}})
	c.Advance()
	return c
}

func mustStep(t testing.TB, c *shadowset.Core, ev shadowset.Event) {
	t.Helper()
	if err := c.Step(ev); err != nil {
		t.Fatalf("step %+v: %v", ev, err)
	}
}

// decodeEvent turns a few bytes into an event over the universe. It
// returns the number of bytes used (0 when input is exhausted).
func decodeEvent(b []byte) (shadowset.Event, int) {
	if len(b) < 4 {
		return shadowset.Event{}, 0
	}
	k, x, y, z := int(b[0]), int(b[1]), int(b[2]), int(b[3])
	host := fuzzHosts[x%len(fuzzHosts)]
	si := y % len(fuzzSets)
	set := fuzzSets[si]
	var ev shadowset.Event
	switch k % 19 {
	case 0:
		ev = shadowset.Event{Kind: shadowset.EvHostFailed, Host: host}
	case 1:
		ev = shadowset.Event{Kind: shadowset.EvHostUp, Host: host}
	case 2:
		ev = shadowset.Event{Kind: shadowset.EvAbort, Set: set, Host: host}
	case 3:
		ev = shadowset.Event{Kind: shadowset.EvDismount, Set: set, Host: host}
	case 4:
		ev = shadowset.Event{Kind: shadowset.EvMount, Set: set, Host: host}
	case 5:
		ev = shadowset.Event{Kind: shadowset.EvRemoveMember, Set: set, Member: fuzzMember(si, z), Minicopy: z&4 != 0, Host: host}
	case 6:
		ev = shadowset.Event{Kind: shadowset.EvIOError, Set: set, Member: fuzzMember(si, z), Host: host}
	case 7:
		ev = shadowset.Event{Kind: shadowset.EvAddMember, Set: set, Member: fuzzMember(si, z), FullCopy: z&8 != 0}
	case 8:
		ev = shadowset.Event{Kind: shadowset.EvDemandMerge, Set: set}
	case 9:
		ev = shadowset.Event{Kind: shadowset.EvEvalResources, Host: host}
	case 10, 11:
		ev = shadowset.Event{Kind: shadowset.EvTick, Duration: time.Duration(z%30) * time.Second}
	case 12, 13:
		ev = shadowset.Event{Kind: shadowset.EvProgress, Set: set, LBN: uint64(z) * 100}
	case 14:
		ev = shadowset.Event{Kind: shadowset.EvComplete, Set: set}
	case 15:
		ev = shadowset.Event{Kind: shadowset.EvPriority, Set: set, Host: host, N: []int{0, 1000, 5000, 9000}[z%4]}
	case 16:
		ev = shadowset.Event{Kind: shadowset.EvMaxOps, Host: host, N: z % 4}
	case 17:
		spec := &shadowset.OpSpec{Set: set, Kind: fuzzKinds[z%len(fuzzKinds)], LBN: uint64(z) * 10}
		if z&8 != 0 {
			spec.Host = host
		}
		if spec.Kind.IsCopy() {
			spec.Target = fuzzMember(si, z>>4)
		}
		ev = shadowset.Event{Kind: shadowset.EvDefineOp, OpSpec: spec}
	case 18:
		var hosts []string
		for i, h := range fuzzHosts {
			if z&(1<<i) != 0 {
				hosts = append(hosts, h)
			}
		}
		ev = shadowset.Event{Kind: shadowset.EvHBMM, Set: set, Spec: &shadowset.SetSpec{Name: set, HBMM: hosts}}
	}
	return ev, 4
}

// opMark is what the checker remembers of an op between steps.
type opMark struct {
	lbn      uint64
	restarts int
}

func countRestarts(h []shadowset.Word) int {
	n := 0
	for _, w := range h {
		if w == shadowset.WordRestarted {
			n++
		}
	}
	return n
}

// checkStep applies ev to c and to a core restored from c's snapshot, and
// checks the invariants the foundation issue names.
func checkStep(t testing.TB, c *shadowset.Core, ev shadowset.Event, marks map[shadowset.OpID]opMark) {
	t.Helper()
	c.Advance()
	before, err := c.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	twin, err := shadowset.Restore(before)
	if err != nil {
		t.Fatalf("restore of a valid snapshot: %v", err)
	}
	err = c.Step(ev)
	twinErr := twin.Step(ev)
	if (err == nil) != (twinErr == nil) || (err != nil && err.Error() != twinErr.Error()) {
		t.Fatalf("restored core disagrees on %+v: %v vs %v", ev, err, twinErr)
	}
	after, _ := c.Snapshot()
	if err != nil {
		if !bytes.Equal(before, after) || !c.Ready().Empty() {
			t.Fatalf("refused event %+v (%v) changed the state", ev, err)
		}
		return
	}
	twinAfter, _ := twin.Snapshot()
	if !bytes.Equal(after, twinAfter) || !slices.Equal(c.Ready().Actions, twin.Ready().Actions) || !slices.Equal(c.Ready().Notes, twin.Ready().Notes) {
		t.Fatalf("snapshot+restore gives different next actions for %+v:\n%v\nvs\n%v", ev, c.Ready().Actions, twin.Ready().Actions)
	}
	if err := c.CheckInvariants(); err != nil {
		t.Fatalf("after %+v: %v\nstate: %s", ev, err, after)
	}
	perHost := map[string]int{}
	for _, sv := range c.Sets() {
		for _, op := range sv.Ops {
			if op.State == shadowset.Running {
				perHost[op.Host]++
			}
			if op.State == shadowset.Suspended && op.Host == "" {
				t.Fatalf("after %+v: %s op%d suspended on no host", ev, sv.Name, op.ID)
			}
			m, seen := marks[op.ID]
			r := countRestarts(op.History)
			if seen && op.LBN < m.lbn && r == m.restarts {
				t.Fatalf("after %+v: %s op%d checkpoint moved back %d -> %d without a restart (history %v)", ev, sv.Name, op.ID, m.lbn, op.LBN, op.History)
			}
			marks[op.ID] = opMark{lbn: op.LBN, restarts: r}
		}
	}
	// Ops only start below a host's limit; a lowered limit lets running
	// ones finish, so check only when the step started something.
	for _, a := range c.Ready().Actions {
		if a.Kind == shadowset.ActStart {
			for _, h := range c.Hosts() {
				if h.Name == a.Host && h.Running > h.MaxOps {
					t.Fatalf("after %+v: %s runs %d ops, limit %d", ev, h.Name, h.Running, h.MaxOps)
				}
			}
		}
	}
}

// maxFuzzEvents bounds one input: every step snapshots and restores the
// core, and longer sequences find nothing shorter ones do not.
const maxFuzzEvents = 120

func runBytes(t testing.TB, data []byte) {
	if len(data) > 4*maxFuzzEvents {
		data = data[:4*maxFuzzEvents]
	}
	c := fuzzSetup(t)
	marks := map[shadowset.OpID]opMark{}
	for len(data) > 0 {
		ev, n := decodeEvent(data)
		if n == 0 {
			return
		}
		data = data[n:]
		checkStep(t, c, ev, marks)
	}
}

// FuzzStep feeds random event sequences to the core and checks its
// invariants after every step.
func FuzzStep(f *testing.F) {
	f.Add([]byte{0, 1, 0, 0, 10, 0, 0, 25, 10, 0, 0, 25})
	f.Add([]byte{17, 0, 0, 8, 0, 0, 0, 0, 10, 0, 0, 29, 12, 0, 0, 5, 14, 0, 0, 0})
	f.Add([]byte{17, 1, 1, 10, 8, 0, 1, 0, 0, 1, 0, 0, 11, 0, 0, 20})
	f.Add([]byte{5, 0, 0, 4, 7, 0, 0, 1, 0, 0, 0, 0, 10, 0, 0, 21, 12, 1, 0, 3})
	f.Add([]byte{16, 2, 0, 1, 8, 0, 0, 0, 8, 0, 2, 0, 3, 2, 2, 0, 4, 0, 2, 0})
	f.Fuzz(func(t *testing.T, data []byte) { runBytes(t, data) })
}

// TestRandomEventSequences runs many seeded random sequences through the
// same checker, so plain `go test` explores more than the fuzz corpus.
func TestRandomEventSequences(t *testing.T) {
	n := 3000
	if testing.Short() {
		n = 300
	}
	for seed := range uint64(n) {
		rng := rand.New(rand.NewPCG(seed, 0x5ad0))
		data := make([]byte, 4*(20+rng.IntN(80)))
		for i := range data {
			data[i] = byte(rng.UintN(256))
		}
		t.Run(fmt.Sprint(seed), func(t *testing.T) { runBytes(t, data) })
		if t.Failed() {
			t.Fatalf("reproduce with seed %d", seed)
		}
	}
}

func FuzzRestore(f *testing.F) {
	c := fuzzSetup(f)
	snap, _ := c.Snapshot()
	f.Add(snap)
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`{"version":2}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := shadowset.Restore(b)
		if err != nil {
			return
		}
		// A restored core must survive any event without panicking.
		for i := range 18 {
			ev, _ := decodeEvent([]byte{byte(i), byte(i), byte(i), byte(i)})
			_ = c.Step(ev)
		}
	})
}
