package shadowset

import (
	"fmt"
	"strings"
)

// TableEvent is an event row group of Table 8-1.
type TableEvent uint8

const (
	RowFailureCommon TableEvent = iota + 1
	RowFailureNoCommon
	RowAbort
	RowDismount
	RowMemberAdded
	RowMount
	RowDemandMerge
	RowEvalResources
)

var tableEventText = [...]string{
	RowFailureCommon:   "Failure of other system that had at least one mounted SS in common with this system.",
	RowFailureNoCommon: "Failure of a system that did not have any SS mounted in common with this system.",
	RowAbort:           "SS aborted on another system, with writes in restart queue on the aborting system; SS is also mounted on this system.",
	RowDismount:        "Other system dismounts a SS that has a merge or copy in progress on its system; SS is also mounted on this system.",
	RowMemberAdded:     "A member is added to a SS that is mounted on this system.",
	RowMount:           "Mount a SS that requires a merge or copy; SS is not mounted on any other system.",
	RowDemandMerge:     "SET SHADOW /DEMAND_MERGE command issued on any system for SS mounted on this system.",
	RowEvalResources:   "SET SHADOW /EVAL=RESOURCES command issued on this system.",
}

func (e TableEvent) String() string { return tableEventText[e] }

// Focus is Table 8-1's "Shadow Set (SS) Focus" column: which sets a row
// speaks of.
type Focus uint8

const (
	FocusMountedOnFailed Focus = iota + 1
	FocusOthers
	FocusAborted
	FocusDismounted
	FocusSpecified
	FocusNoController
	FocusController
	FocusMountedHere
)

var focusText = [...]string{
	FocusMountedOnFailed: "All SSs that were mounted on failed system.",
	FocusOthers:          "All other SSs with prior merge or copy state.",
	FocusAborted:         "Aborted SS.",
	FocusDismounted:      "SS dismounted on other system.",
	FocusSpecified:       "Specified SS.",
	FocusNoController:    "Specified SS does not use controller minimerge.",
	FocusController:      "Specified SS uses controller minimerge.",
	FocusMountedHere:     "All SSs mounted on this system with prior merge or copy state.",
}

func (f Focus) String() string { return focusText[f] }

// Prior is Table 8-1's prior-operation column.
type Prior uint8

const (
	PriorMergeOrHBMM Prior = iota
	PriorControllerMinimerge
	PriorFullCopy
	PriorMinicopy
	numPriors
)

var priorText = [...]string{
	PriorMergeOrHBMM:         "Prior full merge or HBMM",
	PriorControllerMinimerge: "Prior controller minimerge",
	PriorFullCopy:            "Prior full copy",
	PriorMinicopy:            "Prior minicopy",
}

func (p Prior) String() string { return priorText[p] }

// NewWork is the "New work required" column.
type NewWork uint8

const (
	WorkNone NewWork = iota + 1
	WorkMerge
	WorkFullMerge
	WorkCopy
	WorkCopyOrMerge
)

// Outcome is what a cell does to an op of its prior kind.
type Outcome uint8

const (
	// NoChange leaves the op alone.
	NoChange Outcome = iota + 1
	// CancelRestart cancels the op now; when the delay closes it restarts at
	// LBN 0 on the host the host-choice rule picks.
	CancelRestart
	// CancelContinue cancels the op now; when the delay closes (at once
	// without one) it continues at its checkpoint.
	CancelContinue
	// CancelContinueFullCopyIfMasterLost is CancelContinue, and the minicopy
	// becomes a full copy (keeping its checkpoint) if its master bitmap was
	// on the failed host.
	CancelContinueFullCopyIfMasterLost
	// RestartIfOnFailedElseAddedWork cancels and restarts the op if it ran on
	// the failed (or aborting) host; otherwise it keeps running and the new
	// merge work is added to it.
	RestartIfOnFailedElseAddedWork
	// Continued stops the op on its departing host and continues it at its
	// checkpoint elsewhere.
	Continued
	// Restarted restarts the op at LBN 0, on the same host when it can.
	Restarted
	// RestartedAsFullMerge restarts the op at LBN 0 as a full merge.
	RestartedAsFullMerge
	// RestartedAsFullCopy restarts the op at LBN 0 as a full copy.
	RestartedAsFullCopy
	// SuspendRestartAsFullMerge suspends the op and restarts it at LBN 0 as
	// a full merge on its own host.
	SuspendRestartAsFullMerge
	// NotApplicable marks a cell that cannot occur.
	NotApplicable
)

// Entry is one cell of Table 8-1: what an event does to one focus's op of
// one prior kind.
type Entry struct {
	Event   TableEvent
	Focus   Focus
	Prior   Prior
	NewWork NewWork
	// WorkText and Text are the seed's words for the new-work column and
	// the cell.
	WorkText string
	Outcome  Outcome
	Text     string
	Delay    bool
}

// row expands one printed row of the table into its four cells.
func row(ev TableEvent, focus Focus, work NewWork, workText string, delay bool, cells [numPriors]struct {
	o Outcome
	t string
}) []Entry {
	out := make([]Entry, 0, numPriors)
	for p := Prior(0); p < numPriors; p++ {
		out = append(out, Entry{Event: ev, Focus: focus, Prior: p, NewWork: work, WorkText: workText, Outcome: cells[p].o, Text: cells[p].t, Delay: delay})
	}
	return out
}

type cell = struct {
	o Outcome
	t string
}

var (
	noChange       = cell{NoChange, "No change."}
	cancelContinue = cell{CancelContinue, "Canceled but is continued."}
	onFailedElse   = cell{RestartIfOnFailedElseAddedWork, "If on failed system, it restarts. Otherwise, minimerge continues with added work."}
)

// table is Table 8-1 of the HP OpenVMS Volume Shadowing manual (V8.4,
// chapter 8), one entry per cell, in the order the seed prints them.
var table = concat(
	row(RowFailureCommon, FocusMountedOnFailed, WorkMerge, "Merge required.", true, [numPriors]cell{
		{CancelRestart, "Canceled and is restarted."},
		onFailedElse,
		{CancelContinue, "Canceled but is eventually continued."},
		{CancelContinueFullCopyIfMasterLost, "Canceled but is eventually continued. Continued as full copy if minicopy master bitmap was on failed system."},
	}),
	row(RowFailureCommon, FocusOthers, WorkNone, "No new work.", true, [numPriors]cell{cancelContinue, noChange, cancelContinue, cancelContinue}),
	row(RowFailureNoCommon, FocusOthers, WorkNone, "No new work.", true, [numPriors]cell{noChange, noChange, noChange, {NoChange, "No Change."}}),
	row(RowAbort, FocusAborted, WorkMerge, "Merge required.", true, [numPriors]cell{
		{CancelRestart, "Canceled and is restarted."}, onFailedElse, cancelContinue, cancelContinue,
	}),
	row(RowAbort, FocusOthers, WorkNone, "No new work.", true, [numPriors]cell{cancelContinue, noChange, cancelContinue, cancelContinue}),
	row(RowDismount, FocusDismounted, WorkNone, "No new work.", false, [numPriors]cell{
		{Continued, "Continued."}, {Restarted, "Restarted."}, {Continued, "Continued."}, {Continued, "Continued."},
	}),
	row(RowDismount, FocusOthers, WorkNone, "No change.", false, [numPriors]cell{noChange, noChange, noChange, noChange}),
	row(RowMemberAdded, FocusSpecified, WorkCopy, "Copy required.", false, [numPriors]cell{cancelContinue, noChange, noChange, noChange}),
	row(RowMemberAdded, FocusOthers, WorkNone, "No new work.", false, [numPriors]cell{noChange, noChange, noChange, noChange}),
	row(RowMount, FocusSpecified, WorkCopyOrMerge, "Copy and/or merge required.", false, [numPriors]cell{
		{RestartedAsFullMerge, "Restarted as full merge."}, {RestartedAsFullMerge, "Restarted as full merge."},
		{Restarted, "Restarted."}, {RestartedAsFullCopy, "Restarted as full copy."},
	}),
	row(RowDemandMerge, FocusNoController, WorkMerge, "Merge required.", false, [numPriors]cell{
		{Restarted, "Restarted."}, {NotApplicable, "Not applicable."}, cancelContinue, cancelContinue,
	}),
	row(RowDemandMerge, FocusController, WorkFullMerge, "Full merge required.", false, [numPriors]cell{
		{Restarted, "Restarted"}, {SuspendRestartAsFullMerge, "Suspended and restarted as full merge."}, cancelContinue, cancelContinue,
	}),
	row(RowDemandMerge, FocusOthers, WorkNone, "No change.", false, [numPriors]cell{noChange, noChange, noChange, noChange}),
	row(RowEvalResources, FocusMountedHere, WorkNone, "No change.", true, [numPriors]cell{cancelContinue, noChange, cancelContinue, cancelContinue}),
)

func concat(parts ...[]Entry) []Entry {
	var out []Entry
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// Table returns a copy of Table 8-1 as implemented, one entry per cell.
func Table() []Entry { return append([]Entry(nil), table...) }

// lookup returns the cell for an op of kind k under (ev, focus). Every
// (event, focus) pair the core asks for exists; a test checks it.
func lookup(ev TableEvent, focus Focus, k OpKind) Entry {
	p := k.column()
	for _, e := range table {
		if e.Event == ev && e.Focus == focus && e.Prior == p {
			return e
		}
	}
	panic(fmt.Sprintf("shadowset: Table 8-1 has no cell for %v / %v / %v", ev, focus, p))
}

// rowDelay reports the Delay column of an event's rows.
func rowDelay(ev TableEvent) bool {
	for _, e := range table {
		if e.Event == ev {
			return e.Delay
		}
	}
	return false
}

// FormatTable renders the table as implemented, grouped like the seed.
func FormatTable() string {
	var b strings.Builder
	b.WriteString("Table 8-1 Visible Impact of Transient State Events (as implemented)\n")
	var lastEv TableEvent
	var lastFocus Focus
	for _, e := range table {
		if e.Event != lastEv {
			fmt.Fprintf(&b, "\nEVENT %s\n", e.Event)
			lastEv, lastFocus = e.Event, 0
		}
		if e.Focus != lastFocus {
			delay := "No"
			if e.Delay {
				delay = "Yes"
			}
			fmt.Fprintf(&b, "  FOCUS %s\n    new work: %s   delay: %s\n", e.Focus, e.WorkText, delay)
			lastFocus = e.Focus
		}
		fmt.Fprintf(&b, "    %-27s %s  [%s]\n", e.Prior.String()+":", e.Text, e.Outcome)
	}
	return b.String()
}

var outcomeNames = [...]string{
	NoChange:                           "no-change",
	CancelRestart:                      "cancel, restart at 0 after delay",
	CancelContinue:                     "cancel, continue at checkpoint after delay",
	CancelContinueFullCopyIfMasterLost: "cancel, continue at checkpoint after delay; full copy if bitmap lost",
	RestartIfOnFailedElseAddedWork:     "on failed host: cancel, restart at 0; else keep running with added work",
	Continued:                          "continue at checkpoint on another host",
	Restarted:                          "restart at 0, same host if it can",
	RestartedAsFullMerge:               "restart at 0 as full merge",
	RestartedAsFullCopy:                "restart at 0 as full copy",
	SuspendRestartAsFullMerge:          "suspend, restart at 0 as full merge on its own host",
	NotApplicable:                      "not applicable",
}

func (o Outcome) String() string {
	if int(o) < len(outcomeNames) && outcomeNames[o] != "" {
		return outcomeNames[o]
	}
	return fmt.Sprintf("Outcome(%d)", uint8(o))
}
