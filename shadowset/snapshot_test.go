package shadowset_test

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/shadow-project/shadow/shadowset"
)

func TestRestoreRefusesOtherVersions(t *testing.T) {
	c := fuzzSetup(t)
	snap, err := c.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	bumped := strings.Replace(string(snap), `"version":1`, `"version":2`, 1)
	if _, err := shadowset.Restore([]byte(bumped)); !errors.Is(err, shadowset.ErrSnapshotVersion) {
		t.Fatalf("version 2 snapshot: %v, want ErrSnapshotVersion", err)
	}
	if _, err := shadowset.Restore(snap[:len(snap)/2]); err == nil {
		t.Fatal("truncated snapshot accepted")
	}
	// Two running ops in one set break an invariant: refused.
	mustStep(t, c, shadowset.Event{Kind: shadowset.EvDefineOp, OpSpec: &shadowset.OpSpec{Set: "DSA3", Kind: shadowset.FullMerge, Host: "C"}})
	snap, _ = c.Snapshot()
	var raw map[string]any
	if err := json.Unmarshal(snap, &raw); err != nil {
		t.Fatal(err)
	}
	for _, s := range raw["sets"].([]any) {
		set := s.(map[string]any)
		if set["name"] == "DSA3" {
			op := set["ops"].([]any)[0].(map[string]any)
			dup := map[string]any{}
			for k, v := range op {
				dup[k] = v
			}
			dup["id"] = 99
			set["ops"] = append(set["ops"].([]any), dup)
		}
	}
	raw["next_op"] = 100
	bad, _ := json.Marshal(raw)
	if _, err := shadowset.Restore(bad); err == nil || !strings.Contains(err.Error(), "runs 2 ops at once") {
		t.Fatalf("inconsistent snapshot: %v", err)
	}
}

// TestEventJSONRoundTrip: events travel through the ordered event log as
// JSON and must come back identical.
func TestEventJSONRoundTrip(t *testing.T) {
	evs := []shadowset.Event{
		{Kind: shadowset.EvHostFailed, Host: "B"},
		{Kind: shadowset.EvRemoveMember, Set: "DSA1", Member: "M2", Minicopy: true, Host: "A"},
		{Kind: shadowset.EvTick, Duration: 1500000000},
		{Kind: shadowset.EvProgress, Set: "DSA1", Op: 7, Host: "A", LBN: 1 << 40},
		{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA1", Members: []string{"M1", "M2"}, Mounted: []string{"A"}, HBMM: []string{"A"}, Dirty: true}},
		{Kind: shadowset.EvDefineOp, OpSpec: &shadowset.OpSpec{Set: "DSA1", Kind: shadowset.Minicopy, Host: "A", LBN: 9, Target: "M2", Bitmap: "A"}},
	}
	for _, ev := range evs {
		b, err := json.Marshal(ev)
		if err != nil {
			t.Fatal(err)
		}
		var back shadowset.Event
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(ev, back) {
			t.Fatalf("%s round-tripped to %+v", b, back)
		}
	}
}
