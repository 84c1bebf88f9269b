package agent

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

func TestControlAPI(t *testing.T) {
	dir, err := os.MkdirTemp("", "shadow-api-") // short path: unix socket names are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "s", "ctl.sock")
	var busy atomic.Int32
	busy.Store(2)
	srv, err := ListenAPI(path, map[string]Handler{
		"echo": func(_ context.Context, a json.RawMessage) (any, error) {
			var s string
			if err := json.Unmarshal(a, &s); err != nil {
				return nil, err
			}
			return strings.ToUpper(s), nil
		},
		"busy": func(context.Context, json.RawMessage) (any, error) {
			if busy.Add(-1) >= 0 {
				return nil, ErrTryAgain
			}
			return "done", nil
		},
		"fail": func(context.Context, json.RawMessage) (any, error) { return nil, errors.New("dsa1 is not mounted") },
	}, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v %v, want 0600", fi.Mode(), err)
	}
	c := &Client{Path: path, RetryWait: time.Millisecond}
	var out string
	if err := c.Call("echo", "hi", &out); err != nil || out != "HI" {
		t.Fatalf("echo: %q %v", out, err)
	}
	if err := c.Call("busy", nil, &out); err != nil || out != "done" {
		t.Fatalf("busy retried: %q %v", out, err)
	}
	if err := c.Call("fail", nil, nil); err == nil || err.Error() != "dsa1 is not mounted" {
		t.Fatalf("fail: %v", err)
	}
	if err := c.Call("nope", nil, nil); err == nil || !strings.Contains(err.Error(), "unknown verb") {
		t.Fatalf("unknown verb: %v", err)
	}
	if _, err := ListenAPI(path, nil, zerolog.Nop()); err == nil {
		t.Fatal("a second agent started on a live socket")
	}
	srv.Close()
	if err := (&Client{Path: path}).Call("echo", "x", nil); !errors.Is(err, ErrNoAgent) {
		t.Fatalf("no agent: %v", err)
	}
}

func TestFormatShow(t *testing.T) {
	r := ShowReport{Host: "A", Sets: []SetShow{{
		Name: "DSA1", SizeBytes: 1 << 30, Priority: 5000, Mounted: []string{"A"},
		Members: []MemberShow{{Path: "/d/m1", Role: "full", Master: true, ReadCost: 100, ProgressPct: -1}, {Path: "/d/m2", Role: "copy-target", ReadCost: 100, ProgressPct: 32}},
		Ops:     []OpShow{{ID: 1, Kind: "full-copy", State: "running", Host: "A", ProgressPct: 32}},
	}}}
	r.Sets[0].State = vuState(r.Sets[0])
	out := FormatShow(r, false)
	for _, want := range []string{"Virtual Unit State: Copy Active (32%) on A", "Copy Target (32%)", "Master Member"} {
		if !strings.Contains(out, want) {
			t.Fatalf("show lacks %q:\n%s", want, out)
		}
	}
	if got := ProgressBar(50, 10); got != "[#####.....]  50%" {
		t.Fatalf("bar %q", got)
	}
}
