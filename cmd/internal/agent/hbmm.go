package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/bitmap/wire"
	"github.com/shadow-project/shadow/cmd/internal/masters"
	"github.com/shadow-project/shadow/cmd/internal/meta"
	"github.com/shadow-project/shadow/cmd/internal/policy"
	"github.com/shadow-project/shadow/cmd/internal/standby"
	"github.com/shadow-project/shadow/cmd/internal/testhook"
	"github.com/shadow-project/shadow/shadowset"
)

// This file connects a set's tracker to the core's HBMM masters
// (shadowset/masters.go) across hosts. Write policy "all":
//
//   - This host, as a master, keeps one bitmap per writer in a.mstore:
//     its own writes through the tracker's local sink, other writers'
//     through the bit-set streams (masters.Serve).
//   - As a writer, its tracker's remote sink sends each chunk not known
//     set to every other master and waits for all of them; a master that
//     fails to apply it makes the bit-set fail: the masters that applied it
//     roll it back, and the write waits until the log has dropped the
//     failed master (nobody counts on its bitmap any more), then retries
//     with the rest. It fails with EIO only when no retry succeeds within
//     bitSetTimeout. A master the log drops while a bit-set waits for it
//     no longer counts.
//   - A master that became one after this writer mounted covers it only
//     after the handshake: the cache was emptied when the master was
//     added (SetRemote), the writes issued before are drained, every member
//     is flushed, and EvCovered says so through the log.
//
// Write policy "active" (shadowset.WriteActive) differs in who waits:
//
//   - A write waits for one master on another host, its active master
//     (or, while it has none, the candidate its next EvCovered makes
//     active). The other masters are standbys: cmd/internal/standby sends
//     them the same bit-sets without waiting, and catches up one that
//     missed any by copying the active master's bitmap.
//   - When the active master fails, the writer makes its candidate active:
//     at once if the candidate is a standby in step (it holds every bit
//     the writer acknowledged), else after the handshake's flush. The core
//     counts on no standby, so a writer that fails in between is merged
//     in full.

// bitSetTimeout bounds how long a write waits for the masters to record
// its chunks (the log dropping a failed master takes the failure
// detection and lease times, a few seconds).
const bitSetTimeout = 30 * time.Second

// hbmmWriter is a set's remote sink on this host.
type hbmmWriter struct {
	a   *Agent
	vol *volume
	mu  sync.Mutex
	// remotes are where this host's writes are recorded elsewhere: the
	// masters other than this host, and the hosts keeping a minicopy
	// bitmap of an absent member; changed is closed when they change.
	remotes []bitSetTarget
	changed chan struct{}
	// handshake: a handshake goroutine is running.
	handshake bool
	// seen: writers this host, as a master, has seen mount the set (only
	// those are forgotten when they leave: a writer not yet seen may be
	// one whose mount this host has not applied yet).
	// The value is the incarnation the log had for it then (0 off a
	// cluster).
	seen map[string]uint64

	// Write policy active: the standbys (nil off a cluster), and the
	// master this host makes active while it has none.
	sb        *standby.Tracker
	candidate string
	cancel    context.CancelFunc

	// takeovers: standbys made active without a flush; handshakes: masters
	// made to cover this writer by the handshake's flush.
	takeovers, handshakes atomic.Uint64

	bitSets, failures, retries atomic.Uint64
	// waited sums the time writes spent in setOnce (every target's ack),
	// in nanoseconds, over bitSets.
	waited  atomic.Int64
	started time.Time
}

func newHBMMWriter(a *Agent, vol *volume) *hbmmWriter {
	w := &hbmmWriter{a: a, vol: vol, changed: make(chan struct{}), seen: map[string]uint64{}, started: time.Now(), cancel: func() {}}
	if a.clustered() {
		var ctx context.Context
		ctx, w.cancel = context.WithCancel(a.ctx)
		w.sb = standby.New(a.mpool, vol.name, a.host, a.cfg.Cluster.StandbyTimeout, a.log.With().Str("vu", vol.name).Logger())
		a.wg.Go(func() { w.sb.Run(ctx, w.activeMaster) })
	}
	return w
}

// stop ends the standbys' catching up (the set is dismounted here).
func (w *hbmmWriter) stop() { w.cancel() }

// activeMaster is this writer's active master under write policy active
// ("" when it has none, or under write policy all).
func (w *hbmmWriter) activeMaster() string {
	sv, ok := w.a.setView(w.vol.name)
	if !ok || sv.HBMMWrite != shadowset.WriteActive {
		return ""
	}
	return sv.Active(w.a.host)
}

// Set implements bitmap.Remote.
func (w *hbmmWriter) Set(first, last uint64) error {
	deadline := time.Now().Add(bitSetTimeout)
	rs := []wire.Range{{First: first, Last: last}}
	for {
		w.mu.Lock()
		ms, ch := w.remotes, w.changed
		w.mu.Unlock()
		if len(ms) == 0 {
			return nil
		}
		if w.sb != nil {
			w.sb.Send(w.a.ctx, rs)
		}
		err := w.setOnce(rs, deadline)
		if err == nil {
			return nil
		}
		w.failures.Add(1)
		wait := time.Until(deadline)
		if wait <= 0 {
			return err
		}
		// Wait for the log to change the masters (dropping the failed
		// one), then retry.
		t := time.NewTimer(wait)
		select {
		case <-ch:
			t.Stop()
			w.retries.Add(1)
		case <-t.C:
			return err
		case <-w.a.ctx.Done():
			t.Stop()
			return err
		}
	}
}

// bitSetTarget is one place a writer records its chunks before a write:
// Key is the master store entry on Host (the set's name for its HBMM
// masters, minicopyKey for an absent member's minicopy bitmap).
type bitSetTarget struct {
	Host, Key string
}

func (t bitSetTarget) String() string { return t.Host + ":" + t.Key }

// setOnce sends one bit-set to every remote target and waits for all
// that are still targets.
func (w *hbmmWriter) setOnce(rs []wire.Range, deadline time.Time) error {
	w.mu.Lock()
	ms, ch := slices.Clone(w.remotes), w.changed
	w.mu.Unlock()
	type result struct {
		host bitSetTarget
		seq  uint64
		err  error
	}
	ctx, cancel := context.WithDeadline(w.a.ctx, deadline)
	defer cancel()
	began := time.Now()
	defer func() { w.waited.Add(int64(time.Since(began))) }()
	out := make(chan result, len(ms))
	for _, m := range ms {
		go func() {
			seq, err := w.a.mpool.BitSet(ctx, m.Host, m.Key, w.a.host, rs)
			out <- result{m, seq, err}
		}()
	}
	w.bitSets.Add(1)
	pending := slices.Clone(ms)
	var acked []result
	var failed error
	var failedHost bitSetTarget
	for len(pending) > 0 {
		select {
		case r := <-out:
			if !slices.Contains(pending, r.host) {
				continue // dropped by the log meanwhile
			}
			pending = slices.DeleteFunc(pending, func(h bitSetTarget) bool { return h == r.host })
			if r.err == nil {
				acked = append(acked, r)
			} else if r.host.Key != w.vol.name && errors.Is(r.err, masters.ErrNotOpen) {
				// A minicopy bitmap its host does not keep (an expulsion's
				// in a cluster, or one done with): that host has no usable
				// bitmap for the member, which comes back by full copy;
				// nothing to record.
			} else if failed == nil {
				failed, failedHost = fmt.Errorf("master %s: %w", r.host, r.err), r.host
			}
		case <-ch:
			// The log changed the masters: one it dropped no longer counts
			// (a new one covers this writer only after the handshake).
			w.mu.Lock()
			cur := w.remotes
			ch = w.changed
			w.mu.Unlock()
			pending = slices.DeleteFunc(pending, func(h bitSetTarget) bool { return !slices.Contains(cur, h) })
			if failed != nil && !slices.Contains(cur, failedHost) {
				failed = nil
			}
		case <-ctx.Done():
			var names []string
			for _, p := range pending {
				names = append(names, p.String())
			}
			return fmt.Errorf("bit-set to %s: %w", strings.Join(names, ","), ctx.Err())
		}
	}
	if failed == nil {
		return nil
	}
	// The seed's rule: a bit-set that failed on one master is undone on
	// the others (best effort: a bit too many is never wrong).
	for _, r := range acked {
		go func() {
			rctx, rcancel := context.WithTimeout(w.a.ctx, 5*time.Second)
			defer rcancel()
			_ = w.a.mpool.Rollback(rctx, r.host.Host, r.host.Key, w.a.host, r.seq)
		}()
	}
	return failed
}

// setRemotes records the remote targets; true if they changed.
func (w *hbmmWriter) setRemotes(ms []bitSetTarget) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if slices.Equal(w.remotes, ms) {
		return false
	}
	w.remotes = slices.Clone(ms)
	close(w.changed)
	w.changed = make(chan struct{})
	return true
}

// syncHBMMViews makes every mounted set's bitmaps follow the core's
// masters; the apply path calls it (under the log's lock, never waiting).
func (a *Agent) syncHBMMViews() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for name, vol := range a.sets {
		if vol.vu == nil || vol.hbw == nil {
			continue
		}
		sv, ok := a.viewLocked(name)
		if !ok {
			continue
		}
		a.syncHBMM(vol, sv, true)
	}
}

// syncHBMM is syncHBMMViews for one set; inApply: the caller holds the
// log's lock.
func (a *Agent) syncHBMM(vol *volume, sv shadowset.SetView, inApply bool) {
	w := vol.hbw
	mounted := slices.Contains(sv.Mounted, a.host)
	master := mounted && slices.Contains(sv.Masters, a.host)
	// This host's own writes, when it is a master: its bitmap for itself.
	_, had := vol.bm.tracker.Sink(bitmap.HBMMSink)
	switch {
	case master && !had:
		if b, err := a.mstore.Bitmap(vol.name, a.host); err == nil {
			_ = vol.bm.tracker.AddSink(bitmap.HBMMSink, b)
		}
	case !master && had:
		vol.bm.tracker.RemoveSink(bitmap.HBMMSink)
	}
	// The other masters, and the other hosts' minicopy bitmaps of absent
	// members: the tracker's remote sink.
	var remotes []bitSetTarget
	newMinicopy := false
	var standbys []string
	candidate := ""
	if mounted && a.clustered() {
		if sv.HBMMWrite == shadowset.WriteActive {
			candidate = w.pickCandidate(sv)
			for _, m := range sv.Masters {
				if m != a.host && m != candidate {
					standbys = append(standbys, m)
				}
			}
			if candidate != "" {
				remotes = append(remotes, bitSetTarget{Host: candidate, Key: vol.name})
			}
		} else {
			for _, m := range sv.Masters {
				if m != a.host {
					remotes = append(remotes, bitSetTarget{Host: m, Key: vol.name})
				}
			}
		}
		w.mu.Lock()
		old := w.remotes
		w.mu.Unlock()
		for _, r := range sv.Removed {
			if r.Bitmap == "" || r.Bitmap == a.host {
				continue
			}
			// A returning member: this host records its writes at the
			// holder until they reach the member (remoteAdded put it in
			// this host's VU), or the minicopy would miss those between.
			vol.mdMu.Lock()
			_, inVU := vol.members[r.Name]
			vol.mdMu.Unlock()
			if inVU && slices.ContainsFunc(sv.Members, func(m shadowset.MemberView) bool { return m.Name == r.Name }) {
				continue
			}
			t := bitSetTarget{Host: r.Bitmap, Key: minicopyKey(vol.name, r.Name)}
			remotes = append(remotes, t)
			newMinicopy = newMinicopy || !slices.Contains(old, t)
		}
	}
	if w.sb != nil {
		// (Before the remotes: a standby must get every bit-set sent
		// after the cache is emptied.)
		w.sb.SetStandbys(standbys)
	}
	w.mu.Lock()
	w.candidate = candidate
	w.mu.Unlock()
	if w.setRemotes(remotes) {
		if len(remotes) > 0 {
			vol.bm.tracker.SetRemote(w) // (empties the cache)
		} else {
			vol.bm.tracker.SetRemote(nil)
		}
		var names []string
		for _, r := range remotes {
			names = append(names, r.String())
		}
		a.log.Info().Str("vu", vol.name).Strs("masters", sv.Masters).Strs("remote_bitmaps", names).Bool("new_minicopy", newMinicopy).Msg("hbmm masters and remote bitmaps")
	}
	a.dropStaleMinicopies(vol, sv)
	var gaps []string
	for _, g := range sv.Gaps {
		if g.Writer == a.host {
			gaps = append(gaps, g.Master)
		}
	}
	promote := false
	if sv.HBMMWrite == shadowset.WriteActive {
		// Standbys stay gaps; only a writer without an active master
		// makes its candidate one.
		gaps = nil
		if candidate != "" && sv.Active(a.host) == "" {
			gaps, promote = []string{candidate}, true
		}
	}
	if len(gaps) > 0 && mounted && a.clustered() {
		w.mu.Lock()
		start := !w.handshake
		w.handshake = true
		w.mu.Unlock()
		if start {
			a.wg.Go(func() {
				if promote && a.confirmStandby(vol, candidate) {
					return
				}
				a.handshake(vol, gaps)
			})
		}
	}
	a.forgetWriters(vol, sv, master, func(host string) uint64 {
		if a.clog == nil {
			return 0
		}
		var inc uint64
		if inApply {
			inc, _ = a.clog.HostIncarnationLocked(host)
		} else {
			inc, _ = a.clog.HostIncarnation(host)
		}
		return inc
	})
}

// pickCandidate is the master this writer waits for under write policy
// active: its active master; while it has none, the candidate picked
// before if still a master, else the first standby in step (it can take
// over without a flush), else the first master on another host.
func (w *hbmmWriter) pickCandidate(sv shadowset.SetView) string {
	host := w.a.host
	if a := sv.Active(host); a != "" {
		return a
	}
	w.mu.Lock()
	prev := w.candidate
	w.mu.Unlock()
	if prev != "" && prev != host && slices.Contains(sv.Masters, prev) {
		return prev
	}
	if w.sb != nil {
		for _, s := range w.sb.Show() {
			if s.State == standby.InStep && s.Host != host && slices.Contains(sv.Masters, s.Host) {
				return s.Host
			}
		}
	}
	return sv.ActiveCandidate(host)
}

// confirmTimeout bounds a writer's wait for its bit-sets in flight to a
// standby it makes active.
const confirmTimeout = 2 * time.Second

// confirmStandby makes candidate this writer's active master without a
// flush when it is a standby in step: it holds every bit this writer
// acknowledged (the seed's "the writer, still alive, confirms"). False:
// the handshake is needed.
func (a *Agent) confirmStandby(vol *volume, candidate string) bool {
	ctx, cancel := context.WithTimeout(a.ctx, confirmTimeout)
	defer cancel()
	if !vol.hbw.sb.Confirm(ctx, candidate) {
		a.log.Info().Str("vu", vol.name).Str("candidate", candidate).Msg("hbmm: the standby is not in step; it becomes the active master after the handshake's flush")
		return false
	}
	err := a.elog.Append(shadowset.Event{Kind: shadowset.EvCovered, Set: vol.name, Host: a.host, Spec: &shadowset.SetSpec{Name: vol.name, HBMM: []string{candidate}}})
	if err != nil {
		a.log.Warn().Str("vu", vol.name).Err(err).Str("candidate", candidate).Msg("hbmm: standby's takeover not recorded")
		return false
	}
	vol.hbw.takeovers.Add(1)
	a.log.Info().Str("vu", vol.name).Str("active", candidate).Msg("hbmm: a standby in step is the active master")
	return true
}

// handshake makes the masters in gaps cover this writer: the cache was
// emptied when they were added; drain the writes issued before, flush
// every member (nothing written before can differ any more), and say so
// through the log.
func (a *Agent) handshake(vol *volume, gaps []string) {
	w := vol.hbw
	defer func() {
		w.mu.Lock()
		w.handshake = false
		w.mu.Unlock()
	}()
	vol.bm.tracker.Invalidate()
	vol.quiesce(func() {})
	if err := vol.vu.Flush(); err != nil {
		a.log.Warn().Str("vu", vol.name).Err(err).Msg("hbmm handshake: flush failed; the new masters do not cover this host yet")
		return
	}
	err := a.elog.Append(shadowset.Event{Kind: shadowset.EvCovered, Set: vol.name, Host: a.host, Spec: &shadowset.SetSpec{Name: vol.name, HBMM: gaps}})
	if err != nil {
		a.log.Warn().Str("vu", vol.name).Err(err).Strs("masters", gaps).Msg("hbmm handshake not recorded")
		return
	}
	w.handshakes.Add(1)
	a.log.Info().Str("vu", vol.name).Strs("masters", gaps).Msg("hbmm handshake: covered by the new masters")
}

// forgetWriters drops the bitmaps this host keeps for writers that left
// the set (dismounted, failed) once no minimerge this host could run needs
// them, and every writer's when it is no longer a master.
func (a *Agent) forgetWriters(vol *volume, sv shadowset.SetView, master bool, incOf func(host string) uint64) {
	w := vol.hbw
	needed := map[string]bool{}
	for _, op := range sv.Ops {
		if op.Kind == shadowset.Minimerge && slices.Contains(op.Holders, a.host) {
			for _, wr := range op.Writers {
				needed[wr] = true
			}
		}
	}
	for writer := range a.mstore.Writers(vol.name) {
		mounted := slices.Contains(sv.Mounted, writer)
		if mounted && master {
			w.seen[writer] = incOf(writer)
			continue
		}
		if needed[writer] || writer == a.host {
			continue
		}
		// A writer not seen mounted may be one whose mount this host has
		// not applied yet: its chunks are kept. One seen is forgotten
		// with the incarnation seen, and only if no later run of it has
		// written meanwhile (masters.Store.Forget).
		if inc, seen := w.seen[writer]; seen || !master {
			a.mstore.Forget(vol.name, writer, inc)
			delete(w.seen, writer)
		}
	}
}

// minimergeBitmap is the union of this host's bitmaps for a minimerge's
// writers (false: this host has none of them).
func (a *Agent) minimergeBitmap(vol *volume, id shadowset.OpID) (*bitmap.Bitmap, bool) {
	sv, ok := a.viewLocked(vol.name)
	if !ok {
		return nil, false
	}
	var writers []string
	for _, op := range sv.Ops {
		if op.ID == id {
			writers = op.Writers
		}
	}
	if len(writers) == 0 {
		return nil, false
	}
	union, err := bitmap.New(vol.bm.chunkSize)
	if err != nil {
		return nil, false
	}
	found := false
	for _, wr := range writers {
		if b, ok := a.mstore.Snapshot(vol.name, wr); ok {
			if union.Or(b) == nil {
				found = true
			}
		}
	}
	return union, found
}

// masterLists turns a policy into the core's master lists: in a cluster,
// the policy's lists with the hosts the cluster knows; on one host, this
// host if the policy names it.
func (a *Agent) masterLists(p policy.HBMMPolicy) ([]shadowset.MasterList, error) {
	if !a.clustered() {
		ms := p.Masters([]string{a.host})
		if len(ms) == 0 {
			return nil, nil
		}
		return []shadowset.MasterList{{Hosts: ms}}, nil
	}
	var known []string
	for _, h := range a.hostViews() {
		known = append(known, h.Name)
	}
	var out []shadowset.MasterList
	for _, l := range p.Lists {
		var hosts []string
		for _, h := range l.Hosts {
			if h == "*" {
				hosts = append(hosts, h)
				continue
			}
			if i := slices.IndexFunc(known, func(k string) bool { return strings.EqualFold(k, h) }); i >= 0 {
				hosts = append(hosts, known[i])
			}
		}
		if len(hosts) > 0 {
			out = append(out, shadowset.MasterList{Hosts: hosts, Count: l.Count})
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: no host of the policy's master lists is in the cluster", policy.ErrPolicy)
	}
	return out, nil
}

// hostViews are the core's hosts.
func (a *Agent) hostViews() []shadowset.HostView {
	var hs []shadowset.HostView
	a.elog.View(func(c *shadowset.Core) { hs = c.Hosts() })
	return hs
}

// masterHosts are the set's masters on other hosts (not the hosts keeping
// minicopy bitmaps, which are never reset).
func (w *hbmmWriter) masterHosts() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for _, t := range w.remotes {
		if t.Key == w.vol.name {
			out = append(out, t.Host)
		}
	}
	if w.sb != nil {
		out = append(out, w.sb.Standbys()...)
	}
	return out
}

// resetTimeout bounds a reset's wait for the masters' answers, during
// which this host's writes to the set wait too.
const resetTimeout = 2 * time.Second

// resetAcrossHosts resets this host's bitmaps on the set's masters
// (RESET_THRESHOLD), with every write to the set held back (quiesce):
//
//  1. No write of this host is in flight (the quiesce drained them).
//  2. Every member is flushed: the chunks of every write so far are the
//     same on every member, durably.
//  3. The cache of known-set chunks is emptied (and this host's own
//     master bitmap cleared, if it is a master), so every later write
//     sends a bit-set first.
//  4. The resets are numbered now, so each is above every bit-set the
//     flush covered and below every later one; a master refuses one that
//     a later bit-set overtook (masters.ErrStaleReset), and refuses any
//     while a merge is owed on the set or from a writer that is not the
//     live incarnation mounting it (allowRemoteReset).
//
// A master that fails or refuses keeps its bits: too many, never too few.
// The writes wait for the flush and one round trip to the masters, at
// most resetTimeout.
func (a *Agent) resetAcrossHosts(vol *volume, masters []string, modified, threshold uint64) {
	bm := vol.bm
	var flushErr error
	errs := make([]error, len(masters))
	vol.quiesce(func() {
		if flushErr = vol.vu.Flush(); flushErr != nil {
			return
		}
		if err := bm.tracker.Reset(bitmap.HBMMSink); err != nil {
			bm.tracker.Invalidate()
		}
		testhook.RecordReset(a.host, vol.name, vol.vu.Writes())
		ctx, cancel := context.WithTimeout(a.ctx, resetTimeout)
		defer cancel()
		var wg sync.WaitGroup
		for i, h := range masters {
			wg.Go(func() { errs[i] = a.mpool.Reset(ctx, h, vol.name, a.host) })
		}
		wg.Wait()
	})
	if flushErr != nil {
		a.log.Warn().Str("vu", vol.name).Err(flushErr).Msg("hbmm reset: flush failed; bitmaps kept")
		return
	}
	var done, refused []string
	for i, err := range errs {
		if err != nil {
			refused = append(refused, masters[i])
			a.log.Info().Str("vu", vol.name).Str("master", masters[i]).Err(err).Msg("hbmm reset not applied on a master; its bits stay")
			continue
		}
		done = append(done, masters[i])
	}
	bm.mu.Lock()
	bm.hbmm.resets++
	bm.mu.Unlock()
	a.log.Info().Str("vu", vol.name).Uint64("modified_blocks", modified*bm.blocksPerChunk()).Uint64("reset_threshold", threshold).
		Strs("masters", done).Strs("kept", refused).Msg("hbmm bitmaps reset across hosts")
}

// allowRemoteReset is the master store's check before another host
// resets its bitmap here: the writer must be the live incarnation that
// mounts the set, and no merge may be owed on the set (a failed writer's
// bitmap and one feeding a pending merge are never reset: invariant 5).
func (a *Agent) allowRemoteReset(set, writer string, inc uint64) error {
	if cur, ok := a.clog.HostIncarnation(writer); !ok || cur == 0 || cur != inc {
		return fmt.Errorf("agent: %s's incarnation %x is not its current one here (%x)", writer, inc, cur)
	}
	sv, ok := a.setView(set)
	if !ok || !slices.Contains(sv.Mounted, writer) {
		return fmt.Errorf("agent: %s does not mount %s here", writer, set)
	}
	for _, op := range sv.Ops {
		if op.Kind.IsMerge() {
			return fmt.Errorf("agent: a merge is owed on %s (op %d): its bitmaps are kept", set, op.ID)
		}
	}
	return nil
}

// stats is what show gives of the bit-set traffic.
func (w *hbmmWriter) stats() (bitSets, failures, retries uint64, perSecond, meanWaitUS float64) {
	bitSets, failures, retries = w.bitSets.Load(), w.failures.Load(), w.retries.Load()
	if s := time.Since(w.started).Seconds(); s > 0 {
		perSecond = float64(bitSets) / s
	}
	if bitSets > 0 {
		meanWaitUS = float64(w.waited.Load()) / float64(bitSets) / 1e3
	}
	return
}

var _ bitmap.Remote = (*hbmmWriter)(nil)

// minicopyKey names the master store entry where the hosts that mount set
// record their writes while member is away. The member's name is a path
// that may be long; the key must fit a frame's string (wire.MaxString).
func minicopyKey(set, member string) string {
	sum := sha256.Sum256([]byte(member))
	return set + "/minicopy/" + hex.EncodeToString(sum[:12])
}

// minicopyProof is the entry, in a minicopy bitmap's store key, that a
// host where the member returns fetches to check that the bitmap is the
// member's: same member and the set's generation it left at (a member
// written outside the set comes back with another one). No host may write
// it: it is no host's name.
func minicopyProof(uuid meta.UUID, gen meta.Generation) string {
	return fmt.Sprintf("@member %s left at %s", uuid, gen)
}

// dropStaleMinicopies drops this host's cluster minicopy bitmaps that the
// core no longer keeps here (the member came back by full copy, or its
// bitmap was given up), with their store entries.
func (a *Agent) dropStaleMinicopies(vol *volume, sv shadowset.SetView) {
	vol.bm.mu.Lock()
	var stale []string
	for p, mc := range vol.bm.minicopy {
		if mc.remoteKey != "" && !slices.ContainsFunc(sv.Removed, func(r shadowset.MemberView) bool { return r.Name == p && r.Bitmap == a.host }) {
			stale = append(stale, p)
		}
	}
	vol.bm.mu.Unlock()
	for _, p := range stale {
		vol.bm.dropMinicopy(p)
		a.log.Info().Str("vu", vol.name).Str("member", p).Msg("minicopy bitmap dropped: the core no longer keeps it here")
	}
}

// remoteMinicopy adds to work the chunks the other hosts recorded in
// this host's store for a returning member while it was away. The caller
// has waited until every host applied the member's return (from then on
// their writes reach it), so nothing recorded later is missing.
func (a *Agent) remoteMinicopy(vol *volume, target string, work *bitmap.Bitmap) error {
	mc := vol.bm.minicopyFor(target)
	if mc == nil || mc.remoteKey == "" {
		return nil
	}
	for _, key := range []string{mc.remoteKey, gatherKey(mc.remoteKey)} {
		for writer := range a.mstore.Writers(key) {
			b, ok := a.mstore.Snapshot(key, writer)
			if !ok {
				continue
			}
			if err := work.Or(b); err != nil {
				return fmt.Errorf("minicopy of %s: %s's chunks: %w", target, writer, err)
			}
		}
	}
	return nil
}

// remoteMinicopyFor finds a returning member's minicopy bitmap on the host
// it left from: the core names the host, and that host's store holds the
// proof that the bitmap is for this member at the generation it carries
// (minicopyProof). It returns a stand-in (no local bitmap; the op runs on
// that host) or why the member cannot come back by minicopy ("" when the
// core keeps no bitmap for it anywhere else).
func (a *Agent) remoteMinicopyFor(vol *volume, path string, md *meta.Metadata) (*minicopyBitmap, string) {
	sv, ok := a.setView(vol.name)
	if !ok {
		return nil, ""
	}
	i := slices.IndexFunc(sv.Removed, func(r shadowset.MemberView) bool { return r.Name == path && r.Bitmap != "" && r.Bitmap != a.host })
	if i < 0 {
		return nil, ""
	}
	holder := sv.Removed[i].Bitmap
	if md == nil || md.SetUUID != vol.md.SetUUID {
		return nil, "it is not the member that left"
	}
	ctx, cancel := context.WithTimeout(a.ctx, 10*time.Second)
	defer cancel()
	if _, err := a.mpool.Fetch(ctx, holder, minicopyKey(vol.name, path), minicopyProof(md.MemberUUID, md.Generation)); err != nil {
		return nil, fmt.Sprintf("its minicopy bitmap on %s is not for this member at generation %s, or %s cannot be asked (%v)", holder, md.Generation, holder, err)
	}
	return &minicopyBitmap{path: path, uuid: md.MemberUUID, gen: md.Generation}, ""
}
