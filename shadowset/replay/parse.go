// Package replay owns the event-replay language: it parses scripts of
// transient-state events and expectations, feeds the events through the
// shadowset core, and checks the expectations. It is pure like the core
// (callers hand it readers and writers); cmd/shadow's replay verb and the
// tests both use it, so a script means the same thing everywhere.
package replay

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/shadow-project/shadow/shadowset"
)

// ErrSyntax marks a line the language does not accept.
var ErrSyntax = errors.New("replay: bad line")

// Directive is one parsed line.
type Directive struct {
	File string
	Line int
	Text string
	// Events to step, in order (nodes gives several). Empty for expect.
	Events []shadowset.Event
	Expect *Expect
	// Refused: the line was "refused EVENT...": the core must refuse
	// every event (and so stay unchanged).
	Refused bool
}

// Pos is FILE:LINE.
func (d Directive) Pos() string { return fmt.Sprintf("%s:%d", d.File, d.Line) }

// Expect is one expect directive.
type Expect struct {
	Set string
	// Idle: the set has no op.
	Idle bool
	// Queue, when HasQueue: the kinds in run order.
	Queue    []shadowset.OpKind
	HasQueue bool
	// Window, when non-empty: "open" or "closed"; Until is checked if set.
	Window   string
	Until    time.Duration
	HasUntil bool
	// Op filters; exactly one op must match all that are set.
	Kind       shadowset.OpKind
	State      shadowset.OpState
	On         string
	LBN        uint64
	HasLBN     bool
	Target     string
	History    []shadowset.Word
	HasHistory bool
	Added      int
	HasAdded   bool
}

// Parse reads a whole script. The first bad line stops it, and the error
// names FILE:LINE.
func Parse(file string, r io.Reader) ([]Directive, error) {
	var out []Directive
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	n := 0
	for sc.Scan() {
		n++
		d, ok, err := ParseLine(sc.Text())
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %s: %w", file, n, strings.TrimSpace(sc.Text()), err)
		}
		if !ok {
			continue
		}
		d.File, d.Line = file, n
		out = append(out, d)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s:%d: %w", file, n+1, err)
	}
	return out, nil
}

// args holds a line's positional words and key=value options.
type args struct {
	cmd  string
	pos  []string
	kv   map[string]string
	used map[string]bool
}

func splitLine(line string) (args, error) {
	a := args{kv: map[string]string{}, used: map[string]bool{}}
	fields := strings.Fields(line)
	a.cmd = fields[0]
	for _, f := range fields[1:] {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			a.pos = append(a.pos, f)
			continue
		}
		if k == "" {
			return a, fmt.Errorf("%w: %q has no key before '='", ErrSyntax, f)
		}
		if _, dup := a.kv[k]; dup {
			return a, fmt.Errorf("%w: %s= given twice", ErrSyntax, k)
		}
		a.kv[k] = v
	}
	return a, nil
}

func (a *args) opt(k string) (string, bool) {
	v, ok := a.kv[k]
	if ok {
		a.used[k] = true
	}
	return v, ok
}

// done rejects options nobody asked for and positional words beyond want.
func (a *args) done(want int) error {
	if len(a.pos) > want {
		return fmt.Errorf("%w: %s: unexpected %q", ErrSyntax, a.cmd, strings.Join(a.pos[want:], " "))
	}
	for k := range a.kv {
		if !a.used[k] {
			return fmt.Errorf("%w: %s: unknown option %s=", ErrSyntax, a.cmd, k)
		}
	}
	return nil
}

func (a *args) need(n int, what string) error {
	if len(a.pos) < n {
		return fmt.Errorf("%w: %s needs %s", ErrSyntax, a.cmd, what)
	}
	return nil
}

// list splits a comma-separated list; an empty value is an empty list.
func list(v string) ([]string, error) {
	if v == "" {
		return nil, nil
	}
	parts := strings.Split(v, ",")
	for _, p := range parts {
		if p == "" {
			return nil, fmt.Errorf("%w: empty item in list %q", ErrSyntax, v)
		}
	}
	return parts, nil
}

func parseDuration(v string) (time.Duration, error) {
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("%w: bad duration %q (want e.g. 500ms, 20s)", ErrSyntax, v)
	}
	return d, nil
}

func parseUint(what, v string) (uint64, error) {
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: bad %s %q (want a non-negative integer)", ErrSyntax, what, v)
	}
	return n, nil
}

func parseInt(what, v string) (int, error) {
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%w: bad %s %q (want a non-negative integer)", ErrSyntax, what, v)
	}
	return n, nil
}

// ParseLine parses one line; ok is false for blank and comment lines.
func ParseLine(line string) (d Directive, ok bool, err error) {
	if i := strings.IndexByte(line, '#'); i >= 0 {
		line = line[:i]
	}
	line = strings.TrimSpace(line)
	if line == "" {
		return d, false, nil
	}
	d.Text = line
	if rest, ok := strings.CutPrefix(line, "refused "); ok {
		inner, ok, err := ParseLine(rest)
		if err != nil || !ok {
			return d, false, err
		}
		if inner.Expect != nil || len(inner.Events) == 0 || inner.Refused {
			return d, false, fmt.Errorf("%w: refused needs an event line after it", ErrSyntax)
		}
		inner.Text, inner.Refused = line, true
		return inner, true, nil
	}
	a, err := splitLine(line)
	if err != nil {
		return d, false, err
	}
	ev := func(e shadowset.Event) { d.Events = append(d.Events, e) }
	onHost := func() string { h, _ := a.opt("on"); return h }
	needOn := func() (string, error) {
		h, ok := a.opt("on")
		if !ok || h == "" {
			return "", fmt.Errorf("%w: %s needs on=HOST", ErrSyntax, a.cmd)
		}
		return h, nil
	}
	want := 0
	switch a.cmd {
	case "nodes":
		if err := a.need(1, "at least one host"); err != nil {
			return d, false, err
		}
		for _, h := range a.pos {
			ev(shadowset.Event{Kind: shadowset.EvHostUp, Host: h})
		}
		want = len(a.pos)
	case "join", "fail":
		if err := a.need(1, "a host"); err != nil {
			return d, false, err
		}
		k := shadowset.EvHostUp
		if a.cmd == "fail" {
			k = shadowset.EvHostFailed
		}
		ev(shadowset.Event{Kind: k, Host: a.pos[0]})
		want = 1
	case "delay", "wait":
		if err := a.need(1, "a duration"); err != nil {
			return d, false, err
		}
		dur, err := parseDuration(a.pos[0])
		if err != nil {
			return d, false, err
		}
		k := shadowset.EvSetDelay
		if a.cmd == "wait" {
			k = shadowset.EvTick
		}
		ev(shadowset.Event{Kind: k, Duration: dur})
		want = 1
	case "set":
		spec, n, err := parseSet(&a)
		if err != nil {
			return d, false, err
		}
		ev(shadowset.Event{Kind: shadowset.EvDefineSet, Spec: spec})
		want = n
	case "op":
		spec, err := parseOp(&a)
		if err != nil {
			return d, false, err
		}
		ev(shadowset.Event{Kind: shadowset.EvDefineOp, OpSpec: spec})
		want = 2
	case "priority":
		if err := a.need(2, "a set and a priority"); err != nil {
			return d, false, err
		}
		h, err := needOn()
		if err != nil {
			return d, false, err
		}
		p, err := parseInt("priority", a.pos[1])
		if err != nil {
			return d, false, err
		}
		ev(shadowset.Event{Kind: shadowset.EvPriority, Set: a.pos[0], Host: h, N: p})
		want = 2
	case "max-ops":
		if err := a.need(2, "a host and a limit"); err != nil {
			return d, false, err
		}
		n, err := parseInt("op limit", a.pos[1])
		if err != nil {
			return d, false, err
		}
		ev(shadowset.Event{Kind: shadowset.EvMaxOps, Host: a.pos[0], N: n})
		want = 2
	case "abort", "dismount", "mount":
		if err := a.need(1, "a set"); err != nil {
			return d, false, err
		}
		h, err := needOn()
		if err != nil {
			return d, false, err
		}
		k := map[string]shadowset.EventKind{"abort": shadowset.EvAbort, "dismount": shadowset.EvDismount, "mount": shadowset.EvMount}[a.cmd]
		ev(shadowset.Event{Kind: k, Set: a.pos[0], Host: h})
		want = 1
	case "remove":
		if err := a.need(2, "a set and a member"); err != nil {
			return d, false, err
		}
		e := shadowset.Event{Kind: shadowset.EvRemoveMember, Set: a.pos[0], Member: a.pos[1], Host: onHost()}
		want = 2
		if len(a.pos) > 2 && a.pos[2] == "minicopy" {
			e.Minicopy = true
			want = 3
		}
		ev(e)
	case "io-error":
		if err := a.need(2, "a set and a member"); err != nil {
			return d, false, err
		}
		ev(shadowset.Event{Kind: shadowset.EvIOError, Set: a.pos[0], Member: a.pos[1], Host: onHost()})
		want = 2
	case "add":
		if err := a.need(2, "a set and a member"); err != nil {
			return d, false, err
		}
		e := shadowset.Event{Kind: shadowset.EvAddMember, Set: a.pos[0], Member: a.pos[1]}
		want = 2
		if len(a.pos) > 2 && a.pos[2] == "full" {
			e.FullCopy = true
			want = 3
		}
		ev(e)
	case "hbmm":
		if err := a.need(2, "a set and a host list (or none)"); err != nil {
			return d, false, err
		}
		spec := &shadowset.SetSpec{Name: a.pos[0]}
		if len(a.pos) > 2 {
			// Several master lists: HOSTS[/COUNT] each.
			for _, l := range a.pos[1:] {
				hosts, count, _ := strings.Cut(l, "/")
				ml := shadowset.MasterList{Hosts: strings.Split(hosts, ",")}
				if count != "" {
					n, err := strconv.Atoi(count)
					if err != nil || n < 1 {
						return d, false, fmt.Errorf("%w: hbmm list %q: want HOSTS or HOSTS/COUNT with a positive count", ErrSyntax, l)
					}
					ml.Count = n
				}
				spec.HBMMLists = append(spec.HBMMLists, ml)
			}
		} else if a.pos[1] != "none" {
			spec.HBMM = strings.Split(a.pos[1], ",")
		}
		if v, ok := a.opt("count"); ok {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || len(spec.HBMMLists) > 0 {
				return d, false, fmt.Errorf("%w: hbmm count=%q: want a positive number, for a single list", ErrSyntax, v)
			}
			spec.HBMMCount = n
		}
		if v, ok := a.opt("reset"); ok {
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil || n < 1 {
				return d, false, fmt.Errorf("%w: hbmm reset=%q: want a positive number of 512-byte blocks", ErrSyntax, v)
			}
			spec.HBMMReset = n
		}
		if v, ok := a.opt("write"); ok {
			if v != shadowset.WriteAll && v != shadowset.WriteActive {
				return d, false, fmt.Errorf("%w: hbmm write=%q: want %s or %s", ErrSyntax, v, shadowset.WriteAll, shadowset.WriteActive)
			}
			if v == shadowset.WriteActive {
				spec.HBMMWrite = v
			}
		}
		ev(shadowset.Event{Kind: shadowset.EvHBMM, Set: a.pos[0], Spec: spec})
		want = len(a.pos)
	case "covered":
		if err := a.need(1, "a set"); err != nil {
			return d, false, err
		}
		h, err := needOn()
		if err != nil {
			return d, false, err
		}
		v, _ := a.opt("masters")
		ms, err := list(v)
		if err != nil {
			return d, false, err
		}
		if len(ms) == 0 {
			return d, false, fmt.Errorf("%w: covered needs masters=HOST[,HOST]", ErrSyntax)
		}
		ev(shadowset.Event{Kind: shadowset.EvCovered, Set: a.pos[0], Host: h, Spec: &shadowset.SetSpec{Name: a.pos[0], HBMM: ms}})
		want = 1
	case "demand-merge", "complete", "forget":
		if err := a.need(1, "a set"); err != nil {
			return d, false, err
		}
		k := map[string]shadowset.EventKind{"demand-merge": shadowset.EvDemandMerge, "complete": shadowset.EvComplete, "forget": shadowset.EvForgetSet}[a.cmd]
		ev(shadowset.Event{Kind: k, Set: a.pos[0]})
		want = 1
	case "eval-resources":
		h, err := needOn()
		if err != nil {
			return d, false, err
		}
		ev(shadowset.Event{Kind: shadowset.EvEvalResources, Host: h})
	case "progress":
		if err := a.need(1, "a set"); err != nil {
			return d, false, err
		}
		v, ok := a.opt("lbn")
		if !ok {
			return d, false, fmt.Errorf("%w: progress needs lbn=N", ErrSyntax)
		}
		lbn, err := parseUint("lbn", v)
		if err != nil {
			return d, false, err
		}
		ev(shadowset.Event{Kind: shadowset.EvProgress, Set: a.pos[0], LBN: lbn})
		want = 1
	case "expect":
		x, n, err := parseExpect(&a)
		if err != nil {
			return d, false, err
		}
		d.Expect = x
		want = n
	default:
		return d, false, fmt.Errorf("%w: unknown directive %q", ErrSyntax, a.cmd)
	}
	if err := a.done(want); err != nil {
		return d, false, err
	}
	return d, true, nil
}

func parseSet(a *args) (*shadowset.SetSpec, int, error) {
	if err := a.need(1, "a set name"); err != nil {
		return nil, 0, err
	}
	spec := &shadowset.SetSpec{Name: a.pos[0]}
	v, ok := a.opt("members")
	if !ok {
		return nil, 0, fmt.Errorf("%w: set needs members=M1,M2", ErrSyntax)
	}
	var err error
	if spec.Members, err = list(v); err != nil {
		return nil, 0, err
	}
	if v, ok := a.opt("mounted"); ok {
		if spec.Mounted, err = list(v); err != nil {
			return nil, 0, err
		}
	}
	if v, ok := a.opt("hbmm"); ok {
		if spec.HBMM, err = list(v); err != nil {
			return nil, 0, err
		}
		if len(spec.HBMM) == 0 {
			return nil, 0, fmt.Errorf("%w: hbmm= needs at least one host", ErrSyntax)
		}
	}
	n := 1
	for _, w := range a.pos[1:] {
		switch w {
		case "controller":
			spec.Controller = true
		case "dirty":
			spec.Dirty = true
		default:
			return nil, 0, fmt.Errorf("%w: set: unexpected %q (flags are controller and dirty)", ErrSyntax, w)
		}
		n++
	}
	if spec.Controller && spec.HBMM != nil {
		return nil, 0, fmt.Errorf("%w: set %s: hbmm= and controller contradict each other", ErrSyntax, spec.Name)
	}
	return spec, n, nil
}

func parseOp(a *args) (*shadowset.OpSpec, error) {
	if err := a.need(2, "a set and a kind"); err != nil {
		return nil, err
	}
	k, err := shadowset.ParseOpKind(a.pos[1])
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrSyntax, err)
	}
	spec := &shadowset.OpSpec{Set: a.pos[0], Kind: k}
	spec.Host, _ = a.opt("on")
	spec.Target, _ = a.opt("target")
	spec.Bitmap, _ = a.opt("bitmap")
	if v, ok := a.opt("lbn"); ok {
		if spec.LBN, err = parseUint("lbn", v); err != nil {
			return nil, err
		}
	}
	return spec, nil
}

func parseExpect(a *args) (*Expect, int, error) {
	if err := a.need(1, "a set (or window)"); err != nil {
		return nil, 0, err
	}
	x := &Expect{}
	if a.pos[0] == "window" {
		if len(a.pos) < 2 || (a.pos[1] != "open" && a.pos[1] != "closed") {
			return nil, 0, fmt.Errorf("%w: expect window needs open or closed", ErrSyntax)
		}
		x.Window = a.pos[1]
		if v, ok := a.opt("until"); ok {
			d, err := parseDuration(v)
			if err != nil {
				return nil, 0, err
			}
			x.Until, x.HasUntil = d, true
		}
		return x, 2, nil
	}
	x.Set = a.pos[0]
	if v, ok := a.opt("queue"); ok {
		names, err := list(v)
		if err != nil {
			return nil, 0, err
		}
		for _, n := range names {
			k, err := shadowset.ParseOpKind(n)
			if err != nil {
				return nil, 0, fmt.Errorf("%w: %w", ErrSyntax, err)
			}
			x.Queue = append(x.Queue, k)
		}
		x.HasQueue = true
		return x, 1, nil
	}
	n := 1
	for _, w := range a.pos[1:] {
		if w == "idle" {
			x.Idle = true
		} else if k, err := shadowset.ParseOpKind(w); err == nil && x.Kind == 0 {
			x.Kind = k
		} else if s, err := shadowset.ParseOpState(w); err == nil && x.State == 0 {
			x.State = s
		} else {
			return nil, 0, fmt.Errorf("%w: expect: %q is not an op kind, a state or idle", ErrSyntax, w)
		}
		n++
	}
	if x.Idle && n > 2 {
		return nil, 0, fmt.Errorf("%w: expect %s idle takes nothing else", ErrSyntax, x.Set)
	}
	x.On, _ = a.opt("on")
	x.Target, _ = a.opt("target")
	if v, ok := a.opt("lbn"); ok {
		lbn, err := parseUint("lbn", v)
		if err != nil {
			return nil, 0, err
		}
		x.LBN, x.HasLBN = lbn, true
	}
	if v, ok := a.opt("added"); ok {
		added, err := parseInt("added", v)
		if err != nil {
			return nil, 0, err
		}
		x.Added, x.HasAdded = added, true
	}
	if v, ok := a.opt("history"); ok {
		x.HasHistory = true
		if v != "none" {
			words, err := list(v)
			if err != nil {
				return nil, 0, err
			}
			for _, w := range words {
				word, err := shadowset.ParseWord(w)
				if err != nil {
					return nil, 0, fmt.Errorf("%w: %w", ErrSyntax, err)
				}
				x.History = append(x.History, word)
			}
		}
	}
	if x.Idle && (x.On != "" || x.Target != "" || x.HasLBN || x.HasHistory || x.HasAdded) {
		return nil, 0, fmt.Errorf("%w: expect %s idle takes nothing else", ErrSyntax, x.Set)
	}
	return x, n, nil
}
