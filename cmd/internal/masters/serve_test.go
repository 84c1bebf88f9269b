package masters

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/bitmap/wire"
)

// pipeDeadline only keeps a broken test from hanging until the global
// timeout; no test waits for it to pass.
const pipeDeadline = 30 * time.Second

// logBuffer collects zerolog's JSON lines from several goroutines.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) logger() zerolog.Logger { return zerolog.New(l) }

// entries returns the logged lines at or above level.
func (l *logBuffer) entries(t *testing.T, level zerolog.Level) []map[string]any {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	for line := range strings.Lines(l.b.String()) {
		var e map[string]any
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		lv, err := zerolog.ParseLevel(e["level"].(string))
		if err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if lv >= level {
			out = append(out, e)
		}
	}
	return out
}

func encode(t testing.TB, f *wire.Frame) []byte {
	t.Helper()
	b, err := wire.AppendFrame(nil, f)
	if err != nil {
		t.Fatalf("encode %+v: %v", f, err)
	}
	return b
}

// rawPeer is a writer that speaks to Serve byte by byte, so that tests can
// send what a real Pool never would.
type rawPeer struct {
	conn net.Conn
	br   *bufio.Reader
	done chan struct{} // closed when Serve returns
	logs *logBuffer
	stop context.CancelFunc
}

// startServe runs Serve as master "m1" (incarnation 9) over net.Pipe and
// sends first (normally a Hello from writer "w1").
func startServe(t *testing.T, st *Store, first []byte) *rawPeer {
	t.Helper()
	cli, srv := net.Pipe()
	cli.SetDeadline(time.Now().Add(pipeDeadline))
	ctx, cancel := context.WithCancel(context.Background())
	p := &rawPeer{conn: cli, br: bufio.NewReader(cli), done: make(chan struct{}), logs: &logBuffer{}, stop: cancel}
	go func() {
		defer close(p.done)
		Serve(ctx, srv, "m1", 9, st, p.logs.logger())
	}()
	t.Cleanup(func() {
		cancel()
		cli.Close()
		<-p.done
	})
	// Serve sends its Hello from its own writer goroutine, so ours can go
	// first even on an unbuffered pipe.
	if _, err := cli.Write(first); err != nil {
		t.Fatalf("write first frame: %v", err)
	}
	hello, err := wire.ReadFrame(p.br)
	if err != nil {
		t.Fatalf("read master's hello: %v", err)
	}
	if hello.Kind != wire.KindHello || hello.Host != "m1" || hello.Inc != 9 {
		t.Fatalf("master's hello: %+v", hello)
	}
	return p
}

func helloFrom(t *testing.T, host string) []byte {
	return encode(t, &wire.Frame{Kind: wire.KindHello, Host: host, Inc: 3})
}

func (p *rawPeer) roundTrip(t *testing.T, f *wire.Frame) *wire.Frame {
	t.Helper()
	if _, err := p.conn.Write(encode(t, f)); err != nil {
		t.Fatalf("write %v: %v", f.Kind, err)
	}
	r, err := wire.ReadFrame(p.br)
	if err != nil {
		t.Fatalf("reply to %v: %v", f.Kind, err)
	}
	if r.Seq != f.Seq {
		t.Fatalf("reply to seq %d has seq %d", f.Seq, r.Seq)
	}
	return r
}

func TestServeAnswers(t *testing.T) {
	st := openStore(t, "DSA1")
	p := startServe(t, st, helloFrom(t, "w1"))

	r := p.roundTrip(t, &wire.Frame{Kind: wire.KindBitSet, Seq: 1, Set: "DSA1", Writer: "w1", Ranges: []wire.Range{chunkSpan(3, 3)}})
	if r.Kind != wire.KindAck || r.Err != "" {
		t.Fatalf("bit-set reply: %+v", r)
	}
	r = p.roundTrip(t, &wire.Frame{Kind: wire.KindBitSet, Seq: 2, Set: "DSA1", Writer: "w1", Ranges: []wire.Range{chunkSpan(0, 5)}})
	if r.Kind != wire.KindAck || r.Err != "" {
		t.Fatalf("bit-set reply: %+v", r)
	}
	r = p.roundTrip(t, &wire.Frame{Kind: wire.KindRollback, Seq: 2, Set: "DSA1", Writer: "w1"})
	if r.Kind != wire.KindAck || r.Err != "" {
		t.Fatalf("rollback reply: %+v", r)
	}
	r = p.roundTrip(t, &wire.Frame{Kind: wire.KindFetch, Seq: 3, Set: "DSA1", Writer: "w1"})
	if r.Kind != wire.KindBitmap || r.Err != "" {
		t.Fatalf("fetch reply: %+v", r)
	}
	b, err := bitmap.Decode(r.Bitmap)
	if err != nil {
		t.Fatalf("fetched bitmap: %v", err)
	}
	if b.Count() != 1 || !b.Contains(3) {
		t.Fatalf("fetched %d chunks, want chunk 3 only", b.Count())
	}

	r = p.roundTrip(t, &wire.Frame{Kind: wire.KindBitSet, Seq: 4, Set: "DSA9", Writer: "w1", Ranges: []wire.Range{chunkSpan(1, 1)}})
	if r.Kind != wire.KindAck || !strings.Contains(r.Err, "not open") {
		t.Fatalf("bit-set on an unopened set: %+v", r)
	}
	r = p.roundTrip(t, &wire.Frame{Kind: wire.KindFetch, Seq: 5, Set: "DSA1", Writer: "nobody"})
	if r.Kind != wire.KindBitmap || r.Err == "" || r.Bitmap != nil {
		t.Fatalf("fetch of an unknown writer: %+v", r)
	}
	// A writer changes only its own bitmaps, never another writer's nor
	// the master's own (its tracker fills that one).
	for _, other := range []string{"w2", "m1"} {
		r = p.roundTrip(t, &wire.Frame{Kind: wire.KindBitSet, Seq: 6, Set: "DSA1", Writer: other, Ranges: []wire.Range{chunkSpan(9, 9)}})
		if r.Kind != wire.KindAck || !strings.Contains(r.Err, "may not change") {
			t.Fatalf("bit-set for %s from w1: %+v", other, r)
		}
		r = p.roundTrip(t, &wire.Frame{Kind: wire.KindRollback, Seq: 6, Set: "DSA1", Writer: other})
		if r.Kind != wire.KindAck || !strings.Contains(r.Err, "may not change") {
			t.Fatalf("rollback for %s from w1: %+v", other, r)
		}
	}
	if got := st.Writers("DSA1"); got["w1"] != 1 || len(got) != 1 {
		t.Fatalf("store holds %v, want 1 chunk of w1 only", got)
	}
	// A reset: only of the writer's own bitmap, checked against the
	// writer's incarnation from its Hello (3), numbered after its last
	// bit-set.
	var incs []uint64
	st.SetResetCheck(func(set, writer string, inc uint64) error { incs = append(incs, inc); return nil })
	for _, other := range []string{"w2", "m1"} {
		r = p.roundTrip(t, &wire.Frame{Kind: wire.KindReset, Seq: 7, Set: "DSA1", Writer: other})
		if r.Kind != wire.KindAck || !strings.Contains(r.Err, "may not change") {
			t.Fatalf("reset for %s from w1: %+v", other, r)
		}
	}
	r = p.roundTrip(t, &wire.Frame{Kind: wire.KindReset, Seq: 7, Set: "DSA1", Writer: "w1"})
	if r.Kind != wire.KindAck || r.Err != "" {
		t.Fatalf("reset reply: %+v", r)
	}
	if got := st.Writers("DSA1"); got["w1"] != 0 || !slices.Equal(incs, []uint64{3}) {
		t.Fatalf("after the reset the store holds %v (checked incarnations %v), want w1 empty, checked with 3", got, incs)
	}
}

// bitSetBody is the body of a valid bit-set of chunks 20-29 of w1's DSA1.
func bitSetBody(t *testing.T) []byte {
	return encode(t, &wire.Frame{Kind: wire.KindBitSet, Seq: 7, Set: "DSA1", Writer: "w1", Ranges: []wire.Range{chunkSpan(20, 29)}})[4:]
}

func withPrefix(body []byte) []byte {
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...)
}

func TestServeClosesOnBadFrame(t *testing.T) {
	cases := []struct {
		name  string
		frame func(t *testing.T) []byte
		want  string // in the logged error
	}{
		{"trailing byte", func(t *testing.T) []byte { return withPrefix(append(bitSetBody(t), 0)) }, "malformed"},
		{"reversed range", func(t *testing.T) []byte {
			b := []byte{wire.Version, byte(wire.KindBitSet), 7, 4, 'D', 'S', 'A', '1', 2, 'w', '1', 1, 29, 20}
			return withPrefix(b)
		}, "malformed"},
		{"wrong version", func(t *testing.T) []byte {
			b := bitSetBody(t)
			b[0] = wire.Version + 1
			return withPrefix(b)
		}, "version"},
		{"unknown kind", func(t *testing.T) []byte { return withPrefix([]byte{wire.Version, 42, 7}) }, "malformed"},
		// A reset clears a bitmap: one that does not decode must not.
		{"reset of another version", func(t *testing.T) []byte {
			b := encode(t, &wire.Frame{Kind: wire.KindReset, Seq: 9, Set: "DSA1", Writer: "w1"})[4:]
			b[0] = wire.Version + 1
			return withPrefix(b)
		}, "version"},
		{"truncated reset", func(t *testing.T) []byte {
			b := encode(t, &wire.Frame{Kind: wire.KindReset, Seq: 9, Set: "DSA1", Writer: "w1"})[4:]
			return withPrefix(b[:len(b)-1])
		}, "malformed"},
		{"zero length", func(t *testing.T) []byte { return []byte{0, 0, 0, 0} }, "malformed"},
		{"ack sent to a master", func(t *testing.T) []byte { return encode(t, &wire.Frame{Kind: wire.KindAck, Seq: 7}) }, "protocol"},
		{"second hello", func(t *testing.T) []byte { return helloFrom(t, "w1") }, "protocol"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			st := openStore(t, "DSA1")
			p := startServe(t, st, helloFrom(t, "w1"))
			// A good frame first: the stream works, and what it applied
			// must survive the bad frame.
			if r := p.roundTrip(t, &wire.Frame{Kind: wire.KindBitSet, Seq: 1, Set: "DSA1", Writer: "w1", Ranges: []wire.Range{chunkSpan(0, 3)}}); r.Err != "" {
				t.Fatalf("good bit-set refused: %s", r.Err)
			}
			if _, err := p.conn.Write(c.frame(t)); err != nil {
				t.Fatalf("write the bad frame: %v", err)
			}
			if f, err := wire.ReadFrame(p.br); err != io.EOF {
				t.Fatalf("after the bad frame: read %+v, %v; want the stream closed", f, err)
			}
			<-p.done
			if got := st.Writers("DSA1"); len(got) != 1 || got["w1"] != 4 {
				t.Fatalf("store after the bad frame: %v, want w1 with 4 chunks", got)
			}
			bad := p.logs.entries(t, zerolog.WarnLevel)
			if len(bad) != 1 {
				t.Fatalf("%d warning or error lines, want 1: %v", len(bad), bad)
			}
			e := bad[0]
			if e["level"] != "error" || e["component"] != "masters" || e["peer"] != "w1" ||
				!strings.Contains(e["error"].(string), c.want) {
				t.Fatalf("log line %v: want level error, component masters, peer w1, error mentioning %q", e, c.want)
			}
		})
	}
}

// TestServeAnswersFramesBeforeABadOne: a bit-set applied just before a bad
// frame arrives is still acknowledged, so its writer does not count as
// failed a bit-set the master holds.
func TestServeAnswersFramesBeforeABadOne(t *testing.T) {
	st := openStore(t, "DSA1")
	p := startServe(t, st, helloFrom(t, "w1"))
	good := encode(t, &wire.Frame{Kind: wire.KindBitSet, Seq: 1, Set: "DSA1", Writer: "w1", Ranges: []wire.Range{chunkSpan(0, 3)}})
	bad := withPrefix(append(bitSetBody(t), 0))
	// One write, so the master reads both before any reply goes out.
	if _, err := p.conn.Write(append(good, bad...)); err != nil {
		t.Fatal(err)
	}
	if r, err := wire.ReadFrame(p.br); err != nil || r.Kind != wire.KindAck || r.Seq != 1 || r.Err != "" {
		t.Fatalf("reply to the good frame: %+v, %v", r, err)
	}
	if f, err := wire.ReadFrame(p.br); err != io.EOF {
		t.Fatalf("after the bad frame: %+v, %v; want the stream closed", f, err)
	}
	<-p.done
	if got := st.Writers("DSA1")["w1"]; got != 4 {
		t.Fatalf("store holds %d chunks, want the good frame's 4", got)
	}
}

func TestServeWantsHelloFirst(t *testing.T) {
	st := openStore(t, "DSA1")
	cli, srv := net.Pipe()
	cli.SetDeadline(time.Now().Add(pipeDeadline))
	defer cli.Close()
	logs := &logBuffer{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Serve(context.Background(), srv, "m1", 9, st, logs.logger())
	}()
	br := bufio.NewReader(cli)
	if _, err := wire.ReadFrame(br); err != nil {
		t.Fatalf("master's hello: %v", err)
	}
	bitSet := encode(t, &wire.Frame{Kind: wire.KindBitSet, Seq: 1, Set: "DSA1", Writer: "w1", Ranges: []wire.Range{chunkSpan(0, 3)}})
	if _, err := cli.Write(bitSet); err != nil {
		t.Fatal(err)
	}
	if f, err := wire.ReadFrame(br); err != io.EOF {
		t.Fatalf("after a bit-set without hello: %+v, %v; want the stream closed", f, err)
	}
	<-done
	if got := st.Writers("DSA1"); len(got) != 0 {
		t.Fatalf("bit-set before hello applied: %v", got)
	}
	if bad := logs.entries(t, zerolog.ErrorLevel); len(bad) != 1 || !strings.Contains(bad[0]["error"].(string), "hello") {
		t.Fatalf("error lines %v, want one about the missing hello", bad)
	}
}

func TestServeStopsWithContext(t *testing.T) {
	st := openStore(t, "DSA1")
	p := startServe(t, st, helloFrom(t, "w1"))
	p.stop()
	if f, err := wire.ReadFrame(p.br); err != io.EOF {
		t.Fatalf("after cancel: %+v, %v; want the stream closed", f, err)
	}
	<-p.done
	if bad := p.logs.entries(t, zerolog.WarnLevel); len(bad) != 0 {
		t.Fatalf("a shutdown logged as a problem: %v", bad)
	}
}

func TestErrText(t *testing.T) {
	if errText(nil) != "" {
		t.Fatal("nil error has text")
	}
	long := errors.New(strings.Repeat("é", wire.MaxString)) // 2 bytes each
	s := errText(long)
	if len(s) > wire.MaxString || len(s) < wire.MaxString-1 || !strings.HasPrefix(long.Error(), s) {
		t.Fatalf("cut to %d bytes: %q", len(s), s)
	}
	if _, err := wire.AppendFrame(nil, &wire.Frame{Kind: wire.KindAck, Seq: 1, Err: s}); err != nil {
		t.Fatalf("cut text does not fit an ack: %v", err)
	}
	// Invalid UTF-8 in the text is passed on, not a reason to drop it.
	odd := errText(errors.New("\xff" + strings.Repeat("x", 2*wire.MaxString)))
	if len(odd) != wire.MaxString {
		t.Fatalf("text with invalid UTF-8 cut to %d bytes", len(odd))
	}
	if errText(errors.New("")) == "" {
		t.Fatal("an error without text became an empty Err, which means success")
	}
}
