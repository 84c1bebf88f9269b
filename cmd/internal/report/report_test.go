package report

import (
	"strings"
	"testing"
)

func TestFormatShow(t *testing.T) {
	r := ShowReport{Host: "A", Sets: []SetShow{{
		Name: "DSA1", SizeBytes: 1 << 30, Priority: 5000, Mounted: []string{"A"},
		Members: []MemberShow{{Path: "/d/m1", Role: "full", Master: true, ReadCost: 100, ProgressPct: -1}, {Path: "/d/m2", Role: "copy-target", ReadCost: 100, ProgressPct: 32}},
		Ops:     []OpShow{{ID: 1, Kind: "full-copy", State: "running", Host: "A", ProgressPct: 32}},
	}}}
	r.Sets[0].State = VUState(r.Sets[0])
	out := FormatShow(r, false)
	for _, want := range []string{"Virtual Unit State: Copy Active (32%) on A", "Copy Target (32%)", "Master Member"} {
		if !strings.Contains(out, want) {
			t.Fatalf("show lacks %q:\n%s", want, out)
		}
	}
	if got := ProgressBar(50, 10); got != "[#####.....]  50%" {
		t.Fatalf("bar %q", got)
	}
}
