package shadowset

import "slices"

// outcomeCtx carries what a cell needs beyond the op itself.
type outcomeCtx struct {
	// lostHost is the failed or aborting host, for "if on failed system".
	lostHost string
	reason   string
}

// apply carries out one Table 8-1 cell on one op. The outcome words go
// into the op's history as they take effect: "canceled" and "suspended"
// now, "restarted" and "continued" when the op is resumed (see resolve).
func (c *Core) apply(st *setState, op *opState, e Entry, ctx outcomeCtx) {
	switch e.Outcome {
	case NoChange, NotApplicable:
	case CancelRestart:
		c.cancel(st, op, WordRestarted, ctx.reason)
	case CancelContinue:
		c.cancel(st, op, WordContinued, ctx.reason)
	case CancelContinueFullCopyIfMasterLost:
		c.cancel(st, op, WordContinued, ctx.reason)
		if op.Kind == Minicopy && op.Bitmap != "" && op.Bitmap == ctx.lostHost {
			op.Kind, op.Bitmap = FullCopy, ""
			c.notef("%s: op%d continues as full-copy: its master bitmap was on %s", st.Name, op.ID, ctx.lostHost)
		}
	case RestartIfOnFailedElseAddedWork:
		switch {
		case op.Host != "" && op.Host == ctx.lostHost:
			c.cancel(st, op, WordRestarted, ctx.reason)
		case op.State == Running:
			// Keeps running untouched; the added chunks (below its
			// checkpoint too) are done before it completes.
			op.History = append(op.History, WordContinued)
		}
	case Continued:
		c.stop(st, op, WordContinued, anyHost, ctx.reason)
	case Restarted:
		c.stop(st, op, WordRestarted, preferLast, ctx.reason)
	case RestartedAsFullMerge:
		if op.Kind != FullMerge {
			c.notef("%s: op%d %s becomes full-merge", st.Name, op.ID, op.Kind)
		}
		op.Kind, op.Holders = FullMerge, nil
		c.stop(st, op, WordRestarted, preferLast, ctx.reason)
	case RestartedAsFullCopy:
		if op.Kind != FullCopy {
			c.notef("%s: op%d %s becomes full-copy", st.Name, op.ID, op.Kind)
		}
		op.Kind, op.Bitmap = FullCopy, ""
		st.dropBitmap(op.Target)
		c.stop(st, op, WordRestarted, preferLast, ctx.reason)
	case SuspendRestartAsFullMerge:
		if op.State == Running {
			c.emit(Action{Kind: ActSuspend, Op: op.ID, Set: st.Name, OpKind: op.Kind, Host: op.Host, LBN: op.LBN, Target: op.Target, Reason: ctx.reason})
			op.State = Suspended
			op.History = append(op.History, WordSuspended)
			op.Resume = WordRestarted
		} else if op.Started {
			op.Resume = stronger(op.Resume, WordRestarted)
		}
	}
}

func (c *Core) stopAction(st *setState, op *opState, reason string) {
	c.emit(Action{Kind: ActStop, Op: op.ID, Set: st.Name, OpKind: op.Kind, Host: op.Host, LBN: op.LBN, Target: op.Target, Reason: reason})
}

// cancel applies Table 8-1's "Canceled": the op stops where it is (keeping
// its checkpoint) and waits for the delay window; afterwards it is
// continued or restarted on any eligible host.
func (c *Core) cancel(st *setState, op *opState, then Word, reason string) {
	c.halt(st, op, then, anyHost, true, "canceled: "+reason)
}

// stop applies "Continued" and "Restarted" (no cancel): a running op stops
// on its host and is resumed as soon as no delay window holds it back.
func (c *Core) stop(st *setState, op *opState, then Word, aff affinity, reason string) {
	c.halt(st, op, then, aff, false, reason)
}

// halt stops an op for an outcome whose second half (then: restart or
// continue) waits for the delay window. aff says where it may resume;
// canceled records the cancel in its history.
func (c *Core) halt(st *setState, op *opState, then Word, aff affinity, canceled bool, reason string) {
	switch op.State {
	case Running:
		c.stopAction(st, op, reason)
	case Suspended:
		if c.holdsSuspended(st, op) {
			op.Resume = stronger(op.Resume, then)
			return
		}
	case Canceled:
		op.Resume = stronger(op.Resume, then)
		return
	case Pending:
		// Waiting its turn: nothing to stop. A restart still resets it,
		// since new work may lie below its checkpoint.
		if then == WordRestarted && op.Started {
			op.Resume = WordRestarted
			if op.Affinity != onlyLast {
				op.Affinity = aff
			}
		}
		return
	}
	op.LastHost, op.Host = op.Host, ""
	op.State = Canceled
	if canceled {
		op.History = append(op.History, WordCanceled)
	}
	op.Affinity = aff
	op.Resume = stronger(op.Resume, then)
}

// holdsSuspended reports whether a suspended op's host still has its set
// mounted: then the op stays bound there ("may be resumed only on the
// system where it was active"), whatever other events say of it.
func (c *Core) holdsSuspended(st *setState, op *opState) bool {
	return c.s.alive(op.Host) && st.mountedOn(op.Host)
}

// resolve applies the outcomes that waited for the delay window: each
// stopped op is continued or restarted (history gets the word) and becomes
// pending, to be started by the scheduler in its turn.
func (c *Core) resolve() {
	for _, st := range c.s.setsByName() {
		if len(st.Mounted) == 0 {
			continue
		}
		for _, op := range st.opsByID() {
			if op.Resume == 0 {
				continue
			}
			if op.State == Suspended {
				op.LastHost, op.Host, op.Affinity = op.Host, "", onlyLast
			}
			op.History = append(op.History, op.Resume)
			if op.Resume == WordRestarted {
				op.LBN = 0
			}
			op.StartMode, op.Resume, op.State = op.Resume, 0, Pending
		}
	}
}

// schedule starts what may start: nothing while the delay window is open;
// otherwise one op per set, the head of its queue, on the host the
// host-choice rule picks. When hosts run short of slots, the op with the
// highest priority on its chosen host goes first, then by set name.
func (c *Core) schedule() {
	if c.s.WindowOpen {
		return
	}
	c.resolve()
	for {
		var bestSet *setState
		var bestOp *opState
		var bestHost string
		bestPrio := -1
		for _, st := range c.s.setsByName() {
			op := c.head(st)
			if op == nil {
				continue
			}
			h := c.chooseHost(st, op)
			if h == "" {
				continue
			}
			if p := c.s.priority(h, st.Name); p > bestPrio {
				bestSet, bestOp, bestHost, bestPrio = st, op, h, p
			}
		}
		if bestOp == nil {
			return
		}
		c.start(bestSet, bestOp, bestHost)
	}
}

// head is the op a set runs next, or nil if it runs one already or has
// nothing that may start.
func (c *Core) head(st *setState) *opState {
	if len(st.Mounted) == 0 || st.running() != nil {
		return nil
	}
	q := st.queue()
	if len(q) == 0 || q[0].State != Pending {
		return nil // a canceled or suspended op at the head holds the queue
	}
	return q[0]
}

// chooseHost picks the eligible host with the highest priority for the
// set; among equals, the host where the op last ran, then the lowest name.
// A restarted op prefers its own host; a suspended one may use no other.
func (c *Core) chooseHost(st *setState, op *opState) string {
	if op.Affinity == onlyLast && !(c.s.alive(op.LastHost) && st.mountedOn(op.LastHost)) {
		// Its host is gone: it restarts elsewhere. It is already at LBN 0,
		// because a suspended op always resumes by restarting.
		op.Affinity = anyHost
	}
	var cands []string
	for _, h := range st.sortedMounted() {
		if c.eligible(st, op, h) {
			cands = append(cands, h)
		}
	}
	if len(cands) == 0 {
		return ""
	}
	if op.Affinity != anyHost {
		if slices.Contains(cands, op.LastHost) {
			return op.LastHost
		}
		if op.Affinity == onlyLast {
			return ""
		}
	}
	// A minicopy runs where its bitmap is when it can: elsewhere it has to
	// copy the whole volume (the bitmap's holder may have dismounted the
	// set and still keep it, Table 8-1 row 3).
	if op.Kind == Minicopy && !c.rules.MinicopyAnyHost && slices.Contains(cands, op.Bitmap) {
		return op.Bitmap
	}
	best := cands[0]
	for _, h := range cands[1:] {
		ph, pb := c.s.priority(h, st.Name), c.s.priority(best, st.Name)
		if ph > pb || (ph == pb && h == op.LastHost && best != op.LastHost) {
			best = h
		}
	}
	return best
}

func (c *Core) eligible(st *setState, op *opState, host string) bool {
	h := c.s.host(host)
	if h == nil || !h.Alive || !st.mountedOn(host) || c.s.priority(host, st.Name) <= 0 {
		return false
	}
	if c.s.runningOn(host) >= h.MaxOps {
		return false
	}
	if op.Kind == Minimerge && !slices.Contains(op.Holders, host) {
		return false
	}
	return true
}

func (c *Core) start(st *setState, op *opState, host string) {
	op.State, op.Host, op.LastHost, op.Started, op.Affinity = Running, host, host, true, anyHost
	op.Attempt++
	mode := op.StartMode
	op.StartMode = 0
	c.emit(Action{Kind: ActStart, Op: op.ID, Set: st.Name, OpKind: op.Kind, Host: host, LBN: op.LBN, Target: op.Target, Mode: mode, Attempt: op.Attempt})
}
