// Package report owns what `shadow show` prints: the JSON report whose
// field names are a stable interface (docs/cli.md), and its human form.
// The agent fills it; the CLI formats it. Keeping it apart keeps the
// agent's package about running sets.
package report

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/shadow-project/shadow/cluster"
)

// ShowReport is `shadow show --json`: stable field names, documented in
// docs/cli.md. Add fields; never rename or remove one.
type ShowReport struct {
	Host string    `json:"host"`
	Sets []SetShow `json:"sets"`
	// Cluster is the cluster view (absent on a cluster of one).
	Cluster *ClusterShow `json:"cluster,omitempty"`
	// DelayLeftMs is the time left in the recovery delay window, in
	// milliseconds of the log's clock, while one is open (else absent).
	DelayLeftMs *int64 `json:"delay_left_ms,omitempty"`
}

// SetShow is one virtual unit.
type SetShow struct {
	Name      string       `json:"name"`
	State     string       `json:"state"`
	SizeBytes int64        `json:"size_bytes"`
	NBDURI    string       `json:"nbd_uri,omitempty"`
	Mounted   []string     `json:"mounted_on"`
	Priority  int          `json:"priority"`
	Members   []MemberShow `json:"members"`
	Ops       []OpShow     `json:"ops"`
	// ChunkBytes is the write bitmaps' chunk size.
	ChunkBytes int64 `json:"chunk_bytes"`
	// WriteLog: the set keeps write logs on its members (controller
	// minimerge).
	WriteLog bool      `json:"write_log"`
	HBMM     *HBMMShow `json:"hbmm,omitempty"`
	// Minicopy lists the minicopy bitmaps kept for absent members.
	Minicopy []MinicopyShow `json:"minicopy_bitmaps"`
	// Work is what the bitmap-aware engines did: running ops first, then
	// the last completed ones (most recent last).
	Work      []OpWorkShow `json:"work"`
	Completed []OpWorkShow `json:"completed"`
	// MemberIOErrors and Expulsions count, on this host since the set was
	// mounted, the member I/Os that failed (fencing refusals aside) and
	// the members expelled for it.
	MemberIOErrors uint64 `json:"member_io_errors"`
	Expulsions     uint64 `json:"expulsions"`
}

// HBMMShow is a set's HBMM state.
type HBMMShow struct {
	Enabled bool `json:"enabled"`
	// Policy is the policy in force (its name, or the set's own).
	Policy         string `json:"policy,omitempty"`
	PolicyText     string `json:"policy_text,omitempty"`
	ResetThreshold uint64 `json:"reset_threshold,omitempty"`
	// ActiveOn lists the hosts holding master bitmaps; Candidates the
	// policy's hosts; Gaps the masters that do not yet cover a writer
	// ("master>writer": the writer's handshake is pending).
	ActiveOn    []string `json:"active_on"`
	Candidates  []string `json:"candidates,omitempty"`
	Gaps        []string `json:"gaps,omitempty"`
	WritePolicy string   `json:"write_policy,omitempty"`
	// Under write policy active, on a writer: its active master ("" while
	// it has none: its chunks would need a full merge) and its standbys.
	ActiveMaster string        `json:"active_master,omitempty"`
	Standbys     []StandbyShow `json:"standbys,omitempty"`
	// On a writer: standbys it made its active master without a flush
	// (they were in step), and masters it made cover it by the
	// handshake's flush.
	Takeovers  uint64 `json:"takeovers,omitempty"`
	Handshakes uint64 `json:"handshakes,omitempty"`
	// WriterChunks: on a master, the chunks set in its bitmap of each
	// writer.
	WriterChunks map[string]uint64 `json:"writer_chunks,omitempty"`
	// Bit-set messages this host sent as a writer (one per chunk range
	// not known set), failed attempts, retries after the log dropped a
	// master, and the rate since the set was mounted.
	BitSets          uint64  `json:"bit_sets,omitempty"`
	BitSetFailures   uint64  `json:"bit_set_failures,omitempty"`
	BitSetRetries    uint64  `json:"bit_set_retries,omitempty"`
	BitSetsPerSecond float64 `json:"bit_sets_per_second,omitempty"`
	// BitSetMeanWaitUS is how long a write that sent a bit-set waited for
	// every master's ack, on average, in microseconds.
	BitSetMeanWaitUS float64 `json:"bit_set_mean_wait_us,omitempty"`
	// ModifiedBlocks: "Modified blocks since bitmap creation" (512-byte
	// blocks, whole chunks), and the same in chunks.
	ModifiedBlocks uint64 `json:"modified_blocks"`
	ModifiedChunks uint64 `json:"modified_chunks"`
	Resets         int    `json:"resets"`
}

// StandbyShow is one standby master's state under write policy active,
// as its writer sees it (cmd/internal/standby).
type StandbyShow struct {
	Host string `json:"host"`
	// State: in_step, behind, copying or unusable.
	State string    `json:"state"`
	Since time.Time `json:"since"`
	// Copies of the active bitmap completed, and failed.
	Copies       uint64 `json:"copies"`
	CopyFailures uint64 `json:"copy_failures,omitempty"`
	// Missed counts bit-sets it failed to acknowledge in time.
	Missed      uint64 `json:"missed,omitempty"`
	Outstanding int    `json:"outstanding,omitempty"`
	LastError   string `json:"last_error,omitempty"`
}

// MinicopyShow is one absent member's minicopy bitmap.
type MinicopyShow struct {
	Member    string `json:"member"`
	Chunks    uint64 `json:"chunks"`
	Automatic bool   `json:"automatic"`
	// Gathering: in a cluster, the hosts whose chunks not yet flushed to
	// an expelled member have not reached its automatic bitmap yet.
	Gathering []string `json:"gathering,omitempty"`
	// Writers: in a cluster, the chunks each other host that mounts the
	// set recorded here while the member is away (Chunks is this host's).
	Writers map[string]uint64 `json:"writers,omitempty"`
}

// MemberShow is one member.
type MemberShow struct {
	Path string `json:"path"`
	// Role: "full" or "copy-target".
	Role     string `json:"role"`
	Master   bool   `json:"merge_master,omitempty"`
	ReadCost int    `json:"read_cost"`
	// ProgressPct is a copy target's copy progress, or a merge's on the
	// master; -1 when it has none.
	ProgressPct int `json:"progress_pct"`
}

// OpShow is one merge or copy.
type OpShow struct {
	ID          uint64   `json:"id"`
	Kind        string   `json:"kind"`
	State       string   `json:"state"`
	Host        string   `json:"host,omitempty"`
	LBN         uint64   `json:"lbn"`
	Target      string   `json:"target,omitempty"`
	ProgressPct int      `json:"progress_pct"`
	History     []string `json:"history"`
}

// Pct is the share of the volume below an LBN, rounded down.
func Pct(lbn uint64, size int64) int {
	if size <= 0 {
		return 0
	}
	p := int(int64(lbn) * 512 * 100 / size)
	return min(max(p, 0), 100)
}

// VUState renders OpenVMS's "Virtual Unit State" line.
func VUState(s SetShow) string {
	if len(s.Ops) == 0 {
		return "Steady State"
	}
	var parts []string
	where := ""
	for _, op := range s.Ops {
		what := "Copy"
		switch op.Kind {
		case "full-merge":
			what = "Merge"
		case "minimerge", "controller-minimerge":
			what = "MiniMerge"
		case "minicopy":
			what = "MiniCopy"
		}
		state := "Pending"
		if op.State == "running" {
			state = "Active"
			where = op.Host
		} else if op.State == "suspended" {
			state = "Suspended"
		}
		parts = append(parts, fmt.Sprintf("%s %s (%d%%)", what, state, op.ProgressPct))
	}
	out := strings.Join(parts, ",")
	if where != "" {
		out += " on " + where
	}
	return out
}

// FormatShow renders the report like OpenVMS SHOW SHADOW.
func FormatShow(r ShowReport, full bool) string {
	var b strings.Builder
	if c := r.Cluster; c != nil {
		fmt.Fprintf(&b, "Cluster (leader %s):\n", c.Leader)
		for _, h := range c.Hosts {
			var tags []string
			if h.Leader {
				tags = append(tags, "leader")
			}
			if h.Witness {
				tags = append(tags, "witness")
			}
			if h.Voter {
				tags = append(tags, "voter")
			} else {
				tags = append(tags, "non-voter")
			}
			lease := ""
			if h.Lease != "" {
				lease = "lease " + h.Lease
				if h.LeaseLeftMs != nil && h.Lease == "valid" {
					lease += fmt.Sprintf(" (%d ms left)", *h.LeaseLeftMs)
				}
			}
			fmt.Fprintf(&b, "  Host %-12s %-7s %-22s %s\n", h.Host, h.State, strings.Join(tags, ","), lease)
		}
		quorum := "yes"
		if !c.Quorum {
			quorum = "NO"
		}
		auth := "mutual TLS (cluster key)"
		if !c.Authenticated {
			auth = "NOT authenticated"
		}
		fmt.Fprintf(&b, "  Quorum: %s   On no quorum: %s   Transport: %s   Recovery delay: %d ms   Core level: %d (this build %d)\n", quorum, c.OnNoQuorum, auth, c.RecoveryDelayMs, c.CoreLevel, c.BuildLevel)
		if f := c.Fence; f != nil {
			fmt.Fprintf(&b, "  Fencing: lease %d ms, watchdog %d ms (pid %d), needs a recovery delay of %d ms; member I/O outstanding %d, waited %d, refused %d; lapses %d\n",
				f.LeaseMs, f.WatchdogMs, f.WatchdogPID, f.RequiredDelayMs, f.Outstanding, f.Waited, f.Refused, f.Lapses)
			if f.LastFenced != "" {
				fmt.Fprintf(&b, "  Fenced: %s\n", f.LastFenced)
			}
		}
		for _, w := range c.Warnings {
			fmt.Fprintf(&b, "  WARNING: %s\n", w)
		}
		if r.DelayLeftMs != nil {
			fmt.Fprintf(&b, "  Recovery delay open: %d ms left\n", *r.DelayLeftMs)
		}
		b.WriteString("\n")
	}
	if len(r.Sets) == 0 {
		fmt.Fprintf(&b, "No shadow sets mounted on %s\n", r.Host)
		return b.String()
	}
	for i, s := range r.Sets {
		if i > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "_%s:  Volume Label: %s\n", s.Name, s.Name)
		fmt.Fprintf(&b, "Virtual Unit State: %s\n", s.State)
		fmt.Fprintf(&b, "  Size               %d bytes\n", s.SizeBytes)
		if s.NBDURI != "" {
			fmt.Fprintf(&b, "  NBD export         %s\n", s.NBDURI)
		}
		fmt.Fprintf(&b, "  Copy/Merge Priority %d\n", s.Priority)
		switch {
		case s.HBMM != nil && s.HBMM.Enabled:
			b.WriteString("  Enhanced Shadowing Features in use:\n      Host-Based Minimerge (HBMM)\n")
			b.WriteString("  HBMM Policy\n")
			if s.HBMM.Policy != "" {
				fmt.Fprintf(&b, "    Policy: %s\n", s.HBMM.Policy)
			}
			fmt.Fprintf(&b, "    HBMM Reset Threshold: %d\n", s.HBMM.ResetThreshold)
			if len(s.HBMM.ActiveOn) > 0 {
				fmt.Fprintf(&b, "    HBMM bitmaps are active on %s\n", strings.Join(s.HBMM.ActiveOn, ","))
			} else {
				b.WriteString("    HBMM bitmaps are not active (no master host has the set mounted)\n")
			}
			fmt.Fprintf(&b, "    Modified blocks since bitmap creation: %d\n", s.HBMM.ModifiedBlocks)
			if s.HBMM.WritePolicy != "" && len(s.HBMM.Candidates) > 0 {
				fmt.Fprintf(&b, "    Write policy: %s; candidates %s\n", s.HBMM.WritePolicy, strings.Join(s.HBMM.Candidates, ","))
			}
			active := s.HBMM.WritePolicy == "active"
			for _, g := range s.HBMM.Gaps {
				master, writer, _ := strings.Cut(g, ">")
				if active {
					fmt.Fprintf(&b, "    %s is a standby for %s (a minimerge counts only on its active master)\n", master, writer)
					continue
				}
				fmt.Fprintf(&b, "    %s does not cover %s yet (handshake pending)\n", master, writer)
			}
			if active && len(s.HBMM.ActiveOn) > 1 {
				fmt.Fprintf(&b, "    This host's active master: %s\n", cmp.Or(s.HBMM.ActiveMaster, "none (a failure of this host needs a full merge until its handshake)"))
			}
			if s.HBMM.Takeovers+s.HBMM.Handshakes > 0 {
				fmt.Fprintf(&b, "    Masters made to cover this host: %d by a standby in step, %d by handshake\n", s.HBMM.Takeovers, s.HBMM.Handshakes)
			}
			for _, sb := range s.HBMM.Standbys {
				fmt.Fprintf(&b, "    Standby %s: %s since %s, copies %d", sb.Host, sb.State, sb.Since.Format(time.TimeOnly), sb.Copies)
				if sb.Missed > 0 {
					fmt.Fprintf(&b, ", missed %d", sb.Missed)
				}
				if sb.CopyFailures > 0 {
					fmt.Fprintf(&b, ", failed copies %d (%s)", sb.CopyFailures, sb.LastError)
				}
				b.WriteString("\n")
			}
			for _, w := range slices.Sorted(maps.Keys(s.HBMM.WriterChunks)) {
				fmt.Fprintf(&b, "    Chunks set for writer %s on this master: %d\n", w, s.HBMM.WriterChunks[w])
			}
			if s.HBMM.BitSets > 0 {
				fmt.Fprintf(&b, "    Bit-set messages sent: %d (%.1f/s, mean wait %.0f µs), failed %d, retried %d\n", s.HBMM.BitSets, s.HBMM.BitSetsPerSecond, s.HBMM.BitSetMeanWaitUS, s.HBMM.BitSetFailures, s.HBMM.BitSetRetries)
			}
		case s.WriteLog:
			b.WriteString("  Enhanced Shadowing Features in use:\n      Write logs (controller minimerge)\n")
		}
		for _, mc := range s.Minicopy {
			fmt.Fprintf(&b, "  Minicopy bitmap for %s: %d chunks", mc.Member, mc.Chunks)
			for _, w := range slices.Sorted(maps.Keys(mc.Writers)) {
				fmt.Fprintf(&b, ", %d from %s", mc.Writers[w], w)
			}
			b.WriteString("\n")
		}
		if full {
			fmt.Fprintf(&b, "  Mounted on         %s\n", strings.Join(s.Mounted, ","))
		}
		for _, m := range s.Members {
			role := "ShadowSetMember"
			switch {
			case m.Role == "copy-target":
				role = fmt.Sprintf("Copy Target (%d%%)", max(m.ProgressPct, 0))
			case m.Master && m.ProgressPct >= 0:
				role = fmt.Sprintf("Master Member, Merging (%d%%)", m.ProgressPct)
			case m.Master:
				role = "Master Member"
			}
			fmt.Fprintf(&b, "  Device %-30s %s\n", m.Path, role)
			fmt.Fprintf(&b, "    Read Cost          %d\n", m.ReadCost)
		}
		if full {
			for _, op := range s.Ops {
				fmt.Fprintf(&b, "  Op %d %s %s", op.ID, op.Kind, op.State)
				if op.Host != "" {
					fmt.Fprintf(&b, " on %s", op.Host)
				}
				fmt.Fprintf(&b, " at LBN %d (%d%%)", op.LBN, op.ProgressPct)
				if op.Target != "" {
					fmt.Fprintf(&b, " target %s", op.Target)
				}
				if len(op.History) > 0 {
					fmt.Fprintf(&b, " history %s", strings.Join(op.History, ","))
				}
				b.WriteString("\n")
			}
			for _, w := range s.Work {
				fmt.Fprintf(&b, "  Op %d %s: %s\n", w.ID, w.Kind, w.describe())
			}
			for _, w := range s.Completed {
				fmt.Fprintf(&b, "  Op %d %s completed: %s\n", w.ID, w.Kind, w.describe())
			}
		}
	}
	return b.String()
}

// ProgressBar renders a bar for `show --watch`.
func ProgressBar(p, width int) string {
	p = min(max(p, 0), 100)
	filled := p * width / 100
	return "[" + strings.Repeat("#", filled) + strings.Repeat(".", width-filled) + fmt.Sprintf("] %3d%%", p)
}

func (w OpWorkShow) describe() string {
	s := fmt.Sprintf("%d bytes", w.BytesDone)
	if w.BitmapChunks > 0 {
		s = fmt.Sprintf("%d of %d bitmap chunks (%d bytes)", w.ChunksDone, w.BitmapChunks, w.BytesDone)
	}
	if w.Windows > 0 {
		s += fmt.Sprintf(", %d windows (%d ms waiting for other hosts)", w.Windows, w.WindowWaitMS)
	}
	return s
}

// PolicyShow lists the HBMM policies (show --policy hbmm).
type PolicyShow struct {
	Name   string `json:"name"`
	Policy string `json:"policy"`
}

// FormatPolicies renders show --policy hbmm.
func FormatPolicies(ps []PolicyShow) string {
	if len(ps) == 0 {
		return "No HBMM policies defined\n"
	}
	var b strings.Builder
	for _, p := range ps {
		fmt.Fprintf(&b, "HBMM Policy %s: %s\n", p.Name, p.Policy)
	}
	return b.String()
}

// OpWorkShow is the work of a running or recently completed op.
type OpWorkShow struct {
	ID   uint64 `json:"id"`
	Kind string `json:"kind"`
	// BitmapChunks is how many chunks the op's bitmap holds (minimerge,
	// controller minimerge, minicopy); 0 for full ops.
	BitmapChunks uint64 `json:"bitmap_chunks"`
	// ChunksDone is how many chunks the op has merged or copied (of
	// ChunkBytes each; full ops count 1 MiB steps).
	ChunksDone uint64 `json:"chunks_done"`
	ChunkBytes int64  `json:"chunk_bytes"`
	BytesDone  int64  `json:"bytes_done"`
	// ElapsedMS is the engine's running time (this run of the op), in
	// milliseconds: recovery delays are not in it.
	ElapsedMS int64 `json:"elapsed_ms"`
	// Windows is how many windows the op claimed on a shared set (a log
	// entry and a round of every other host's acks each), WindowWaitMS
	// the time it spent waiting for them; both 0 off a cluster.
	Windows      uint64 `json:"windows,omitempty"`
	WindowWaitMS int64  `json:"window_wait_ms,omitempty"`
}

// ClusterShow is the cluster part of show.
type ClusterShow struct {
	Leader  string           `json:"leader"`
	Hosts   []HostShow       `json:"hosts"`
	Servers []cluster.Server `json:"raft_servers"`
	// Warnings: e.g. the cluster could not survive the loss of one host.
	Warnings []string `json:"warnings,omitempty"`
	// Quorum: this host reaches a leader and holds a valid lease (a
	// witness: reaches a leader).
	Quorum bool `json:"quorum"`
	// OnNoQuorum is what member I/O does without a lease: suspend-io or
	// io-error.
	OnNoQuorum string `json:"on_no_quorum"`
	// Authenticated: raft and the streams between agents are mutual TLS
	// keyed by the cluster key.
	Authenticated   bool  `json:"transport_authenticated"`
	RecoveryDelayMs int64 `json:"recovery_delay_ms"`
	// CoreLevel is the cluster's core level (rolling upgrades), BuildLevel
	// this host's build's; Behind lists the hosts below BuildLevel.
	CoreLevel  int      `json:"core_level"`
	BuildLevel int      `json:"build_level"`
	Behind     []string `json:"behind,omitempty"`
	// Fence is this host's lease and watchdog (absent: no lease, as on a
	// witness).
	Fence *FenceShow `json:"fence,omitempty"`
}

// FenceShow is this host's fencing state.
type FenceShow struct {
	LeaseMs    int64 `json:"lease_ms"`
	WatchdogMs int64 `json:"watchdog_ms"`
	// RequiredDelayMs: the least recovery delay that is safe with them,
	// (L+W)(1+ρ)² + margin.
	RequiredDelayMs int64 `json:"required_delay_ms"`
	WatchdogPID     int   `json:"watchdog_pid"`
	// Outstanding member I/Os; Refused: failed for want of a lease;
	// Waited: waited for one; Lapses: times the lease lapsed under I/O.
	Outstanding int64  `json:"outstanding_io"`
	Refused     uint64 `json:"refused_io"`
	Waited      uint64 `json:"waited_io"`
	Lapses      uint64 `json:"lapses"`
	LastFenced  string `json:"last_fenced,omitempty"`
}

// HostShow is one host in the cluster view.
type HostShow struct {
	Host    string `json:"host"`
	State   string `json:"state"` // up, failed, left (stopped cleanly)
	Gossip  bool   `json:"gossip"`
	Witness bool   `json:"witness,omitempty"`
	Leader  bool   `json:"leader,omitempty"`
	Voter   bool   `json:"voter,omitempty"`
	// Lease as this host sees it: valid, lapsed, fenced (failed), none
	// (a witness, or fencing off); LeaseLeftMs for this host only.
	Lease       string `json:"lease,omitempty"`
	LeaseLeftMs *int64 `json:"lease_left_ms,omitempty"`
}
