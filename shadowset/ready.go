package shadowset

import (
	"fmt"
	"strings"
	"time"
)

// ActionKind says what the host named in an action must do.
type ActionKind uint8

const (
	// ActStart: start (fresh, continued or restarted) Op on Host at LBN.
	ActStart ActionKind = iota + 1
	// ActStop: stop Op on Host now; Reason says why.
	ActStop
	// ActSuspend: stop Op on Host and keep it bound there.
	ActSuspend
	// ActTimer: deliver an EvTick that reaches virtual time At; the delay
	// window closes then.
	ActTimer
	// ActDone: Op completed and left the set (copy target now full, bitmap
	// deleted): every host updates its view.
	ActDone
)

var actionKindNames = [...]string{ActStart: "start", ActStop: "stop", ActSuspend: "suspend", ActTimer: "timer", ActDone: "done"}

func (k ActionKind) String() string {
	if int(k) < len(actionKindNames) && actionKindNames[k] != "" {
		return actionKindNames[k]
	}
	return fmt.Sprintf("ActionKind(%d)", uint8(k))
}

// Action is one thing the core asks the world to do.
type Action struct {
	Kind   ActionKind
	Op     OpID
	Set    string
	OpKind OpKind
	Host   string
	LBN    uint64
	Target string
	// Mode for ActStart: zero for a fresh start, WordContinued or
	// WordRestarted.
	Mode Word
	// Reason for ActStop.
	Reason string
	// At for ActTimer.
	At time.Duration
	// Attempt for ActStart: progress and completion reports of this run
	// carry it back.
	Attempt uint64
}

func (a Action) String() string {
	var b strings.Builder
	switch a.Kind {
	case ActTimer:
		fmt.Fprintf(&b, "timer at=%s", a.At)
		return b.String()
	case ActStart:
		mode := "start"
		if a.Mode == WordContinued {
			mode = "continue"
		} else if a.Mode == WordRestarted {
			mode = "restart"
		}
		fmt.Fprintf(&b, "%s %s op%d %s on=%s lbn=%d", mode, a.Set, a.Op, a.OpKind, a.Host, a.LBN)
	default:
		fmt.Fprintf(&b, "%s %s op%d %s", a.Kind, a.Set, a.Op, a.OpKind)
		if a.Host != "" {
			fmt.Fprintf(&b, " on=%s", a.Host)
		}
		fmt.Fprintf(&b, " lbn=%d", a.LBN)
	}
	if a.Target != "" {
		fmt.Fprintf(&b, " target=%s", a.Target)
	}
	if a.Reason != "" {
		fmt.Fprintf(&b, " (%s)", a.Reason)
	}
	return b.String()
}

// Ready is the work accumulated since the last Advance. Actions must be
// carried out in order by the hosts they name; Notes are for the log (the
// core has no logger).
type Ready struct {
	Actions []Action
	Notes   []string
}

// Empty reports whether there is nothing to do.
func (r Ready) Empty() bool { return len(r.Actions) == 0 && len(r.Notes) == 0 }
