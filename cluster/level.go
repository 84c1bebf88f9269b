package cluster

import (
	"fmt"
	"github.com/shadow-project/shadow/shadowset"
	"slices"
	"strconv"
	"time"
)

// Core levels: rolling upgrades. Every host applies the same log with the
// same code path, or their states part. A build that changes what an
// entry does (a new entry type, a new rule) raises its core level, and
// its new behaviour is switched on through the log, in the same entry on
// every host, once every registered host runs a build that has it:
//
//   - Each registration carries the build's level (Supports).
//   - The cluster's level is the lowest level among the hosts registered
//     (incarnation not 0: up, or failed and not yet back), never lowered;
//     it moves when a registration or a clean leave raises that lowest
//     level, in that entry.
//   - A registration below the cluster's level is refused: that build
//     cannot follow the log any more.
//   - Every entry carries its proposer's build level (C) and snapshots the
//     cluster's level and each host's, for diagnosis.
//
// Procedure (docs/operations.md): stop one host cleanly (SIGTERM: it
// dismounts and leaves), start the new build on its state directory,
// mount its sets again; repeat. The new level switches on when the last
// host registers with the new build. A host that crashed keeps the old
// level in force until it comes back (with the new build) or leaves.
//
// Levels:
//
//	1: the cluster issue's core: incarnations, events, windows, write-log
//	   slots, leaves.
//	2: leases (lease.go): renewal entries, lapses recorded as failures;
//	   member I/O is fenced from the first renewal on.
//	3: HBMM across hosts: master candidates with a count, per-writer
//	   coverage (EvCovered). Below it a cluster refuses HBMM policies: a
//	   level-2 build keeps a master bitmap of its own writes only, which
//	   cannot cover another host's. Minicopy across hosts: a minicopy runs
//	   on the host holding its bitmap (shadowset.Rules), and the other
//	   hosts record their writes there while the member is away.
//	4: resets across hosts: a writer whose masters are on other hosts
//	   resets its bitmaps there (RESET_THRESHOLD) with the bit-set
//	   stream's reset frame (bitmap/wire.KindReset), which a level-3
//	   master would take for a malformed frame.
//	5: write policy active (shadowset.WriteActive): a writer's standbys
//	   cover it only once it makes one its active master; a level-4 host
//	   would count every master as covering.

// buildCoreLevel is this build's core level; tests build an "older"
// agent with -ldflags "-X github.com/shadow-project/shadow/cluster.buildCoreLevel=1".
var buildCoreLevel = "5"

// LevelLeases is the level that switches leases on.
const LevelLeases = 2

// LevelHBMM is the level that switches HBMM across hosts on.
const LevelHBMM = 3

// LevelHBMMReset is the level from which writers reset their bitmaps on
// masters on other hosts.
const LevelHBMMReset = 4

// LevelHBMMActive is the level from which a set may use write policy
// active.
const LevelHBMMActive = 5

// checkHBMMLevel refuses HBMM events below LevelHBMM: the hosts would
// not agree on what a master covers.
func (l *Log) checkHBMMLevel(ev shadowset.Event) error {
	hbmm := ev.Kind == shadowset.EvCovered || (ev.Kind == shadowset.EvHBMM && ev.Spec != nil && (len(ev.Spec.HBMM) > 0 || len(ev.Spec.HBMMLists) > 0))
	if hbmm && l.level < LevelHBMM {
		return fmt.Errorf("%w: HBMM across hosts is off until every host runs core level %d (the cluster runs %d)", shadowset.ErrBadEvent, LevelHBMM, l.level)
	}
	if ev.Kind == shadowset.EvHBMM && ev.Spec != nil && ev.Spec.HBMMWrite == shadowset.WriteActive && l.level < LevelHBMMActive {
		return fmt.Errorf("%w: write policy active is off until every host runs core level %d (the cluster runs %d); use write_policy=all", shadowset.ErrBadEvent, LevelHBMMActive, l.level)
	}
	return nil
}

// CoreLevel is this build's core level.
func CoreLevel() int {
	n, err := strconv.Atoi(buildCoreLevel)
	if err != nil || n < 1 {
		return 1
	}
	return n
}

// ErrCoreLevel: a build too old for the cluster's level.
var ErrCoreLevel = fmt.Errorf("cluster: core level")

// checkLevel refuses a registration whose build cannot follow the log.
func (l *Log) checkLevel(e entry) error {
	if s := max(e.Supports, 1); s < l.level {
		return fmt.Errorf("%w: host %s runs core level %d, the cluster runs level %d: start it with a newer build", ErrCoreLevel, e.Host, s, l.level)
	}
	return nil
}

// raiseLevel moves the cluster's level to the lowest level among the
// registered hosts, if that is higher (registrations and leaves call it).
func (l *Log) raiseLevel() {
	lowest := 0
	for h, inc := range l.incs {
		if inc == 0 {
			continue
		}
		s := max(l.supports[h], 1)
		if lowest == 0 || s < lowest {
			lowest = s
		}
	}
	if lowest <= l.level {
		return
	}
	l.level = lowest
	if l.level >= LevelLeases {
		// Every lease is counted from the switch: nobody could renew
		// before it.
		for h := range l.leases {
			l.renewedAt[h] = time.Now()
		}
	}
	if l.live && l.hooks.Level != nil {
		l.hooks.Level(l.level)
	}
}

// Level is the cluster's core level, as applied here.
func (l *Log) Level() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.level
}

// HostLevels are the core levels the registered hosts run, by host.
func (l *Log) HostLevels() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]int{}
	for h, inc := range l.incs {
		if inc != 0 {
			out[h] = max(l.supports[h], 1)
		}
	}
	return out
}

// levelHosts lists the hosts registered below level n (show: what an
// upgrade still waits for).
func (l *Log) levelHosts(n int) []string {
	var out []string
	for h, inc := range l.incs {
		if inc != 0 && max(l.supports[h], 1) < n {
			out = append(out, h)
		}
	}
	slices.Sort(out)
	return out
}

// Behind lists the registered hosts whose build is below this one's: the
// hosts a rolling upgrade still has to replace.
func (l *Log) Behind() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.levelHosts(CoreLevel())
}
