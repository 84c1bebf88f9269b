package agent

import (
	"fmt"
	"slices"
	"strings"

	"github.com/shadow-project/shadow/shadowset"
	"github.com/shadow-project/shadow/shadowset/replay"
)

// RecentEvents gives the status page (metrics.EventSource) the last n
// events of the ordered log as replay lines, and the members expelled
// after an I/O error that have not come back, by set. Formatting replays
// the whole history, so the lines are kept until the history grows.
func (a *Agent) RecentEvents(n int) ([]string, map[string][]string) {
	hist := a.elog.History()
	expelled := map[string][]string{}
	for _, ev := range hist {
		switch ev.Kind {
		case shadowset.EvIOError:
			if !slices.Contains(expelled[ev.Set], ev.Member) {
				expelled[ev.Set] = append(expelled[ev.Set], ev.Member)
			}
		case shadowset.EvAddMember, shadowset.EvRemoveMember:
			expelled[ev.Set] = slices.DeleteFunc(expelled[ev.Set], func(m string) bool { return m == ev.Member })
		}
	}
	for set, ms := range expelled {
		if len(ms) == 0 {
			delete(expelled, set)
		}
	}
	a.statusMu.Lock()
	defer a.statusMu.Unlock()
	if len(hist) != a.statusLen {
		script, err := replay.Format(hist)
		if err != nil {
			// (The page still shows what happened, if not as a script.)
			a.statusLines = a.statusLines[:0]
			for _, ev := range hist {
				a.statusLines = append(a.statusLines, fmt.Sprintf("%s %s %s %s", ev.Kind, ev.Set, ev.Member, ev.Host))
			}
		} else {
			a.statusLines = strings.Split(strings.TrimSuffix(script, "\n"), "\n")
		}
		a.statusLen = len(hist)
	}
	// The last n, without the engines' progress reports (one per
	// checkpoint: they would crowd out everything else; the page shows
	// progress as bars).
	var lines []string
	for i := len(a.statusLines) - 1; i >= 0 && len(lines) < n; i-- {
		if !strings.HasPrefix(a.statusLines[i], "progress ") {
			lines = append(lines, a.statusLines[i])
		}
	}
	slices.Reverse(lines)
	return lines, expelled
}
