package metrics

import (
	"errors"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/shadow-project/shadow/cluster"
	"github.com/shadow-project/shadow/cmd/internal/report"
)

type fakeSource struct {
	r   report.ShowReport
	err error
}

func (f *fakeSource) Show(string) (report.ShowReport, error) { return f.r, f.err }

func sampleReport() report.ShowReport {
	return report.ShowReport{Host: "A", Sets: []report.SetShow{{
		Name: "DSA1", State: "Steady State", SizeBytes: 1 << 30, Mounted: []string{"A", "B"}, MemberIOErrors: 6, Expulsions: 2,
		Members: []report.MemberShow{
			{Path: "/m1", Role: "full", Master: true, ReadCost: 1, ProgressPct: -1},
			{Path: "/m2", Role: "copy-target", ProgressPct: 40},
		},
		Ops:      []report.OpShow{{ID: 3, Kind: "full-copy", State: "running", Host: "A", ProgressPct: 40}},
		Minicopy: []report.MinicopyShow{{Member: "/m3", Chunks: 12}},
		Work:     []report.OpWorkShow{{ID: 3, Kind: "full-copy", ChunksDone: 410, BytesDone: 410 << 20, ElapsedMS: 2000}},
		HBMM: &report.HBMMShow{Enabled: true, ActiveOn: []string{"B", "C"}, WriterChunks: map[string]uint64{"C": 7},
			BitSets: 100, BitSetFailures: 2, BitSetRetries: 1, BitSetMeanWaitUS: 500, ModifiedChunks: 9, Resets: 4},
	}}, Cluster: &report.ClusterShow{Leader: "B", Quorum: true, CoreLevel: 4,
		Hosts:   []report.HostShow{{Host: "A", State: "up", Lease: "valid"}, {Host: "B", State: "up", Lease: "valid"}},
		Servers: []cluster.Server{{Host: "A", Voter: true}, {Host: "B", Voter: true}, {Host: "W", Voter: true}},
		Fence:   &report.FenceShow{Outstanding: 3, Refused: 5, Lapses: 1},
	}}
}

// The names follow Prometheus's conventions (promlint), and a scrape
// carries what show says.
func TestCollectorFromShow(t *testing.T) {
	m := New()
	m.SetSource(&fakeSource{r: sampleReport()})
	problems, err := testutil.GatherAndLint(m.Registry())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	want := `
# HELP shadow_member_progress_ratio A copy target's copy progress, or a merge's on the master (absent: none).
# TYPE shadow_member_progress_ratio gauge
shadow_member_progress_ratio{member="/m2",set="DSA1"} 0.4
# HELP shadow_hbmm_bit_sets_total Bit-set messages this host sent as a writer.
# TYPE shadow_hbmm_bit_sets_total counter
shadow_hbmm_bit_sets_total{set="DSA1"} 100
# HELP shadow_hbmm_bit_set_wait_seconds Time writes waited for every master's acknowledgement of their bit-set.
# TYPE shadow_hbmm_bit_set_wait_seconds summary
shadow_hbmm_bit_set_wait_seconds_sum{set="DSA1"} 0.05
shadow_hbmm_bit_set_wait_seconds_count{set="DSA1"} 100
# HELP shadow_bitmap_dirty_chunks Chunks set in a write bitmap: hbmm (this host's own writes, on a master) or minicopy (an absent member's).
# TYPE shadow_bitmap_dirty_chunks gauge
shadow_bitmap_dirty_chunks{bitmap="hbmm",member="",set="DSA1"} 9
shadow_bitmap_dirty_chunks{bitmap="minicopy",member="/m3",set="DSA1"} 12
# HELP shadow_op_info A merge or copy the set owes, its kind, state and host.
# TYPE shadow_op_info gauge
shadow_op_info{host="A",kind="full-copy",op="3",set="DSA1",state="running"} 1
# HELP shadow_cluster_voters Raft voters.
# TYPE shadow_cluster_voters gauge
shadow_cluster_voters 3
# HELP shadow_lease_refused_io_total Member I/Os failed for want of a lease.
# TYPE shadow_lease_refused_io_total counter
shadow_lease_refused_io_total 5
# HELP shadow_show_error 1 when the agent could not produce its show report for this scrape.
# TYPE shadow_show_error gauge
shadow_show_error 0
# HELP shadow_member_expulsions_total Members this host expelled after an I/O error, since the set was mounted here.
# TYPE shadow_member_expulsions_total counter
shadow_member_expulsions_total{set="DSA1"} 2
`
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(want), "shadow_member_expulsions_total",
		"shadow_member_progress_ratio", "shadow_hbmm_bit_sets_total", "shadow_hbmm_bit_set_wait_seconds",
		"shadow_bitmap_dirty_chunks", "shadow_op_info", "shadow_cluster_voters", "shadow_lease_refused_io_total", "shadow_show_error"); err != nil {
		t.Error(err)
	}
}

// A report the agent cannot make is a scrape that says so, not an
// error page: the NBD metrics still come through.
func TestCollectorShowError(t *testing.T) {
	m := New()
	m.SetSource(&fakeSource{err: errors.New("agent: shutting down")})
	m.ObserveNBD("write", 0.001, false)
	m.ObserveNBD("write", 0.002, true)
	m.ObserveNBD("bogus", 1, true) // not a command: ignored
	want := `
# HELP shadow_show_error 1 when the agent could not produce its show report for this scrape.
# TYPE shadow_show_error gauge
shadow_show_error 1
# HELP shadow_nbd_requests_total NBD requests served, by command.
# TYPE shadow_nbd_requests_total counter
shadow_nbd_requests_total{command="flush"} 0
shadow_nbd_requests_total{command="read"} 0
shadow_nbd_requests_total{command="trim"} 0
shadow_nbd_requests_total{command="write"} 2
shadow_nbd_requests_total{command="write_zeroes"} 0
# HELP shadow_nbd_request_errors_total NBD requests answered with an error, by command.
# TYPE shadow_nbd_request_errors_total counter
shadow_nbd_request_errors_total{command="flush"} 0
shadow_nbd_request_errors_total{command="read"} 0
shadow_nbd_request_errors_total{command="trim"} 0
shadow_nbd_request_errors_total{command="write"} 1
shadow_nbd_request_errors_total{command="write_zeroes"} 0
`
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(want), "shadow_show_error", "shadow_nbd_requests_total", "shadow_nbd_request_errors_total"); err != nil {
		t.Error(err)
	}
	if n := testutil.CollectAndCount(m.latency); n != len(commands) {
		t.Errorf("%d latency series, want one per command (%d)", n, len(commands))
	}
}

func TestListenLoopbackOnly(t *testing.T) {
	for _, addr := range []string{"192.0.2.1:9100", "0.0.0.0:9100", ":9100", "example.org:9100"} {
		if ln, err := Listen(addr); !errors.Is(err, ErrNotLoopback) {
			if ln != nil {
				ln.Close()
			}
			t.Errorf("Listen(%q): %v, want ErrNotLoopback", addr, err)
		}
	}
	ln, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
}
