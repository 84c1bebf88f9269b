package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/shadow-project/shadow/shadowset"
	"github.com/shadow-project/shadow/shadowset/replay"
	"github.com/urfave/cli/v2"
)

func replayCommand() *cli.Command {
	return &cli.Command{
		Name:      "replay",
		Usage:     "run event-replay scripts through the shadow-set core",
		ArgsUsage: "FILE...",
		Description: "Each FILE is a script in the replay language (docs/replay.md). The run stops at the\n" +
			"first bad line or failed expect, naming FILE:LINE, and exits non-zero.",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "verbose", Aliases: []string{"v"}, Usage: "print a trace of every directive and the actions it caused"},
			&cli.BoolFlag{Name: "table", Usage: "print Table 8-1 as implemented and exit"},
		},
		Action: func(cc *cli.Context) error {
			if cc.Bool("table") {
				fmt.Fprint(cc.App.Writer, shadowset.FormatTable())
				return nil
			}
			if cc.NArg() == 0 {
				return cli.Exit("replay: no script given (usage: shadow replay [-v] FILE...)", 2)
			}
			for _, file := range cc.Args().Slice() {
				if err := replayFile(cc, file); err != nil {
					code := 1
					if errors.Is(err, replay.ErrSyntax) || errors.Is(err, os.ErrNotExist) {
						code = 2
					}
					return cli.Exit("replay: "+err.Error(), code)
				}
			}
			return nil
		},
	}
}

func replayFile(cc *cli.Context, file string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	var trace io.Writer
	if cc.Bool("verbose") {
		trace = cc.App.Writer
		fmt.Fprintf(trace, "== %s\n", file)
	}
	if err := replay.RunScript(file, f, trace); err != nil {
		return err
	}
	fmt.Fprintf(cc.App.Writer, "%s: ok\n", file)
	return nil
}
