// Command shadow is the shadow-set manager's single binary: the operator's
// CLI verbs and, in later issues, the per-host agent. This file wires the
// urfave/cli application; each verb lives in its own file.
package main

import (
	"fmt"
	"os"

	"github.com/urfave/cli/v2"
)

func main() {
	if err := newApp().Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "shadow:", err)
		os.Exit(1)
	}
}

func newApp() *cli.App {
	return &cli.App{
		Name:  "shadow",
		Usage: "volume shadow sets with host-based minimerge",
		Commands: []*cli.Command{
			replayCommand(),
		},
		HideHelpCommand: true,
	}
}
