package replay_test

import (
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shadow-project/shadow/shadowset"
	"github.com/shadow-project/shadow/shadowset/replay"
)

const scriptDir = "../../testdata/replay"

func scripts(t *testing.T) []string {
	files, err := filepath.Glob(filepath.Join(scriptDir, "*.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatalf("no scripts in %s", scriptDir)
	}
	return files
}

func parseFile(t *testing.T, file string) []replay.Directive {
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dirs, err := replay.Parse(file, f)
	if err != nil {
		t.Fatal(err)
	}
	return dirs
}

// runTrace runs a script and returns every directive's output, joined.
func runTrace(t *testing.T, dirs []replay.Directive, r *replay.Runner) string {
	var b strings.Builder
	for _, d := range dirs {
		out, err := r.Exec(d)
		if err != nil {
			t.Fatalf("%s: %s: %v", d.Pos(), d.Text, err)
		}
		b.WriteString(d.Text + "\n" + out)
	}
	return b.String()
}

// TestScripts runs every replay script in testdata/replay; each expect
// line is an assertion.
func TestScripts(t *testing.T) {
	for _, file := range scripts(t) {
		t.Run(filepath.Base(file), func(t *testing.T) {
			runTrace(t, parseFile(t, file), replay.NewRunner(nil))
		})
	}
}

// TestShuffledInternalOrder replays every script with the core's internal
// orders shuffled after every step and demands the identical trace: no
// decision may depend on storage or map order.
func TestShuffledInternalOrder(t *testing.T) {
	for _, file := range scripts(t) {
		t.Run(filepath.Base(file), func(t *testing.T) {
			dirs := parseFile(t, file)
			want := runTrace(t, dirs, replay.NewRunner(nil))
			for seed := range uint64(8) {
				rng := rand.New(rand.NewPCG(seed, 7))
				r := replay.NewRunner(nil)
				r.AfterStep = func(c *shadowset.Core) { c.ShuffleInternal(rng.Shuffle) }
				if got := runTrace(t, dirs, r); got != want {
					t.Fatalf("seed %d: shuffled run differs:\n%s\nwant:\n%s", seed, got, want)
				}
			}
		})
	}
}

// TestSnapshotRestoreEveryStep replaces the core by a restore of its own
// snapshot after every directive; the trace must not change.
func TestSnapshotRestoreEveryStep(t *testing.T) {
	for _, file := range scripts(t) {
		t.Run(filepath.Base(file), func(t *testing.T) {
			dirs := parseFile(t, file)
			want := runTrace(t, dirs, replay.NewRunner(nil))
			r := replay.NewRunner(nil)
			r.AfterStep = func(c *shadowset.Core) {
				snap, err := c.Snapshot()
				if err != nil {
					t.Fatal(err)
				}
				restored, err := shadowset.Restore(snap)
				if err != nil {
					t.Fatal(err)
				}
				r.Core = restored
			}
			if got := runTrace(t, dirs, r); got != want {
				t.Fatalf("restored run differs:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

// TestBadScripts: each bad script gives one clear error naming FILE:LINE.
func TestBadScripts(t *testing.T) {
	head := "nodes A B\nset DSA1 members=M1,M2 mounted=A,B\n"
	cases := []struct {
		name, body, want string
		syntax           bool
	}{
		{"unknown directive", "explode DSA1\n", "bad.txt:3: explode DSA1: replay: bad line: unknown directive \"explode\"", true},
		{"unknown set", "demand-merge DSA7\n", "bad.txt:3: demand-merge DSA7: demand-merge: shadowset: unknown set \"DSA7\"", false},
		{"unknown host", "fail Z\n", "bad.txt:3: fail Z: host-failed: shadowset: unknown host \"Z\"", false},
		{"malformed lbn", "progress DSA1 lbn=12x\n", "bad.txt:3: progress DSA1 lbn=12x: replay: bad line: bad lbn \"12x\"", true},
		{"malformed duration", "wait soon\n", "bad.txt:3: wait soon: replay: bad line: bad duration \"soon\"", true},
		{"negative priority", "priority DSA1 on=A -5\n", "bad priority \"-5\"", true},
		{"priority too high", "priority DSA1 on=A 10001\n", "priority 10001 out of range", false},
		{"contradictory set flags", "set DSA2 members=M3 hbmm=A controller\n", "set DSA2: hbmm= and controller contradict each other", true},
		{"controller minimerge without controller", "op DSA1 controller-minimerge on=A\n", "DSA1 does not use controller minimerge", false},
		{"unknown kind", "op DSA1 half-merge\n", "unknown op kind \"half-merge\"", true},
		{"unknown option", "mount DSA1 on=A speed=9\n", "unknown option speed=", true},
		{"duplicate option", "mount DSA1 on=A on=B\n", "on= given twice", true},
		{"missing on", "abort DSA1\n", "abort needs on=HOST", true},
		{"surplus word", "fail A B\n", "unexpected \"B\"", true},
		{"bad set name", "set volume members=M9\n", "set name \"volume\" is not DSAn", false},
		{"member twice", "set DSA2 members=M3,M3\n", "member M3 named twice", false},
		{"expect fails", "expect DSA1 full-merge running\n", "bad.txt:3: expect DSA1 full-merge running: replay: expect failed: 0 ops of DSA1 match", false},
		{"backwards checkpoint", "op DSA1 full-merge on=A lbn=100\nprogress DSA1 lbn=50\n", "bad.txt:4: progress DSA1 lbn=50: progress: shadowset: bad event: DSA1 op1 checkpoint cannot move backwards from 100 to 50", false},
		{"empty list item", "set DSA2 members=M3,,M4\n", "empty item in list", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := replay.RunScript("bad.txt", strings.NewReader(head+tc.body), nil)
			if err == nil {
				t.Fatal("bad script accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
			if !strings.HasPrefix(err.Error(), "bad.txt:") {
				t.Fatalf("error %q does not start with FILE:LINE", err)
			}
			if got := errors.Is(err, replay.ErrSyntax); got != tc.syntax {
				t.Fatalf("errors.Is(ErrSyntax) = %v, want %v (%v)", got, tc.syntax, err)
			}
		})
	}
}

// TestRefusedEventChangesNothing: after a refused event, the core's state
// is byte-identical to before.
func TestRefusedEventChangesNothing(t *testing.T) {
	r := replay.NewRunner(nil)
	src := "nodes A B\nset DSA1 members=M1,M2 mounted=A,B\nop DSA1 full-copy on=A lbn=10 target=M2\n"
	dirs, err := replay.Parse("x", strings.NewReader(src))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(dirs); err != nil {
		t.Fatal(err)
	}
	before, _ := r.Core.Snapshot()
	for _, line := range []string{"remove DSA1 M1", "add DSA1 M1", "mount DSA1 on=A", "progress DSA1 lbn=5", "max-ops A 999", "dismount DSA1 on=C"} {
		d, _, err := replay.ParseLine(line)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := r.Exec(d); err == nil {
			t.Fatalf("%q accepted", line)
		}
		after, _ := r.Core.Snapshot()
		if string(after) != string(before) {
			t.Fatalf("%q was refused but changed the state", line)
		}
	}
}

// FuzzParseLine: any line either parses or gives an error, never a panic;
// what parses can be stepped on a small cluster without a panic.
func FuzzParseLine(f *testing.F) {
	for _, s := range []string{
		"nodes A B C", "delay 20s", "set DSA1 members=M1,M2 mounted=A,B hbmm=A,B dirty",
		"op DSA1 minicopy on=A lbn=5 target=M2 bitmap=B", "priority DSA1 on=A 0", "max-ops A 1",
		"remove DSA1 M2 minicopy on=A", "expect DSA1 full-merge history=canceled,continued",
		"expect DSA1 queue=minimerge,full-copy", "expect window open until=20s", "wait 1m30s # comment",
		"progress DSA1 lbn=18446744073709551615", "expect DSA1 idle",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		d, ok, err := replay.ParseLine(line)
		if err != nil || !ok {
			return
		}
		r := replay.NewRunner(nil)
		setup, _ := replay.Parse("setup", strings.NewReader("nodes A B C\nset DSA1 members=M1,M2,M3 mounted=A,B hbmm=A,B\nset DSA2 members=N1,N2 mounted=B,C controller\nop DSA1 full-copy on=A target=M3\n"))
		if err := r.Run(setup); err != nil {
			t.Fatal(err)
		}
		_, _ = r.Exec(d)
		if err := r.Core.CheckInvariants(); err != nil {
			t.Fatalf("%q broke an invariant: %v", line, err)
		}
	})
}
