package agent

import (
	"fmt"
	"strings"
)

// ShowReport is `shadow show --json`: stable field names, documented in
// docs/cli.md. Add fields; never rename or remove one.
type ShowReport struct {
	Host string    `json:"host"`
	Sets []SetShow `json:"sets"`
}

// SetShow is one virtual unit.
type SetShow struct {
	Name      string       `json:"name"`
	State     string       `json:"state"`
	SizeBytes int64        `json:"size_bytes"`
	NBDURI    string       `json:"nbd_uri,omitempty"`
	Mounted   []string     `json:"mounted_on"`
	Priority  int          `json:"priority"`
	Members   []MemberShow `json:"members"`
	Ops       []OpShow     `json:"ops"`
}

// MemberShow is one member.
type MemberShow struct {
	Path string `json:"path"`
	// Role: "full" or "copy-target".
	Role     string `json:"role"`
	Master   bool   `json:"merge_master,omitempty"`
	ReadCost int    `json:"read_cost"`
	// ProgressPct is a copy target's copy progress, or a merge's on the
	// master; -1 when it has none.
	ProgressPct int `json:"progress_pct"`
}

// OpShow is one merge or copy.
type OpShow struct {
	ID          uint64   `json:"id"`
	Kind        string   `json:"kind"`
	State       string   `json:"state"`
	Host        string   `json:"host,omitempty"`
	LBN         uint64   `json:"lbn"`
	Target      string   `json:"target,omitempty"`
	ProgressPct int      `json:"progress_pct"`
	History     []string `json:"history"`
}

// pct is the share of the volume below an LBN, rounded down.
func pct(lbn uint64, size int64) int {
	if size <= 0 {
		return 0
	}
	p := int(int64(lbn) * 512 * 100 / size)
	return min(max(p, 0), 100)
}

// vuState renders OpenVMS's "Virtual Unit State" line.
func vuState(s SetShow) string {
	if len(s.Ops) == 0 {
		return "Steady State"
	}
	var parts []string
	where := ""
	for _, op := range s.Ops {
		what := "Copy"
		switch op.Kind {
		case "full-merge":
			what = "Merge"
		case "minimerge", "controller-minimerge":
			what = "MiniMerge"
		case "minicopy":
			what = "MiniCopy"
		}
		state := "Pending"
		if op.State == "running" {
			state = "Active"
			where = op.Host
		} else if op.State == "suspended" {
			state = "Suspended"
		}
		parts = append(parts, fmt.Sprintf("%s %s (%d%%)", what, state, op.ProgressPct))
	}
	out := strings.Join(parts, ",")
	if where != "" {
		out += " on " + where
	}
	return out
}

// FormatShow renders the report like OpenVMS SHOW SHADOW.
func FormatShow(r ShowReport, full bool) string {
	var b strings.Builder
	if len(r.Sets) == 0 {
		fmt.Fprintf(&b, "No shadow sets mounted on %s\n", r.Host)
		return b.String()
	}
	for i, s := range r.Sets {
		if i > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "_%s:  Volume Label: %s\n", s.Name, s.Name)
		fmt.Fprintf(&b, "Virtual Unit State: %s\n", s.State)
		fmt.Fprintf(&b, "  Size               %d bytes\n", s.SizeBytes)
		if s.NBDURI != "" {
			fmt.Fprintf(&b, "  NBD export         %s\n", s.NBDURI)
		}
		fmt.Fprintf(&b, "  Copy/Merge Priority %d\n", s.Priority)
		if full {
			fmt.Fprintf(&b, "  Mounted on         %s\n", strings.Join(s.Mounted, ","))
		}
		for _, m := range s.Members {
			role := "ShadowSetMember"
			switch {
			case m.Role == "copy-target":
				role = fmt.Sprintf("Copy Target (%d%%)", max(m.ProgressPct, 0))
			case m.Master && m.ProgressPct >= 0:
				role = fmt.Sprintf("Master Member, Merging (%d%%)", m.ProgressPct)
			case m.Master:
				role = "Master Member"
			}
			fmt.Fprintf(&b, "  Device %-30s %s\n", m.Path, role)
			fmt.Fprintf(&b, "    Read Cost          %d\n", m.ReadCost)
		}
		if full {
			for _, op := range s.Ops {
				fmt.Fprintf(&b, "  Op %d %s %s", op.ID, op.Kind, op.State)
				if op.Host != "" {
					fmt.Fprintf(&b, " on %s", op.Host)
				}
				fmt.Fprintf(&b, " at LBN %d (%d%%)", op.LBN, op.ProgressPct)
				if op.Target != "" {
					fmt.Fprintf(&b, " target %s", op.Target)
				}
				if len(op.History) > 0 {
					fmt.Fprintf(&b, " history %s", strings.Join(op.History, ","))
				}
				b.WriteString("\n")
			}
		}
	}
	return b.String()
}

// ProgressBar renders a bar for `show --watch`.
func ProgressBar(p, width int) string {
	p = min(max(p, 0), 100)
	filled := p * width / 100
	return "[" + strings.Repeat("#", filled) + strings.Repeat(".", width-filled) + fmt.Sprintf("] %3d%%", p)
}
