package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestE2EMetrics: an agent with --metrics-listen serves Prometheus metrics
// at /metrics: the set, its members, and the NBD requests it served, by
// command, counted exactly. A non-loopback address is refused before the
// agent starts.
func TestE2EMetrics(t *testing.T) {
	requireTools(t)
	const size = 16 << 20
	addr := fmt.Sprintf("127.0.0.1:%d", freeGossipPort(t))
	h, ms := mirrored(t, 2, size, "--metrics-listen", addr)
	cl := dialFence(t, &cnode{host: h}, "DSA1")
	buf := make([]byte, 4096)
	const writes, reads = 37, 11
	for i := range writes {
		if err := cl.WriteAt(buf, int64(i)*65536, 0); err != nil {
			t.Fatal(err)
		}
	}
	for i := range reads {
		if err := cl.ReadAt(buf, int64(i)*4096); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape %s: %v", addr, err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: status %d, %v", resp.StatusCode, err)
	}
	text := string(body)
	for _, want := range []string{
		`shadow_show_error 0`,
		// (the text format writes floats as strconv's 'g')
		`shadow_set_size_bytes{set="DSA1"} ` + strconv.FormatFloat(float64(h.show().Sets[0].SizeBytes), 'g', -1, 64),
		fmt.Sprintf(`shadow_member_info{member=%q,role="full",set="DSA1"} 1`, ms[0]),
		fmt.Sprintf(`shadow_member_info{member=%q,role="full",set="DSA1"} 1`, ms[1]),
		fmt.Sprintf(`shadow_nbd_requests_total{command="write"} %d`, writes),
		fmt.Sprintf(`shadow_nbd_requests_total{command="read"} %d`, reads),
		fmt.Sprintf(`shadow_nbd_request_duration_seconds_count{command="write"} %d`, writes),
		`shadow_nbd_request_errors_total{command="write"} 0`,
	} {
		if !strings.Contains(text, want+"\n") {
			t.Errorf("scrape lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("scrape:\n%s", text)
	}

	// Refused before anything starts: no socket is created.
	sock := filepath.Join(h.dir, "other.sock")
	cmd := exec.Command(shadowBin, "agent", "--socket", sock, "--nbd-unix", "", "--nbd-listen", "127.0.0.1:0", "--metrics-listen", "192.0.2.1:9100")
	out, err := runCmdTimeout(cmd, 20*time.Second)
	if err == nil || !strings.Contains(out, "not loopback") {
		t.Errorf("agent with a non-loopback metrics address: %v\n%s", err, out)
	}
	if _, err := os.Stat(sock); err == nil {
		t.Errorf("the refused agent created its socket %s", sock)
	}
}
