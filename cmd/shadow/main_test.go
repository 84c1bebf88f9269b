package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(append([]string{"shadow"}, args...), &out, &errOut)
	return code, out.String(), errOut.String()
}

func writeScript(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "s.txt")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestReplayTable(t *testing.T) {
	code, out, _ := runCLI(t, "replay", "--table")
	if code != 0 || !strings.Contains(out, "Suspended and restarted as full merge.") || strings.Count(out, "Prior minicopy:") != 14 {
		t.Fatalf("code %d, table:\n%s", code, out)
	}
}

func TestReplayGoodScriptVerbose(t *testing.T) {
	p := writeScript(t, "nodes A B\nset DSA1 members=M1,M2 mounted=A,B dirty\nexpect DSA1 full-merge running on=A\n")
	code, out, errOut := runCLI(t, "replay", "-v", p)
	if code != 0 {
		t.Fatalf("code %d: %s", code, errOut)
	}
	if !strings.Contains(out, "start DSA1 op1 full-merge on=A lbn=0") || !strings.Contains(out, p+": ok") {
		t.Fatalf("trace lacks the start action or the ok line:\n%s", out)
	}
}

func TestReplayFailedExpectNamesFileLine(t *testing.T) {
	p := writeScript(t, "nodes A B\nset DSA1 members=M1,M2 mounted=A,B\n\n# nothing runs\nexpect DSA1 full-merge running\n")
	code, _, errOut := runCLI(t, "replay", p)
	if code != 1 || !strings.Contains(errOut, p+":5: expect DSA1 full-merge running: replay: expect failed") {
		t.Fatalf("code %d, stderr %q", code, errOut)
	}
}

func TestReplayBadLine(t *testing.T) {
	p := writeScript(t, "nodes A B\nfrobnicate DSA1\n")
	code, _, errOut := runCLI(t, "replay", p)
	if code != 2 || !strings.Contains(errOut, p+":2: frobnicate DSA1: replay: bad line: unknown directive") {
		t.Fatalf("code %d, stderr %q", code, errOut)
	}
}

func TestReplayUsageErrors(t *testing.T) {
	if code, _, errOut := runCLI(t, "replay"); code != 2 || !strings.Contains(errOut, "no script given") {
		t.Fatalf("no args: code %d, %q", code, errOut)
	}
	if code, _, errOut := runCLI(t, "replay", "/nonexistent/x.txt"); code != 2 || !strings.Contains(errOut, "no such file") {
		t.Fatalf("missing file: code %d, %q", code, errOut)
	}
	if code, _, _ := runCLI(t, "no-such-verb"); code == 0 {
		t.Fatal("unknown verb accepted")
	}
}
