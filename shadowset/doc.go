// Package shadowset is the pure, deterministic core of shadow: it owns every
// decision about the cluster's shadow sets (which merges and copies are
// required, the Table 8-1 outcome of every transient-state event, the
// recovery delay window, and which host runs which op at which LBN).
//
// It is modelled on etcd-io/raft's RawNode. The core never touches the
// clock, the disk, the network or a logger: time arrives as EvTick events,
// and everything the world must do comes back as Actions.
//
// # Usage
//
//	c := shadowset.New()
//	err := c.Step(shadowset.Event{Kind: shadowset.EvHostUp, Host: "A"})
//	rd := c.Ready()   // actions (start/stop/suspend op, set a timer) and notes
//	... carry out rd.Actions in order; log rd.Notes ...
//	c.Advance()
//
// Caller duties:
//  1. Feed every host the same events in the same order (the ordered event
//     log); the core then decides the same everywhere, and the host an
//     action names carries it out.
//  2. Deliver an EvTick reaching each ActTimer's time; the delay window
//     closes only through time events.
//  3. Report progress (EvProgress) only after the data below the LBN is
//     flushed on the target, and completion (EvComplete) after the final
//     flush. Reports naming an op that no longer runs on the host are
//     ignored as stale.
//  4. A Step that returns an error changed nothing.
//
// Table 8-1 of the OpenVMS Volume Shadowing manual is data (Table,
// FormatTable); the rules beside it (merge-before-copy iff minimerge, one
// delay window, one merge op per set, host choice) live in sched.go and are
// documented in docs/replay.md.
package shadowset
