package cluster

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shadow-project/shadow/shadowset"
)

// ErrStaleIncarnation: an entry from an earlier run of a host's agent. It
// is refused: that process's view of the sets died with it.
var ErrStaleIncarnation = errors.New("cluster: stale incarnation")

// entryVersion is the encoding of log entries. A host refuses entries of
// a version it does not know rather than guess (rolling upgrades switch
// new versions on through the log once every host reads them).
const entryVersion = 1

// entryType says what an entry carries.
type entryType string

const (
	// entryIncarnation: Host starts as incarnation Inc; an earlier one
	// still up in the core failed.
	entryIncarnation entryType = "inc"
	// entryEvent: a shadowset event.
	entryEvent entryType = "ev"
	// entryWindow: Host's op on Set is about to process [Lo, Hi): every
	// other host mounting Set stops writing there and acknowledges.
	entryWindow entryType = "win"
	// entryAck: Host has drained its writes to Set's window Seq.
	entryAck entryType = "ack"
	// entrySlotClaim: Host takes a free write-log slot of a set;
	// entrySlotFree: a slot is free again (its owner dismounted cleanly,
	// or a merge covered what it logged).
	entrySlotClaim entryType = "wclaim"
	entrySlotFree  entryType = "wfree"
	// entryLeave: Host's run stops cleanly, mounting nothing: it is not
	// a failure (no Table 8-1 row, no recovery delay), and its next run
	// registers without failing this one.
	entryLeave entryType = "leave"
	// entryRenew: Host renews its lease (lease.go).
	entryRenew entryType = "renew"
)

// WriteLogSlots is how many hosts can keep write logs on one set's
// members: each has its own slot of the write-log region, so no two hosts
// ever write one log block.
const WriteLogSlots = 8

// ErrNoSlot: every write-log slot of the set is taken (by hosts that
// mount it, or that failed and whose logs no merge has covered yet).
var ErrNoSlot = errors.New("cluster: no free write-log slot")

// SlotEntry names a set's write-log slot.
type SlotEntry struct {
	Set   string `json:"set"`
	Index int    `json:"index"`
}

// entry is one log record.
type entry struct {
	V    int              `json:"v"`
	Type entryType        `json:"t"`
	Host string           `json:"h"`
	Inc  uint64           `json:"i"`
	Ev   *shadowset.Event `json:"ev,omitempty"`
	// Join, on a mount event: the set must already be mounted by another
	// host (a host that mounts a set others hold writes no metadata).
	Join bool    `json:"join,omitempty"`
	Win  *Window `json:"win,omitempty"`
	// Slot, on a write-log slot claim or release.
	Slot *SlotEntry `json:"slot,omitempty"`
	// Witness, on an incarnation: the host votes but mounts nothing, so
	// the core never hears of it.
	Witness bool `json:"witness,omitempty"`
	// HostInc, on an event that names a host (the leader's record of a
	// failure): the run of that host the proposer saw. The entry is stale
	// if the host has registered another run since: the failure was the
	// previous run's, which its successor's registration already ended.
	HostInc uint64 `json:"hi,omitempty"`
	// ID numbers the proposals of one run of a host, from 1. A proposal
	// is retried when its outcome is unknown (leadership lost after the
	// entry was appended, a forwarded reply lost), so one entry may reach
	// the log twice: it applies once, and the copy is accepted as a no-op.
	ID uint64 `json:"id,omitempty"`
	// Prev, on a renewal: the host's last renewal as the host has applied
	// it.
	Prev uint64 `json:"prev,omitempty"`
	// Lease, on an incarnation: the host's lease and watchdog (nil: the
	// host holds no lease: a witness, or fencing off). Delay, if not 0:
	// the recovery delay the host sets as it registers (checked against
	// every lease, its own included).
	Lease *LeaseConfig `json:"lease,omitempty"`
	Delay int64        `json:"delay,omitempty"`
	// SetDelay: Delay is set even when 0.
	SetDelay bool `json:"sd,omitempty"`
	// Supports, on an incarnation: the core level the host's build runs
	// (level.go). C, on every entry: the proposer's build level.
	Supports int `json:"sup,omitempty"`
	C        int `json:"c,omitempty"`
}

// doneIDs are the IDs of the proposals of one run of a host that the log
// accepted: the most recent maxDoneIDs of them, ascending.
type doneIDs struct {
	Inc uint64   `json:"inc"`
	IDs []uint64 `json:"ids"`
}

// maxDoneIDs bounds the IDs kept per host: far more than one run has in
// flight while a retry can still arrive.
const maxDoneIDs = 256

// Window is a range a merge or copy is about to process on a set.
type Window struct {
	Set  string         `json:"set"`
	Op   shadowset.OpID `json:"op"`
	Host string         `json:"host"`
	Seq  uint64         `json:"seq"`
	Lo   int64          `json:"lo"`
	Hi   int64          `json:"hi"`
	// Acked lists the hosts that have drained their writes to the range;
	// Busy, those among them whose applications were writing: the engine
	// then runs at its minimum rate, as it does for its own host's I/O.
	Acked []string `json:"acked,omitempty"`
	Busy  []string `json:"busy,omitempty"`
}

// ErrNotMounted: a joining mount found the set mounted nowhere.
var ErrNotMounted = errors.New("cluster: set is not mounted on any host")

// Hooks is how the agent hears of what the log applied. Every hook runs
// under the log's lock, in log order, and must not call back into the log
// (it starts goroutines for anything long).
type Hooks struct {
	// Applied receives each event the core accepted and its Ready.
	Applied func(ev shadowset.Event, origin string, rd shadowset.Ready)
	// Window receives a set's new window, or nil when it closes.
	Window func(set string, w *Window)
	// Level receives the cluster's new core level (level.go).
	Level func(level int)
}

// Log is the cluster's ordered event log: the shadowset core as raft's
// state machine. It implements the agent's Log.
type Log struct {
	host string
	// inc is this run's incarnation (an atomic: Stamp reads it without the
	// lock; Reincarnate changes it).
	inc  atomic.Uint64
	node *Node

	mu      sync.Mutex
	core    *shadowset.Core
	incs    map[string]uint64
	windows map[string]*Window
	// slots: each set's write-log slot owners ("" free).
	slots   map[string][]string
	seq     uint64
	history []shadowset.Event
	hooks   Hooks
	changed chan struct{}
	timers  map[time.Duration]*time.Timer
	leading bool
	closed  bool
	// id is the cluster's identity and applied the last index applied
	// (atomics: Stamp reads them without the lock).
	id      atomic.Pointer[[16]byte]
	applied atomic.Uint64
	// live: this incarnation's registration has been applied. Entries
	// replayed before it (the log of earlier runs) update the core but
	// reach no hook: they speak of processes that are gone.
	live bool
	// registered: when this host applied each host's latest registration
	// (its own clock; not part of the replicated state). The leader gives
	// a new run time to show up in its gossip before taking its absence
	// for a failure.
	registered map[string]time.Time
	// done: the proposals each host's current run has had accepted
	// (replicated state: in the snapshot); lastID numbers this run's.
	done   map[string]*doneIDs
	lastID uint64

	// Leases (lease.go). leases and lastRenew are replicated (in the
	// snapshot): each lease holder's configuration and last accepted
	// renewal. renewedAt is when this host applied each one (its own
	// clock). The rest is this host's own lease.
	leases        map[string]LeaseConfig
	lastRenew     map[string]uint64
	renewedAt     map[string]time.Time
	leaseCfg      LeaseConfig
	leaseHooks    LeaseHooks
	renewSent     map[uint64]int64
	fenced        bool
	registerDelay *time.Duration

	// level is the cluster's core level and supports each registered
	// host's (replicated: level.go).
	level    int
	supports map[string]int
	// lastReconcile: when the leader last reconciled (its own clock).
	lastReconcile time.Time
}

// Incarnation is the run of this host's agent the log belongs to.
func (l *Log) Incarnation() uint64 { return l.inc.Load() }

// Stamp identifies what this host writes into member metadata: the
// cluster (zero until the first entry is applied), this run, and the last
// log index applied. It takes no lock: hooks call it under the log's.
func (l *Log) Stamp() (id [16]byte, inc, index uint64) {
	if p := l.id.Load(); p != nil {
		id = *p
	}
	return id, l.inc.Load(), l.applied.Load()
}

func (l *Log) idBytes() []byte {
	if p := l.id.Load(); p != nil {
		return p[:]
	}
	return nil
}

// NewLog makes the state machine; Start it with a node.
func NewLog(host string, inc uint64, hooks Hooks) *Log {
	l := &Log{host: host, core: shadowset.New(), incs: map[string]uint64{}, windows: map[string]*Window{},
		hooks: hooks, changed: make(chan struct{}), timers: map[time.Duration]*time.Timer{}, registered: map[string]time.Time{}, done: map[string]*doneIDs{},
		leases: map[string]LeaseConfig{}, lastRenew: map[string]uint64{}, renewedAt: map[string]time.Time{},
		level: 1, supports: map[string]int{}}
	l.inc.Store(inc)
	return l
}

// Reincarnate starts a new run of this host in the same process: after it
// was fenced, its sets dropped, it registers again as inc (Register next)
// and mounts only what it is asked to mount again.
func (l *Log) Reincarnate(inc uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.inc.Store(inc)
	l.live = false
	l.fenced = false
}

// SetRegisterDelay makes the registration set the cluster's recovery
// delay (checked against every lease).
func (l *Log) SetRegisterDelay(d time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.registerDelay = &d
}

// Attach connects the log to its node (after Start).
func (l *Log) Attach(n *Node) { l.node = n }

// Register declares this incarnation: the first entry of every agent run.
func (l *Log) Register(ctx context.Context, witness bool) error {
	e := entry{Type: entryIncarnation, Witness: witness, Supports: CoreLevel()}
	l.mu.Lock()
	if l.leaseHooks.Now != nil && !witness {
		c := l.leaseCfg
		e.Lease = &c
	}
	if l.registerDelay != nil {
		e.Delay, e.SetDelay = int64(*l.registerDelay), true
	}
	l.mu.Unlock()
	return l.propose(ctx, e)
}

// Leave records that this run stops cleanly, mounting nothing (the last
// entry of a graceful stop, after every dismount).
func (l *Log) Leave(ctx context.Context) error {
	return l.propose(ctx, entry{Type: entryLeave})
}

// HostIncarnation is the incarnation the log has for host's current run:
// 0 if it stopped cleanly or was recorded failed, false if it never
// registered.
func (l *Log) HostIncarnation(host string) (uint64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.HostIncarnationLocked(host)
}

// HostIncarnationLocked is HostIncarnation for hooks (under the log's
// lock).
func (l *Log) HostIncarnationLocked(host string) (uint64, bool) {
	inc, ok := l.incs[host]
	return inc, ok
}

// LeftCleanly reports whether a host's last run stopped cleanly and no
// run has registered since.
func (l *Log) LeftCleanly(host string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	inc, ok := l.incs[host]
	return ok && inc == 0
}

// Append implements the agent's Log.
func (l *Log) Append(ev shadowset.Event) error { return l.AppendFrom(context.Background(), ev) }

// AppendFrom implements the agent's Log. An engine's report whose run was
// stopped is dropped; one that reaches the log anyway is stale to the core
// (its attempt is over) and ignored there.
func (l *Log) AppendFrom(ctx context.Context, ev shadowset.Event) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return l.propose(ctx, entry{Type: entryEvent, Ev: &ev})
}

// Join appends a mount that requires another host to hold the set already.
func (l *Log) Join(set string) error {
	return l.propose(context.Background(), entry{Type: entryEvent, Ev: &shadowset.Event{Kind: shadowset.EvMount, Set: set, Host: l.host}, Join: true})
}

func (l *Log) propose(ctx context.Context, e entry) error {
	l.mu.Lock()
	l.lastID++
	id := l.lastID
	l.mu.Unlock()
	return l.proposeWithID(ctx, e, id)
}

// proposeWithID proposes e as this run's proposal id.
func (l *Log) proposeWithID(ctx context.Context, e entry, id uint64) error {
	l.mu.Lock()
	closed := l.closed
	l.mu.Unlock()
	if closed {
		return ErrClosed
	}
	e.ID = id
	if e.Inc == 0 {
		e.Inc = l.inc.Load()
	}
	e.V, e.Host, e.C = entryVersion, l.host, CoreLevel()
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
	}
	err = l.node.Propose(ctx, b)
	if errors.Is(err, ErrRefused) {
		// The verdict's text is all that crosses the wire; keep the
		// sentinels callers test for.
		for _, s := range []error{shadowset.ErrBadEvent, shadowset.ErrUnknownHost, shadowset.ErrUnknownSet, ErrStaleIncarnation, ErrNotMounted, ErrFenced, ErrLeaseConfig} {
			if containsAny(err.Error(), s.Error()) {
				return fmt.Errorf("%w: %w", s, err)
			}
		}
	}
	return err
}

// Apply implements StateMachine.
func (l *Log) Apply(index uint64, data []byte) (err error) {
	var e entry
	if err := json.Unmarshal(data, &e); err != nil {
		return fmt.Errorf("cluster: entry %d: %w", index, err)
	}
	if e.V != entryVersion {
		return fmt.Errorf("cluster: entry %d has version %d, this host reads %d", index, e.V, entryVersion)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	defer l.signal()
	l.applied.Store(index)
	if l.id.Load() == nil {
		// The cluster's identity: derived from its first entry, so every
		// host computes the same one without another round.
		sum := sha256.Sum256(append(binary.LittleEndian.AppendUint64([]byte("shadow cluster "), index), data...))
		id := [16]byte(sum[:16])
		l.id.Store(&id)
	}
	if l.isRetry(e) {
		return nil
	}
	defer func() {
		if err == nil {
			l.remember(e)
		}
	}()
	if e.Type == entryIncarnation {
		return l.applyIncarnation(e)
	}
	if cur, ok := l.incs[e.Host]; !ok || cur != e.Inc {
		return fmt.Errorf("%w: %s incarnation %x (current %x)", ErrStaleIncarnation, e.Host, e.Inc, cur)
	}
	switch e.Type {
	case entryLeave:
		for _, sv := range l.core.Sets() {
			if slices.Contains(sv.Mounted, e.Host) {
				return fmt.Errorf("%w: %s leaves while it mounts %s", shadowset.ErrBadEvent, e.Host, sv.Name)
			}
		}
		l.incs[e.Host] = 0
		l.raiseLevel()
		return nil
	case entryEvent:
		if e.Ev == nil {
			return fmt.Errorf("%w: event entry without an event", shadowset.ErrBadEvent)
		}
		if e.HostInc != 0 && l.incs[e.Ev.Host] != e.HostInc {
			return fmt.Errorf("%w: %s of %s incarnation %x (current %x)", ErrStaleIncarnation, e.Ev.Kind, e.Ev.Host, e.HostInc, l.incs[e.Ev.Host])
		}
		if e.Ev.Kind == shadowset.EvSetDelay {
			if err := l.checkLeaseDelay(e.Ev.Duration); err != nil {
				return err
			}
		}
		if err := l.checkHBMMLevel(*e.Ev); err != nil {
			return err
		}
		if e.Join {
			sv, ok := l.core.Set(e.Ev.Set)
			if !ok || len(sv.Mounted) == 0 {
				return fmt.Errorf("%w: %s", ErrNotMounted, e.Ev.Set)
			}
		}
		if err := l.step(*e.Ev, e.Host); err != nil {
			return err
		}
		if e.Ev.Kind == shadowset.EvHostFailed && e.Ev.Host == l.host && l.live {
			l.fenceLocked("the cluster declared this host failed", true)
		}
		return nil
	case entryRenew:
		if l.level < LevelLeases {
			return fmt.Errorf("%w: leases are off until every host runs core level %d (the cluster runs %d)", shadowset.ErrBadEvent, LevelLeases, l.level)
		}
		return l.applyRenew(e)
	case entryWindow:
		return l.applyWindow(e)
	case entrySlotClaim, entrySlotFree:
		return l.applySlot(e)
	case entryAck:
		if e.Win == nil {
			return fmt.Errorf("%w: ack entry without a window", shadowset.ErrBadEvent)
		}
		w := l.windows[e.Win.Set]
		if w != nil && w.Seq == e.Win.Seq && !slices.Contains(w.Acked, e.Host) {
			w.Acked = append(w.Acked, e.Host)
			slices.Sort(w.Acked)
			if len(e.Win.Busy) > 0 {
				w.Busy = append(w.Busy, e.Host)
				slices.Sort(w.Busy)
			}
		}
		return nil
	}
	return fmt.Errorf("%w: unknown entry type %q", shadowset.ErrBadEvent, e.Type)
}

// isRetry reports whether e is a copy of a proposal already accepted.
func (l *Log) isRetry(e entry) bool {
	d := l.done[e.Host]
	if e.ID == 0 || d == nil || d.Inc != e.Inc {
		return false
	}
	_, found := slices.BinarySearch(d.IDs, e.ID)
	return found
}

// remember records an accepted proposal (a new run of a host starts a new
// record).
func (l *Log) remember(e entry) {
	if e.ID == 0 {
		return
	}
	d := l.done[e.Host]
	if d == nil || d.Inc != e.Inc {
		d = &doneIDs{Inc: e.Inc}
		l.done[e.Host] = d
	}
	i, found := slices.BinarySearch(d.IDs, e.ID)
	if found {
		return
	}
	d.IDs = slices.Insert(d.IDs, i, e.ID)
	if len(d.IDs) > maxDoneIDs {
		d.IDs = slices.Delete(d.IDs, 0, len(d.IDs)-maxDoneIDs)
	}
}

func (l *Log) applyIncarnation(e entry) (err error) {
	prev, had := l.incs[e.Host]
	wasLive := l.live
	defer func() {
		// A refused registration changes nothing (the core refuses a bad
		// host name before it changes anything itself).
		if err != nil {
			if had {
				l.incs[e.Host] = prev
			} else {
				delete(l.incs, e.Host)
			}
			l.live = wasLive
			delete(l.registered, e.Host)
			return
		}
		l.supports[e.Host] = max(e.Supports, 1)
		l.raiseLevel()
	}()
	if err := l.checkLevel(e); err != nil {
		return err
	}
	prevLease, hadLease := l.leases[e.Host]
	defer func() {
		if err != nil {
			if hadLease {
				l.leases[e.Host] = prevLease
			} else {
				delete(l.leases, e.Host)
			}
		}
	}()
	if err := l.checkRegistration(e); err != nil {
		return err
	}
	l.incs[e.Host] = e.Inc
	if e.Host == l.host && e.Inc == l.inc.Load() {
		l.live = true
	} else if e.Host == l.host && l.live {
		// Another run of this host's name registered: this one's view of
		// the sets is no longer the cluster's.
		l.fenceLocked("another run of this host registered", false)
	}
	if !had || prev != e.Inc {
		l.registered[e.Host] = time.Now()
	}
	delete(l.leases, e.Host)
	if e.Lease != nil {
		l.leases[e.Host] = *e.Lease
		l.lastRenew[e.Host] = 0
		l.renewedAt[e.Host] = time.Now()
	}
	if e.Delay > 0 || e.SetDelay {
		if err := l.step(shadowset.Event{Kind: shadowset.EvSetDelay, Duration: time.Duration(e.Delay)}, e.Host); err != nil {
			return err
		}
	}
	if e.Witness {
		return nil
	}
	alive := false
	for _, h := range l.core.Hosts() {
		if h.Name == e.Host {
			alive = h.Alive
		}
	}
	if had && prev != e.Inc && prev != 0 && alive {
		// The previous run died without the cluster noticing yet (one
		// that left cleanly set its incarnation to 0).
		if err := l.step(shadowset.Event{Kind: shadowset.EvHostFailed, Host: e.Host}, e.Host); err != nil {
			return err
		}
		alive = false
	}
	if alive {
		return nil
	}
	return l.step(shadowset.Event{Kind: shadowset.EvHostUp, Host: e.Host}, e.Host)
}

// checkRegistration refuses a run whose lease the recovery delay (the
// cluster's, or the one it brings) does not cover, and a delay it brings
// that another host's lease does not fit.
func (l *Log) checkRegistration(e entry) error {
	d := l.core.Delay()
	if e.Delay > 0 || e.SetDelay {
		d = time.Duration(e.Delay)
		for h, c := range l.leases {
			if h == e.Host || l.incs[h] == 0 {
				continue
			}
			if err := c.CheckDelay(d); err != nil {
				return fmt.Errorf("host %s: %w", h, err)
			}
		}
	}
	if e.Lease != nil {
		if err := e.Lease.CheckDelay(d); err != nil {
			return fmt.Errorf("host %s: %w", e.Host, err)
		}
	}
	return nil
}

func (l *Log) applyWindow(e entry) error {
	w := e.Win
	if w == nil {
		return fmt.Errorf("%w: window entry without a window", shadowset.ErrBadEvent)
	}
	if !l.opRunning(w.Set, w.Op, e.Host) {
		return fmt.Errorf("%w: op%d of %s is not running on %s", shadowset.ErrBadEvent, w.Op, w.Set, e.Host)
	}
	l.seq++
	nw := &Window{Set: w.Set, Op: w.Op, Host: e.Host, Seq: l.seq, Lo: w.Lo, Hi: w.Hi}
	l.windows[w.Set] = nw
	if l.hooks.Window != nil && l.live {
		l.hooks.Window(w.Set, nw)
	}
	return nil
}

func (l *Log) applySlot(e entry) error {
	if e.Slot == nil {
		return fmt.Errorf("%w: slot entry without a slot", shadowset.ErrBadEvent)
	}
	owners := l.slots[e.Slot.Set]
	if e.Type == entrySlotClaim {
		if l.slots == nil {
			l.slots = map[string][]string{}
		}
		if owners == nil {
			owners = make([]string, WriteLogSlots)
			l.slots[e.Slot.Set] = owners
		}
		if slices.Contains(owners, e.Host) {
			return nil
		}
		for i, o := range owners {
			if o == "" {
				owners[i] = e.Host
				return nil
			}
		}
		return fmt.Errorf("%w: %s: %v", ErrNoSlot, e.Slot.Set, owners)
	}
	i := e.Slot.Index
	if i < 0 || i >= WriteLogSlots {
		return fmt.Errorf("%w: write-log slot %d out of range", shadowset.ErrBadEvent, i)
	}
	if owners == nil {
		return nil // every slot of the set is free
	}
	// A slot is freed by its owner, or, once its owner no longer mounts
	// the set, by the host whose merge covered it.
	if o := owners[i]; o != "" && o != e.Host {
		if sv, ok := l.core.Set(e.Slot.Set); ok && slices.Contains(sv.Mounted, o) {
			return fmt.Errorf("%w: write-log slot %d of %s belongs to %s, which mounts the set", shadowset.ErrBadEvent, i, e.Slot.Set, o)
		}
	}
	owners[i] = ""
	return nil
}

// ClaimSlot takes (or finds) this host's write-log slot of set.
func (l *Log) ClaimSlot(ctx context.Context, set string) (int, error) {
	if err := l.propose(ctx, entry{Type: entrySlotClaim, Slot: &SlotEntry{Set: set}}); err != nil {
		return -1, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if i := slices.Index(l.slots[set], l.host); i >= 0 {
		return i, nil
	}
	return -1, fmt.Errorf("%w: claimed, yet no slot of %s is this host's", ErrNoSlot, set)
}

// FreeSlot releases a write-log slot of set.
func (l *Log) FreeSlot(ctx context.Context, set string, i int) error {
	return l.propose(ctx, entry{Type: entrySlotFree, Slot: &SlotEntry{Set: set, Index: i}})
}

// SlotOwners returns who holds each write-log slot of set ("" free).
func (l *Log) SlotOwners(set string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.slotOwnersLocked(set)
}

// SlotOwnersLocked is SlotOwners for hooks (under the log's lock).
func (l *Log) SlotOwnersLocked(set string) []string { return l.slotOwnersLocked(set) }

func (l *Log) slotOwnersLocked(set string) []string {
	if o := l.slots[set]; o != nil {
		return slices.Clone(o)
	}
	return make([]string, WriteLogSlots)
}

func (l *Log) opRunning(set string, op shadowset.OpID, host string) bool {
	sv, ok := l.core.Set(set)
	if !ok {
		return false
	}
	for _, o := range sv.Ops {
		if o.ID == op && o.State == shadowset.Running && o.Host == host {
			return true
		}
	}
	return false
}

// step applies one event to the core and hands its Ready on.
func (l *Log) step(ev shadowset.Event, origin string) error {
	l.core.SetRules(shadowset.Rules{MinicopyAnyHost: l.level < LevelHBMM})
	if err := l.core.Step(ev); err != nil {
		return err
	}
	l.history = append(l.history, ev)
	rd := l.core.Ready()
	l.core.Advance()
	for _, a := range rd.Actions {
		if a.Kind == shadowset.ActTimer && l.leading {
			l.armTimer(a.At)
		}
	}
	if l.hooks.Applied != nil && l.live {
		l.hooks.Applied(ev, origin, rd)
	}
	// A window lives only as long as its op runs on its host.
	for set, w := range l.windows {
		if !l.opRunning(set, w.Op, w.Host) {
			delete(l.windows, set)
			if l.hooks.Window != nil && l.live {
				l.hooks.Window(set, nil)
			}
		}
	}
	// A host that mounts a set while a window is open must hold it too
	// before its first write: hooks are idempotent for a window they hold.
	if ev.Kind == shadowset.EvMount && l.live && l.hooks.Window != nil {
		if w := l.windows[ev.Set]; w != nil {
			l.hooks.Window(ev.Set, w)
		}
	}
	return nil
}

func (l *Log) signal() {
	close(l.changed)
	l.changed = make(chan struct{})
}

// Announce proposes a window for a running op and waits until every other
// host that mounts the set has drained its writes to it (or stopped
// mounting the set, e.g. by failing).
func (l *Log) Announce(ctx context.Context, set string, op shadowset.OpID, lo, hi int64) error {
	_, err := l.AnnounceBusy(ctx, set, op, lo, hi)
	return err
}

// AnnounceBusy is Announce, and reports whether a host that acknowledged
// said its applications were writing.
func (l *Log) AnnounceBusy(ctx context.Context, set string, op shadowset.OpID, lo, hi int64) (busy bool, err error) {
	if err := l.propose(ctx, entry{Type: entryWindow, Win: &Window{Set: set, Op: op, Lo: lo, Hi: hi}}); err != nil {
		return false, err
	}
	for {
		l.mu.Lock()
		w := l.windows[set]
		ch := l.changed
		done := false
		if w == nil || w.Op != op || w.Host != l.host {
			l.mu.Unlock()
			return false, fmt.Errorf("cluster: window on %s for op%d closed", set, op)
		}
		if sv, ok := l.core.Set(set); ok {
			done = true
			for _, h := range sv.Mounted {
				if h != l.host && !slices.Contains(w.Acked, h) {
					done = false
				}
			}
		}
		busy = len(w.Busy) > 0
		l.mu.Unlock()
		if done {
			return busy, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return false, ctx.Err()
		}
	}
}

// Ack tells the window's host that this one has drained its writes.
func (l *Log) Ack(ctx context.Context, set string, seq uint64) error {
	return l.AckBusy(ctx, set, seq, false)
}

// AckBusy is Ack, saying whether this host's applications are writing.
// It goes to the window's host directly (inforce.go), retried until that
// host takes it or the window is gone.
func (l *Log) AckBusy(ctx context.Context, set string, seq uint64, busy bool) error {
	for {
		l.mu.Lock()
		w := l.windows[set]
		ch := l.changed
		l.mu.Unlock()
		if w == nil || w.Seq != seq {
			return nil // the window moved on: nobody waits for this ack
		}
		err := l.node.sendAck(w.Host, ackRequest{Set: set, Seq: seq, Host: l.host, Busy: busy})
		if err == nil {
			return nil
		}
		t := time.NewTimer(100 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("cluster: ack of window %d of %s: %w (last: %v)", seq, set, ctx.Err(), err)
		case <-ch:
		case <-t.C:
		}
		t.Stop()
	}
}

// receiveAck records an ack this host's engine waits for.
func (l *Log) receiveAck(set string, seq uint64, host string, busy bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	w := l.windows[set]
	switch {
	case w == nil || w.Seq < seq:
		// This host has not applied the window yet (it may lag the
		// acknowledging host): the sender tries again.
		return fmt.Errorf("window %d of %s not applied here yet", seq, set)
	case w.Seq > seq:
		return nil // an earlier window's: moot
	case w.Host != l.host:
		return fmt.Errorf("window %d of %s is not held here", seq, set)
	}
	if !slices.Contains(w.Acked, host) {
		w.Acked = append(w.Acked, host)
		slices.Sort(w.Acked)
		if busy {
			w.Busy = append(w.Busy, host)
			slices.Sort(w.Busy)
		}
	}
	l.signal()
	return nil
}

// armTimer turns the core's virtual deadline into a real timer on the
// leader; its expiry is a tick through the log.
func (l *Log) armTimer(at time.Duration) {
	if _, ok := l.timers[at]; ok {
		return
	}
	l.timers[at] = time.AfterFunc(at-l.core.Now(), func() { l.tick(at) })
}

// tick appends the tick that reaches virtual time at, if this host still
// leads and no tick has reached it yet; a failed append is retried soon,
// not lost.
func (l *Log) tick(at time.Duration) {
	l.mu.Lock()
	delete(l.timers, at)
	now, leading := l.core.Now(), l.leading
	l.mu.Unlock()
	if at <= now || !leading {
		return
	}
	err := l.Append(shadowset.Event{Kind: shadowset.EvTick, Duration: at - now})
	if err == nil || errors.Is(err, ErrClosed) {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.timers[at]; !ok && l.leading && !l.closed {
		l.timers[at] = time.AfterFunc(200*time.Millisecond, func() { l.tick(at) })
	}
}

// LeaderChanged implements Reconciler: a new leader takes over the
// delay window's timer (it restarts no count: the window's end is in the
// log's virtual time).
func (l *Log) LeaderChanged(leader bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.leading = leader
	if leader {
		// A new leader counts every lease from its own start: it has not
		// seen the renewals its predecessor applied.
		now := time.Now()
		for h := range l.leases {
			l.renewedAt[h] = now
		}
		l.lastReconcile = time.Time{}
	}
	if !leader {
		for at, t := range l.timers {
			t.Stop()
			delete(l.timers, at)
		}
		return
	}
	if open, end := l.core.Window(); open {
		l.armTimer(end)
	}
}

// Reconcile implements Reconciler: hosts the core has up that gossip no
// longer sees alive have failed.
//
// Gossip and the log are not ordered: a run that has just registered may
// still be dead in this host's gossip (the previous run's death, until
// the new run's refutation arrives). Gossip names the run (Peer.Inc): a
// host fails at once when gossip saw its current run go; when gossip's
// last word on it is about another run (or nothing), only once the run
// has been registered for registerGrace without gossip showing it alive.
// Each failure names the run it is about, so one that lands after the
// host registered a new run is refused as stale instead of failing the
// new run.
func (l *Log) Reconcile(alive []Peer) {
	type failure struct {
		host string
		inc  uint64
	}
	l.mu.Lock()
	var failed []failure
	grace := l.registerGrace()
	for _, h := range l.core.Hosts() {
		if !h.Alive || slices.ContainsFunc(alive, func(p Peer) bool { return p.Host == h.Name }) {
			continue
		}
		inc, ok := l.incs[h.Name]
		if ok && inc == 0 {
			continue // left cleanly: not a failure
		}
		if d, ok := l.node.departed(h.Name); !ok || d.peer.Inc != inc || inc == 0 {
			if at, ok := l.registered[h.Name]; ok && time.Since(at) < grace {
				continue
			}
		}
		failed = append(failed, failure{h.Name, inc})
	}
	// A lapse the leader sees is a failure, gossip or not: unless this
	// leader was itself stopped or starved (its reconcile ticks stopped),
	// when every lease looks lapsed on its clock. Then it counts them all
	// afresh, from now.
	now := time.Now()
	if !l.lastReconcile.IsZero() && now.Sub(l.lastReconcile) > reconcileGap {
		for h := range l.leases {
			l.renewedAt[h] = now
		}
	}
	l.lastReconcile = now
	for h, inc := range l.lapsed() {
		if !slices.ContainsFunc(failed, func(f failure) bool { return f.host == h }) {
			l.node.log.Warn().Str("peer", h).Msg("host's lease lapsed: recording its failure")
			failed = append(failed, failure{h, inc})
		}
	}
	l.mu.Unlock()
	if len(failed) > 0 && !l.node.verifyLeader() {
		// A leader that was stopped may not know yet that another has
		// taken over: what it saw is stale, and a forwarded proposal
		// would still commit.
		return
	}
	for _, f := range failed {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := l.propose(ctx, entry{Type: entryEvent, Ev: &shadowset.Event{Kind: shadowset.EvHostFailed, Host: f.host}, HostInc: f.inc})
		cancel()
		switch {
		case err == nil:
			l.node.log.Warn().Str("peer", f.host).Msg("host failed: recorded in the log")
		case errors.Is(err, shadowset.ErrBadEvent), errors.Is(err, shadowset.ErrUnknownHost), errors.Is(err, ErrStaleIncarnation):
			// Already failed, or a new run registered meanwhile.
		default:
			l.node.log.Warn().Err(err).Str("peer", f.host).Msg("cannot record the host's failure")
		}
	}
}

// registerGrace is how long a newly registered run may stay out of the
// leader's gossip before it counts as failed: long enough for the run's
// refutation of its predecessor's death to spread.
func (l *Log) registerGrace() time.Duration {
	if l.node == nil {
		return 0
	}
	return 10 * l.node.cfg.Timing.ProbeInterval
}

// View runs f with the core under the log's lock.
func (l *Log) View(f func(c *shadowset.Core)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f(l.core)
}

// Locked returns the core for hooks, which run under the log's lock.
func (l *Log) Locked() *shadowset.Core { return l.core }

// History returns the events applied so far.
func (l *Log) History() []shadowset.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.history)
}

// WindowOf returns a set's current window (nil: none).
func (l *Log) WindowOf(set string) *Window {
	l.mu.Lock()
	defer l.mu.Unlock()
	if w := l.windows[set]; w != nil {
		c := *w
		c.Acked = slices.Clone(w.Acked)
		return &c
	}
	return nil
}

// Close stops taking proposals and the timers.
func (l *Log) Close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	for _, t := range l.timers {
		t.Stop()
	}
}

// logSnapshot is the state machine's snapshot: the core's own snapshot
// and what the log keeps beside it.
type logSnapshot struct {
	V         int                    `json:"v"`
	ID        []byte                 `json:"id,omitempty"`
	Core      json.RawMessage        `json:"core"`
	Incs      map[string]uint64      `json:"incs"`
	Windows   map[string]*Window     `json:"windows,omitempty"`
	Seq       uint64                 `json:"seq"`
	History   []shadowset.Event      `json:"history,omitempty"`
	Slots     map[string][]string    `json:"slots,omitempty"`
	Done      map[string]*doneIDs    `json:"done,omitempty"`
	Leases    map[string]LeaseConfig `json:"leases,omitempty"`
	LastRenew map[string]uint64      `json:"last_renew,omitempty"`
	// Level is the cluster's core level, Supports each host's build's.
	Level    int            `json:"level,omitempty"`
	Supports map[string]int `json:"supports,omitempty"`
}

// Snapshot implements StateMachine.
func (l *Log) Snapshot() ([]byte, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	c, err := l.core.Snapshot()
	if err != nil {
		return nil, err
	}
	return json.Marshal(logSnapshot{V: entryVersion, ID: l.idBytes(), Core: c, Incs: l.incs, Windows: l.windows, Seq: l.seq, History: l.history, Slots: l.slots, Done: l.done, Leases: l.leases, LastRenew: l.lastRenew, Level: l.level, Supports: l.supports})
}

// Restore implements StateMachine.
func (l *Log) Restore(b []byte) error {
	var s logSnapshot
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("cluster: snapshot: %w", err)
	}
	if s.V != entryVersion {
		return fmt.Errorf("cluster: snapshot version %d, this host reads %d", s.V, entryVersion)
	}
	c, err := shadowset.Restore(s.Core)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for set, owners := range s.Slots {
		if len(owners) != WriteLogSlots {
			return fmt.Errorf("cluster: snapshot: %d write-log slots for %s, want %d", len(owners), set, WriteLogSlots)
		}
	}
	l.core, l.incs, l.windows, l.seq, l.history, l.slots = c, s.Incs, s.Windows, s.Seq, s.History, s.Slots
	if len(s.ID) == 16 {
		id := [16]byte(s.ID)
		l.id.Store(&id)
	}
	l.registered = map[string]time.Time{}
	l.leases, l.lastRenew, l.renewedAt = s.Leases, s.LastRenew, map[string]time.Time{}
	if l.leases == nil {
		l.leases = map[string]LeaseConfig{}
	}
	if l.lastRenew == nil {
		l.lastRenew = map[string]uint64{}
	}
	now := time.Now()
	for h := range l.leases {
		l.renewedAt[h] = now
	}
	l.level, l.supports = max(s.Level, 1), s.Supports
	if l.supports == nil {
		l.supports = map[string]int{}
	}
	l.done = s.Done
	if l.done == nil {
		l.done = map[string]*doneIDs{}
	}
	if l.incs == nil {
		l.incs = map[string]uint64{}
	}
	if l.windows == nil {
		l.windows = map[string]*Window{}
	}
	// A snapshot taken after this incarnation registered (a host that
	// fell behind gets one from the leader) makes it live, as applying
	// the registration would have.
	if l.incs[l.host] == l.inc.Load() {
		l.live = true
	}
	return nil
}
