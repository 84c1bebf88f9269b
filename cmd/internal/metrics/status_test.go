package metrics

import (
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/shadow-project/shadow/cmd/internal/report"
)

type eventSource struct{ *fakeSource }

func (eventSource) RecentEvents(n int) ([]string, map[string][]string) {
	return []string{"io-error DSA1 /m2 on=A"}, map[string][]string{"DSA1": {"/m2"}}
}

func serveStatus(t *testing.T, src Source) string {
	t.Helper()
	m := New()
	if src != nil {
		m.SetSource(src)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := m.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String()
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestStatusPageAndData(t *testing.T) {
	base := serveStatus(t, eventSource{&fakeSource{r: report.ShowReport{Host: "A", Sets: []report.SetShow{{Name: "DSA1"}}}}})
	code, page := get(t, base+"/")
	if code != http.StatusOK || !strings.Contains(page, "/status.json") {
		t.Fatalf("/: %d, the page does not poll /status.json", code)
	}
	if code, _ := get(t, base+"/nothing"); code != http.StatusNotFound {
		t.Fatalf("/nothing: %d, want 404", code)
	}
	code, body := get(t, base+"/status.json")
	var st Status
	if err := json.Unmarshal([]byte(body), &st); err != nil || code != http.StatusOK {
		t.Fatalf("/status.json: %d %v: %s", code, err, body)
	}
	if st.Report.Host != "A" || len(st.Report.Sets) != 1 || len(st.Events) != 1 || st.Expelled["DSA1"][0] != "/m2" || st.Error != "" {
		t.Fatalf("/status.json = %+v", st)
	}
}

func TestStatusDataErrors(t *testing.T) {
	var st Status
	_, body := get(t, serveStatus(t, nil)+"/status.json")
	if err := json.Unmarshal([]byte(body), &st); err != nil || st.Error == "" {
		t.Fatalf("before the agent exists: %v %+v", err, st)
	}
	_, body = get(t, serveStatus(t, &fakeSource{err: errors.New("show failed")})+"/status.json")
	st = Status{}
	if err := json.Unmarshal([]byte(body), &st); err != nil || st.Error != "show failed" || st.Events == nil {
		t.Fatalf("a failing show: %v %+v", err, st)
	}
}
