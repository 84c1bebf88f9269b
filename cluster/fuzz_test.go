package cluster

import (
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"github.com/shadow-project/shadow/shadowset"
)

// FuzzLogApply feeds arbitrary bytes to a Log as a log entry: Apply must
// never panic (a panic in the state machine stops every host at the same
// entry), and an entry it refuses must leave the log exactly as it was,
// since every other host refuses it too and goes on from the same state.
func FuzzLogApply(f *testing.F) {
	enc := func(e entry) []byte {
		if e.V == 0 {
			e.V = entryVersion
		}
		b, _ := json.Marshal(e)
		return b
	}
	seeds := [][]byte{
		enc(entry{Type: entryIncarnation, Host: "D", Inc: 11}),
		enc(entry{Type: entryIncarnation, Host: "A", Inc: 3}),
		enc(entry{Type: entryIncarnation, Host: "V", Inc: 1, Witness: true}),
		enc(evEntry("A", 2, shadowset.Event{Kind: shadowset.EvMount, Set: "DSA2", Host: "A"})),
		enc(evEntry("B", 5, shadowset.Event{Kind: shadowset.EvHostFailed, Host: "C"})),
		enc(entry{Type: entryEvent, Host: "A", Inc: 2, Ev: &shadowset.Event{Kind: shadowset.EvHostFailed, Host: "B"}, HostInc: 4}),
		enc(evEntry("C", 7, shadowset.Event{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA3", Members: []string{"/q"}, Dirty: true}})),
		enc(evEntry("C", 7, shadowset.Event{Kind: shadowset.EvTick, Duration: time.Hour})),
		enc(evEntry("B", 5, shadowset.Event{Kind: shadowset.EvComplete, Set: "DSA1", Host: "B", Op: 1})),
		enc(entry{Type: entryWindow, Host: "B", Inc: 5, Win: &Window{Set: "DSA1", Op: 1, Lo: 1, Hi: 2}}),
		enc(entry{Type: entryAck, Host: "C", Inc: 7, Win: &Window{Set: "DSA1", Seq: 1}}),
		enc(entry{Type: entryEvent, Host: "C", Inc: 7, Ev: &shadowset.Event{Kind: shadowset.EvMount, Set: "DSA1", Host: "C"}, Join: true}),
	}
	for _, b := range refusals() {
		seeds = append(seeds, b)
	}
	for _, b := range seeds {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		l, ap := populated(t, Hooks{})
		before, err := l.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		hist := l.History()
		if err := l.Apply(ap.index+1, data); err == nil {
			// Accepted: the log must still snapshot and restore.
			snap, err := l.Snapshot()
			if err != nil {
				t.Fatalf("snapshot after %q: %v", data, err)
			}
			if err := NewLog("A", 2, Hooks{}).Restore(snap); err != nil {
				t.Fatalf("restore after %q: %v", data, err)
			}
			return
		}
		after, err := l.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		if string(after) != string(before) || !reflect.DeepEqual(l.History(), hist) {
			t.Fatalf("refused entry %q changed the log:\n%s\n%s", data, before, after)
		}
	})
}
