package agent

import (
	"bytes"
	"context"
	"fmt"
	"time"

	"github.com/shadow-project/shadow/cmd/internal/device"
	"github.com/shadow-project/shadow/cmd/internal/vu"
)

// VerifyArgs is the verify verb.
type VerifyArgs struct {
	Set string `json:"set"`
}

// VerifyResult reports where a set's full members differ, like md's
// check and its mismatch count: nothing is repaired (a merge does that).
type VerifyResult struct {
	Set     string   `json:"set"`
	Members []string `json:"members"`
	// BytesCompared is the data region compared on each member.
	BytesCompared int64 `json:"bytes_compared"`
	ChunkBytes    int64 `json:"chunk_bytes"`
	// MismatchedChunks counts chunks whose members still differed after
	// the rereads.
	MismatchedChunks int64 `json:"mismatched_chunks"`
	// First lists the byte offsets of the first mismatched chunks (at
	// most 16).
	First     []int64 `json:"first_mismatches,omitempty"`
	ElapsedMS int64   `json:"elapsed_ms"`
	// MergeOwed: a merge is required or running, so differences are
	// expected where it has not been.
	MergeOwed bool     `json:"merge_owed,omitempty"`
	Notes     []string `json:"notes,omitempty"`
}

const (
	verifyChunk = 1 << 20
	// On a set other hosts write, a chunk may differ for the moment one
	// of their writes is reaching the members; it counts only if it still
	// differs after these rereads.
	verifyRereads = 3
)

// verify compares the set's full members chunk by chunk, each chunk under
// this host's range lock (so none of this host's writes is half done).
func (a *Agent) verify(ctx context.Context, set string) (*VerifyResult, error) {
	vol, err := a.volume(set)
	if err != nil {
		return nil, err
	}
	res := &VerifyResult{Set: set, ChunkBytes: verifyChunk, BytesCompared: vol.size}
	var devs []vu.Device
	for _, m := range vol.vu.Members() {
		if m.Role == vu.Full {
			d, _, ok := vol.vu.Device(m.Path)
			if ok {
				devs = append(devs, d)
				res.Members = append(res.Members, m.Path)
			}
		}
	}
	if len(devs) < 2 {
		res.Notes = append(res.Notes, "fewer than two full members: nothing to compare")
		return res, nil
	}
	if sv, ok := a.setView(set); ok {
		for _, op := range sv.Ops {
			if op.Kind.IsMerge() {
				res.MergeOwed = true
				res.Notes = append(res.Notes, fmt.Sprintf("a %s is owed (op%d %s): members may differ where it has not been", op.Kind, op.ID, op.State))
			}
		}
	}
	if a.clustered() && a.mountedElsewhere(set) {
		res.Notes = append(res.Notes, fmt.Sprintf("other hosts write the set: a chunk counts only if it still differs after %d rereads", verifyRereads))
	}
	began := time.Now()
	bufs := make([][]byte, len(devs))
	for i := range bufs {
		bufs[i] = device.AlignedBuffer(verifyChunk, 4096)
	}
	for off := int64(0); off < vol.size; off += verifyChunk {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		n := min(verifyChunk, vol.size-off)
		differs := false
		for try := 0; try <= verifyRereads; try++ {
			if try > 0 {
				time.Sleep(20 * time.Millisecond)
			}
			if differs, err = compareChunk(vol.vu, devs, bufs, off, n); err != nil {
				return nil, fmt.Errorf("verify %s: %w", set, err)
			}
			if !differs {
				break
			}
		}
		if differs {
			res.MismatchedChunks++
			if len(res.First) < 16 {
				res.First = append(res.First, off)
			}
		}
	}
	res.ElapsedMS = time.Since(began).Milliseconds()
	a.log.Info().Str("vu", set).Int64("mismatched_chunks", res.MismatchedChunks).Int64("elapsed_ms", res.ElapsedMS).Msg("verify done")
	return res, nil
}

func compareChunk(v *vu.VU, devs []vu.Device, bufs [][]byte, off, n int64) (bool, error) {
	unlock := v.Lock(off, n)
	defer unlock()
	for i, d := range devs {
		if _, err := d.ReadAt(bufs[i][:n], off); err != nil {
			return false, fmt.Errorf("read %s at %d: %w", d.Path(), off, err)
		}
	}
	for i := 1; i < len(devs); i++ {
		if !bytes.Equal(bufs[0][:n], bufs[i][:n]) {
			return true, nil
		}
	}
	return false, nil
}
