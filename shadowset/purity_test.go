package shadowset_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// forbiddenImports are the packages through which the core could touch the
// disk, the network, the process or a logger.
var forbiddenImports = []string{"os", "net", "syscall", "io/fs", "os/exec", "os/signal", "log", "log/slog",
	"github.com/rs/zerolog", "github.com/hashicorp/memberlist", "github.com/hashicorp/raft", "math/rand", "math/rand/v2", "crypto/rand"}

// clockReads are the time functions that read or wait on the wall clock.
var clockReads = map[string]bool{"Now": true, "Since": true, "Until": true, "Sleep": true, "After": true,
	"AfterFunc": true, "Tick": true, "NewTimer": true, "NewTicker": true}

// TestCorePurity enforces that shadowset and its sub-packages stay a pure
// state machine: no I/O, no logger, no randomness, no clock.
func TestCorePurity(t *testing.T) {
	checked := 0
	err := filepath.WalkDir(".", func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "testdata" {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		checked++
		for _, problem := range impurities(t, path) {
			t.Errorf("%s", problem)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked < 5 {
		t.Fatalf("checked only %d files; the walk is broken", checked)
	}
}

func impurities(t *testing.T, path string) []string {
	f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	timeName := ""
	for _, imp := range f.Imports {
		p, _ := strconv.Unquote(imp.Path.Value)
		for _, bad := range forbiddenImports {
			if p == bad || strings.HasPrefix(p, bad+"/") {
				out = append(out, path+": imports "+p)
			}
		}
		if p == "time" {
			timeName = "time"
			if imp.Name != nil {
				timeName = imp.Name.Name
			}
		}
	}
	if timeName != "" {
		ast.Inspect(f, func(n ast.Node) bool {
			sel, ok := n.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			if id, ok := sel.X.(*ast.Ident); ok && id.Name == timeName && clockReads[sel.Sel.Name] {
				out = append(out, path+": reads the clock with time."+sel.Sel.Name)
			}
			return true
		})
	}
	return out
}

// TestPurityCheckCatches proves the checker is not blind: a file that
// imports os and calls time.Now must be flagged twice.
func TestPurityCheckCatches(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.go")
	src := "package x\nimport (\n\t\"os\"\n\tclock \"time\"\n)\nvar _ = os.Args\nvar now = clock.Now()\n"
	if err := os.WriteFile(bad, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := impurities(t, bad); len(got) != 2 {
		t.Fatalf("checker found %v in a file with two impurities", got)
	}
}
