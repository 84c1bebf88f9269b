package merge

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/shadow-project/shadow/merge/walk"
)

// mem is a member that tracks which bytes were written but not flushed, so
// tests can check that no checkpoint is reported over unflushed data.
type mem struct {
	mu        sync.Mutex
	data      []byte
	dirtyHigh int64 // end of the highest unflushed write, 0 if none
	dirtyLow  int64
}

func newMem(n int) *mem { return &mem{data: make([]byte, n), dirtyLow: -1} }

func (m *mem) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.data[off:]), nil
}
func (m *mem) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.dirtyLow < 0 || off < m.dirtyLow {
		m.dirtyLow = off
	}
	m.dirtyHigh = max(m.dirtyHigh, off+int64(len(p)))
	return copy(m.data[off:], p), nil
}
func (m *mem) Flush() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.dirtyLow, m.dirtyHigh = -1, 0
	return nil
}
func (m *mem) unflushedBelow(lbn uint64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.dirtyLow >= 0 && m.dirtyLow < int64(lbn)*512
}

func noLock(int64, int64) func() { return func() {} }

func TestMergeMakesMembersIdenticalAndCheckpointsAfterFlush(t *testing.T) {
	const size = 8 << 20
	master, other := newMem(size), newMem(size)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range master.data {
		master.data[i] = byte(rng.UintN(256))
	}
	copy(other.data, master.data)
	for range 20 { // scattered divergence, as after a crash
		off := rng.IntN(size - 4096)
		for i := range 4096 {
			other.data[off+i] ^= 0xff
		}
	}
	var checkpoints []uint64
	st, err := Run(context.Background(), Job{
		Master: master, Others: []Device{other},
		Plan: walk.Plan{Size: size, Lock: noLock, Chunk: 256 << 10,
			Progress: func(lbn uint64) {
				if other.unflushedBelow(lbn) {
					t.Errorf("checkpoint %d reported over unflushed writes", lbn)
				}
				checkpoints = append(checkpoints, lbn)
			}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(master.data, other.data) {
		t.Fatal("members differ after the merge")
	}
	if st.ChunksRepaired == 0 || st.ChunksRepaired > 40 {
		t.Fatalf("repaired %d chunks for 20 scattered differences", st.ChunksRepaired)
	}
	if checkpoints[len(checkpoints)-1] != size/512 {
		t.Fatalf("last checkpoint %v, want %d", checkpoints, size/512)
	}
}

func TestMergeResumesAtCheckpointAndHonoursWant(t *testing.T) {
	const size = 4 << 20
	master, other := newMem(size), newMem(size)
	for i := range master.data {
		master.data[i] = 1
	}
	_, err := Run(context.Background(), Job{
		Master: master, Others: []Device{other},
		Plan: walk.Plan{Size: size, Lock: noLock, Chunk: 1 << 20, StartLBN: (1 << 20) / 512,
			Want: func(off, n int64) bool { return off != 2<<20 }},
	})
	if err != nil {
		t.Fatal(err)
	}
	for off, want := range map[int64]byte{0: 0, 1 << 20: 1, 2 << 20: 0, 3 << 20: 1} {
		if other.data[off] != want {
			t.Errorf("byte at %d is %d, want %d", off, other.data[off], want)
		}
	}
}

func TestMergeStopsPromptlyOnCancelAndThrottles(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const size = 64 << 20
		master, other := newMem(size), newMem(size)
		ctx, cancel := context.WithCancel(context.Background())
		start := time.Now()
		var last uint64
		done := make(chan error, 1)
		go func() {
			_, err := Run(ctx, Job{Master: master, Others: []Device{other}, Plan: walk.Plan{Size: size, Lock: noLock,
				Chunk: 1 << 20, MaxRate: 4 << 20, MinRate: 1 << 20, Busy: func() bool { return false },
				Progress: func(lbn uint64) { last = lbn }}})
			done <- err
		}()
		time.Sleep(2 * time.Second) // at 4 MiB/s: about 8 chunks
		cancel()
		err := <-done
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("canceled merge returned %v", err)
		}
		if elapsed := time.Since(start); elapsed > 3*time.Second {
			t.Fatalf("cancel took until %v of virtual time", elapsed)
		}
		// About 8 chunks moved in 2 s: no checkpoint may claim more.
		if last*512 > 10<<20 {
			t.Fatalf("checkpoint at LBN %d claims more than was merged", last)
		}
	})
}

func TestMinRateWhenBusy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const size = 8 << 20
		master, other := newMem(size), newMem(size)
		start := time.Now()
		_, err := Run(context.Background(), Job{Master: master, Others: []Device{other}, Plan: walk.Plan{Size: size, Lock: noLock,
			Chunk: 1 << 20, MaxRate: 64 << 20, MinRate: 2 << 20, Busy: func() bool { return true }}})
		if err != nil {
			t.Fatal(err)
		}
		// 8 MiB at the 2 MiB/s minimum: about 4 s of virtual time.
		if d := time.Since(start); d < 3500*time.Millisecond || d > 4500*time.Millisecond {
			t.Fatalf("busy merge took %v, want about 4s at the minimum rate", d)
		}
	})
}
