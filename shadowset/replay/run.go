package replay

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/shadow-project/shadow/shadowset"
)

// ErrExpect marks a failed expectation.
var ErrExpect = errors.New("replay: expect failed")

// Runner feeds directives through one core.
type Runner struct {
	Core *shadowset.Core
	// Trace, if set, receives a readable line per directive and per action
	// and note it caused.
	Trace io.Writer
	// AfterStep, if set, runs after every directive (tests shuffle the
	// core's internal order or snapshot it here).
	AfterStep func(c *shadowset.Core)
}

// NewRunner returns a runner over a fresh core.
func NewRunner(trace io.Writer) *Runner { return &Runner{Core: shadowset.New(), Trace: trace} }

// Run executes directives in order and stops at the first error, which
// names FILE:LINE.
func (r *Runner) Run(dirs []Directive) error {
	for _, d := range dirs {
		if _, err := r.Exec(d); err != nil {
			return fmt.Errorf("%s: %s: %w", d.Pos(), d.Text, err)
		}
	}
	return nil
}

// RunScript parses and runs one script.
func RunScript(file string, src io.Reader, trace io.Writer) error {
	dirs, err := Parse(file, src)
	if err != nil {
		return err
	}
	return NewRunner(trace).Run(dirs)
}

// Exec runs one directive and returns the trace it produced (actions and
// notes, one per line).
func (r *Runner) Exec(d Directive) (string, error) {
	var b strings.Builder
	if d.Expect != nil {
		if err := r.check(d.Expect); err != nil {
			return "", err
		}
		b.WriteString("ok\n")
	}
	for _, ev := range d.Events {
		err := r.Core.Step(ev)
		switch {
		case d.Refused && err == nil:
			return "", expectf("the core accepted %s, want it refused", ev.Kind)
		case d.Refused:
			fmt.Fprintf(&b, "refused: %v\n", err)
		case err != nil:
			return "", err
		}
	}
	rd := r.Core.Ready()
	for _, a := range rd.Actions {
		fmt.Fprintf(&b, "%s\n", a)
	}
	for _, n := range rd.Notes {
		fmt.Fprintf(&b, "note: %s\n", n)
	}
	r.Core.Advance()
	if r.Trace != nil {
		fmt.Fprintf(r.Trace, "t=%-6s %s\n", r.Core.Now(), d.Text)
		for _, l := range strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n") {
			if l != "" {
				fmt.Fprintf(r.Trace, "           %s\n", l)
			}
		}
	}
	if r.AfterStep != nil {
		r.AfterStep(r.Core)
	}
	return b.String(), nil
}

func expectf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrExpect}, args...)...)
}

func (r *Runner) check(x *Expect) error {
	if x.Window != "" {
		open, end := r.Core.Window()
		state := "closed"
		if open {
			state = "open"
		}
		if state != x.Window {
			return expectf("window is %s (until %s)", state, end)
		}
		if x.HasUntil && (!open || end != x.Until) {
			return expectf("window closes at %s, not %s", end, x.Until)
		}
		return nil
	}
	sv, ok := r.Core.Set(x.Set)
	if !ok {
		return fmt.Errorf("%w %q", shadowset.ErrUnknownSet, x.Set)
	}
	if x.Idle {
		if len(sv.Ops) != 0 {
			return expectf("%s is not idle; ops: %s", x.Set, describeOps(sv.Ops))
		}
		return nil
	}
	if x.HasQueue {
		var got []shadowset.OpKind
		for _, op := range sv.Ops {
			got = append(got, op.Kind)
		}
		if !slices.Equal(got, x.Queue) {
			return expectf("%s queue is %s; ops: %s", x.Set, kindList(got), describeOps(sv.Ops))
		}
		return nil
	}
	var matches []shadowset.OpView
	for _, op := range sv.Ops {
		if matchOp(x, op) {
			matches = append(matches, op)
		}
	}
	if len(matches) != 1 {
		return expectf("%d ops of %s match (want exactly 1); ops: %s", len(matches), x.Set, describeOps(sv.Ops))
	}
	return nil
}

// whereOp is the host an expect's on= speaks of: where the op runs or is
// suspended, or, for a canceled op, where it was canceled.
func whereOp(op shadowset.OpView) string {
	if op.Host == "" && op.State == shadowset.Canceled {
		return op.LastHost
	}
	return op.Host
}

func matchOp(x *Expect, op shadowset.OpView) bool {
	switch {
	case x.Kind != 0 && op.Kind != x.Kind,
		x.State != 0 && op.State != x.State,
		x.On != "" && whereOp(op) != x.On,
		x.HasLBN && op.LBN != x.LBN,
		x.Target != "" && op.Target != x.Target,
		x.HasHistory && !slices.Equal(op.History, x.History),
		x.HasAdded && op.AddedWork != x.Added:
		return false
	}
	return true
}

func kindList(ks []shadowset.OpKind) string {
	if len(ks) == 0 {
		return "(empty)"
	}
	var s []string
	for _, k := range ks {
		s = append(s, k.String())
	}
	return strings.Join(s, ",")
}

// DescribeOp renders an op the way expect lines are written.
func DescribeOp(op shadowset.OpView) string {
	var b strings.Builder
	fmt.Fprintf(&b, "op%d %s %s", op.ID, op.Kind, op.State)
	if h := whereOp(op); h != "" {
		fmt.Fprintf(&b, " on=%s", h)
	}
	fmt.Fprintf(&b, " lbn=%d", op.LBN)
	if op.Target != "" {
		fmt.Fprintf(&b, " target=%s", op.Target)
	}
	if op.AddedWork > 0 {
		fmt.Fprintf(&b, " added=%d", op.AddedWork)
	}
	h := "none"
	if len(op.History) > 0 {
		var ws []string
		for _, w := range op.History {
			ws = append(ws, w.String())
		}
		h = strings.Join(ws, ",")
	}
	fmt.Fprintf(&b, " history=%s", h)
	return b.String()
}

func describeOps(ops []shadowset.OpView) string {
	if len(ops) == 0 {
		return "(none)"
	}
	var s []string
	for _, op := range ops {
		s = append(s, "["+DescribeOp(op)+"]")
	}
	return strings.Join(s, " ")
}
