package agent

import (
	"errors"
	"time"

	"github.com/shadow-project/shadow/bitmap/wlog"
	"github.com/shadow-project/shadow/cmd/internal/memberlog"
)

// memberLogs returns the write logs of the set's members.
func (vol *volume) memberLogs() []*wlog.Log {
	vol.mdMu.Lock()
	defer vol.mdMu.Unlock()
	var out []*wlog.Log
	for _, m := range vol.members {
		if ld, ok := m.dev.(*memberlog.Device); ok {
			out = append(out, ld.Log())
		}
	}
	return out
}

// sweepLogs clears the logs' idle, flushed extents.
func (a *Agent) sweepLogs(vol *volume) {
	now := time.Now()
	for _, l := range vol.memberLogs() {
		if err := l.Sweep(now, a.cfg.CleanAfter); err != nil && !errors.Is(err, wlog.ErrClosed) {
			a.log.Warn().Str("vu", vol.name).Err(err).Msg("write log sweep failed")
		}
	}
}

// mergeUnderway records durably, on every member, that a merge runs on a
// set with write logs (a crash then turns it into a full merge, per Table
// 8-1's mount row), or that it is done: then the logs' recovered extents
// are released.
func (a *Agent) mergeUnderway(vol *volume, on bool) error {
	if !vol.writeLog {
		return nil
	}
	vol.mdMu.Lock()
	changed := vol.md.MergeUnderway != on
	vol.md.MergeUnderway = on
	vol.mdMu.Unlock()
	if !on {
		for _, l := range vol.memberLogs() {
			if err := l.Unpin(0, vol.size); err != nil {
				a.log.Warn().Str("vu", vol.name).Err(err).Msg("could not release a write log's recovered extents")
			}
		}
		vol.bm.mu.Lock()
		vol.bm.logged = nil
		vol.bm.mu.Unlock()
	}
	if !changed || a.clustered() {
		// (In a cluster the set's metadata writer records it from the
		// log: syncMeta.)
		return nil
	}
	return vol.writeAll()
}
