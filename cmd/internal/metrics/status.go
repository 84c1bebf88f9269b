package metrics

import (
	_ "embed"
	"encoding/json"
	"net/http"
	"sync/atomic"

	"github.com/shadow-project/shadow/cmd/internal/report"
)

// The status page: one plain HTML page (status.html) whose script polls
// /status.json twice a second and redraws the cluster's hosts, each set's
// members, ops with progress bars, HBMM bitmaps, and the recent events.
// Polling, not server-sent events: a show report is small, and a page
// left open in a browser tab then costs one request per half second and
// no connection held in the agent.

//go:embed status.html
var statusPage []byte

// EventSource is what the status page needs beyond the show report: the
// recent ordered-log events, as replay lines (the cluster's, in a
// cluster), and the members expelled after an I/O error that have not
// come back, by set.
type EventSource interface {
	RecentEvents(n int) (lines []string, expelled map[string][]string)
}

// Status is /status.json.
type Status struct {
	Report   report.ShowReport   `json:"report"`
	Events   []string            `json:"events"`
	Expelled map[string][]string `json:"expelled"`
	Error    string              `json:"error,omitempty"`
}

// recentEvents is how many events the page shows.
const recentEvents = 30

type statusHandler struct {
	src atomic.Pointer[Source]
}

func (h *statusHandler) page(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/" {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_, _ = w.Write(statusPage)
}

func (h *statusHandler) json(w http.ResponseWriter, r *http.Request) {
	st := Status{Events: []string{}, Expelled: map[string][]string{}}
	if p := h.src.Load(); p == nil {
		st.Error = "the agent is starting"
	} else {
		src := *p
		rep, err := src.Show("")
		if err != nil {
			st.Error = err.Error()
		}
		st.Report = rep
		if es, ok := src.(EventSource); ok {
			st.Events, st.Expelled = es.RecentEvents(recentEvents)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(st)
}
