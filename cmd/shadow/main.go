// Command shadow is the shadow-set manager's single binary: the operator's
// CLI verbs and, in later issues, the per-host agent. This file wires the
// urfave/cli application; each verb lives in its own file.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"

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
	err := app.Run(args)
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
			examineCommand(),
			replayCommand(),
		},
		HideHelpCommand: true,
		// --mount DSA1=a,b carries its own commas.
		DisableSliceFlagSeparator: true,
		// Exit codes are decided in run, never by os.Exit deep inside.
		ExitErrHandler: func(*cli.Context, error) {},
	}
}
