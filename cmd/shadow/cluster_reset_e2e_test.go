package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// resetLog is what the agents' SHADOW_TEST_RESET_LOG hook recorded: per
// host and set, the write count at each reset's flush, and each bitmap
// op's chunks by op ID.
type resetLog struct {
	resets map[string][]int        // "HOST SET" → writes issued at each reset
	work   map[uint64]map[int]bool // op → chunks
	kinds  map[uint64]string
}

func readResetLog(t *testing.T, path string) resetLog {
	t.Helper()
	rl := resetLog{resets: map[string][]int{}, work: map[uint64]map[int]bool{}, kinds: map[uint64]string{}}
	data, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(data)) {
		f := strings.Fields(line)
		switch {
		case len(f) == 4 && f[0] == "reset":
			n, err := strconv.Atoi(f[3])
			if err != nil {
				t.Fatalf("reset log line %q: %v", line, err)
			}
			rl.resets[f[1]+" "+f[2]] = append(rl.resets[f[1]+" "+f[2]], n)
		case len(f) >= 5 && f[0] == "work":
			op, err := strconv.ParseUint(f[3], 10, 64)
			if err != nil {
				t.Fatalf("reset log line %q: %v", line, err)
			}
			chunks := map[int]bool{}
			for _, s := range f[5:] {
				c, err := strconv.Atoi(s)
				if err != nil {
					t.Fatalf("reset log line %q: %v", line, err)
				}
				chunks[c] = true
			}
			rl.work[op], rl.kinds[op] = chunks, f[4]
		default:
			t.Fatalf("reset log: unexpected line %q", line)
		}
	}
	return rl
}

// TestClusterE2EHBMMResetOracle: hosts A, B, C mount DSA1 with HBMM
// masters on A and B and a reset threshold of 32 chunks, so C's bitmaps on
// A and B are reset every few hundred writes while C writes random 4 KiB
// blocks one at a time and B writes its own range with fio. C is
// SIGKILLed at a random moment after a random number of resets: mid-write
// in odd rounds, between writes in even ones. The oracle is not what the
// members disagree on but what C had not yet flushed: the agents' test
// hook records, at each reset, how many writes C had issued when it
// flushed every member, so every write after the last such count (the
// one in flight included) may differ between the members, and the
// minimerge on A or B must cover its chunk. It must also cover fewer
// chunks than C wrote in the whole round, or the resets did nothing.
// The members end identical.
func TestClusterE2EHBMMResetOracle(t *testing.T) {
	requireTools(t, "fio")
	const size = 64 << 20
	const span = 32 << 20 // C's range; B's fio writes [32 MiB, 48 MiB)
	const threshold = 32 * hbmmChunk / 512
	delay := 3 * time.Second
	for round := range repeats(t) {
		t.Run(fmt.Sprintf("round%d", round), func(t *testing.T) {
			dir, err := os.MkdirTemp("", "shereset")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			logPath := filepath.Join(dir, "resets")
			t.Setenv("SHADOW_TEST_RESET_LOG", logPath)
			c := newCluster(t, delay, []string{"A", "B", "C"})
			ms := c.members(2, size)
			a, b, victim := c.node("A"), c.node("B"), c.node("C")
			c.mountEverywhere(a, "DSA1", ms, nil)
			hbmmPolicyText(t, c, c.nodes[rand.IntN(3)], "DSA1", fmt.Sprintf("hbmm=(master_list=(A,B),reset_threshold=%d,write_policy=all)", threshold), "A", "B")
			bfio := background(t, "fio", fioArgs("bload", b.uri("DSA1"), "32m", "16m", "--time_based", "--runtime=60")...)
			defer endGroup(bfio)

			cl := dialFence(t, victim, "DSA1")
			var mu sync.Mutex
			var written []int // chunk of the k-th write, k from 1 (written[k-1])
			var acked int     // how many of them completed
			stop := make(chan struct{})
			done := make(chan struct{})
			go func() {
				defer close(done)
				buf := make([]byte, 4096)
				for {
					select {
					case <-stop:
						return
					default:
					}
					off := rand.Int64N(span/4096) * 4096
					for i := range buf {
						buf[i] = byte(rand.Uint32())
					}
					mu.Lock()
					written = append(written, int(off/hbmmChunk))
					mu.Unlock()
					if err := cl.WriteAt(buf, off, 0); err != nil {
						return // the kill
					}
					mu.Lock()
					acked++
					mu.Unlock()
				}
			}()
			wantResets := 1 + rand.IntN(4)
			waitFor(t, time.Minute, fmt.Sprintf("%d resets of C's bitmaps", wantResets), func() (bool, string) {
				n := len(readResetLog(t, logPath).resets["C DSA1"])
				return n >= wantResets, fmt.Sprintf("%d resets", n)
			})
			time.Sleep(time.Duration(rand.IntN(400)) * time.Millisecond)
			midWrite := round%2 == 1
			if !midWrite {
				close(stop)
				<-done
			}
			victim.crash()
			if midWrite {
				close(stop)
				<-done
			}
			mu.Lock()
			writes := slices.Clone(written)
			completed := acked
			mu.Unlock()

			work, on := hbmmMinimerge(t, []*cnode{a, b}, "DSA1", delay+time.Minute)
			rl := readResetLog(t, logPath)
			resets := rl.resets["C DSA1"]
			last := resets[len(resets)-1]
			merged, ok := rl.work[work.ID]
			if !ok || rl.kinds[work.ID] != "minimerge" {
				t.Fatalf("the hook recorded no minimerge chunks for op %d (recorded: %v)", work.ID, rl.kinds)
			}
			if last > len(writes) {
				t.Fatalf("C had issued %d writes at its last reset, but the test sent only %d", last, len(writes))
			}
			// Required: every completed write after the last reset's flush.
			// The write in flight at the kill may or may not have reached
			// a member (its bit-set may not have been acknowledged, and
			// then it was never issued): whether the members agree there
			// is left to the final comparison.
			var missed []int
			all := map[int]bool{}
			inFlight := "none"
			for k, ch := range writes {
				all[ch] = true
				switch {
				case k+1 <= last:
				case k+1 <= completed && !merged[ch]:
					missed = append(missed, ch)
				case k+1 > completed:
					inFlight = fmt.Sprintf("chunk %d, merged %v", ch, merged[ch])
				}
			}
			t.Logf("round %d: %d resets of C (last after write %d), %d writes sent (%d completed, mid-write %v; in flight: %s) to %d chunks; minimerge on %s merged %d chunks",
				round, len(resets), last, len(writes), completed, midWrite, inFlight, len(all), on, len(merged))
			if len(missed) > 0 {
				slices.Sort(missed)
				t.Errorf("the minimerge missed chunks %v, written by C after its last reset's flush", slices.Compact(missed))
			}
			for ch := range merged {
				if !all[ch] {
					t.Errorf("the minimerge covered chunk %d, which C never wrote", ch)
				}
			}
			if len(merged) >= len(all) {
				t.Errorf("the minimerge covered %d chunks, every chunk C wrote this round (%d): the resets cleared nothing", len(merged), len(all))
			}
			if int(work.BitmapChunks) != len(merged) || work.ChunksDone != work.BitmapChunks {
				t.Errorf("show says the minimerge had %d chunks and moved %d; the hook recorded %d", work.BitmapChunks, work.ChunksDone, len(merged))
			}
			endGroup(bfio)
			c.waitIdleEverywhere("DSA1", 2*time.Minute)
			a.mustCLI("dismount", "DSA1")
			b.mustCLI("dismount", "DSA1")
			sameData(t, size, ms...)
		})
	}
}
