// Package metrics owns the agent's Prometheus exposition (`agent
// --metrics-listen`): what `show` reports, read at each scrape, and the NBD
// server's request counts and latencies, observed as requests are served.
//
// Reading `show` at scrape time, rather than keeping gauges up to date on
// every change, keeps the agent's code about running sets: a scrape every
// few seconds costs one report, and the figures cannot drift from what
// `show` prints. Counters that `show` carries as totals (bit-sets, resets,
// lease refusals) are exported as counters; Prometheus computes their rates.
package metrics

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/shadow-project/shadow/cmd/internal/report"
)

// Source is what the exposition reads at each scrape: the agent.
type Source interface {
	Show(set string) (report.ShowReport, error)
}

// Metrics is one agent's registry: the show collector and the NBD
// request metrics.
type Metrics struct {
	reg      *prometheus.Registry
	requests *prometheus.CounterVec
	failures *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	// byCommand caches each command's observers, so that an observation
	// costs no label lookup.
	byCommand map[string]commandObservers
	status    statusHandler
}

type commandObservers struct {
	requests, failures prometheus.Counter
	latency            prometheus.Observer
}

// commands are the NBD commands a server observes.
var commands = []string{"read", "write", "flush", "trim", "write_zeroes"}

// New returns the registry for src. Until SetSource is called, scrapes
// carry the NBD metrics only (the agent starts its NBD server before it
// exists as a Source).
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shadow_nbd_requests_total", Help: "NBD requests served, by command.",
		}, []string{"command"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shadow_nbd_request_errors_total", Help: "NBD requests answered with an error, by command.",
		}, []string{"command"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "shadow_nbd_request_duration_seconds", Help: "Time to serve an NBD request, from its handling's start to its reply, by command.",
			// 10 µs (a quick read from the page cache) to 42 s (a write
			// waiting for the cluster's masters or a lease).
			Buckets: prometheus.ExponentialBuckets(10e-6, 4, 12),
		}, []string{"command"}),
		byCommand: map[string]commandObservers{},
	}
	for _, c := range commands {
		m.byCommand[c] = commandObservers{m.requests.WithLabelValues(c), m.failures.WithLabelValues(c), m.latency.WithLabelValues(c)}
	}
	m.reg.MustRegister(m.requests, m.failures, m.latency)
	return m
}

// ObserveNBD is the NBD server's Observe hook.
func (m *Metrics) ObserveNBD(command string, seconds float64, failed bool) {
	o, ok := m.byCommand[command]
	if !ok {
		return
	}
	o.requests.Inc()
	o.latency.Observe(seconds)
	if failed {
		o.failures.Inc()
	}
}

// SetSource adds the collector that reads src's show report at each
// scrape. Call it once.
func (m *Metrics) SetSource(src Source) {
	m.reg.MustRegister(newShowCollector(src))
	m.status.src.Store(&src)
}

// Registry is the registry, for tests and for other handlers.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// ErrNotLoopback: the metrics address must be on 127.0.0.0/8 or ::1, as
// every address this project listens on.
var ErrNotLoopback = errors.New("metrics: address is not loopback")

// Listen opens addr (host:port, loopback only) for the exposition.
func Listen(addr string) (net.Listener, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: address %q: %w", addr, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return nil, fmt.Errorf("%w: %q (serve metrics on 127.0.0.0/8 or ::1)", ErrNotLoopback, addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: listen %s: %w", addr, err)
	}
	return ln, nil
}

// Serve serves /metrics, the status page (/) and its data (/status.json)
// on ln until the server is closed.
func (m *Metrics) Serve(ln net.Listener) *http.Server {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	mux.HandleFunc("/status.json", m.status.json)
	mux.HandleFunc("/", m.status.page)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	return srv
}

// showCollector turns one show report into metrics at each scrape.
type showCollector struct {
	src Source

	scrapeErr, setInfo, setSize, setHosts                    *prometheus.Desc
	memberInfo, memberReadCost, memberMaster, memberProgress *prometheus.Desc
	opInfo, opProgress                                       *prometheus.Desc
	workChunks, workChunksDone, workBytes, workSeconds       *prometheus.Desc
	dirtyChunks, writerChunks, bitSets, bitSetFailures       *prometheus.Desc
	bitSetRetries, bitSetWait, resets, masters               *prometheus.Desc
	quorum, leader, hostUp, coreLevel, leaseIO, leaseRefused *prometheus.Desc
	leaseLapses, voters, ioErrors, expulsions                *prometheus.Desc
}

func newShowCollector(src Source) *showCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, nil)
	}
	return &showCollector{
		src:            src,
		scrapeErr:      d("shadow_show_error", "1 when the agent could not produce its show report for this scrape."),
		setInfo:        d("shadow_set_info", "A mounted shadow set and its state (Virtual Unit State).", "set", "state"),
		setSize:        d("shadow_set_size_bytes", "The set's size.", "set"),
		setHosts:       d("shadow_set_mounted_hosts", "Hosts that mount the set.", "set"),
		ioErrors:       d("shadow_member_io_errors_total", "Member I/Os of this host that failed (fencing refusals aside), since the set was mounted here.", "set"),
		expulsions:     d("shadow_member_expulsions_total", "Members this host expelled after an I/O error, since the set was mounted here.", "set"),
		memberInfo:     d("shadow_member_info", "A member of a set and its role (full or copy-target).", "set", "member", "role"),
		memberReadCost: d("shadow_member_read_cost", "The member's read cost on this host.", "set", "member"),
		memberMaster:   d("shadow_member_merge_master", "1 for the set's merge master.", "set", "member"),
		memberProgress: d("shadow_member_progress_ratio", "A copy target's copy progress, or a merge's on the master (absent: none).", "set", "member"),
		opInfo:         d("shadow_op_info", "A merge or copy the set owes, its kind, state and host.", "set", "op", "kind", "state", "host"),
		opProgress:     d("shadow_op_progress_ratio", "How much of the volume the op has passed.", "set", "op", "kind"),
		workChunks:     d("shadow_op_bitmap_chunks", "Chunks in a running bitmap op's bitmap on this host.", "set", "op", "kind"),
		workChunksDone: d("shadow_op_chunks_done", "Chunks (or 1 MiB steps for a full op) a running op has moved on this host.", "set", "op", "kind"),
		workBytes:      d("shadow_op_moved_bytes", "Bytes a running op has moved on this host.", "set", "op", "kind"),
		workSeconds:    d("shadow_op_running_seconds", "How long a running op's engine has run on this host (its rate is moved bytes over this).", "set", "op", "kind"),
		dirtyChunks:    d("shadow_bitmap_dirty_chunks", "Chunks set in a write bitmap: hbmm (this host's own writes, on a master) or minicopy (an absent member's).", "set", "bitmap", "member"),
		writerChunks:   d("shadow_hbmm_writer_chunks", "On a master, the chunks set in its bitmap of each writer host.", "set", "writer"),
		bitSets:        d("shadow_hbmm_bit_sets_total", "Bit-set messages this host sent as a writer.", "set"),
		bitSetFailures: d("shadow_hbmm_bit_set_failures_total", "Bit-set attempts that failed.", "set"),
		bitSetRetries:  d("shadow_hbmm_bit_set_retries_total", "Bit-sets retried after the log dropped a master.", "set"),
		bitSetWait:     d("shadow_hbmm_bit_set_wait_seconds", "Time writes waited for every master's acknowledgement of their bit-set.", "set"),
		resets:         d("shadow_hbmm_resets_total", "Resets of this host's write bitmaps (RESET_THRESHOLD).", "set"),
		masters:        d("shadow_hbmm_masters", "Hosts holding the set's master bitmaps.", "set"),
		quorum:         d("shadow_cluster_quorum", "1 when this host reaches a leader and holds a valid lease.", nil...),
		leader:         d("shadow_cluster_leader", "1 for the host this one sees as the raft leader.", "host"),
		hostUp:         d("shadow_cluster_host_info", "A host of the cluster and its state (up, failed, left), gossip view and lease.", "host", "state", "lease"),
		voters:         d("shadow_cluster_voters", "Raft voters.", nil...),
		coreLevel:      d("shadow_cluster_core_level", "The cluster's core level (rolling upgrades).", nil...),
		leaseIO:        d("shadow_lease_outstanding_io", "Member I/Os in flight under this host's lease.", nil...),
		leaseRefused:   d("shadow_lease_refused_io_total", "Member I/Os failed for want of a lease.", nil...),
		leaseLapses:    d("shadow_lease_lapses_total", "Times this host's lease lapsed with member I/O outstanding.", nil...),
	}
}

// Describe sends every descriptor.
func (c *showCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.scrapeErr, c.setInfo, c.setSize, c.setHosts, c.memberInfo, c.memberReadCost, c.memberMaster,
		c.memberProgress, c.opInfo, c.opProgress, c.workChunks, c.workChunksDone, c.workBytes, c.workSeconds, c.dirtyChunks,
		c.writerChunks, c.bitSets, c.bitSetFailures, c.bitSetRetries, c.bitSetWait, c.resets, c.masters, c.quorum, c.leader,
		c.hostUp, c.voters, c.coreLevel, c.leaseIO, c.leaseRefused, c.leaseLapses, c.ioErrors, c.expulsions} {
		ch <- d
	}
}

// Collect reads one show report.
func (c *showCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	r, err := c.src.Show("")
	if err != nil {
		gauge(c.scrapeErr, 1)
		return
	}
	gauge(c.scrapeErr, 0)
	for _, s := range r.Sets {
		gauge(c.setInfo, 1, s.Name, s.State)
		gauge(c.setSize, float64(s.SizeBytes), s.Name)
		gauge(c.setHosts, float64(len(s.Mounted)), s.Name)
		counter(c.ioErrors, float64(s.MemberIOErrors), s.Name)
		counter(c.expulsions, float64(s.Expulsions), s.Name)
		for _, m := range s.Members {
			gauge(c.memberInfo, 1, s.Name, m.Path, m.Role)
			gauge(c.memberReadCost, float64(m.ReadCost), s.Name, m.Path)
			gauge(c.memberMaster, b2f(m.Master), s.Name, m.Path)
			if m.ProgressPct >= 0 {
				gauge(c.memberProgress, float64(m.ProgressPct)/100, s.Name, m.Path)
			}
		}
		for _, op := range s.Ops {
			id := strconv.FormatUint(op.ID, 10)
			gauge(c.opInfo, 1, s.Name, id, op.Kind, op.State, op.Host)
			gauge(c.opProgress, float64(op.ProgressPct)/100, s.Name, id, op.Kind)
		}
		for _, w := range s.Work {
			id := strconv.FormatUint(w.ID, 10)
			gauge(c.workChunks, float64(w.BitmapChunks), s.Name, id, w.Kind)
			gauge(c.workChunksDone, float64(w.ChunksDone), s.Name, id, w.Kind)
			gauge(c.workBytes, float64(w.BytesDone), s.Name, id, w.Kind)
			gauge(c.workSeconds, float64(w.ElapsedMS)/1000, s.Name, id, w.Kind)
		}
		for _, mc := range s.Minicopy {
			gauge(c.dirtyChunks, float64(mc.Chunks), s.Name, "minicopy", mc.Member)
		}
		if h := s.HBMM; h != nil {
			gauge(c.dirtyChunks, float64(h.ModifiedChunks), s.Name, "hbmm", "")
			gauge(c.masters, float64(len(h.ActiveOn)), s.Name)
			for wr, n := range h.WriterChunks {
				gauge(c.writerChunks, float64(n), s.Name, wr)
			}
			counter(c.bitSets, float64(h.BitSets), s.Name)
			counter(c.bitSetFailures, float64(h.BitSetFailures), s.Name)
			counter(c.bitSetRetries, float64(h.BitSetRetries), s.Name)
			counter(c.resets, float64(h.Resets), s.Name)
			ch <- prometheus.MustNewConstSummary(c.bitSetWait, h.BitSets, h.BitSetMeanWaitUS*float64(h.BitSets)/1e6, nil, s.Name)
		}
	}
	cl := r.Cluster
	if cl == nil {
		return
	}
	gauge(c.quorum, b2f(cl.Quorum))
	gauge(c.coreLevel, float64(cl.CoreLevel))
	if cl.Leader != "" {
		gauge(c.leader, 1, cl.Leader)
	}
	voters := 0
	for _, s := range cl.Servers {
		if s.Voter {
			voters++
		}
	}
	gauge(c.voters, float64(voters))
	for _, h := range cl.Hosts {
		gauge(c.hostUp, 1, h.Host, h.State, h.Lease)
	}
	if f := cl.Fence; f != nil {
		gauge(c.leaseIO, float64(f.Outstanding))
		counter(c.leaseRefused, float64(f.Refused))
		counter(c.leaseLapses, float64(f.Lapses))
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
