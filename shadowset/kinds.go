package shadowset

import "fmt"

// OpKind is the kind of a merge or copy operation.
type OpKind uint8

const (
	// FullMerge compares every block of the volume.
	FullMerge OpKind = iota + 1
	// Minimerge is a host-based minimerge (HBMM): only the chunks in the
	// master write bitmaps. It runs only on a host holding one of them.
	Minimerge
	// ControllerMinimerge merges the chunks recorded in the write logs kept
	// with the members; it survives the loss of every host.
	ControllerMinimerge
	// FullCopy copies every block to a target member.
	FullCopy
	// Minicopy copies only the chunks recorded in a minicopy bitmap.
	Minicopy
)

var opKindNames = [...]string{
	FullMerge:           "full-merge",
	Minimerge:           "minimerge",
	ControllerMinimerge: "controller-minimerge",
	FullCopy:            "full-copy",
	Minicopy:            "minicopy",
}

func (k OpKind) String() string {
	if int(k) < len(opKindNames) && opKindNames[k] != "" {
		return opKindNames[k]
	}
	return fmt.Sprintf("OpKind(%d)", uint8(k))
}

// ParseOpKind parses the replay-language name of a kind.
func ParseOpKind(s string) (OpKind, error) {
	for k, n := range opKindNames {
		if n != "" && n == s {
			return OpKind(k), nil
		}
	}
	return 0, fmt.Errorf("%w: unknown op kind %q (want full-merge, minimerge, controller-minimerge, full-copy or minicopy)", ErrBadEvent, s)
}

// IsMerge reports whether the kind is a merge (as opposed to a copy).
func (k OpKind) IsMerge() bool { return k == FullMerge || k == Minimerge || k == ControllerMinimerge }

// IsCopy reports whether the kind is a copy.
func (k OpKind) IsCopy() bool { return k == FullCopy || k == Minicopy }

// isMini reports whether a pending op of this kind runs before pending
// copies (Table 8-1: "the merge is done before the copy if and only if the
// merge is a minimerge").
func (k OpKind) isMini() bool { return k == Minimerge || k == ControllerMinimerge }

// column returns Table 8-1's prior-operation column for an op of this kind.
func (k OpKind) column() Prior {
	switch k {
	case FullMerge, Minimerge:
		return PriorMergeOrHBMM
	case ControllerMinimerge:
		return PriorControllerMinimerge
	case FullCopy:
		return PriorFullCopy
	default:
		return PriorMinicopy
	}
}

// OpState is where an op stands.
type OpState uint8

const (
	// Pending: required, waiting for its turn, a host or the delay window.
	Pending OpState = iota + 1
	// Running on its host.
	Running
	// Canceled: stopped by an event, waiting for the delay window to close
	// before it is continued or restarted (on any eligible host).
	Canceled
	// Suspended: stopped; it may resume only on the host where it ran.
	Suspended
)

var opStateNames = [...]string{Pending: "pending", Running: "running", Canceled: "canceled", Suspended: "suspended"}

func (s OpState) String() string {
	if int(s) < len(opStateNames) && opStateNames[s] != "" {
		return opStateNames[s]
	}
	return fmt.Sprintf("OpState(%d)", uint8(s))
}

// ParseOpState parses the replay-language name of a state.
func ParseOpState(s string) (OpState, error) {
	for k, n := range opStateNames {
		if n != "" && n == s {
			return OpState(k), nil
		}
	}
	return 0, fmt.Errorf("%w: unknown op state %q (want running, pending, canceled or suspended)", ErrBadEvent, s)
}

// Word is one of Table 8-1's outcome words, as recorded in an op's history.
type Word uint8

const (
	WordCanceled Word = iota + 1
	WordSuspended
	WordRestarted
	WordContinued
)

var wordNames = [...]string{WordCanceled: "canceled", WordSuspended: "suspended", WordRestarted: "restarted", WordContinued: "continued"}

func (w Word) String() string {
	if int(w) < len(wordNames) && wordNames[w] != "" {
		return wordNames[w]
	}
	return fmt.Sprintf("Word(%d)", uint8(w))
}

// ParseWord parses a history word.
func ParseWord(s string) (Word, error) {
	for k, n := range wordNames {
		if n != "" && n == s {
			return Word(k), nil
		}
	}
	return 0, fmt.Errorf("%w: unknown history word %q (want canceled, suspended, restarted or continued)", ErrBadEvent, s)
}

// Role is a member's role in its set.
type Role uint8

const (
	// FullMember holds valid data and may be read.
	FullMember Role = iota + 1
	// CopyTarget is being filled by a copy: written, never read.
	CopyTarget
)

func (r Role) String() string {
	switch r {
	case FullMember:
		return "full"
	case CopyTarget:
		return "copy-target"
	}
	return fmt.Sprintf("Role(%d)", uint8(r))
}
