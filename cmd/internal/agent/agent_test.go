package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/shadow-project/shadow/cmd/internal/device"
	"github.com/shadow-project/shadow/cmd/internal/meta"
	"github.com/shadow-project/shadow/shadowset"
)

const testData = 16 << 20 // volume bytes per member

// shortDir is a temp folder with a short path: unix socket names are
// limited to 108 bytes.
func shortDir(t *testing.T) string {
	d, err := os.MkdirTemp("", "sh")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func makeMember(t *testing.T, path string) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, testData+meta.ReservedSize); err != nil {
		t.Fatal(err)
	}
}

func startAgent(t *testing.T, dir string, open func(string, device.Options) (device.Device, error)) *Agent {
	t.Helper()
	a, err := New(Config{Host: "A", Socket: filepath.Join(dir, "a.sock"), NBDUnix: filepath.Join(dir, "n.sock"),
		CleanAfter: time.Hour, Logger: zerolog.Nop(), OpenDevice: open})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// faultyOpener opens members through device.Faulty (armed for power loss
// if asked) and gives the test the wrappers by path.
func faultyOpener(powerLoss bool) (func(string, device.Options) (device.Device, error), func() map[string]*device.Faulty) {
	var mu sync.Mutex
	opened := map[string]*device.Faulty{}
	open := func(p string, o device.Options) (device.Device, error) {
		d, err := device.Open(p, o)
		if err != nil {
			return nil, err
		}
		f := device.NewFaulty(d)
		if powerLoss {
			f.PowerLoss()
		}
		mu.Lock()
		opened[p] = f
		mu.Unlock()
		return f, nil
	}
	return open, func() map[string]*device.Faulty {
		mu.Lock()
		defer mu.Unlock()
		return opened
	}
}

// kill stops an agent the way SIGKILL would: nothing is flushed or
// recorded; only the member files are released.
func (a *Agent) kill() {
	a.halt()
	a.release()
}

// halt freezes the agent as a crash would: no more requests, events or
// engine steps (a process dies with its engines; here they must stop
// before the devices crash or close, or they would act on the crash).
func (a *Agent) halt() {
	a.api.Close()
	_ = a.nbd.Shutdown(context.Background())
	a.closeListeners()
	a.elog.Close()
	a.stop()
	a.waitStopped(a.runsNow())
}

// release closes the member files of a halted agent.
func (a *Agent) release() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, v := range a.sets {
		close(v.stopCleaner)
		for _, m := range v.members {
			m.dev.Close()
		}
		for _, d := range v.retired {
			d.Close()
		}
	}
}

// waitIdle waits until the set has no merge or copy.
func waitIdle(t *testing.T, a *Agent, set string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		r, err := a.Show(set)
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Sets[0].Ops) == 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	r, _ := a.Show(set)
	t.Fatalf("%s still busy: %+v", set, r.Sets[0].Ops)
}

func dataOf(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b[:testData]
}

func TestCreateWriteRemountClean(t *testing.T) {
	dir := shortDir(t)
	m1, m2 := filepath.Join(dir, "m1"), filepath.Join(dir, "m2")
	makeMember(t, m1)
	makeMember(t, m2)
	a := startAgent(t, dir, nil)
	res, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Created || res.Size != testData || len(res.Copies) != 1 {
		t.Fatalf("mount result %+v", res)
	}
	waitIdle(t, a, "DSA1")
	v := a.sets["DSA1"].vu
	if err := v.WriteAt(bytes.Repeat([]byte("shadow"), 1000), 12345, true); err != nil {
		t.Fatal(err)
	}
	if err := a.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dataOf(t, m1), dataOf(t, m2)) {
		t.Fatal("members differ after an orderly shutdown")
	}
	// Clean: the next mount needs no merge and no copy.
	a = startAgent(t, dir, nil)
	defer a.Shutdown(context.Background())
	res, err = a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}})
	if err != nil {
		t.Fatal(err)
	}
	r, _ := a.Show("DSA1")
	if res.Created || len(res.Copies) != 0 || len(r.Sets[0].Ops) != 0 {
		t.Fatalf("remount of a clean set: %+v, ops %+v", res, r.Sets[0].Ops)
	}
}

// TestPowerLossCrashes: ten power losses through the fault-injecting
// device. Each restart runs a full merge; every write acknowledged before
// a FLUSH is still readable; the members end identical.
func TestPowerLossCrashes(t *testing.T) { powerLossRounds(t, false) }

// TestPowerLossCrashesWithWriteLogs: the same with write logs. Each
// restart runs a controller minimerge of the logged extents only (the
// writes stay in the first 4 MiB extent of the 16 MiB volume), except
// where a merge was already underway: every fourth round crashes again
// during the recovery merge, and the mount after that runs a full merge
// (Table 8-1's mount row).
func TestPowerLossCrashesWithWriteLogs(t *testing.T) { powerLossRounds(t, true) }

func powerLossRounds(t *testing.T, writeLog bool) {
	dir := shortDir(t)
	m1, m2 := filepath.Join(dir, "m1"), filepath.Join(dir, "m2")
	makeMember(t, m1)
	makeMember(t, m2)
	a := startAgent(t, dir, nil)
	if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}, WriteLog: writeLog}); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, a, "DSA1")
	if err := a.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	span := testData // where the writes go
	if writeLog {
		span = 4 << 20
	}
	durable := make([]byte, testData) // what every flushed write left
	copy(durable, dataOf(t, m1))
	rng := rand.New(rand.NewPCG(42, 7))
	crashAll := func(a *Agent, faulty func() map[string]*device.Faulty) {
		a.halt()
		for _, f := range faulty() {
			if err := f.Crash(); err != nil {
				t.Fatal(err)
			}
		}
		a.release()
	}
	for round := range 10 {
		open, faulty := faultyOpener(true)
		a := startAgent(t, dir, open)
		if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}}); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if r, _ := a.Show("DSA1"); r.Sets[0].WriteLog != writeLog {
			t.Fatalf("round %d: write log %v after remount, want %v", round, r.Sets[0].WriteLog, writeLog)
		}
		if round > 0 {
			waitIdle(t, a, "DSA1") // the merge the crash required
		}
		v := a.sets["DSA1"].vu
		type write struct {
			off int64
			buf []byte
		}
		var pending []write // unflushed, in order: later ones win
		for range 40 + rng.IntN(40) {
			off := int64(rng.IntN(span/4096)) * 4096
			buf := make([]byte, 4096*(1+rng.IntN(4)))
			for i := range buf {
				buf[i] = byte(rng.UintN(256))
			}
			if off+int64(len(buf)) > int64(span) {
				continue
			}
			if err := v.WriteAt(buf, off, false); err != nil {
				t.Fatal(err)
			}
			pending = append(pending, write{off, buf})
			if rng.IntN(8) == 0 {
				if err := v.Flush(); err != nil {
					t.Fatal(err)
				}
				for _, w := range pending {
					copy(durable[w.off:], w.buf)
				}
				pending = nil
			}
		}
		// Writes not yet flushed may or may not survive: remember both
		// possibilities by taking whatever the merge keeps, below.
		crashAll(a, faulty)
		want := "full-merge"
		if writeLog {
			want = "controller-minimerge"
			if round%4 == 3 {
				// Crash again while the recovery merge runs (its reads
				// slowed down), after it recorded itself underway.
				open, faulty := faultyOpener(true)
				a = startAgent(t, dir, open)
				for _, f := range faulty() {
					f.Inject(device.When(func(op device.Op, off, n int64) bool { return op == device.OpRead && off < testData }, nil, 20*time.Millisecond))
				}
				res, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}})
				if err != nil {
					t.Fatalf("round %d remount: %v", round, err)
				}
				if res.Merge != want {
					t.Fatalf("round %d: the mount requires %q, want %q", round, res.Merge, want)
				}
				for deadline := time.Now().Add(30 * time.Second); !mergeRecorded(a); time.Sleep(time.Millisecond) {
					if time.Now().After(deadline) {
						t.Fatalf("round %d: the merge never recorded itself underway", round)
					}
				}
				crashAll(a, faulty)
				want = "full-merge"
			}
		}
		a = startAgent(t, dir, nil)
		res, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}})
		if err != nil {
			t.Fatalf("round %d remount: %v", round, err)
		}
		if res.Merge != want {
			t.Fatalf("round %d: after a power loss the mount requires %q, want %q", round, res.Merge, want)
		}
		waitIdle(t, a, "DSA1")
		if writeLog && want == "controller-minimerge" {
			// Only the logged extents: at most the one 4 MiB extent the
			// writes went to (some rounds log nothing unflushed).
			r, _ := a.Show("DSA1")
			w := r.Sets[0].Completed[len(r.Sets[0].Completed)-1]
			if w.Kind != want || w.BytesDone > int64(span) {
				t.Fatalf("round %d: recovery %+v, want a %s of at most %d bytes", round, w, want, span)
			}
		}
		if err := a.Shutdown(context.Background()); err != nil {
			t.Fatal(err)
		}
		d1, d2 := dataOf(t, m1), dataOf(t, m2)
		if !bytes.Equal(d1, d2) {
			t.Fatalf("round %d: members differ after the merge", round)
		}
		for i := 0; i < testData; i += 4096 {
			if !bytes.Equal(d1[i:i+4096], durable[i:i+4096]) {
				inPending := false
				for _, w := range pending {
					if int64(i) >= w.off && int64(i) < w.off+int64(len(w.buf)) {
						inPending = true
					}
				}
				if !inPending {
					t.Fatalf("round %d: block at %d lost a flushed write", round, i)
				}
			}
		}
		copy(durable, d1)
	}
}

// TestExpelKeepsServing: a member whose writes fail is expelled before the
// write is acknowledged; the set keeps serving; the last member's failure
// fails the request instead.
func TestExpelKeepsServing(t *testing.T) {
	dir := shortDir(t)
	m1, m2 := filepath.Join(dir, "m1"), filepath.Join(dir, "m2")
	makeMember(t, m1)
	makeMember(t, m2)
	open, faulty := faultyOpener(false)
	a := startAgent(t, dir, open)
	defer a.Shutdown(context.Background())
	if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}}); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, a, "DSA1")
	v := a.sets["DSA1"].vu
	eio := errors.New("injected EIO")
	faulty()[m2].Inject(device.When(func(op device.Op, off, n int64) bool { return op == device.OpWrite && off < testData }, eio, 0))
	if err := v.WriteAt([]byte("still here"), 4096, false); err != nil {
		t.Fatalf("write with one good member: %v", err)
	}
	r, _ := a.Show("DSA1")
	if len(r.Sets[0].Members) != 1 || r.Sets[0].Members[0].Path != m1 {
		t.Fatalf("members after the failure: %+v", r.Sets[0].Members)
	}
	got := make([]byte, 10)
	if err := v.ReadAt(got, 4096); err != nil || string(got) != "still here" {
		t.Fatalf("read after expel: %q %v", got, err)
	}
	md, _, err := meta.Read(faulty()[m1])
	if err != nil {
		t.Fatal(err)
	}
	removed := 0
	for _, m := range md.Members {
		if m.Role == meta.RoleRemoved {
			removed++
		}
	}
	if removed != 1 {
		t.Fatalf("survivor's metadata does not record the expulsion: %+v", md.Members)
	}
	faulty()[m1].Inject(device.When(func(op device.Op, off, n int64) bool { return op == device.OpWrite && off < testData }, eio, 0))
	if err := v.WriteAt([]byte("x"), 0, false); err == nil {
		t.Fatal("a write failing on the last member was acknowledged")
	}
	if r, _ := a.Show("DSA1"); len(r.Sets[0].Members) != 1 {
		t.Fatal("the last member was expelled")
	}
}

func TestMountRefusals(t *testing.T) {
	dir := shortDir(t)
	paths := map[string]string{}
	for _, n := range []string{"a1", "a2", "b1", "b2", "junk"} {
		paths[n] = filepath.Join(dir, n)
		makeMember(t, paths[n])
	}
	if err := os.WriteFile(paths["junk"], bytes.Repeat([]byte{1}, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(paths["junk"], testData+meta.ReservedSize); err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, dir, nil)
	defer a.Shutdown(context.Background())
	mustMount := func(set string, ms ...string) {
		t.Helper()
		if _, err := a.Mount(MountArgs{Set: set, Members: ms}); err != nil {
			t.Fatal(err)
		}
		waitIdle(t, a, set)
	}
	mustMount("DSA1", paths["a1"], paths["a2"])
	mustMount("DSA2", paths["b1"], paths["b2"])
	if err := a.dismountSet("DSA2"); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		args MountArgs
		want string
	}{
		{MountArgs{Set: "DSA3", Members: []string{paths["b1"]}}, "is a member of DSA2"},
		{MountArgs{Set: "DSA3", Members: []string{paths["a1"]}}, "busy"},
		{MountArgs{Set: "DSA3", Members: []string{paths["b2"], paths["junk"]}}, "is a member of DSA2"},
		{MountArgs{Set: "DSA1", Members: []string{paths["junk"]}}, "holds data and would get a full copy: use --confirm"},
		{MountArgs{Set: "DSAX", Members: []string{paths["junk"]}}, "not DSAn"},
		{MountArgs{Set: "DSA4", Members: []string{filepath.Join(dir, "missing")}}, "no such file"},
	}
	for _, c := range cases {
		_, err := a.Mount(c.args)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("mount %+v: %v, want %q", c.args, err, c.want)
		}
	}
	// Creating over a non-blank second member needs --overwrite.
	fresh := filepath.Join(dir, "fresh")
	makeMember(t, fresh)
	if _, err := a.Mount(MountArgs{Set: "DSA5", Members: []string{fresh, paths["junk"]}}); err == nil || !strings.Contains(err.Error(), "not blank") {
		t.Errorf("creation over a non-blank member: %v", err)
	}
	// A corrupt slot falls back to the other with a warning; both corrupt
	// are refused.
	corrupt := func(p string, slot int) {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		_, area, _ := meta.Layout(testData + meta.ReservedSize)
		if _, err := f.WriteAt([]byte("garbage"), area.Slots[slot]+100); err != nil {
			t.Fatal(err)
		}
	}
	corrupt(paths["b1"], 0)
	res, err := a.Mount(MountArgs{Set: "DSA2", Members: []string{paths["b1"], paths["b2"]}})
	if err != nil {
		t.Fatalf("one corrupt slot: %v", err)
	}
	if !strings.Contains(fmt.Sprint(res.Warnings), "corrupt") {
		t.Errorf("no warning about the corrupt slot: %v", res.Warnings)
	}
	if err := a.dismountSet("DSA2"); err != nil {
		t.Fatal(err)
	}
	corrupt(paths["b1"], 0)
	corrupt(paths["b1"], 1)
	if _, err := a.Mount(MountArgs{Set: "DSA2", Members: []string{paths["b1"]}}); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Errorf("both slots corrupt: %v", err)
	}
}

func TestAddMemberFullCopyShowsProgress(t *testing.T) {
	dir := shortDir(t)
	m1, m2, m3 := filepath.Join(dir, "m1"), filepath.Join(dir, "m2"), filepath.Join(dir, "m3")
	for _, p := range []string{m1, m2, m3} {
		makeMember(t, p)
	}
	a, err := New(Config{Host: "A", Socket: filepath.Join(dir, "a.sock"), NBDUnix: filepath.Join(dir, "n.sock"),
		CleanAfter: time.Hour, Logger: zerolog.Nop(), MaxRate: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Shutdown(context.Background())
	if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}}); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, a, "DSA1")
	v := a.sets["DSA1"].vu
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { // application writes during the copy
		rng := rand.New(rand.NewPCG(9, 9))
		buf := make([]byte, 4096)
		for {
			select {
			case <-stop:
				return
			default:
			}
			for i := range buf {
				buf[i] = byte(rng.UintN(256))
			}
			if err := v.WriteAt(buf, int64(rng.IntN(testData/4096))*4096, false); err != nil {
				t.Error(err)
				return
			}
			time.Sleep(time.Millisecond)
		}
	})
	if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m3}}); err != nil {
		t.Fatal(err)
	}
	seen := map[int]bool{}
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		r, _ := a.Show("DSA1")
		if len(r.Sets[0].Ops) == 0 {
			break
		}
		seen[r.Sets[0].Ops[0].ProgressPct] = true
	}
	close(stop)
	wg.Wait()
	waitIdle(t, a, "DSA1")
	if len(seen) < 2 {
		t.Errorf("show saw copy progress %v, want it to move", seen)
	}
	if err := a.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	d1 := dataOf(t, m1)
	if !bytes.Equal(d1, dataOf(t, m2)) || !bytes.Equal(d1, dataOf(t, m3)) {
		t.Fatal("members differ after the copy under load")
	}
}

func mergeRecorded(a *Agent) bool {
	vol := a.sets["DSA1"]
	vol.mdMu.Lock()
	defer vol.mdMu.Unlock()
	return vol.md.MergeUnderway
}

// TestVerifyReportsWithoutRepairing: a member changed behind the set's
// back is reported chunk by chunk, and stays changed until a merge.
func TestVerifyReportsWithoutRepairing(t *testing.T) {
	dir := shortDir(t)
	m1, m2 := filepath.Join(dir, "m1"), filepath.Join(dir, "m2")
	makeMember(t, m1)
	makeMember(t, m2)
	a := startAgent(t, dir, nil)
	defer a.Shutdown(context.Background())
	if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}}); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, a, "DSA1")
	r, err := a.verify(context.Background(), "DSA1")
	if err != nil || r.MismatchedChunks != 0 || len(r.Members) != 2 || r.BytesCompared != testData {
		t.Fatalf("verify of identical members: %+v, %v", r, err)
	}
	// Two bytes written to m2 outside the set, 3 MiB apart (flock is
	// advisory: a plain write gets through).
	f, err := os.OpenFile(m2, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{5 << 20, 8<<20 + 17} {
		if _, err := f.WriteAt([]byte{0xa5}, off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	r, err = a.verify(context.Background(), "DSA1")
	if err != nil || r.MismatchedChunks != 2 || len(r.First) != 2 || r.First[0] != 5<<20 || r.First[1] != 8<<20 {
		t.Fatalf("verify after two changed bytes: %+v, %v", r, err)
	}
	if bytes.Equal(dataOf(t, m1), dataOf(t, m2)) {
		t.Fatal("verify repaired the difference; it must only report it")
	}
	if err := a.setVerb(SetArgs{Set: "DSA1", DemandMerge: true}); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, a, "DSA1")
	if r, err = a.verify(context.Background(), "DSA1"); err != nil || r.MismatchedChunks != 0 {
		t.Fatalf("verify after a merge: %+v, %v", r, err)
	}
}

// TestAbortLeavesTheSetToMerge: DISMOUNT/ABORT records Table 8-1 row 3,
// leaves the set dirty, and the next mount merges it.
func TestAbortLeavesTheSetToMerge(t *testing.T) {
	dir := shortDir(t)
	m1, m2 := filepath.Join(dir, "m1"), filepath.Join(dir, "m2")
	makeMember(t, m1)
	makeMember(t, m2)
	noDelay := time.Duration(0)
	a, err := New(Config{Host: "A", Socket: filepath.Join(dir, "a.sock"), NBDUnix: filepath.Join(dir, "n.sock"),
		CleanAfter: time.Hour, Logger: zerolog.Nop(), RecoveryDelay: &noDelay})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}}); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, a, "DSA1")
	if err := a.sets["DSA1"].vu.WriteAt(bytes.Repeat([]byte("x"), 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := a.abortSet("DSA1"); err != nil {
		t.Fatal(err)
	}
	evs := a.elog.History()
	if !slices.ContainsFunc(evs, func(e shadowset.Event) bool { return e.Kind == shadowset.EvAbort && e.Set == "DSA1" && e.Host == "A" }) {
		t.Fatalf("no abort in the log: %+v", evs)
	}
	if _, err := a.volume("DSA1"); err == nil {
		t.Fatal("DSA1 still mounted after --abort")
	}
	res, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Merge != "full-merge" {
		t.Fatalf("mount after an abort: %+v, want a full merge", res)
	}
	waitIdle(t, a, "DSA1")
	if err := a.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestEvaluateResourcesCancelsAndContinues: SET SHADOW /EVALUATE=RESOURCES
// on the host running a copy cancels it and continues it at its
// checkpoint after the delay (Table 8-1 row 8).
func TestEvaluateResourcesCancelsAndContinues(t *testing.T) {
	dir := shortDir(t)
	m1, m2 := filepath.Join(dir, "m1"), filepath.Join(dir, "m2")
	makeMember(t, m1)
	makeMember(t, m2)
	delay := 300 * time.Millisecond
	a, err := New(Config{Host: "A", Socket: filepath.Join(dir, "a.sock"), NBDUnix: filepath.Join(dir, "n.sock"),
		CleanAfter: time.Hour, Logger: zerolog.Nop(), RecoveryDelay: &delay, MaxRate: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Shutdown(context.Background())
	if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}}); err != nil {
		t.Fatal(err)
	}
	if err := (SetArgs{EvaluateResources: true}).Check(0); err != nil {
		t.Fatalf("--evaluate-resources without a set name: %v", err)
	}
	// Let the copy record a checkpoint, then evaluate.
	deadline := time.Now().Add(20 * time.Second)
	for {
		sv, _ := a.setView("DSA1")
		if len(sv.Ops) == 1 && sv.Ops[0].LBN > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the copy never recorded a checkpoint: %+v", sv.Ops)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := a.setVerb(SetArgs{EvaluateResources: true}); err != nil {
		t.Fatal(err)
	}
	sv, _ := a.setView("DSA1")
	if len(sv.Ops) != 1 || sv.Ops[0].State != shadowset.Canceled {
		t.Fatalf("after evaluate-resources: %+v, want the copy canceled", sv.Ops)
	}
	at := sv.Ops[0].LBN
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		sv, _ = a.setView("DSA1")
		if len(sv.Ops) == 1 && sv.Ops[0].State == shadowset.Running {
			if sv.Ops[0].LBN < at || !slices.Contains(sv.Ops[0].History, shadowset.WordContinued) {
				t.Fatalf("the copy resumed at %d (history %v), want continued at %d", sv.Ops[0].LBN, sv.Ops[0].History, at)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the copy never resumed: %+v", sv.Ops)
		}
	}
	if err := a.setVerb(SetArgs{MaxOps: new(int)}); err != nil {
		t.Fatalf("--max-ops 0: %v", err)
	}
}

// TestClusterHeldSetRefused: a set whose metadata says a cluster holds it
// and did not dismount it cleanly is refused by a single-host agent (that
// cluster's hosts may still write it), unless --overwrite; clean, it is
// taken, and the agent writes it back in format 1, without the stamp.
func TestClusterHeldSetRefused(t *testing.T) {
	dir := shortDir(t)
	m1, m2 := filepath.Join(dir, "m1"), filepath.Join(dir, "m2")
	makeMember(t, m1)
	makeMember(t, m2)
	a := startAgent(t, dir, nil)
	if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}}); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, a, "DSA1")
	if err := a.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	stamp := func(dirty bool) {
		for _, p := range []string{m1, m2} {
			dev, err := device.Open(p, device.Options{})
			if err != nil {
				t.Fatal(err)
			}
			md, _, err := meta.Read(dev)
			if err != nil {
				t.Fatal(err)
			}
			md.Cluster = meta.ClusterStamp{UUID: meta.NewUUID(), Incarnation: 3, LogIndex: 99}
			md.Dirty = dirty
			if err := meta.Write(dev, md); err != nil {
				t.Fatal(err)
			}
			dev.Close()
		}
	}
	stamp(true)
	a = startAgent(t, dir, nil)
	defer a.Shutdown(context.Background())
	if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}}); !errors.Is(err, errHeld) || !strings.Contains(err.Error(), "log index 99") {
		t.Fatalf("mount of a set a cluster holds dirty: %v, want a refusal naming the cluster", err)
	}
	if _, err := a.volume("DSA1"); err == nil {
		t.Fatal("a refused mount left the set mounted")
	}
	if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}, Overwrite: true}); err != nil {
		t.Fatalf("--overwrite: %v", err)
	}
	if err := a.dismountSet("DSA1"); err != nil {
		t.Fatal(err)
	}
	stamp(false)
	if _, err := a.Mount(MountArgs{Set: "DSA1", Members: []string{m1, m2}}); err != nil {
		t.Fatalf("mount of a set a cluster left clean: %v", err)
	}
	dev, err := device.Open(m1, device.Options{ReadOnly: true, Shared: true})
	if err == nil {
		dev.Close()
		t.Fatal("a member of a mounted set opened shared beside the agent's exclusive lock")
	}
	if err := a.dismountSet("DSA1"); err != nil {
		t.Fatal(err)
	}
	dev, err = device.Open(m1, device.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	md, _, err := meta.Read(dev)
	if err != nil || md.Version != meta.FormatVersionSingle || !md.Cluster.IsZero() {
		t.Fatalf("after a single-host mount: %+v, %v; want format 1 without a stamp", md, err)
	}
}
