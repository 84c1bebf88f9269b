package shadowset_test

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/shadow-project/shadow/shadowset"
)

// TestTableComplete checks that every (event, focus) group has exactly one
// cell per prior-operation column, that each event has one delay flag, and
// that the seed's fourteen printed rows are all there.
func TestTableComplete(t *testing.T) {
	type key struct {
		ev    shadowset.TableEvent
		focus shadowset.Focus
	}
	cells := map[key]map[shadowset.Prior]int{}
	delay := map[shadowset.TableEvent]bool{}
	for _, e := range shadowset.Table() {
		k := key{e.Event, e.Focus}
		if cells[k] == nil {
			cells[k] = map[shadowset.Prior]int{}
		}
		cells[k][e.Prior]++
		if d, ok := delay[e.Event]; ok && d != e.Delay {
			t.Errorf("%v has mixed delay flags", e.Event)
		}
		delay[e.Event] = e.Delay
		if e.Outcome == 0 || e.NewWork == 0 || e.Text == "" {
			t.Errorf("incomplete cell %+v", e)
		}
	}
	if len(cells) != 14 {
		t.Errorf("table has %d rows, the seed has 14", len(cells))
	}
	for k, ps := range cells {
		for p := shadowset.PriorMergeOrHBMM; p <= shadowset.PriorMinicopy; p++ {
			if ps[p] != 1 {
				t.Errorf("%v / %v has %d cells for %v", k.ev, k.focus, ps[p], p)
			}
		}
	}
	wantDelay := map[shadowset.TableEvent]bool{
		shadowset.RowFailureCommon: true, shadowset.RowFailureNoCommon: true, shadowset.RowAbort: true,
		shadowset.RowDismount: false, shadowset.RowMemberAdded: false, shadowset.RowMount: false,
		shadowset.RowDemandMerge: false, shadowset.RowEvalResources: true,
	}
	for ev, d := range wantDelay {
		if delay[ev] != d {
			t.Errorf("%v: delay %v, the seed says %v", ev, delay[ev], d)
		}
	}
}

// TestTableMatchesSeed checks every event, focus, new-work and cell text
// word for word against the seed document.
func TestTableMatchesSeed(t *testing.T) {
	raw, err := os.ReadFile("../testdata/seeds/table8-1.txt")
	if err != nil {
		t.Fatal(err)
	}
	seed := regexp.MustCompile(`\s+`).ReplaceAllString(string(raw), " ")
	norm := func(s string) string { return regexp.MustCompile(`\s+`).ReplaceAllString(s, " ") }
	for _, e := range shadowset.Table() {
		for _, s := range []string{e.Event.String(), e.Focus.String(), e.WorkText, e.Text} {
			if !strings.Contains(seed, norm(s)) {
				t.Errorf("%q is not in the seed table", s)
			}
		}
	}
}
