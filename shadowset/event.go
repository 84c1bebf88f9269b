package shadowset

import (
	"errors"
	"fmt"
	"time"
)

// Sentinel errors; Step wraps them with context.
var (
	// ErrBadEvent: the event is malformed or contradicts the state. The
	// core is unchanged.
	ErrBadEvent = errors.New("shadowset: bad event")
	// ErrUnknownHost: the event names a host the cluster does not have.
	ErrUnknownHost = errors.New("shadowset: unknown host")
	// ErrUnknownSet: the event names a set that was never defined.
	ErrUnknownSet = errors.New("shadowset: unknown set")
	// ErrSnapshotVersion: a snapshot of a version this core cannot read.
	ErrSnapshotVersion = errors.New("shadowset: unsupported snapshot version")
)

// EventKind says what happened.
type EventKind uint8

const (
	// EvHostUp: Host joins (or rejoins) the cluster.
	EvHostUp EventKind = iota + 1
	// EvHostFailed: Host failed.
	EvHostFailed
	// EvSetDelay: the recovery delay becomes Duration.
	EvSetDelay
	// EvDefineSet: Spec defines a set (replay and bootstrap).
	EvDefineSet
	// EvDefineOp: OpSpec records a prior op underway.
	EvDefineOp
	// EvPriority: SET SHADOW /PRIORITY=N on Host for Set.
	EvPriority
	// EvMaxOps: Host may run N ops at once.
	EvMaxOps
	// EvAbort: Set aborted on Host with writes in its restart queue.
	EvAbort
	// EvDismount: Host dismounts Set.
	EvDismount
	// EvMount: Host mounts Set.
	EvMount
	// EvRemoveMember: an operator removes Member from Set; with Minicopy a
	// minicopy bitmap is kept on Host.
	EvRemoveMember
	// EvIOError: a write to Member failed on Host; Member is expelled with
	// an automatic minicopy bitmap on Host.
	EvIOError
	// EvAddMember: Member is added to Set.
	EvAddMember
	// EvDemandMerge: SET SHADOW /DEMAND_MERGE for Set.
	EvDemandMerge
	// EvEvalResources: SET SHADOW /EVALUATE=RESOURCES on Host.
	EvEvalResources
	// EvTick: Duration of virtual time passed.
	EvTick
	// EvProgress: the op reached checkpoint LBN.
	EvProgress
	// EvComplete: the op finished.
	EvComplete
	// EvForgetSet: Set, mounted nowhere, leaves the core (its state lives
	// on in its members' metadata until a host mounts it again).
	EvForgetSet
	// EvHBMM: SET SHADOW /POLICY=HBMM: Set's HBMM master hosts become
	// Spec.HBMM (empty: HBMM disabled). Refused on a set with write logs,
	// and while a minimerge is pending or running (its bitmaps would
	// change under it).
	EvHBMM
	// EvCovered: writer Host has emptied its cache of known-set chunks,
	// drained the writes it issued before, and flushed every member, after
	// the masters Spec.HBMM became its masters: from now on each of them
	// that is still a master of Set holds every chunk Host may leave
	// different, so it counts as covering Host (docs/cluster.md, "A new
	// master").
	EvCovered
	numEventKinds
)

var eventKindNames = [...]string{
	EvHostUp: "host-up", EvHostFailed: "host-failed", EvSetDelay: "set-delay", EvDefineSet: "define-set",
	EvDefineOp: "define-op", EvPriority: "priority", EvMaxOps: "max-ops", EvAbort: "abort", EvDismount: "dismount",
	EvMount: "mount", EvRemoveMember: "remove-member", EvIOError: "io-error", EvAddMember: "add-member",
	EvDemandMerge: "demand-merge", EvEvalResources: "eval-resources", EvTick: "tick", EvProgress: "progress",
	EvComplete: "complete", EvForgetSet: "forget-set", EvHBMM: "hbmm",
	EvCovered: "covered",
}

func (k EventKind) String() string {
	if int(k) < len(eventKindNames) && eventKindNames[k] != "" {
		return eventKindNames[k]
	}
	return fmt.Sprintf("EventKind(%d)", uint8(k))
}

// Event is one input to the core. Which fields matter depends on Kind. One
// flat struct (rather than a type per event) keeps the ordered event log
// and the fuzzer simple: every event encodes the same way.
type Event struct {
	Kind     EventKind `json:"kind"`
	Host     string    `json:"host,omitempty"`
	Set      string    `json:"set,omitempty"`
	Member   string    `json:"member,omitempty"`
	Minicopy bool      `json:"minicopy,omitempty"`
	// FullCopy, on EvAddMember: the member's minicopy bitmap cannot be
	// used (its generation history shows writes outside the set): the
	// bitmap is dropped and the member gets a full copy.
	FullCopy bool          `json:"full_copy,omitempty"`
	N        int           `json:"n,omitempty"`
	LBN      uint64        `json:"lbn,omitempty"`
	Duration time.Duration `json:"duration,omitempty"`
	// Op names the op for EvProgress and EvComplete. Zero means the set's
	// running op; a non-zero Op that is not running (anymore) on Host makes
	// the event stale, and a stale event is ignored.
	Op OpID `json:"op,omitempty"`
	// Attempt, with Op, names the run a report comes from (ActStart's
	// Attempt); a report from an earlier run of the op is stale.
	Attempt uint64   `json:"attempt,omitempty"`
	Spec    *SetSpec `json:"spec,omitempty"`
	OpSpec  *OpSpec  `json:"op_spec,omitempty"`
}

// SetSpec defines a set.
type SetSpec struct {
	Name    string   `json:"name"`
	Members []string `json:"members"`
	Mounted []string `json:"mounted,omitempty"`
	// HBMM lists the hosts eligible to hold master write bitmaps, in the
	// policy's order of preference (MASTER_LIST); empty: no HBMM.
	HBMM []string `json:"hbmm,omitempty"`
	// HBMMCount is how many of them are masters at once (COUNT); 0: all.
	HBMMCount int `json:"hbmm_count,omitempty"`
	// HBMMLists, when given, is the policy's master lists (HBMM is then
	// their hosts, and HBMMCount is unused).
	HBMMLists []MasterList `json:"hbmm_lists,omitempty"`
	// HBMMReset is the policy's RESET_THRESHOLD in 512-byte blocks (0:
	// never reset), in the log so that every writer resets its bitmaps on
	// the masters at the same threshold.
	HBMMReset uint64 `json:"hbmm_reset,omitempty"`
	// HBMMWrite is the policy's write policy: WriteActive, or "" for
	// "all" (every master acknowledges each bit-set).
	HBMMWrite string `json:"hbmm_write,omitempty"`
	// Controller: the set uses write logs (controller minimerge).
	Controller bool `json:"controller,omitempty"`
	// Dirty: a merge is required.
	Dirty bool `json:"dirty,omitempty"`
}

// OpSpec records an op that was underway before the core saw the set.
type OpSpec struct {
	Set  string `json:"set"`
	Kind OpKind `json:"kind"`
	// Host running it; empty: recorded in the set's metadata only.
	Host   string `json:"host,omitempty"`
	LBN    uint64 `json:"lbn,omitempty"`
	Target string `json:"target,omitempty"`
	// Bitmap is the host holding a minicopy's master bitmap.
	Bitmap string `json:"bitmap,omitempty"`
}

func badf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrBadEvent}, args...)...)
}
