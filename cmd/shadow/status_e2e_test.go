package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// TestE2EStatusPage drives the status page in headless Chromium during a
// full copy: the progress shown for the new member moves and reaches
// 100%, and a member expelled meanwhile (forced removal) is shown
// expelled.
func TestE2EStatusPage(t *testing.T) {
	requireTools(t, "chromium")
	const size = 64 << 20
	addr := fmt.Sprintf("127.0.0.1:%d", freeGossipPort(t))
	// 8 MiB/s: the copy of 64 MiB takes some 8 s, long enough to watch.
	h, ms := mirrored(t, 3, size, "--metrics-listen", addr, "--min-rate", "8388608", "--max-rate", "8388608")
	target := filepath.Join(h.dir, "m4")
	makeFile(t, target, size)

	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.NoSandbox, chromedp.Headless, chromedp.DisableGPU, chromedp.ExecPath(mustLookPath(t, "chromium")))
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelA()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	ctx, cancelT := context.WithTimeout(ctx, 3*time.Minute)
	defer cancelT()
	if _, err := chromedp.Run(ctx, chromedp.Navigate("http://"+addr+"/")); err != nil {
		t.Fatalf("open the status page: %v", err)
	}
	if _, err := chromedp.Run(ctx, chromedp.WaitVisible(`section.set[data-set="DSA1"]`)); err != nil {
		t.Fatalf("the status page shows no DSA1: %v", err)
	}
	// text returns a cell of a member's row as the page shows it ("" if
	// the row is not there).
	text := func(member, cell string) string {
		js := fmt.Sprintf(`(() => { const r = document.querySelector('section.set[data-set="DSA1"] tr[data-member=%q] %s'); return r ? r.textContent : ""; })()`, member, cell)
		out, err := chromedp.Run(ctx, chromedp.Evaluate[string](js))
		if err != nil {
			t.Fatalf("read the page: %v", err)
		}
		return strings.TrimSpace(out)
	}
	pct := func(member string) int {
		s := strings.TrimSuffix(text(member, ".pct"), "%")
		n, err := strconv.Atoi(s)
		if err != nil {
			return -1
		}
		return n
	}

	h.mustCLI("mount", "DSA1", "--member", target, "--confirm")
	var seen []int
	waitFor(t, time.Minute, "the page shows the copy under way (0 < progress < 100)", func() (bool, string) {
		p := pct(target)
		if p >= 0 && (len(seen) == 0 || seen[len(seen)-1] != p) {
			seen = append(seen, p)
		}
		return p > 0 && p < 100, fmt.Sprintf("progress seen %v, role %q", seen, text(target, ".role"))
	})
	// A member expelled during the copy.
	h.mustCLI("set", "DSA1", "--force-removal", ms[1])
	waitFor(t, 30*time.Second, "the page shows "+ms[1]+" expelled", func() (bool, string) {
		r := text(ms[1], ".role")
		return r == "expelled", "role " + r
	})
	first := seen[len(seen)-1]
	waitFor(t, 2*time.Minute, "the page shows the copy at 100%", func() (bool, string) {
		p := pct(target)
		if p >= 0 && seen[len(seen)-1] != p {
			seen = append(seen, p)
		}
		return p == 100, fmt.Sprintf("progress seen %v, role %q", seen, text(target, ".role"))
	})
	moved := false
	for _, p := range seen {
		if p > first && p < 100 {
			moved = true
		}
	}
	t.Logf("progress the page showed: %v", seen)
	if !moved {
		t.Errorf("the page's progress went from %d%% to 100%% without a step between: %v", first, seen)
	}
	if r := text(target, ".role"); r != "full" {
		t.Errorf("after the copy the page shows the new member as %q, want full", r)
	}
	if r := text(ms[1], ".role"); r != "expelled" {
		t.Errorf("after the copy the page shows the expelled member as %q", r)
	}
	events, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.getElementById("events").textContent`))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(events, "io-error DSA1 "+ms[1]) {
		pageErr, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.getElementById("error").textContent`))
		_, raw := httpGet(t, "http://"+addr+"/status.json")
		raw = pageErr + "\n" + raw
		t.Errorf("the page's recent events lack the expulsion:\n%s\n/status.json: %s", events, raw)
	}
}

func mustLookPath(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return p
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}
