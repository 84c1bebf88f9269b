// Package agent owns one host's shadow agent: the ordered event log that
// feeds the shadowset core, the mounted virtual units (members, metadata,
// VU I/O engine, NBD exports), the merge and copy runs the core starts on
// this host, the dirty/clean protocol, and the control API the CLI speaks
// to. It carries out decisions; it makes none: every mount, dismount,
// member change, I/O failure, progress report, completion and timer expiry
// goes through the log to the core, and the agent acts on the core's
// Ready.
package agent

import (
	"context"
	"errors"
	"fmt"
	"github.com/shadow-project/shadow/cmd/internal/masters"
	"net"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/shadow-project/shadow/cluster"
	"github.com/shadow-project/shadow/cmd/internal/control"
	"github.com/shadow-project/shadow/cmd/internal/device"
	"github.com/shadow-project/shadow/cmd/internal/fence"
	"github.com/shadow-project/shadow/cmd/internal/nbd"
	"github.com/shadow-project/shadow/cmd/internal/policy"
	"github.com/shadow-project/shadow/shadowset"
)

// Config configures an agent.
type Config struct {
	// Host is this host's name in the cluster (default: "local").
	Host string
	// Socket is the control socket path.
	Socket string
	// NBDUnix and NBDTCP are where the NBD exports listen (either may be
	// empty, not both). NBDTCP must be a loopback address.
	NBDUnix string
	NBDTCP  string
	// MinRate and MaxRate bound merges and copies (bytes/s, 0 = none).
	MinRate, MaxRate int64
	// CleanAfter is the idle time after which a dirty set is flushed and
	// marked clean (default 5 s).
	CleanAfter time.Duration
	Logger     zerolog.Logger
	// ObserveNBD, if set, hears of every NBD request served (the metrics'
	// request counts and latencies: nbd.Options.Observe).
	ObserveNBD func(command string, seconds float64, failed bool)
	// OpenDevice opens members (default device.Open); tests wrap the
	// devices to inject faults and power losses.
	OpenDevice func(path string, opts device.Options) (device.Device, error)
	// Cluster, if set, joins a cluster; nil: a cluster of one (this host
	// alone, the in-process log).
	Cluster *ClusterConfig
	// RecoveryDelay, if set, becomes the cluster-wide recovery delay
	// (Table 8-1's Delay; default 20 s) when this agent starts.
	RecoveryDelay *time.Duration
}

// Agent is one host's agent.
type Agent struct {
	cfg  Config
	host string
	log  zerolog.Logger
	elog eventLog
	// clog and node are the cluster's log and membership (nil: a cluster
	// of one).
	clog *cluster.Log
	node *cluster.Node
	nbd  *nbd.Server
	api  *control.APIServer
	lns  []net.Listener
	ctx  context.Context
	stop context.CancelFunc

	mu   sync.Mutex // guards sets and runs; never held across elog.Append
	sets map[string]*volume
	runs map[shadowset.OpID]*run
	wg   sync.WaitGroup

	// The status page's formatted events (status.go).
	statusMu    sync.Mutex
	statusLen   int
	statusLines []string

	policies policy.Store
	// mstore holds the master bitmaps this host keeps, one per (set,
	// writer); mpool the bit-set streams to other masters (nil on one
	// host).
	mstore *masters.Store
	mpool  *masters.Pool

	// Fencing (lease.go); gate and watchdog are nil without a lease.
	gate        *fence.Gate
	watchdog    *fence.Watchdog
	renewStop   context.CancelFunc
	fenceMu     sync.Mutex
	fenceReason string
	fencedAt    time.Time
	// deferred: apply-path member I/O queued for want of a lease.
	deferred *fence.Deferred
}

// run is one engine goroutine executing an op.
type run struct {
	set    string
	cancel context.CancelFunc
	done   chan struct{}
}

// New starts an agent: event log, NBD listeners and control socket.
func New(cfg Config) (*Agent, error) {
	if cfg.Host == "" {
		cfg.Host = "local"
	}
	if cfg.CleanAfter <= 0 {
		cfg.CleanAfter = 5 * time.Second
	}
	if cfg.OpenDevice == nil {
		cfg.OpenDevice = device.Open
	}
	if cfg.NBDUnix == "" && cfg.NBDTCP == "" {
		return nil, errors.New("agent: no NBD listener configured")
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &Agent{cfg: cfg, host: cfg.Host, log: cfg.Logger, ctx: ctx, stop: cancel,
		sets: map[string]*volume{}, runs: map[shadowset.OpID]*run{}, mstore: masters.NewStore()}
	a.nbd = nbd.NewServer(nbd.Options{Logger: cfg.Logger, Observe: cfg.ObserveNBD})
	if err := a.listenNBD(); err != nil {
		a.closeListeners()
		cancel()
		return nil, err
	}
	if cfg.Cluster != nil {
		if err := a.startCluster(); err != nil {
			a.closeListeners()
			cancel()
			return nil, err
		}
	} else {
		a.elog = NewLocalLog(shadowset.New(), a.apply)
		if err := a.elog.Append(shadowset.Event{Kind: shadowset.EvHostUp, Host: a.host}); err != nil {
			a.closeListeners()
			cancel()
			return nil, err
		}
	}
	if cfg.RecoveryDelay != nil && cfg.Cluster == nil {
		if err := a.elog.Append(shadowset.Event{Kind: shadowset.EvSetDelay, Duration: *cfg.RecoveryDelay}); err != nil {
			a.closeListeners()
			a.stopCluster(false)
			cancel()
			return nil, fmt.Errorf("agent: recovery delay: %w", err)
		}
	}
	api, err := control.ListenAPI(cfg.Socket, a.handlers(), cfg.Logger)
	if err != nil {
		a.closeListeners()
		a.stopCluster(false)
		cancel()
		return nil, err
	}
	a.api = api
	a.log.Info().Str("host", a.host).Str("socket", cfg.Socket).Str("nbd_unix", cfg.NBDUnix).Str("nbd_tcp", cfg.NBDTCP).Msg("agent started")
	return a, nil
}

func (a *Agent) listenNBD() error {
	if a.cfg.NBDUnix != "" {
		if err := control.RemoveStaleSocket(a.cfg.NBDUnix); err != nil {
			return err
		}
		ln, err := net.Listen("unix", a.cfg.NBDUnix)
		if err != nil {
			return fmt.Errorf("agent: nbd listen %s: %w", a.cfg.NBDUnix, err)
		}
		a.lns = append(a.lns, ln)
	}
	if a.cfg.NBDTCP != "" {
		host, _, err := net.SplitHostPort(a.cfg.NBDTCP)
		if err != nil {
			return fmt.Errorf("agent: nbd address %q: %w", a.cfg.NBDTCP, err)
		}
		if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
			return fmt.Errorf("agent: nbd address %q is not loopback; shadow serves NBD on 127.0.0.0/8 or ::1 only", a.cfg.NBDTCP)
		}
		ln, err := net.Listen("tcp", a.cfg.NBDTCP)
		if err != nil {
			return fmt.Errorf("agent: nbd listen %s: %w", a.cfg.NBDTCP, err)
		}
		a.lns = append(a.lns, ln)
	}
	for _, ln := range a.lns {
		a.wg.Go(func() { _ = a.nbd.Serve(ln) })
	}
	return nil
}

func (a *Agent) closeListeners() {
	for _, ln := range a.lns {
		ln.Close()
	}
}

// URI is the NBD URI of an export.
func (a *Agent) URI(set string) string {
	if a.cfg.NBDUnix != "" {
		return fmt.Sprintf("nbd+unix:///%s?socket=%s", set, a.cfg.NBDUnix)
	}
	return fmt.Sprintf("nbd://%s/%s", a.cfg.NBDTCP, set)
}

// TCPAddr is the bound NBD TCP address (useful with port 0).
func (a *Agent) TCPAddr() string {
	for _, ln := range a.lns {
		if ln.Addr().Network() == "tcp" {
			return ln.Addr().String()
		}
	}
	return ""
}

// Shutdown is the orderly stop (SIGTERM): stop serving, stop the runs
// (their checkpoints are recorded), flush every set and mark it clean
// unless a merge is still owed, close the members.
func (a *Agent) Shutdown(ctx context.Context) error {
	a.log.Info().Msg("agent shutting down")
	if a.api != nil {
		a.api.Close()
	}
	_ = a.nbd.Shutdown(ctx)
	a.closeListeners()
	var errs []error
	for _, name := range a.setNames() {
		if err := a.dismountSet(name); err != nil {
			errs = append(errs, err)
		}
	}
	if a.clustered() && len(errs) == 0 {
		// Not a failure: no recovery delay for the others, and the next
		// run registers without failing this one.
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if err := a.clog.Leave(lctx); err != nil {
			a.log.Warn().Err(err).Msg("could not record the clean stop: the others will see a failure")
		}
		cancel()
	}
	a.elog.Close()
	a.stopCluster(true)
	a.stop()
	a.wg.Wait()
	return errors.Join(errs...)
}

func (a *Agent) setNames() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []string
	for n := range a.sets {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func (a *Agent) volume(name string) (*volume, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	v, ok := a.sets[name]
	if !ok {
		return nil, fmt.Errorf("%s is not mounted on %s", name, a.host)
	}
	return v, nil
}

// apply carries out the core's decisions. It runs under the event log's
// lock, in log order; anything long runs in goroutines.
func (a *Agent) apply(rd shadowset.Ready) {
	for _, n := range rd.Notes {
		a.log.Info().Str("component", "core").Msg(n)
	}
	for _, act := range rd.Actions {
		a.log.Debug().Str("component", "core").Str("action", act.String()).Msg("action")
		switch act.Kind {
		case shadowset.ActStart:
			if act.Host == a.host {
				a.startRun(act)
			}
		case shadowset.ActStop, shadowset.ActSuspend:
			if act.Host == a.host {
				a.cancelRun(act.Op)
			}
		case shadowset.ActDone:
			a.finished(act)
		}
	}
	a.syncMergeViews()
	a.syncHBMMViews()
}

// cancelRun stops an engine without waiting: its late reports are
// dropped by the log (AppendFrom) and by the core (attempts).
func (a *Agent) cancelRun(op shadowset.OpID) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if r, ok := a.runs[op]; ok {
		r.cancel()
		delete(a.runs, op)
	}
}

// runsNow snapshots the engines running now; waitStopped then waits for
// those among them the core has stopped since.
func (a *Agent) runsNow() []*run {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]*run, 0, len(a.runs))
	for _, r := range a.runs {
		out = append(out, r)
	}
	return out
}

// waitStopped waits for the runs among old that are no longer live (the
// core stopped them): an engine must be gone before its member or set is.
func (a *Agent) waitStopped(old []*run) {
	for _, r := range old {
		a.mu.Lock()
		live := false
		for _, x := range a.runs {
			live = live || x == r
		}
		a.mu.Unlock()
		if !live {
			<-r.done
		}
	}
}

// setView reads the core's view of a set.
func (a *Agent) setView(name string) (shadowset.SetView, bool) {
	var sv shadowset.SetView
	var ok bool
	a.elog.View(func(c *shadowset.Core) { sv, ok = c.Set(name) })
	return sv, ok
}

// viewLocked reads a set's view when the caller already runs under the
// log's lock (apply).
func (a *Agent) viewLocked(name string) (shadowset.SetView, bool) {
	return a.elog.Locked().Set(name)
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
