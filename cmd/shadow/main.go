// Command shadow is the shadow-set manager's single binary: the operator's
// CLI verbs and, in later issues, the per-host agent. This file wires the
// urfave/cli application; each verb lives in its own file.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/shadow-project/shadow/cmd/internal/fence"
	"github.com/urfave/cli/v2"
)

func main() {
	os.Exit(run(os.Args, os.Stdout, os.Stderr))
}

// run executes the CLI and returns the process exit code, so tests can
// drive the whole binary in-process.
func run(args []string, stdout, stderr io.Writer) int {
	app := newApp()
	app.Writer, app.ErrWriter = stdout, stderr
	err := app.Run(flagsFirst(app, args))
	if err == nil {
		return 0
	}
	fmt.Fprintln(stderr, "shadow:", err)
	var ec cli.ExitCoder
	if errors.As(err, &ec) && ec.ExitCode() != 0 {
		return ec.ExitCode()
	}
	return 1
}

// flagsFirst lets flags follow the positional arguments, as operators
// type them ("shadow mount DSA1 --member a"): urfave/cli stops parsing
// flags at the first positional argument, so the verb's flags (with their
// values) are moved in front of its positionals. "--" ends the reordering.
func flagsFirst(app *cli.App, args []string) []string {
	if len(args) < 2 {
		return args
	}
	var cmd *cli.Command
	for _, c := range app.Commands {
		if c.Name == args[1] {
			cmd = c
		}
	}
	if cmd == nil {
		return args
	}
	boolean := map[string]bool{"help": true, "h": true}
	for _, f := range cmd.Flags {
		if _, ok := f.(*cli.BoolFlag); ok {
			for _, n := range f.Names() {
				boolean[n] = true
			}
		}
	}
	var flags, pos []string
	rest := args[2:]
	for i := 0; i < len(rest); i++ {
		a := rest[i]
		switch {
		case a == "--":
			pos = append(pos, rest[i+1:]...)
			i = len(rest)
		case strings.HasPrefix(a, "-") && len(a) > 1:
			flags = append(flags, a)
			name := strings.TrimLeft(a, "-")
			if !strings.Contains(name, "=") && !boolean[name] && i+1 < len(rest) {
				flags = append(flags, rest[i+1])
				i++
			}
		default:
			pos = append(pos, a)
		}
	}
	out := append([]string{args[0], args[1]}, flags...)
	return append(out, pos...)
}

func newApp() *cli.App {
	return &cli.App{
		Name:  "shadow",
		Usage: "volume shadow sets with host-based minimerge",
		Commands: []*cli.Command{
			agentCommand(),
			mountCommand(),
			dismountCommand(),
			setCommand(),
			showCommand(),
			verifyCommand(),
			examineCommand(),
			replayCommand(),
			{Name: fence.WatchdogCommand, Hidden: true, Usage: "the agent's fencing watchdog (started by the agent)",
				Action: func(*cli.Context) error { return fence.RunWatchdog() }},
		},
		HideHelpCommand: true,
		// --mount DSA1=a,b carries its own commas.
		DisableSliceFlagSeparator: true,
		// Exit codes are decided in run, never by os.Exit deep inside.
		ExitErrHandler: func(*cli.Context, error) {},
	}
}
