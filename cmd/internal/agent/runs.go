package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/cmd/internal/device"
	"github.com/shadow-project/shadow/cmd/internal/meta"
	"github.com/shadow-project/shadow/cmd/internal/testhook"
	"github.com/shadow-project/shadow/cmd/internal/vu"
	shadowcopy "github.com/shadow-project/shadow/copy"
	"github.com/shadow-project/shadow/merge"
	"github.com/shadow-project/shadow/merge/walk"
	"github.com/shadow-project/shadow/shadowset"
)

// startRun starts the engine for an op the core started on this host.
// Called from apply (under the log's lock): it only sets things up and
// starts a goroutine.
func (a *Agent) startRun(act shadowset.Action) {
	a.mu.Lock()
	vol := a.sets[act.Set]
	if old, ok := a.runs[act.Op]; ok {
		old.cancel()
	}
	if vol == nil {
		a.mu.Unlock()
		a.log.Error().Str("vu", act.Set).Str("action", act.String()).Msg("core started an op on a set this host does not have")
		return
	}
	ctx, cancel := context.WithCancel(a.ctx)
	r := &run{set: act.Set, cancel: cancel, done: make(chan struct{})}
	a.runs[act.Op] = r
	// What the op covers: its bitmap, or the whole volume.
	work, whole := a.opBitmap(vol, act)
	var f mergeFence
	if act.OpKind.IsMerge() {
		if vol.startedMerge == "" {
			vol.startedMerge = act.OpKind.String()
		}
		if whole {
			f = &progressFence{}
		} else {
			f = &bitmapFence{bm: work}
		}
		f.advance(int64(act.LBN) * meta.LBNSize)
		vol.mergeFence = f
	}
	a.mu.Unlock()
	a.log.Info().Str("vu", act.Set).Uint64("op", uint64(act.Op)).Str("kind", act.OpKind.String()).Uint64("lbn", act.LBN).Str("target", act.Target).Msg("starting " + act.OpKind.String())
	a.wg.Go(func() {
		defer close(r.done)
		defer cancel()
		if err := a.waitInForce(ctx, act); err != nil {
			return
		}
		var err error
		if act.OpKind == shadowset.Minicopy && work != nil {
			if err = a.remoteMinicopy(vol, act.Target, work); err != nil {
				// (Chunk sizes agree by construction: not expected.)
				a.log.Error().Str("vu", act.Set).Uint64("op", uint64(act.Op)).Err(err).Msg("minicopy covers the whole volume")
				work = nil
			}
		}
		for {
			if act.OpKind.IsMerge() {
				err = a.runMerge(ctx, vol, act, f, work)
			} else {
				err = a.runCopy(ctx, vol, act, work)
			}
			var ee *engineError
			fenced := errors.Is(err, device.ErrFenced)
			if err == nil || ctx.Err() != nil || (errors.As(err, &ee) && ee.member != "" && !fenced) {
				break
			}
			// No member is to blame (the cluster's log, a window): the op
			// still runs here as far as the core knows, so run it again
			// from its last checkpoint rather than leave it hanging.
			a.log.Warn().Str("vu", act.Set).Uint64("op", uint64(act.Op)).Err(err).Msg(act.OpKind.String() + " failed with no member to blame; running it again from its checkpoint")
			t := time.NewTimer(time.Second)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
			if ctx.Err() != nil {
				break
			}
			if sv, ok := a.setView(act.Set); ok {
				for _, op := range sv.Ops {
					if op.ID == act.Op {
						act.LBN = op.LBN
					}
				}
			}
		}
		vol.bm.endWork(act.Op, err == nil)
		switch {
		case err == nil:
			if err := a.elog.AppendFrom(ctx, a.report(act, shadowset.EvComplete, 0)); err != nil && ctx.Err() == nil {
				a.log.Error().Err(err).Msg("completion refused")
			}
		case ctx.Err() != nil:
			a.log.Info().Str("vu", act.Set).Uint64("op", uint64(act.Op)).Msg(act.OpKind.String() + " stopped")
		default:
			a.runFailed(ctx, vol, act, err)
		}
	})
}

// waitInForce holds an engine on a shared set until every host that mounts
// it has applied what this host has: a copy target must receive every
// host's writes before the copy passes over them, and a merge must not
// start before every host reads from its master. It gives up only when
// the run is stopped.
func (a *Agent) waitInForce(ctx context.Context, act shadowset.Action) error {
	if !a.clustered() {
		return nil
	}
	for {
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := a.clog.InForce(wctx, act.Set)
		cancel()
		if err == nil || ctx.Err() != nil {
			return ctx.Err()
		}
		a.log.Warn().Str("vu", act.Set).Uint64("op", uint64(act.Op)).Err(err).Msg("waiting for every host to apply the change before starting")
	}
}

func (a *Agent) report(act shadowset.Action, kind shadowset.EventKind, lbn uint64) shadowset.Event {
	return shadowset.Event{Kind: kind, Set: act.Set, Op: act.Op, Attempt: act.Attempt, Host: a.host, LBN: lbn}
}

// taggedDevice remembers which member an engine's I/O error came from.
type taggedDevice struct {
	vu.Device
	failed *string
}

func (t taggedDevice) ReadAt(p []byte, off int64) (int, error) {
	n, err := t.Device.ReadAt(p, off)
	if err != nil && *t.failed == "" {
		*t.failed = t.Path()
	}
	return n, err
}

func (t taggedDevice) WriteAt(p []byte, off int64) (int, error) {
	n, err := t.Device.WriteAt(p, off)
	if err != nil && *t.failed == "" {
		*t.failed = t.Path()
	}
	return n, err
}

func (t taggedDevice) Flush() error {
	err := t.Device.Flush()
	if err != nil && *t.failed == "" {
		*t.failed = t.Path()
	}
	return err
}

// engineError carries the member an engine failed on.
type engineError struct {
	member string
	err    error
}

func (e *engineError) Error() string { return fmt.Sprintf("member %s: %v", e.member, e.err) }
func (e *engineError) Unwrap() error { return e.err }

// runFailed handles an engine that hit an I/O error: the member it failed
// on leaves the set as if an application write had failed there (the core
// then stops or reschedules the op).
func (a *Agent) runFailed(ctx context.Context, vol *volume, act shadowset.Action, err error) {
	a.log.Error().Str("vu", act.Set).Uint64("op", uint64(act.Op)).Err(err).Msg(act.OpKind.String() + " failed")
	var ee *engineError
	if errors.As(err, &ee) && ee.member != "" {
		if xerr := vol.vu.RemoveMember(ee.member); xerr != nil {
			a.log.Error().Err(xerr).Msg("cannot expel the failing member")
			return
		}
		if xerr := a.expel(vol, ee.member, err); xerr != nil {
			a.log.Error().Err(xerr).Msg("cannot record the expulsion")
		}
	}
}

// masterMember picks the merge master: the first full member by read
// cost, ties to the first path (any full member can be the logical merge
// master). Read costs are per host; the path order is the same on every
// host, which is what a shared set needs (its VUs run with read cost
// ignored here: see masterFor).
func masterMember(ms []vu.MemberInfo) string {
	best := ""
	cost := 0
	for _, m := range ms {
		if m.Role == vu.Full && (best == "" || m.ReadCost < cost || (m.ReadCost == cost && m.Path < best)) {
			best, cost = m.Path, m.ReadCost
		}
	}
	return best
}

// masterFor is the set's merge master on this host: on a shared set every
// host must read the same member, so read costs (local settings) do not
// count there.
func (a *Agent) masterFor(vol *volume) string {
	ms := vol.vu.Members()
	if a.clustered() {
		for i := range ms {
			ms[i].ReadCost = 0
		}
	}
	return masterMember(ms)
}

// plan is the walk a started op makes: from its LBN, under the VU's
// locks, at the agent's rates; each checkpoint runs record first, then
// reaches the core (the final one arrives as the completion instead).
func (a *Agent) plan(ctx context.Context, vol *volume, act shadowset.Action, work *bitmap.Bitmap, record func(lbn uint64)) walk.Plan {
	p := walk.Plan{
		Size: vol.size, StartLBN: act.LBN, Lock: vol.vu.Lock,
		MinRate: a.cfg.MinRate, MaxRate: a.cfg.MaxRate, Busy: vol.vu.BusyProbe(),
		Progress: func(lbn uint64) {
			record(lbn)
			if lbn < uint64(vol.size/meta.LBNSize) {
				_ = a.elog.AppendFrom(ctx, a.report(act, shadowset.EvProgress, lbn))
			}
		},
	}
	var total uint64
	if work != nil {
		// A bitmap op moves exactly its bitmap's chunks.
		p.Chunk, p.Next, total = work.ChunkSize(), nextChunk(work), work.Count()
		testhook.RecordWork(a.host, act.Set, uint64(act.Op), act.OpKind.String(), work.Chunks())
	}
	w := vol.bm.startWork(act.Op, act.OpKind, total, p.ChunkSize())
	if cl := a.claimer(ctx, vol, act, p.Next); cl != nil {
		cl.Cost = func(waited time.Duration) {
			w.windows.Add(1)
			w.windowWait.Add(int64(waited))
		}
		p.Claim = cl.Claim
	}
	p.Stepped = func(off, n int64) {
		w.done.Add(1)
		w.bytes.Add(n)
	}
	return p
}

// opBitmap is the bitmap a started op walks, or whole=true for the whole
// volume: a full op, or a bitmap op whose bitmap this host does not have
// (then doing all of it is the safe way to do its part).
func (a *Agent) opBitmap(vol *volume, act shadowset.Action) (work *bitmap.Bitmap, whole bool) {
	switch act.OpKind {
	case shadowset.Minimerge:
		// The union of this host's bitmaps for the op's writers (a failed
		// writer's only, after a host failure).
		if b, ok := a.minimergeBitmap(vol, act.Op); ok {
			return b, false
		}
		if b, ok := vol.bm.hbmmBitmap(); ok && !a.clustered() {
			// A snapshot: chunks written from now on reach every member
			// under the range lock, so they cannot differ.
			return b.Clone(), false
		}
	case shadowset.Minicopy:
		if mc := vol.bm.minicopyFor(act.Target); mc != nil {
			return mc.bm.Clone(), false
		}
	case shadowset.ControllerMinimerge:
		if a.clustered() {
			// Under the log's lock (startRun runs in apply).
			b, slots, ok := a.clusterLogBitmap(vol, act)
			vol.mergedSlots = slots
			if ok {
				return b, false
			}
			break
		}
		if b := vol.loggedChunks(); b != nil {
			return b, false
		}
	default:
		return nil, true
	}
	a.log.Warn().Str("vu", act.Set).Uint64("op", uint64(act.Op)).Str("kind", act.OpKind.String()).Msg("this host has no bitmap for the op: it covers the whole volume")
	return nil, true
}

func (a *Agent) runMerge(ctx context.Context, vol *volume, act shadowset.Action, f mergeFence, work *bitmap.Bitmap) error {
	ms := vol.vu.Members()
	master := a.masterFor(vol)
	var failed string
	dev := func(p string) merge.Device {
		d, _, _ := vol.vu.Device(p)
		return taggedDevice{Device: d, failed: &failed}
	}
	var others []merge.Device
	for _, m := range ms {
		if m.Path != master {
			others = append(others, dev(m.Path))
		}
	}
	if err := a.mergeUnderway(vol, true); err != nil {
		return fmt.Errorf("record the merge underway: %w", err)
	}
	vol.vu.SetMerge(f, master)
	_, err := merge.Run(ctx, merge.Job{Master: dev(master), Others: others,
		Plan: a.plan(ctx, vol, act, work, func(lbn uint64) { f.advance(int64(lbn) * meta.LBNSize) })})
	if err != nil && ctx.Err() == nil {
		return &engineError{member: failed, err: err}
	}
	return err
}

func (a *Agent) runCopy(ctx context.Context, vol *volume, act shadowset.Action, work *bitmap.Bitmap) error {
	src, _ := vol.copySource.Load().(string)
	if _, role, ok := vol.vu.Device(src); !ok || role != vu.Full {
		src = a.masterFor(vol)
	}
	var failed string
	sd, _, _ := vol.vu.Device(src)
	td, _, ok := vol.vu.Device(act.Target)
	if sd == nil || !ok {
		return fmt.Errorf("copy %s: source %q or target %q missing", act.Set, src, act.Target)
	}
	vol.mdMu.Lock()
	target := vol.members[act.Target]
	vol.mdMu.Unlock()
	err := shadowcopy.Run(ctx, shadowcopy.Job{
		Source: taggedDevice{Device: sd, failed: &failed}, Target: taggedDevice{Device: td, failed: &failed},
		Plan: a.plan(ctx, vol, act, work, func(lbn uint64) {
			// The target is flushed below lbn: record it in its metadata so
			// the copy can be continued there, before the core hears of it.
			if target != nil && !a.clustered() { // (a cluster's metadata writer records it from the log)
				target.checkpoint.Store(lbn)
				vol.mdMu.Lock()
				err := vol.writeOneLocked(target)
				vol.mdMu.Unlock()
				if err != nil {
					a.log.Warn().Err(err).Msg("could not record the copy checkpoint")
				}
			}
		}),
	})
	if err != nil && ctx.Err() == nil {
		return &engineError{member: failed, err: err}
	}
	return err
}

// finished applies a completed op (under the log's lock).
func (a *Agent) finished(act shadowset.Action) {
	a.mu.Lock()
	vol := a.sets[act.Set]
	delete(a.runs, act.Op)
	if vol != nil && act.OpKind.IsMerge() {
		vol.mergeFence = nil
	}
	a.mu.Unlock()
	if vol == nil {
		return
	}
	// In a cluster the set's metadata writer records the outcome from the
	// log (syncMeta); here only the view changes.
	recorder := !a.clustered()
	if act.OpKind.IsMerge() && recorder {
		if err := a.mergeUnderway(vol, false); err != nil {
			a.log.Error().Str("vu", act.Set).Err(err).Msg("cannot record the completed merge")
		}
	}
	if act.OpKind.IsMerge() && a.clustered() {
		_ = a.mergeUnderway(vol, false) // the logs' in-memory part
		if act.Host == a.host && act.OpKind == shadowset.ControllerMinimerge {
			a.mu.Lock()
			slots := vol.mergedSlots
			vol.mergedSlots = nil
			a.mu.Unlock()
			a.releaseMergedSlots(vol, slots)
		}
	}
	if act.OpKind.IsCopy() {
		if err := vol.vu.SetRole(act.Target, vu.Full); err != nil {
			a.log.Error().Err(err).Msg("cannot promote the copy target")
			return
		}
		vol.mdMu.Lock()
		if m, ok := vol.members[act.Target]; ok {
			m.checkpoint.Store(0)
		}
		vol.mdMu.Unlock()
		vol.setRole(act.Target, meta.RoleFull)
		if recorder {
			if err := vol.writeAll(); err != nil {
				a.log.Error().Str("vu", act.Set).Err(err).Msg("cannot record the completed copy")
			}
		}
		// The member is whole again: its minicopy bitmap is done with.
		vol.bm.dropMinicopy(act.Target)
	}
	a.log.Info().Str("vu", act.Set).Uint64("op", uint64(act.Op)).Str("kind", act.OpKind.String()).Msg(act.OpKind.String() + " completed")
}

// owedFence covers the whole volume: a merge that is required but not
// running here has reached nothing yet. Nobody advances it.
var owedFence progressFence

// syncMergeViews keeps each VU's merge-time read consistency in step with
// the core: from the moment a merge is required until it completes, reads
// of what it has not reached go through the merge master. A merge running
// here publishes its own fence; one not running here (pending, in its
// delay, canceled) covers the whole volume.
func (a *Agent) syncMergeViews() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for name, vol := range a.sets {
		if vol.vu == nil {
			continue
		}
		sv, ok := a.viewLocked(name)
		if !ok {
			continue
		}
		var mergeOp *shadowset.OpView
		for i := range sv.Ops {
			if sv.Ops[i].Kind.IsMerge() {
				mergeOp = &sv.Ops[i]
			}
		}
		switch {
		case mergeOp == nil:
			vol.mergeFence = nil
			vol.vu.SetMerge(nil, "")
		case mergeOp.State == shadowset.Running && mergeOp.Host == a.host && vol.mergeFence != nil:
			vol.vu.SetMerge(vol.mergeFence, a.masterFor(vol))
		default:
			vol.vu.SetMerge(&owedFence, a.masterFor(vol))
		}
	}
}
