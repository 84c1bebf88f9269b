package shadowset_test

import (
	"cmp"
	"fmt"
	"strings"
	"testing"

	"github.com/cockroachdb/datadriven"
	"github.com/shadow-project/shadow/shadowset"
	"github.com/shadow-project/shadow/shadowset/replay"
)

// TestInteraction runs the golden traces in testdata/ the way etcd-io/raft
// runs its interaction tests: each command is a replay directive, and its
// expected output is every action and note the core emitted for it (or
// "ok" for an expect). Regenerate with `go test ./shadowset -rewrite` and
// review the diff.
//
// Extra commands:
//
//	print-table   # Table 8-1 as implemented
//	show          # every set with its ops in queue order
//	masters       # every HBMM set's masters, gaps, and minimerges' holders and writers
func TestInteraction(t *testing.T) {
	datadriven.Walk(t, "testdata", func(t *testing.T, path string) {
		r := replay.NewRunner(nil)
		datadriven.RunTest(t, path, func(t *testing.T, d *datadriven.TestData) string {
			switch d.Cmd {
			case "print-table":
				return shadowset.FormatTable()
			case "show":
				return show(r.Core)
			case "masters":
				return masters(r.Core)
			}
			line := d.Cmd
			for _, a := range d.CmdArgs {
				switch len(a.Vals) {
				case 0:
					line += " " + a.Key
				case 1:
					line += " " + a.Key + "=" + a.Vals[0]
				default:
					d.Fatalf(t, "list arguments are written a,b without parentheses")
				}
			}
			dir, ok, err := replay.ParseLine(line)
			if err != nil || !ok {
				return fmt.Sprintf("error: %v\n", err)
			}
			out, err := r.Exec(dir)
			if err != nil {
				return fmt.Sprintf("error: %v\n", err)
			}
			return out
		})
	})
}

func show(c *shadowset.Core) string {
	var b strings.Builder
	open, end := c.Window()
	fmt.Fprintf(&b, "t=%s window=%v", c.Now(), open)
	if open {
		fmt.Fprintf(&b, " until=%s", end)
	}
	b.WriteString("\n")
	for _, s := range c.Sets() {
		fmt.Fprintf(&b, "%s mounted=%s", s.Name, strings.Join(s.Mounted, ","))
		for _, m := range s.Members {
			fmt.Fprintf(&b, " %s:%s", m.Name, m.Role)
		}
		for _, m := range s.Removed {
			fmt.Fprintf(&b, " %s:bitmap@%s", m.Name, m.Bitmap)
		}
		b.WriteString("\n")
		for _, op := range s.Ops {
			fmt.Fprintf(&b, "  %s\n", replay.DescribeOp(op))
		}
	}
	return b.String()
}

func masters(c *shadowset.Core) string {
	var b strings.Builder
	for _, s := range c.Sets() {
		if len(s.HBMM) == 0 {
			continue
		}
		fmt.Fprintf(&b, "%s masters=%s", s.Name, strings.Join(s.Masters, ","))
		for _, g := range s.Gaps {
			fmt.Fprintf(&b, " gap=%s>%s", g.Master, g.Writer)
		}
		if s.HBMMWrite == shadowset.WriteActive {
			b.WriteString(" write=active")
			for _, w := range s.Mounted {
				fmt.Fprintf(&b, " %s>%s", w, cmp.Or(s.Active(w), "none"))
			}
		}
		b.WriteString("\n")
		for _, op := range s.Ops {
			if op.Kind == shadowset.Minimerge {
				fmt.Fprintf(&b, "  op%d holders=%s writers=%s\n", op.ID, strings.Join(op.Holders, ","), strings.Join(op.Writers, ","))
			}
		}
	}
	if b.Len() == 0 {
		return "no HBMM set\n"
	}
	return b.String()
}
