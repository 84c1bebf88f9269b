// Package testhook owns the agent's recording hooks for end-to-end tests
// that need to know what happened inside an agent they cannot observe
// from outside. Each is off unless its environment variable names a file,
// and then costs one file append per event it records.
//
// SHADOW_TEST_RESET_LOG=PATH serves the reset oracle (cmd/shadow's
// TestClusterE2EHBMMResetOracle): each reset of a writer's bitmaps across
// hosts appends "reset HOST SET N", N being the writes the host had issued
// to the set's members when it flushed them (vu.VU.Writes), and each
// bitmap op appends "work HOST SET OP KIND CHUNK...", the chunks it is
// about to walk. A test that writes one write at a time knows from the
// first which of its writes a reset may have forgotten (the first N) and
// which a merge after a crash must still cover (the rest). The reset line
// is written before the resets are sent, so a crash between the two
// leaves a line for a reset that may not have happened: the oracle then
// asks for less, never for too much.
package testhook

import (
	"fmt"
	"iter"
	"os"
	"strings"
)

const resetLog = "SHADOW_TEST_RESET_LOG"

// RecordReset records a reset's flush (see the package comment).
func RecordReset(host, set string, writes uint64) {
	appendLine(resetLog, fmt.Sprintf("reset %s %s %d\n", host, set, writes))
}

// RecordWork records the chunks of a bitmap op (see the package comment).
func RecordWork(host, set string, op uint64, kind string, chunks iter.Seq[uint64]) {
	if os.Getenv(resetLog) == "" {
		return
	}
	var b strings.Builder
	fmt.Fprintf(&b, "work %s %s %d %s", host, set, op, kind)
	for c := range chunks {
		fmt.Fprintf(&b, " %d", c)
	}
	b.WriteString("\n")
	appendLine(resetLog, b.String())
}

// appendLine appends line to the file env names, if any, in one write (so
// that the lines of several agents do not mix) and syncs it.
func appendLine(env, line string) {
	path := os.Getenv(env)
	if path == "" {
		return
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	_, _ = f.WriteString(line)
	_ = f.Sync()
}
