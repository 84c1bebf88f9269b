package agent

import (
	"context"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/shadow-project/shadow/shadowset"
)

func TestLocalLogTimersCloseTheDelayWindow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var mu sync.Mutex
		var starts []shadowset.Action
		count := func() ([]shadowset.Action, int) { mu.Lock(); defer mu.Unlock(); return starts, len(starts) }
		l := NewLocalLog(shadowset.New(), func(rd shadowset.Ready) {
			mu.Lock()
			defer mu.Unlock()
			for _, a := range rd.Actions {
				if a.Kind == shadowset.ActStart {
					starts = append(starts, a)
				}
			}
		})
		defer l.Close()
		for _, ev := range []shadowset.Event{
			{Kind: shadowset.EvHostUp, Host: "A"},
			{Kind: shadowset.EvDefineSet, Spec: &shadowset.SetSpec{Name: "DSA1", Members: []string{"M1", "M2"}, Mounted: []string{"A"}}},
			{Kind: shadowset.EvEvalResources, Host: "A"}, // opens the 20 s window
			{Kind: shadowset.EvDemandMerge, Set: "DSA1"}, // no delay, but waits for the window
		} {
			if err := l.Append(ev); err != nil {
				t.Fatal(err)
			}
		}
		if _, n := count(); n != 0 {
			t.Fatal("merge started inside the delay window")
		}
		time.Sleep(19 * time.Second)
		synctest.Wait()
		if _, n := count(); n != 0 {
			t.Fatal("merge started before the window closed")
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if got, n := count(); n != 1 || got[0].OpKind != shadowset.FullMerge {
			t.Fatalf("after the window: %+v", got)
		}
	})
}

func TestAppendFromCanceledRunIsDropped(t *testing.T) {
	l := NewLocalLog(shadowset.New(), nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.AppendFrom(ctx, shadowset.Event{Kind: shadowset.EvHostUp, Host: "A"}); err == nil {
		t.Fatal("a report from a canceled run was applied")
	}
	if len(l.History()) != 0 {
		t.Fatal("history grew")
	}
}
