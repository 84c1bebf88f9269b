package agent

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/cluster"
	"github.com/shadow-project/shadow/cmd/internal/meta"
	"github.com/shadow-project/shadow/cmd/internal/policy"
	"github.com/shadow-project/shadow/cmd/internal/report"
	"github.com/shadow-project/shadow/shadowset"
)

// This file holds what a set's write bitmaps need on this host: the HBMM
// policy and master bitmap, the minicopy bitmaps of absent members, the
// chunks written since the last flush (for an expelled member's automatic
// bitmap), the reset threshold, and the work counters shown for bitmap
// ops. The bitmaps live in the agent's memory, as OpenVMS keeps them in
// its hosts' memory: an agent crash loses them, and the core then
// requires full merges and full copies (write logs, kept on the members,
// are what survive a crash).

// minicopyBitmap is an absent member's write bitmap.
type minicopyBitmap struct {
	path string
	uuid meta.UUID
	// gen is the set's generation the member last recorded: a member that
	// comes back with another one was written outside the set.
	gen meta.Generation
	bm  *bitmap.Bitmap
	// automatic: made when the member was expelled after an I/O error.
	automatic bool
	// pending, for an automatic bitmap in a cluster: the hosts whose
	// chunks not yet flushed have not arrived (automatic.go); the bitmap
	// is usable once none is left. Guarded by bitmaps.mu.
	pending []string
	// remoteKey, in a cluster, names the master store entry where the
	// other hosts that mount the set record their writes while the member
	// is away (minicopyKey); the minicopy covers bm and every writer's
	// bitmap there.
	remoteKey string
}

func minicopySink(path string) string { return "minicopy " + path }

// hbmmSetting is a set's HBMM state on this host.
type hbmmSetting struct {
	// own is the set's own policy; named the named policy assigned to it
	// (policy.PolicyNoDefault included); with neither, DEFAULT applies.
	own   *policy.HBMMPolicy
	named string
	// enabled: the set is using HBMM (the hosts holding master bitmaps
	// are the core's: SetView.HBMM).
	enabled bool
	resets  int
}

// opWork counts what a bitmap op covers and what it moved, for show.
type opWork struct {
	id    shadowset.OpID
	kind  shadowset.OpKind
	total uint64 // chunks in the op's bitmap; 0 for a full op
	chunk int64
	done  atomic.Uint64
	bytes atomic.Int64
	began time.Time
	ended time.Time // zero while running
	// windows and windowWait: see report.OpWorkShow.
	windows    atomic.Uint64
	windowWait atomic.Int64
}

func (w *opWork) show() report.OpWorkShow {
	end := w.ended
	if end.IsZero() {
		end = time.Now()
	}
	return report.OpWorkShow{ID: uint64(w.id), Kind: w.kind.String(), BitmapChunks: w.total, ChunksDone: w.done.Load(),
		ChunkBytes: w.chunk, BytesDone: w.bytes.Load(), ElapsedMS: end.Sub(w.began).Milliseconds(),
		Windows: w.windows.Load(), WindowWaitMS: time.Duration(w.windowWait.Load()).Milliseconds()}
}

// bitmaps is the per-volume bitmap state.
type bitmaps struct {
	chunkSize  int64
	tracker    *bitmap.Tracker
	sinceFlush *bitmap.SinceFlush

	mu       sync.Mutex
	hbmm     hbmmSetting
	minicopy map[string]*minicopyBitmap // by member path
	// closeRemote forgets a minicopy's remoteKey (the master store's
	// Close), when there is one.
	closeRemote func(key string)
	work        map[shadowset.OpID]*opWork
	completed   []report.OpWorkShow // most recent last
	// logged is the union of the members' write logs found at mount.
	logged *bitmap.Bitmap
}

const keepCompleted = 8

func newBitmaps(chunkSize int64) (*bitmaps, error) {
	t, err := bitmap.NewTracker(chunkSize)
	if err != nil {
		return nil, err
	}
	sf, err := bitmap.NewSinceFlush(chunkSize)
	if err != nil {
		return nil, err
	}
	return &bitmaps{chunkSize: chunkSize, tracker: t, sinceFlush: sf, minicopy: map[string]*minicopyBitmap{}, work: map[shadowset.OpID]*opWork{}}, nil
}

// startWork registers a running op's counters.
func (b *bitmaps) startWork(id shadowset.OpID, kind shadowset.OpKind, total uint64, chunk int64) *opWork {
	w := &opWork{id: id, kind: kind, total: total, chunk: chunk, began: time.Now()}
	b.mu.Lock()
	b.work[id] = w
	b.mu.Unlock()
	return w
}

// endWork moves an op's counters to the completed list (completed) or
// drops them (stopped: the op will run again).
func (b *bitmaps) endWork(id shadowset.OpID, completed bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	w, ok := b.work[id]
	if !ok {
		return
	}
	delete(b.work, id)
	w.ended = time.Now()
	if completed {
		b.completed = append(b.completed, w.show())
		if len(b.completed) > keepCompleted {
			b.completed = b.completed[len(b.completed)-keepCompleted:]
		}
	}
}

// gathering lists the hosts an automatic bitmap still waits for.
func (b *bitmaps) gathering(mc *minicopyBitmap) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(mc.pending)
}

// minicopyFor returns the member's minicopy bitmap, if any.
func (b *bitmaps) minicopyFor(path string) *minicopyBitmap {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.minicopy[path]
}

// keepMinicopy starts recording writes for an absent member. seed, if
// given, returns chunks written before (an expelled member's unflushed
// writes); it is called after the sink is in place, so that no write
// falls between the two.
func (b *bitmaps) keepMinicopy(mc *minicopyBitmap, seed func() *bitmap.Bitmap) error {
	bm, err := bitmap.New(b.chunkSize)
	if err != nil {
		return err
	}
	b.forgetMinicopy(mc.path)
	if err := b.tracker.AddSink(minicopySink(mc.path), bm); err != nil {
		return err
	}
	if seed != nil {
		if err := bm.Or(seed()); err != nil {
			return err
		}
	}
	mc.bm = bm
	b.mu.Lock()
	b.minicopy[mc.path] = mc
	b.mu.Unlock()
	return nil
}

// dropMinicopy deletes a member's minicopy bitmap (its minicopy completed,
// or it cannot be used).
func (b *bitmaps) dropMinicopy(path string) {
	if mc := b.forgetMinicopy(path); mc != nil && mc.remoteKey != "" && b.closeRemote != nil {
		b.closeRemote(mc.remoteKey)
		b.closeRemote(gatherKey(mc.remoteKey))
	}
}

// forgetMinicopy is dropMinicopy that leaves the remote entry alone (a
// new bitmap for the member is about to replace it).
func (b *bitmaps) forgetMinicopy(path string) *minicopyBitmap {
	b.mu.Lock()
	mc := b.minicopy[path]
	delete(b.minicopy, path)
	b.mu.Unlock()
	b.tracker.RemoveSink(minicopySink(path))
	return mc
}

// hbmmBitmap is the master bitmap, if this host holds one.
func (b *bitmaps) hbmmBitmap() (*bitmap.Bitmap, bool) { return b.tracker.Sink(bitmap.HBMMSink) }

// blocksPerChunk converts chunks to OpenVMS's 512-byte blocks.
func (b *bitmaps) blocksPerChunk() uint64 { return uint64(b.chunkSize / meta.LBNSize) }

// bitmapFence is a bitmap merge's progress: the chunks of its bitmap at or
// above the fence are still owed. Reads elsewhere need no care.
type bitmapFence struct {
	progressFence
	bm *bitmap.Bitmap
}

// Pending implements vu.MergeWork.
func (f *bitmapFence) Pending(off, n int64) bool {
	return off+n > f.at.Load() && f.bm.Intersects(off, n)
}

// nextChunk makes a walk's Next over a bitmap.
func nextChunk(bm *bitmap.Bitmap) func(off int64) (int64, bool) {
	cs := bm.ChunkSize()
	return func(off int64) (int64, bool) {
		c, ok := bm.NextFrom(uint64(off / cs))
		if !ok {
			return 0, false
		}
		return int64(c) * cs, true
	}
}

// ---- policies

// effectivePolicy is the policy a set would use, and why not if none.
func (a *Agent) effectivePolicy(h hbmmSetting) (policy.HBMMPolicy, error) {
	switch {
	case h.own != nil:
		return *h.own, nil
	case h.named == policy.PolicyNoDefault:
		return policy.HBMMPolicy{}, fmt.Errorf("%w: the set's policy is NODEFAULT: it uses no HBMM", policy.ErrPolicy)
	case h.named != "":
		p, ok := a.policies.Get(h.named)
		if !ok {
			return policy.HBMMPolicy{}, fmt.Errorf("%w: the set's policy %s no longer exists", policy.ErrPolicy, h.named)
		}
		return p, nil
	}
	p, ok := a.policies.Get(policy.PolicyDefault)
	if !ok {
		return policy.HBMMPolicy{}, fmt.Errorf("%w: the set has no HBMM policy and none is named DEFAULT (give --policy hbmm=(master_list=(...)))", policy.ErrPolicy)
	}
	return p, nil
}

// applyHBMM makes the set's HBMM state what h says: the master lists go
// to the core through the log (which refuses while a minimerge exists);
// applying them, every host follows the masters the core picks
// (syncHBMM): a master keeps bitmaps, a writer sends its chunks there.
func (a *Agent) applyHBMM(vol *volume, h hbmmSetting) error {
	var lists []shadowset.MasterList
	var reset uint64
	var write string
	if h.enabled {
		if vol.writeLog {
			return fmt.Errorf("%w: %s uses write logs; a set uses HBMM or write logs, not both", policy.ErrPolicy, vol.name)
		}
		p, err := a.effectivePolicy(h)
		if err != nil {
			return err
		}
		if lists, err = a.masterLists(p); err != nil {
			return err
		}
		reset = p.ResetThreshold
		if p.WritePolicy == policy.WriteActive {
			write = shadowset.WriteActive
		}
	}
	bm := vol.bm
	bm.mu.Lock()
	old := bm.hbmm
	bm.mu.Unlock()
	sv, _ := a.setView(vol.name)
	if h.enabled == old.enabled && reset == sv.HBMMReset && write == sv.HBMMWrite && slices.EqualFunc(lists, sv.Lists, func(x, y shadowset.MasterList) bool {
		return x.Count == y.Count && slices.Equal(x.Hosts, y.Hosts)
	}) {
		bm.mu.Lock()
		bm.hbmm.own, bm.hbmm.named = h.own, h.named
		bm.mu.Unlock()
		return nil
	}
	if err := a.elog.Append(shadowset.Event{Kind: shadowset.EvHBMM, Set: vol.name, Spec: &shadowset.SetSpec{Name: vol.name, HBMMLists: lists, HBMMReset: reset, HBMMWrite: write}}); err != nil {
		return err
	}
	bm.mu.Lock()
	h.resets = old.resets
	bm.hbmm = h
	bm.mu.Unlock()
	sv, _ = a.setView(vol.name)
	a.log.Info().Str("vu", vol.name).Bool("enabled", h.enabled).Strs("masters", sv.Masters).Msg("hbmm policy applied")
	return nil
}

// quiesce runs fn with no application write in flight to the set (the
// dirty/clean gate held for writing).
func (vol *volume) quiesce(fn func()) {
	vol.cleanMu.Lock()
	defer vol.cleanMu.Unlock()
	fn()
}

// policyVerb handles set's HBMM qualifiers.
func (a *Agent) policyVerb(args SetArgs) error {
	var ref policy.PolicyRef
	if args.Policy != "" {
		var err error
		if ref, err = policy.ParseHBMMPolicy(args.Policy); err != nil {
			return err
		}
	}
	if args.Set == "" {
		// Named policies: define or delete.
		switch {
		case args.Name == "":
			return fmt.Errorf("%w: without a set, --policy and --delete need --name", policy.ErrPolicy)
		case args.Delete:
			return a.policies.Remove(args.Name)
		case ref.Policy == nil:
			return fmt.Errorf("%w: --name %s needs --policy hbmm=(master_list=(...),...)", policy.ErrPolicy, args.Name)
		}
		return a.policies.Define(args.Name, *ref.Policy)
	}
	vol, err := a.volume(args.Set)
	if err != nil {
		return err
	}
	vol.bm.mu.Lock()
	h := vol.bm.hbmm
	vol.bm.mu.Unlock()
	switch {
	case args.Name != "":
		return fmt.Errorf("%w: --name defines a named policy: give no set (and assign it with --policy hbmm=%s)", policy.ErrPolicy, args.Name)
	case args.Delete:
		h.own, h.named = nil, ""
	case ref.Policy != nil:
		h.own, h.named = ref.Policy, ""
	case ref.Name != "":
		if ref.Name != policy.PolicyNoDefault {
			if _, ok := a.policies.Get(ref.Name); !ok {
				return fmt.Errorf("%w: no policy named %s", policy.ErrPolicy, ref.Name)
			}
		}
		h.own, h.named = nil, ref.Name
		if ref.Name == policy.PolicyNoDefault {
			h.enabled = false
		}
	}
	for _, q := range []struct {
		flag, value string
		enabled     bool
	}{{"enable", args.Enable, true}, {"disable", args.Disable, false}} {
		switch strings.ToLower(q.value) {
		case "":
		case "hbmm":
			h.enabled = q.enabled
		default:
			return fmt.Errorf("%w: --%s %q: only hbmm", policy.ErrPolicy, q.flag, q.value)
		}
	}
	return a.applyHBMM(vol, h)
}

// ---- reset threshold

// maybeReset clears the master bitmap once it records more modified
// blocks than the policy's threshold, as OpenVMS does every
// SHADOW_HBMM_RTC seconds. Never while a merge is owed (the bitmap feeds
// it) and never with a write in flight (invariant 5); minicopy bitmaps
// are separate sinks and are never reset.
func (a *Agent) maybeReset(vol *volume) {
	bm := vol.bm
	var threshold uint64
	if a.clustered() {
		// The log's threshold, the same for every writer, whichever host
		// the policy was set on.
		sv, ok := a.setView(vol.name)
		if !ok || len(sv.Masters) == 0 {
			return
		}
		threshold = sv.HBMMReset
	} else {
		bm.mu.Lock()
		h := bm.hbmm
		bm.mu.Unlock()
		if !h.enabled {
			return
		}
		p, err := a.effectivePolicy(h)
		if err != nil {
			return
		}
		threshold = p.ResetThreshold
	}
	if threshold == 0 {
		return
	}
	var masters []string
	if vol.hbw != nil {
		masters = vol.hbw.masterHosts()
	}
	// What this host's writes have set: its own master bitmap if it is a
	// master, and, with masters elsewhere, the chunks it knows set there
	// (its cache, emptied by every reset).
	modified := bm.tracker.Modified(bitmap.HBMMSink)
	if len(masters) > 0 {
		modified = max(modified, bm.tracker.CachedChunks())
	}
	if modified*bm.blocksPerChunk() <= threshold {
		return
	}
	if len(masters) > 0 && a.clog.Level() < cluster.LevelHBMMReset {
		return // a master of an older build would not understand the reset
	}
	if sv, ok := a.setView(vol.name); ok {
		for _, op := range sv.Ops {
			if op.Kind.IsMerge() {
				return
			}
		}
	}
	if len(masters) > 0 {
		a.resetAcrossHosts(vol, masters, modified, threshold)
		return
	}
	var before uint64
	var err2 error
	vol.quiesce(func() {
		before = bm.tracker.Modified(bitmap.HBMMSink)
		err2 = bm.tracker.Reset(bitmap.HBMMSink)
	})
	if err2 != nil {
		if !errors.Is(err2, bitmap.ErrNoSink) {
			a.log.Warn().Str("vu", vol.name).Err(err2).Msg("hbmm reset failed")
		}
		return
	}
	bm.mu.Lock()
	bm.hbmm.resets++
	bm.mu.Unlock()
	a.log.Info().Str("vu", vol.name).Uint64("modified_blocks", before*bm.blocksPerChunk()).Uint64("reset_threshold", threshold).Msg("hbmm bitmap reset")
}

// loggedChunks is what the members' write logs recorded at mount, for a
// controller minimerge (nil: no usable logs, so the whole volume).
func (vol *volume) loggedChunks() *bitmap.Bitmap {
	vol.bm.mu.Lock()
	defer vol.bm.mu.Unlock()
	if vol.bm.logged == nil {
		return nil
	}
	return vol.bm.logged.Clone()
}

// showBitmaps fills a set's bitmap fields for show.
func (a *Agent) showBitmaps(vol *volume, sv shadowset.SetView, s *report.SetShow) {
	bm := vol.bm
	s.ChunkBytes, s.WriteLog = bm.chunkSize, vol.writeLog
	bm.mu.Lock()
	h := bm.hbmm
	s.Minicopy = []report.MinicopyShow{}
	for _, p := range sortedKeys(bm.minicopy) {
		mc := bm.minicopy[p]
		ms := report.MinicopyShow{Member: p, Chunks: mc.bm.Count(), Automatic: mc.automatic, Gathering: slices.Clone(mc.pending)}
		if mc.remoteKey != "" {
			for w, n := range a.mstore.Writers(mc.remoteKey) {
				if !strings.HasPrefix(w, "@") { // (the proof is no writer)
					if ms.Writers == nil {
						ms.Writers = map[string]uint64{}
					}
					ms.Writers[w] = n
				}
			}
		}
		s.Minicopy = append(s.Minicopy, ms)
	}
	s.Work = []report.OpWorkShow{}
	for _, w := range bm.work {
		s.Work = append(s.Work, w.show())
	}
	s.Completed = slices.Clone(bm.completed)
	if s.Completed == nil {
		s.Completed = []report.OpWorkShow{}
	}
	bm.mu.Unlock()
	sort.Slice(s.Work, func(i, j int) bool { return s.Work[i].ID < s.Work[j].ID })
	if !h.enabled && h.own == nil && h.named == "" && len(sv.HBMM) == 0 {
		return
	}
	// (Another host may have set the policy: the log's masters count.)
	hs := &report.HBMMShow{Enabled: h.enabled || len(sv.HBMM) > 0, ActiveOn: append([]string{}, sv.Masters...), Candidates: append([]string{}, sv.HBMM...),
		WritePolicy: cmp.Or(sv.HBMMWrite, shadowset.WriteAll), Resets: h.resets}
	if sv.HBMMWrite == shadowset.WriteActive && vol.hbw != nil && vol.hbw.sb != nil {
		hs.ActiveMaster = sv.Active(a.host)
		hs.Standbys = vol.hbw.sb.Show()
	}
	if vol.hbw != nil {
		hs.Takeovers, hs.Handshakes = vol.hbw.takeovers.Load(), vol.hbw.handshakes.Load()
	}
	for _, g := range sv.Gaps {
		hs.Gaps = append(hs.Gaps, g.Master+">"+g.Writer)
	}
	if counts := a.mstore.Writers(vol.name); len(counts) > 0 && slices.Contains(sv.Masters, a.host) {
		hs.WriterChunks = counts
	}
	if vol.hbw != nil {
		hs.BitSets, hs.BitSetFailures, hs.BitSetRetries, hs.BitSetsPerSecond, hs.BitSetMeanWaitUS = vol.hbw.stats()
	}
	if p, err := a.effectivePolicy(h); err == nil {
		hs.Policy, hs.PolicyText, hs.ResetThreshold = p.Name, p.String(), p.ResetThreshold
	} else if h.named != "" {
		hs.Policy = h.named
	}
	if a.clustered() && len(sv.Masters) > 0 {
		// The threshold every writer resets at is the log's.
		hs.ResetThreshold = sv.HBMMReset
	}
	hs.ModifiedChunks = bm.tracker.Modified(bitmap.HBMMSink)
	hs.ModifiedBlocks = hs.ModifiedChunks * bm.blocksPerChunk()
	s.HBMM = hs
}

// Policies lists the named HBMM policies.
func (a *Agent) Policies() []report.PolicyShow {
	out := []report.PolicyShow{}
	for _, p := range a.policies.List() {
		out = append(out, report.PolicyShow{Name: p.Name, Policy: p.String()})
	}
	return out
}
