package agent

import (
	"fmt"
	"os"
	"strings"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/shadowset"
)

// A test hook for the reset oracle (cmd/shadow's
// TestClusterE2EHBMMResetOracle): with SHADOW_TEST_RESET_LOG=PATH, each
// reset across hosts appends "reset HOST SET N" to PATH and syncs it, N
// being the writes this host had issued to the set's members when it
// flushed them (vu.VU.Writes); each bitmap op appends "work HOST SET OP KIND CHUNK..."
// (testRecordWork), the chunks it is about to walk.
// A test that writes one write at a time knows from it which of its writes
// a reset may have forgotten (the first N) and which a merge after a crash
// must still cover (the rest). It is written before the resets are sent,
// so a crash between the two leaves a line for a reset that may not have
// happened: the oracle then asks for less, never for too much. Unset, it
// costs one environment lookup per reset.
func testRecordReset(host string, vol *volume) {
	path := os.Getenv("SHADOW_TEST_RESET_LOG")
	if path == "" {
		return
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "reset %s %s %d\n", host, vol.name, vol.vu.Writes())
	_ = f.Sync()
}

// testRecordWork: see testRecordReset.
func testRecordWork(host string, act shadowset.Action, work *bitmap.Bitmap) {
	path := os.Getenv("SHADOW_TEST_RESET_LOG")
	if path == "" || work == nil {
		return
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	var b strings.Builder
	fmt.Fprintf(&b, "work %s %s %d %s", host, act.Set, act.Op, act.OpKind)
	for c := range work.Chunks() {
		fmt.Fprintf(&b, " %d", c)
	}
	b.WriteString("\n")
	_, _ = f.WriteString(b.String()) // one write: lines of several agents do not mix
	_ = f.Sync()
}
