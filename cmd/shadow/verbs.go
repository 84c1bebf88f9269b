package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/urfave/cli/v2"

	"github.com/shadow-project/shadow/cluster"
	"github.com/shadow-project/shadow/cmd/internal/agent"
	"github.com/shadow-project/shadow/cmd/internal/control"
	"github.com/shadow-project/shadow/cmd/internal/fence"
	"github.com/shadow-project/shadow/cmd/internal/meta"
	"github.com/shadow-project/shadow/cmd/internal/metrics"
	"github.com/shadow-project/shadow/cmd/internal/policy"
	"github.com/shadow-project/shadow/cmd/internal/report"
	"github.com/shadow-project/shadow/cmd/internal/standby"
	"github.com/shadow-project/shadow/shadowset"
	"github.com/shadow-project/shadow/shadowset/replay"
)

// defaultRunDir holds the control and NBD sockets unless told otherwise.
func defaultRunDir() string {
	return filepath.Join(os.TempDir(), fmt.Sprintf("shadow-%d", os.Getuid()))
}

func socketFlag() cli.Flag {
	return &cli.StringFlag{Name: "socket", Usage: "the agent's control socket", EnvVars: []string{"SHADOW_SOCKET"},
		Value: filepath.Join(defaultRunDir(), "agent.sock")}
}

func client(cc *cli.Context) *control.Client {
	return &control.Client{Path: cc.String("socket")}
}

// call sends one verb to the agent; a refusal exits 1 with the verb named.
func call(cc *cli.Context, verb string, args, out any) error {
	if err := client(cc).Call(verb, args, out); err != nil {
		return cli.Exit(cc.Command.Name+": "+err.Error(), 1)
	}
	return nil
}

func newLogger(w io.Writer, level string) (zerolog.Logger, error) {
	lvl, err := zerolog.ParseLevel(level)
	if err != nil {
		return zerolog.Nop(), fmt.Errorf("bad --log-level %q: %w", level, err)
	}
	if f, ok := w.(*os.File); ok {
		if fi, err := f.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			w = zerolog.ConsoleWriter{Out: f, TimeFormat: time.TimeOnly}
		}
	}
	return zerolog.New(w).Level(lvl).With().Timestamp().Logger(), nil
}

func agentCommand() *cli.Command {
	return &cli.Command{
		Name:  "agent",
		Usage: "run this host's shadow agent (NBD exports, merges, copies, control socket)",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.StringFlag{Name: "host", Value: "local", Usage: "this host's name in the cluster"},
			&cli.StringFlag{Name: "nbd-unix", Value: filepath.Join(defaultRunDir(), "nbd.sock"), Usage: "unix socket for the NBD exports (empty: none)"},
			&cli.StringFlag{Name: "nbd-listen", Value: "127.0.0.1:10809", Usage: "loopback TCP address for the NBD exports (empty: none)"},
			&cli.Int64Flag{Name: "min-rate", Value: 16 << 20, Usage: "merge/copy rate while applications do I/O, bytes/s"},
			&cli.Int64Flag{Name: "max-rate", Value: 0, Usage: "merge/copy rate limit when idle, bytes/s (0: none)"},
			&cli.DurationFlag{Name: "clean-after", Value: 5 * time.Second, Usage: "idle time before a set is flushed and marked clean"},
			&cli.StringFlag{Name: "log-level", Value: "info"},
			&cli.StringSliceFlag{Name: "mount", Usage: "mount at start: DSAn=PATH,PATH (repeatable)"},
			&cli.StringFlag{Name: "create-size", Usage: "create missing member files of this size (e.g. 256MiB) for --mount"},
			&cli.StringFlag{Name: "cpuprofile", Usage: "write a CPU profile here until the agent stops", Hidden: true},
			&cli.IntFlag{Name: "io-parallelism", Value: defaultIOParallelism, Usage: "how many member reads and writes may block in the kernel at once (sets GOMAXPROCS; 0: Go's default)"},
			&cli.StringFlag{Name: "cluster-listen", Usage: "join a cluster: gossip on this loopback address (UDP and TCP; raft takes the next TCP port); none: a cluster of one"},
			&cli.StringSliceFlag{Name: "join", Usage: "gossip addresses of hosts already in the cluster (none: form a new cluster, or resume this host's from --state-dir)"},
			&cli.StringFlag{Name: "state-dir", Usage: "where raft keeps its log, stable store and snapshots (required with --cluster-listen)"},
			&cli.BoolFlag{Name: "witness", Usage: "a raft voter that mounts nothing (the third vote of a two-host cluster)"},
			&cli.StringFlag{Name: "gossip-key-file", Usage: "encrypt gossip with the 16, 24 or 32 byte key in this file (raw, or base64)"},
			&cli.DurationFlag{Name: "probe-interval", Value: cluster.DefaultTiming.ProbeInterval, Usage: "failure detection: how often each host probes a peer"},
			&cli.DurationFlag{Name: "probe-timeout", Value: cluster.DefaultTiming.ProbeTimeout, Usage: "failure detection: how long a probe waits before asking others"},
			&cli.IntFlag{Name: "suspicion-mult", Value: cluster.DefaultTiming.SuspicionMult, Usage: "failure detection: a suspect is declared failed after this × probe-interval × log10(hosts)"},
			&cli.DurationFlag{Name: "recovery-delay", Usage: "set the cluster-wide recovery delay (Table 8-1's Delay) at start; default: keep the cluster's (20s when new)"},
			&cli.DurationFlag{Name: "raft-heartbeat", Value: cluster.DefaultTiming.RaftHeartbeat, Usage: "raft heartbeat and election timeout"},
			&cli.DurationFlag{Name: "lease", Value: defaultLease.Lease, Usage: "fencing: member I/O needs a lease renewed through the log; it lasts this long from each renewal (at least 2 × raft-heartbeat)"},
			&cli.DurationFlag{Name: "watchdog", Value: defaultLease.Watchdog, Usage: "fencing: the watchdog kills the agent this long after a lapse that leaves member I/O outstanding; the recovery delay must be ≥ (lease + watchdog)(1.01)² + 250ms"},
			&cli.StringFlag{Name: "on-no-quorum", Value: "suspend-io", Usage: "member I/O without a lease (quorum lost): suspend-io (wait, up to --no-quorum-timeout) or io-error"},
			&cli.DurationFlag{Name: "no-quorum-timeout", Value: 60 * time.Second, Usage: "with suspend-io, how long I/O waits for quorum before it fails"},
			&cli.BoolFlag{Name: "no-fencing", Hidden: true, Usage: "benchmarks only: no lease, no watchdog"},
			&cli.DurationFlag{Name: "hbmm-standby-timeout", Value: standby.DefaultAckTimeout, Usage: "write policy active: a standby master that takes longer than this to acknowledge a bit-set is behind until it copies the active master's bitmap (keep it well under the lease)"},
			&cli.StringFlag{Name: "metrics-listen", Usage: "loopback TCP address to serve Prometheus metrics on, at /metrics (empty: none)"},
		},
		Action: func(cc *cli.Context) error {
			setIOParallelism(cc.Int("io-parallelism"))
			if p := cc.String("cpuprofile"); p != "" {
				f, err := os.Create(p)
				if err != nil {
					return err
				}
				if err := pprof.StartCPUProfile(f); err != nil {
					return err
				}
				defer pprof.StopCPUProfile()
			}
			log, err := newLogger(cc.App.ErrWriter, cc.String("log-level"))
			if err != nil {
				return cli.Exit(err.Error(), 2)
			}
			cl, err := clusterConfig(cc)
			if err != nil {
				return cli.Exit("agent: "+err.Error(), 2)
			}
			cfgA := agent.Config{
				Host: cc.String("host"), Socket: cc.String("socket"),
				NBDUnix: cc.String("nbd-unix"), NBDTCP: cc.String("nbd-listen"),
				MinRate: cc.Int64("min-rate"), MaxRate: cc.Int64("max-rate"),
				CleanAfter: cc.Duration("clean-after"), Logger: log, Cluster: cl,
			}
			var mx *metrics.Metrics
			var mln net.Listener
			if addr := cc.String("metrics-listen"); addr != "" {
				// Listened on before the agent starts, so that a bad
				// address changes nothing.
				if mln, err = metrics.Listen(addr); err != nil {
					return cli.Exit("agent: "+err.Error(), 2)
				}
				defer mln.Close()
				mx = metrics.New()
				cfgA.ObserveNBD = mx.ObserveNBD
			}
			if cc.IsSet("recovery-delay") {
				d := cc.Duration("recovery-delay")
				cfgA.RecoveryDelay = &d
			}
			a, err := agent.New(cfgA)
			if err != nil {
				return err
			}
			if mx != nil {
				mx.SetSource(a)
				srv := mx.Serve(mln)
				defer srv.Close()
				log.Info().Str("addr", mln.Addr().String()).Msg("serving metrics at /metrics")
			}
			for _, spec := range cc.StringSlice("mount") {
				if err := mountAtStart(cc, a, spec); err != nil {
					_ = a.Shutdown(context.Background())
					return err
				}
			}
			sig := make(chan os.Signal, 1)
			signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
			<-sig
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			return a.Shutdown(ctx)
		},
	}
}

// defaultIOParallelism: a goroutine in a blocking pread keeps its P until
// sysmon retakes it, which on a VM takes far longer than its nominal 20 µs:
// with GOMAXPROCS=2, 16 goroutines reading a cold file keep only about 5
// reads in the kernel at once (18k IOPS where 16 C threads get 59k). More
// Ps let more reads wait in the kernel, but more threads also contend for
// the CPUs on buffered writes. Measured on this 2-core VM (1 GiB set,
// fio iodepth 16, 2 runs each): cold random reads 6–15k IOPS at 2, 20k at
// 8, 12–23k at 32; random writes 42–50k at 2, 42–45k at 8, 36–37k at 32.
// 8 takes most of the read gain for little write cost.
const defaultIOParallelism = 8

// setIOParallelism raises GOMAXPROCS (never lowers it) so that many
// member reads can wait in the kernel at once.
func setIOParallelism(n int) {
	if n > runtime.GOMAXPROCS(0) {
		runtime.GOMAXPROCS(n)
	}
}

// defaultLease: a 3 s lease rides out a raft election and a slow fsync;
// with a 1 s watchdog it needs a recovery delay of 4.3 s (the default is
// 20 s).
var defaultLease = cluster.LeaseConfig{Lease: 3 * time.Second, Watchdog: time.Second}

// clusterConfig reads the cluster flags (nil: a cluster of one).
func clusterConfig(cc *cli.Context) (*agent.ClusterConfig, error) {
	listen := cc.String("cluster-listen")
	if listen == "" {
		for _, f := range []string{"join", "state-dir", "witness", "gossip-key-file"} {
			if cc.IsSet(f) {
				return nil, fmt.Errorf("--%s needs --cluster-listen", f)
			}
		}
		return nil, nil
	}
	if cc.String("state-dir") == "" {
		return nil, errors.New("--cluster-listen needs --state-dir (raft's log lives there)")
	}
	cfg := &agent.ClusterConfig{Listen: listen, StateDir: cc.String("state-dir"), Witness: cc.Bool("witness"),
		Timing: cluster.Timing{ProbeInterval: cc.Duration("probe-interval"), ProbeTimeout: cc.Duration("probe-timeout"),
			SuspicionMult: cc.Int("suspicion-mult"), RaftHeartbeat: cc.Duration("raft-heartbeat")},
		Lease:           cluster.LeaseConfig{Lease: cc.Duration("lease"), Watchdog: cc.Duration("watchdog")},
		NoQuorumTimeout: cc.Duration("no-quorum-timeout"), StandbyTimeout: cc.Duration("hbmm-standby-timeout")}
	if cfg.StandbyTimeout < 10*time.Millisecond {
		return nil, fmt.Errorf("--hbmm-standby-timeout %v: at least 10ms", cfg.StandbyTimeout)
	}
	pol, err := fence.ParsePolicy(cc.String("on-no-quorum"))
	if err != nil {
		return nil, err
	}
	cfg.OnNoQuorum = pol
	if cc.Bool("no-fencing") {
		cfg.Lease = cluster.LeaseConfig{}
	} else if err := cfg.Lease.Check(cfg.Timing); err != nil {
		return nil, err
	}
	for _, j := range cc.StringSlice("join") {
		for _, p := range strings.Split(j, ",") {
			if p = strings.TrimSpace(p); p != "" {
				cfg.Join = append(cfg.Join, p)
			}
		}
	}
	if kf := cc.String("gossip-key-file"); kf != "" {
		raw, err := os.ReadFile(kf)
		if err != nil {
			return nil, fmt.Errorf("--gossip-key-file: %w", err)
		}
		key := bytes.TrimSpace(raw)
		if dec, err := base64.StdEncoding.DecodeString(string(key)); err == nil {
			key = dec
		}
		if n := len(key); n != 16 && n != 24 && n != 32 {
			return nil, fmt.Errorf("--gossip-key-file: a key of %d bytes; gossip encryption needs 16, 24 or 32 (AES-128/192/256)", n)
		}
		cfg.GossipKey = key
	}
	return cfg, nil
}

func mountAtStart(cc *cli.Context, a *agent.Agent, spec string) error {
	name, list, ok := strings.Cut(spec, "=")
	if !ok || list == "" {
		return cli.Exit(fmt.Sprintf("--mount %q: want DSAn=PATH[,PATH...]", spec), 2)
	}
	paths := strings.Split(list, ",")
	if s := cc.String("create-size"); s != "" {
		size, err := parseSize(s)
		if err != nil {
			return cli.Exit(err.Error(), 2)
		}
		for _, p := range paths {
			if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					return err
				}
				if err := os.WriteFile(p, nil, 0o644); err != nil {
					return err
				}
				if err := os.Truncate(p, size+meta.ReservedSize); err != nil {
					return err
				}
			}
		}
	}
	res, err := a.Mount(agent.MountArgs{Set: name, Members: paths})
	if err != nil {
		return err
	}
	fmt.Fprintf(cc.App.Writer, "%s mounted: %s (%d bytes)\n", name, res.URI, res.Size)
	if tcp := a.TCPAddr(); tcp != "" {
		fmt.Fprintf(cc.App.Writer, "%s also at nbd://%s/%s\n", name, tcp, name)
	}
	return nil
}

// parseSize reads sizes like 256MiB, 1GiB, 4096.
func parseSize(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}, {"", 1}}
	for _, u := range units {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			var n int64
			if _, err := fmt.Sscanf(num, "%d", &n); err != nil || n <= 0 || fmt.Sprint(n) != num {
				break
			}
			return n * u.mult, nil
		}
	}
	return 0, fmt.Errorf("bad size %q (want e.g. 256MiB, 1GiB)", s)
}

func mountCommand() *cli.Command {
	return &cli.Command{
		Name:      "mount",
		Usage:     "mount a shadow set, or add a member to a mounted one",
		ArgsUsage: "DSAn",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.StringSliceFlag{Name: "member", Usage: "member device or file (repeatable; the first is the source of a new set)"},
			&cli.BoolFlag{Name: "include", Usage: "also mount the members the set's metadata lists"},
			&cli.BoolFlag{Name: "confirm", Usage: "allow a full copy onto a member that holds data"},
			&cli.BoolFlag{Name: "overwrite", Usage: "take a member of another set, one written outside the set, or one with corrupt metadata"},
			&cli.BoolFlag{Name: "direct", Usage: "open every member with O_DIRECT"},
			&cli.StringSliceFlag{Name: "direct-member", Usage: "open this member (also given with --member) with O_DIRECT (repeatable)"},
			&cli.StringFlag{Name: "policy", Usage: "minicopy: a returning member must come back by minicopy (else fail); minicopy=optional: by minicopy if possible"},
			&cli.StringFlag{Name: "chunk-size", Usage: "write bitmap chunk of a set mounted here first (4KiB to 64MiB, power of two; default 64KiB)"},
			&cli.BoolFlag{Name: "write-log", Usage: "keep write logs on the members (controller minimerge after a crash) instead of HBMM"},
			&cli.BoolFlag{Name: "json", Usage: "print the result as JSON"},
		},
		Action: func(cc *cli.Context) error {
			if cc.NArg() != 1 {
				return cli.Exit("mount: give one set name (DSAn) and --member PATH...", 2)
			}
			if len(cc.StringSlice("member")) == 0 {
				return cli.Exit("mount: no --member given", 2)
			}
			var chunk int64
			if s := cc.String("chunk-size"); s != "" {
				n, err := parseSize(s)
				if err != nil {
					return cli.Exit("mount: --chunk-size: "+err.Error(), 2)
				}
				chunk = n
			}
			if _, err := policy.ParseMinicopyPolicy(cc.String("policy")); err != nil {
				return cli.Exit("mount: --policy: "+err.Error(), 2)
			}
			members := absAll(cc.StringSlice("member"))
			direct := absAll(cc.StringSlice("direct-member"))
			for _, d := range direct {
				if !slices.Contains(members, d) {
					return cli.Exit("mount: --direct-member "+d+" is not among the --member paths", 2)
				}
			}
			var res agent.MountResult
			err := client(cc).Call("mount", agent.MountArgs{Set: cc.Args().First(), Members: members, DirectMembers: direct,
				Include: cc.Bool("include"), Confirm: cc.Bool("confirm"), Overwrite: cc.Bool("overwrite"), Direct: cc.Bool("direct"),
				Policy: cc.String("policy"), ChunkSize: chunk, WriteLog: cc.Bool("write-log")}, &res)
			if err != nil {
				return cli.Exit("mount: "+err.Error(), 1)
			}
			if cc.Bool("json") {
				return json.NewEncoder(cc.App.Writer).Encode(res)
			}
			for _, w := range res.Warnings {
				fmt.Fprintf(cc.App.ErrWriter, "warning: %s\n", w)
			}
			fmt.Fprintf(cc.App.Writer, "%%MOUNT-I-MOUNTED, %s mounted (%d bytes) at %s\n", res.Set, res.Size, res.URI)
			if res.Merge != "" {
				fmt.Fprintf(cc.App.Writer, "%%MOUNT-I-MERGE, %s was not dismounted cleanly: %s required\n", res.Set, res.Merge)
			}
			for _, c := range res.Copies {
				if slices.Contains(res.Minicopies, c) {
					fmt.Fprintf(cc.App.Writer, "%%MOUNT-I-SHDWMEMCOPY, %s added to the shadow set with a minicopy operation\n", c)
					continue
				}
				fmt.Fprintf(cc.App.Writer, "%%MOUNT-I-SHDWMEMCOPY, %s added to the shadow set with a copy operation\n", c)
			}
			return nil
		},
	}
}

func absAll(ps []string) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		if a, err := filepath.Abs(p); err == nil {
			p = a
		}
		out[i] = p
	}
	return out
}

func dismountCommand() *cli.Command {
	return &cli.Command{
		Name:      "dismount",
		Usage:     "dismount a shadow set, or remove one member",
		ArgsUsage: "DSAn",
		Flags: []cli.Flag{socketFlag(), &cli.StringFlag{Name: "member", Usage: "remove only this member"},
			&cli.StringFlag{Name: "policy", Usage: "with --member: minicopy keeps a minicopy bitmap (or fails), minicopy=optional keeps one if it can"},
			&cli.BoolFlag{Name: "abort", Usage: "DISMOUNT/ABORT: stop serving at once, without draining writes or marking clean; the set needs a merge"}},
		Action: func(cc *cli.Context) error {
			if cc.NArg() != 1 {
				return cli.Exit("dismount: give one set name (DSAn)", 2)
			}
			if _, err := policy.ParseMinicopyPolicy(cc.String("policy")); err != nil {
				return cli.Exit("dismount: --policy: "+err.Error(), 2)
			}
			if cc.String("policy") != "" && cc.String("member") == "" {
				return cli.Exit("dismount: --policy applies to one member: give --member PATH", 2)
			}
			args := agent.DismountArgs{Set: cc.Args().First(), Policy: cc.String("policy"), Abort: cc.Bool("abort")}
			if m := cc.String("member"); m != "" {
				args.Member = absAll([]string{m})[0]
			}
			return call(cc, "dismount", args, nil)
		},
	}
}

func setCommand() *cli.Command {
	return &cli.Command{
		Name:      "set",
		Usage:     "change a mounted shadow set (SET SHADOW)",
		ArgsUsage: "DSAn",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.BoolFlag{Name: "demand-merge", Usage: "merge the set now"},
			&cli.IntFlag{Name: "priority", Usage: "merge/copy priority on this host (0–10000; 0: never here)"},
			&cli.IntFlag{Name: "read-cost", Usage: "read cost of --member (1–65535; 0 restores the default)"},
			&cli.StringFlag{Name: "member", Usage: "the member --read-cost applies to"},
			&cli.StringFlag{Name: "copy-source", Usage: "full member copies read from"},
			&cli.StringFlag{Name: "force-removal", Usage: "expel this member now"},
			&cli.BoolFlag{Name: "evaluate-resources", Usage: "SET SHADOW /EVALUATE=RESOURCES on this host: cancel its ops and reschedule them by priority and op limits (no set name needed)"},
			&cli.IntFlag{Name: "max-ops", Usage: "how many merges and copies this host runs at once (0–200, default 4; no set name needed)"},
			&cli.StringFlag{Name: "policy", Usage: "hbmm=(master_list=(HOST,...),count=N,reset_threshold=BLOCKS) or hbmm=NAME (NODEFAULT: no HBMM)"},
			&cli.StringFlag{Name: "name", Usage: "with --policy and no set: define a named policy (DEFAULT applies to sets without one)"},
			&cli.BoolFlag{Name: "delete", Usage: "delete the named policy (--name), or the set's own policy"},
			&cli.StringFlag{Name: "enable", Usage: "hbmm: start HBMM on the set with its policy"},
			&cli.StringFlag{Name: "disable", Usage: "hbmm: stop HBMM on the set (its bitmaps go)"},
		},
		Action: func(cc *cli.Context) error {
			args := agent.SetArgs{Set: cc.Args().First(), DemandMerge: cc.Bool("demand-merge"),
				Member: cc.String("member"), CopySource: cc.String("copy-source"), ForceRemoval: cc.String("force-removal"),
				Policy: cc.String("policy"), Name: cc.String("name"), Delete: cc.Bool("delete"),
				Enable: cc.String("enable"), Disable: cc.String("disable")}
			if cc.IsSet("priority") {
				p := cc.Int("priority")
				args.Priority = &p
			}
			if cc.IsSet("read-cost") {
				r := cc.Int("read-cost")
				args.ReadCost = &r
			}
			args.EvaluateResources = cc.Bool("evaluate-resources")
			if cc.IsSet("max-ops") {
				n := cc.Int("max-ops")
				args.MaxOps = &n
			}
			if err := args.Check(cc.NArg()); err != nil {
				return cli.Exit("set: "+err.Error(), 2)
			}
			return call(cc, "set", args, nil)
		},
	}
}

func showCommand() *cli.Command {
	return &cli.Command{
		Name:      "show",
		Usage:     "show shadow sets (SHOW SHADOW)",
		ArgsUsage: "[DSAn]",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.BoolFlag{Name: "full", Usage: "also show hosts and ops"},
			&cli.BoolFlag{Name: "json", Usage: "machine-readable output (stable; see docs/cli.md)"},
			&cli.BoolFlag{Name: "watch", Usage: "redraw every second with progress bars until no merge or copy is left"},
			&cli.DurationFlag{Name: "interval", Value: time.Second, Usage: "redraw interval for --watch"},
			&cli.StringFlag{Name: "policy", Usage: "hbmm: list the named HBMM policies"},
			&cli.BoolFlag{Name: "events", Usage: "print the ordered event log (the cluster's, in a cluster) as a replay script: `shadow replay` of it reaches the same decisions"},
		},
		Action: func(cc *cli.Context) error {
			if cc.Bool("events") {
				var evs []shadowset.Event
				if err := call(cc, "events", struct{}{}, &evs); err != nil {
					return err
				}
				if cc.Bool("json") {
					return json.NewEncoder(cc.App.Writer).Encode(evs)
				}
				script, err := replay.Format(evs)
				if err != nil {
					return cli.Exit("show --events: "+err.Error(), 1)
				}
				fmt.Fprint(cc.App.Writer, script)
				return nil
			}
			if p := cc.String("policy"); p != "" {
				if !strings.EqualFold(p, "hbmm") {
					return cli.Exit("show: --policy: only hbmm", 2)
				}
				var ps []report.PolicyShow
				if err := call(cc, "policies", struct{}{}, &ps); err != nil {
					return err
				}
				if cc.Bool("json") {
					return json.NewEncoder(cc.App.Writer).Encode(ps)
				}
				fmt.Fprint(cc.App.Writer, report.FormatPolicies(ps))
				return nil
			}
			args := agent.ShowArgs{Set: cc.Args().First()}
			for {
				var r report.ShowReport
				if err := call(cc, "show", args, &r); err != nil {
					return err
				}
				if cc.Bool("json") {
					if err := json.NewEncoder(cc.App.Writer).Encode(r); err != nil {
						return err
					}
				} else {
					fmt.Fprint(cc.App.Writer, report.FormatShow(r, cc.Bool("full")))
				}
				if !cc.Bool("watch") {
					return nil
				}
				active := false
				for _, s := range r.Sets {
					for _, op := range s.Ops {
						active = true
						if !cc.Bool("json") {
							fmt.Fprintf(cc.App.Writer, "  %s %-10s %s %s\n", s.Name, op.Kind, op.State, report.ProgressBar(op.ProgressPct, 40))
						}
					}
				}
				if !active {
					return nil
				}
				time.Sleep(cc.Duration("interval"))
			}
		},
	}
}

func examineCommand() *cli.Command {
	return &cli.Command{
		Name:      "examine",
		Usage:     "print a member's metadata (like mdadm --examine)",
		ArgsUsage: "PATH",
		Action: func(cc *cli.Context) error {
			if cc.NArg() != 1 {
				return cli.Exit("examine: give one member path", 2)
			}
			f, err := os.Open(cc.Args().First())
			if err != nil {
				return cli.Exit("examine: "+err.Error(), 1)
			}
			defer f.Close()
			dev, err := readOnlyMember(f)
			if err != nil {
				return cli.Exit("examine: "+err.Error(), 1)
			}
			m, warnings, err := meta.Read(dev)
			if err != nil {
				return cli.Exit(fmt.Sprintf("examine: %s: %v", f.Name(), err), 1)
			}
			fmt.Fprint(cc.App.Writer, meta.Examine(m, warnings))
			return nil
		},
	}
}

// roMember reads a member without the agent's exclusive lock: examine
// must work while the set is mounted.
type roMember struct {
	f    *os.File
	size int64
}

func readOnlyMember(f *os.File) (*roMember, error) {
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return nil, err
	}
	return &roMember{f: f, size: size}, nil
}

func (m *roMember) ReadAt(p []byte, off int64) (int, error) { return m.f.ReadAt(p, off) }
func (m *roMember) WriteAt([]byte, int64) (int, error) {
	return 0, errors.New("examine opens members read-only")
}
func (m *roMember) Flush() error { return nil }
func (m *roMember) Size() int64  { return m.size }

func verifyCommand() *cli.Command {
	return &cli.Command{
		Name:      "verify",
		Usage:     "compare a set's full members and report where they differ, without repairing (like md's check); exit 1 if they differ",
		ArgsUsage: "DSAn",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.BoolFlag{Name: "json", Usage: "machine-readable output"},
			&cli.DurationFlag{Name: "timeout", Value: time.Hour, Usage: "give up after this long"},
		},
		Action: func(cc *cli.Context) error {
			if cc.NArg() != 1 {
				return cli.Exit("verify: give one set name (DSAn)", 2)
			}
			var r agent.VerifyResult
			c := &control.Client{Path: cc.String("socket"), Timeout: cc.Duration("timeout")}
			if err := c.Call("verify", agent.VerifyArgs{Set: cc.Args().First()}, &r); err != nil {
				return cli.Exit("verify: "+err.Error(), 1)
			}
			if cc.Bool("json") {
				if err := json.NewEncoder(cc.App.Writer).Encode(r); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(cc.App.Writer, "%s: compared %d bytes on %d full members in %d ms: %d mismatched chunks of %d bytes\n",
					r.Set, r.BytesCompared, len(r.Members), r.ElapsedMS, r.MismatchedChunks, r.ChunkBytes)
				for _, off := range r.First {
					fmt.Fprintf(cc.App.Writer, "  differs in [%d, +%d)\n", off, r.ChunkBytes)
				}
				for _, n := range r.Notes {
					fmt.Fprintf(cc.App.Writer, "  note: %s\n", n)
				}
			}
			if r.MismatchedChunks > 0 {
				return cli.Exit("", 1)
			}
			return nil
		},
	}
}
