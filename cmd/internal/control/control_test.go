package control

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
