package replay

import (
	"fmt"
	"strings"

	"github.com/shadow-project/shadow/shadowset"
)

// Format writes events (an agent's or a cluster's ordered event log) as a
// script that replays to the same decisions: each event becomes its
// directive. A report of a run the core had already stopped (a stale
// progress or completion, which the core ignored) becomes a comment, since
// the language's progress and complete name the set's running op. Events
// the language cannot express (a name with a space or a comma) are an
// error rather than a script that means something else.
func Format(events []shadowset.Event) (string, error) {
	var b strings.Builder
	core := shadowset.New()
	for i, ev := range events {
		line, err := formatEvent(core, ev)
		if err != nil {
			return "", fmt.Errorf("replay: event %d (%s): %w", i+1, ev.Kind, err)
		}
		b.WriteString(line)
		b.WriteByte('\n')
		if err := core.Step(ev); err != nil {
			return "", fmt.Errorf("replay: event %d (%s) is refused by the core: %w", i+1, ev.Kind, err)
		}
		core.Advance()
	}
	return b.String(), nil
}

func formatEvent(core *shadowset.Core, ev shadowset.Event) (string, error) {
	for _, s := range []string{ev.Host, ev.Set, ev.Member} {
		if strings.ContainsAny(s, " ,#=\t\n") {
			return "", fmt.Errorf("name %q cannot be written in the replay language", s)
		}
	}
	on := func() string {
		if ev.Host == "" {
			return ""
		}
		return " on=" + ev.Host
	}
	switch ev.Kind {
	case shadowset.EvHostUp:
		return "join " + ev.Host, nil
	case shadowset.EvHostFailed:
		return "fail " + ev.Host, nil
	case shadowset.EvSetDelay:
		return "delay " + ev.Duration.String(), nil
	case shadowset.EvTick:
		return "wait " + ev.Duration.String(), nil
	case shadowset.EvDefineSet:
		s := ev.Spec
		if s == nil {
			return "", fmt.Errorf("define-set without a spec")
		}
		line := fmt.Sprintf("set %s members=%s mounted=%s", s.Name, strings.Join(s.Members, ","), strings.Join(s.Mounted, ","))
		if len(s.HBMM) > 0 {
			line += " hbmm=" + strings.Join(s.HBMM, ",")
		}
		if s.Controller {
			line += " controller"
		}
		if s.Dirty {
			line += " dirty"
		}
		return line, nil
	case shadowset.EvDefineOp:
		o := ev.OpSpec
		if o == nil {
			return "", fmt.Errorf("define-op without a spec")
		}
		line := fmt.Sprintf("op %s %s", o.Set, o.Kind)
		if o.Host != "" {
			line += " on=" + o.Host
		}
		if o.LBN != 0 {
			line += fmt.Sprintf(" lbn=%d", o.LBN)
		}
		if o.Target != "" {
			line += " target=" + o.Target
		}
		if o.Bitmap != "" {
			line += " bitmap=" + o.Bitmap
		}
		return line, nil
	case shadowset.EvPriority:
		return fmt.Sprintf("priority %s on=%s %d", ev.Set, ev.Host, ev.N), nil
	case shadowset.EvMaxOps:
		return fmt.Sprintf("max-ops %s %d", ev.Host, ev.N), nil
	case shadowset.EvAbort:
		return "abort " + ev.Set + on(), nil
	case shadowset.EvDismount:
		return "dismount " + ev.Set + on(), nil
	case shadowset.EvMount:
		return "mount " + ev.Set + on(), nil
	case shadowset.EvRemoveMember:
		line := "remove " + ev.Set + " " + ev.Member
		if ev.Minicopy {
			line += " minicopy"
		}
		return line + on(), nil
	case shadowset.EvIOError:
		return "io-error " + ev.Set + " " + ev.Member + on(), nil
	case shadowset.EvAddMember:
		line := "add " + ev.Set + " " + ev.Member
		if ev.FullCopy {
			line += " full"
		}
		return line, nil
	case shadowset.EvDemandMerge:
		return "demand-merge " + ev.Set, nil
	case shadowset.EvEvalResources:
		return "eval-resources on=" + ev.Host, nil
	case shadowset.EvForgetSet:
		return "forget " + ev.Set, nil
	case shadowset.EvHBMM:
		var spec shadowset.SetSpec
		if ev.Spec != nil {
			spec = *ev.Spec
		}
		if len(spec.HBMMLists) == 1 {
			spec.HBMM, spec.HBMMCount = spec.HBMMLists[0].Hosts, spec.HBMMLists[0].Count
		} else if len(spec.HBMMLists) > 1 {
			line := "hbmm " + ev.Set
			for _, l := range spec.HBMMLists {
				line += " " + strings.Join(l.Hosts, ",")
				if l.Count > 0 {
					line += fmt.Sprintf("/%d", l.Count)
				}
			}
			return line + hbmmOptions(spec), nil
		}
		hosts := "none"
		if len(spec.HBMM) > 0 {
			hosts = strings.Join(spec.HBMM, ",")
		}
		line := "hbmm " + ev.Set + " " + hosts
		if spec.HBMMCount > 0 {
			line += fmt.Sprintf(" count=%d", spec.HBMMCount)
		}
		return line + hbmmOptions(spec), nil
	case shadowset.EvCovered:
		var ms []string
		if ev.Spec != nil {
			ms = ev.Spec.HBMM
		}
		return "covered " + ev.Set + " on=" + ev.Host + " masters=" + strings.Join(ms, ","), nil
	case shadowset.EvProgress, shadowset.EvComplete:
		if stale(core, ev) {
			return fmt.Sprintf("# stale %s of op%d attempt %d from %s ignored (lbn=%d)", ev.Kind, ev.Op, ev.Attempt, ev.Host, ev.LBN), nil
		}
		if ev.Kind == shadowset.EvComplete {
			return "complete " + ev.Set, nil
		}
		return fmt.Sprintf("progress %s lbn=%d", ev.Set, ev.LBN), nil
	}
	return "", fmt.Errorf("no directive for event kind %s", ev.Kind)
}

// stale says whether the core would ignore a report (the core's own rule:
// the op is not running, on that host, in that attempt).
func stale(core *shadowset.Core, ev shadowset.Event) bool {
	if ev.Op == 0 {
		return false
	}
	sv, ok := core.Set(ev.Set)
	if !ok {
		return false // the core refuses it; Format says so
	}
	for _, op := range sv.Ops {
		if op.ID == ev.Op {
			return op.State != shadowset.Running || (ev.Host != "" && op.Host != ev.Host) || (ev.Attempt != 0 && ev.Attempt != op.Attempt)
		}
	}
	return true
}

// hbmmOptions are an hbmm line's options after its master lists.
func hbmmOptions(spec shadowset.SetSpec) string {
	var s string
	if spec.HBMMReset > 0 {
		s += fmt.Sprintf(" reset=%d", spec.HBMMReset)
	}
	if spec.HBMMWrite != "" {
		s += " write=" + spec.HBMMWrite
	}
	return s
}
