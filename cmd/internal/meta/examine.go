package meta

import (
	"fmt"
	"strconv"
	"strings"
	"text/tabwriter"
	"unicode"
)

// Examine renders m and Read's warnings for people, like mdadm --examine.
// Strings from the device are quoted when they hold anything but
// printable characters, so a corrupt or hostile name cannot forge lines.
func Examine(m *Metadata, warnings []string) string {
	var b strings.Builder
	kv := func(k, format string, args ...any) {
		fmt.Fprintf(&b, "%15s : %s\n", k, fmt.Sprintf(format, args...))
	}
	kv("Magic", "%s", magic[:])
	kv("Version", "%d", m.Version)
	kv("Set Name", "%s", printable(m.SetName))
	kv("Set UUID", "%s", m.SetUUID)
	kv("Member UUID", "%s", m.MemberUUID)
	if !m.Cluster.IsZero() {
		kv("Cluster", "%s (written by incarnation %016x at log index %d)", m.Cluster.UUID, m.Cluster.Incarnation, m.Cluster.LogIndex)
	}
	kv("Generation", "%s", m.Generation)
	if len(m.History) == 0 {
		kv("History", "(none)")
	} else {
		hist := make([]string, len(m.History))
		for i, g := range m.History {
			hist[i] = g.String()
		}
		kv("History", "%s", strings.Join(hist, ", "))
	}
	state := "clean"
	if m.Dirty {
		state = "dirty (needs a merge if found at mount)"
	}
	if m.MergeUnderway {
		state += ", merge underway"
	}
	kv("State", "%s", state)
	kv("Copy Checkpoint", "LBN %d (%d bytes)", m.CopyCheckpoint, m.CopyCheckpoint*LBNSize)
	if m.WriteLog.Length == 0 && m.WriteLog.Offset == 0 {
		kv("Write Log", "none")
	} else {
		kv("Write Log", "offset %d length %d flags %#x", m.WriteLog.Offset, m.WriteLog.Length, m.WriteLog.Flags)
	}
	kv("Slot Used", "%s (seq %d)", m.Slot, m.Seq)

	fmt.Fprintf(&b, "%15s : %d\n", "Members", len(m.Members))
	if len(m.Members) > 0 {
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "     #\tMember UUID\tRole\tPath hint\n")
		for i, x := range m.Members {
			hint := printable(x.PathHint)
			if hint == "" {
				hint = "-"
			}
			if x.UUID == m.MemberUUID {
				hint += "  (this member)"
			}
			fmt.Fprintf(tw, "     %d\t%s\t%s\t%s\n", i, x.UUID, x.Role, hint)
		}
		tw.Flush()
	}
	if _, ok := m.Member(m.MemberUUID); !ok && len(m.Members) > 0 {
		fmt.Fprintf(&b, "%15s : this member is not in its own member table\n", "Note")
	}
	if len(warnings) > 0 {
		b.WriteString("Warnings:\n")
		for _, w := range warnings {
			fmt.Fprintf(&b, "  %s\n", printable(w))
		}
	}
	return b.String()
}

// printable returns s as is when every rune is printable, else quoted.
func printable(s string) string {
	for _, r := range s {
		if !unicode.IsPrint(r) || r == unicode.ReplacementChar {
			return strconv.Quote(s)
		}
	}
	return s
}
