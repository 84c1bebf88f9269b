package agent

import (
	"context"
	"slices"
	"strings"
	"time"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/bitmap/wire"
	"github.com/shadow-project/shadow/cmd/internal/masters"
	"github.com/shadow-project/shadow/cmd/internal/meta"
)

// An automatic minicopy bitmap in a cluster (a member expelled after an
// I/O error), as md-cluster's re-add gathers every node's bitmap. The
// member may lack any chunk some host had not flushed when it left, not
// only the expelling host's. So:
//
//  1. The expelling host H opens the bitmap's store entries (minicopyKey,
//     and its gather entry) before it appends the expulsion, and keeps its
//     own chunks not yet flushed plus every later write (keepMinicopy).
//  2. Every other host, applying the expulsion, takes the member out of
//     its I/O path with no write in flight, and in the same moment takes
//     its own chunks not yet flushed; it sends them to H's gather entry
//     (gatherUnflushed). From the apply on, its writes record their chunks
//     at H before they reach a member (syncHBMM), as for a removal.
//  3. H waits until every host that mounted the set at the expulsion has
//     delivered (awaitGather). Only then does it write the proof that a
//     host where the member returns checks; a host that failed or left
//     first may have taken chunks with it, so the bitmap is dropped and
//     the member comes back by full copy.

// gatherTimeout bounds how long the expelling host waits for the others'
// chunks not yet flushed.
const gatherTimeout = 30 * time.Second

// gatherKey is the store entry where the other hosts deliver their chunks
// not yet flushed to an expelled member.
func gatherKey(key string) string { return key + "/gather" }

// openAutomaticMinicopy opens an expelled member's store entries here
// ("" if it cannot: the member will come back by full copy).
func (a *Agent) openAutomaticMinicopy(vol *volume, path string) string {
	key := minicopyKey(vol.name, path)
	a.closeAutomaticMinicopy(key) // (what an earlier absence left)
	for _, k := range []string{key, gatherKey(key)} {
		if err := a.mstore.Open(k, vol.bm.chunkSize); err != nil {
			a.log.Warn().Str("vu", vol.name).Str("member", path).Err(err).Msg("no automatic minicopy bitmap: the member will come back by full copy")
			a.closeAutomaticMinicopy(key)
			return ""
		}
	}
	return key
}

func (a *Agent) closeAutomaticMinicopy(key string) {
	if key != "" {
		a.mstore.Close(key)
		a.mstore.Close(gatherKey(key))
	}
}

// keepAutomaticMinicopy starts the expelling host's bitmap, once the
// expulsion is in force everywhere, and waits for the others' chunks.
func (a *Agent) keepAutomaticMinicopy(vol *volume, path string, uuid meta.UUID, gen meta.Generation, key string) {
	sv, _ := a.setView(vol.name)
	var others []string
	for _, h := range sv.Mounted {
		if h != a.host {
			others = append(others, h)
		}
	}
	mc := &minicopyBitmap{path: path, uuid: uuid, gen: gen, automatic: true, remoteKey: key, pending: others}
	if err := vol.bm.keepMinicopy(mc, vol.bm.sinceFlush.Snapshot); err != nil {
		a.log.Warn().Str("vu", vol.name).Str("member", path).Err(err).Msg("no automatic minicopy bitmap")
		a.closeAutomaticMinicopy(key)
		return
	}
	a.wg.Go(func() { a.awaitGather(vol, mc) })
}

// awaitGather waits until every host in mc.pending has delivered its
// chunks not yet flushed, then writes the proof; it drops the bitmap if
// one of them fails or leaves first, or after gatherTimeout.
func (a *Agent) awaitGather(vol *volume, mc *minicopyBitmap) {
	deadline := time.Now().Add(gatherTimeout)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	why := ""
	for why == "" {
		if vol.bm.minicopyFor(mc.path) != mc {
			return // dropped or replaced meanwhile
		}
		delivered := a.mstore.Writers(gatherKey(mc.remoteKey))
		vol.bm.mu.Lock()
		mc.pending = slices.DeleteFunc(mc.pending, func(h string) bool { _, ok := delivered[h]; return ok })
		missing := slices.Clone(mc.pending)
		vol.bm.mu.Unlock()
		if len(missing) == 0 {
			if _, err := a.mstore.Bitmap(mc.remoteKey, minicopyProof(mc.uuid, mc.gen)); err != nil {
				why = "its proof cannot be recorded: " + err.Error()
				break
			}
			a.log.Info().Str("vu", vol.name).Str("member", mc.path).Msg("automatic minicopy bitmap: every host's chunks not yet flushed are in")
			return
		}
		sv, _ := a.setView(vol.name)
		for _, h := range missing {
			if !slices.Contains(sv.Mounted, h) {
				why = h + " failed or left before it sent its chunks not yet flushed to the member"
			}
		}
		select {
		case <-a.ctx.Done():
			return
		case <-tick.C:
		}
		if why == "" && time.Now().After(deadline) {
			why = "hosts " + strings.Join(missing, ",") + " did not send their chunks not yet flushed within " + gatherTimeout.String()
		}
	}
	vol.bm.dropMinicopy(mc.path)
	a.log.Warn().Str("vu", vol.name).Str("member", mc.path).Str("why", why).Msg("automatic minicopy bitmap dropped: the member will come back by full copy")
}

// gatherUnflushed sends this host's chunks not yet flushed to an expelled
// member (taken as it left this host's I/O path) to the expelling host's
// gather entry. Chunk 0 goes too: a delivery that names nothing must
// still be seen, and a chunk too many is never wrong.
func (a *Agent) gatherUnflushed(vol *volume, path, holder string, unflushed *bitmap.Bitmap) {
	unflushed.Add(0)
	key := gatherKey(minicopyKey(vol.name, path))
	ctx, cancel := context.WithTimeout(a.ctx, gatherTimeout)
	defer cancel()
	var err error
	for attempt := 0; ; attempt++ {
		err = nil
		for batch := range masters.Batches(unflushed, wire.MaxRanges) {
			if _, err = a.mpool.BitSet(ctx, holder, key, a.host, batch); err != nil {
				break
			}
		}
		if err == nil || ctx.Err() != nil {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
	if err != nil {
		a.log.Warn().Str("vu", vol.name).Str("member", path).Str("holder", holder).Err(err).Msg("chunks not yet flushed to the expelled member not delivered: it will come back by full copy")
		return
	}
	a.log.Info().Str("vu", vol.name).Str("member", path).Str("holder", holder).Uint64("chunks", unflushed.Count()).Msg("chunks not yet flushed to the expelled member delivered to its automatic minicopy bitmap")
}
