package device

import (
	"fmt"
	"os"
	"strconv"
	"sync/atomic"
	"time"
)

// A test hook for the fencing tests: SHADOW_TEST_PARK_WRITE_AT=OFFSET
// parks the first fenced member write covering byte OFFSET between the
// lease check and the system call, for SHADOW_TEST_PARK_FOR (default
// 30s): the window a SIGSTOP or a stall can open in a real agent. Unset,
// it costs one atomic load per write.
var park = struct {
	at   int64 // -1: off
	dur  time.Duration
	done atomic.Bool
}{at: -1}

func init() {
	v := os.Getenv("SHADOW_TEST_PARK_WRITE_AT")
	if v == "" {
		return
	}
	at, err := strconv.ParseInt(v, 10, 64)
	if err != nil || at < 0 {
		return
	}
	park.at, park.dur = at, 30*time.Second
	if d, err := time.ParseDuration(os.Getenv("SHADOW_TEST_PARK_FOR")); err == nil {
		park.dur = d
	}
}

func testPark(path string, off, n int64) {
	if park.at < 0 || park.at < off || park.at >= off+n || park.done.Swap(true) {
		return
	}
	fmt.Fprintf(os.Stderr, `{"level":"warn","component":"test-park","member":%q,"off":%d,"message":"test hook: write parked after the lease check"}`+"\n", path, off)
	time.Sleep(park.dur)
}
