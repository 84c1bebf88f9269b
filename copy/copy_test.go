package copy

import (
	"bytes"
	"context"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/shadow-project/shadow/merge/walk"
)

type mem struct {
	mu      sync.Mutex
	data    []byte
	flushed int
}

func (m *mem) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.data[off:]), nil
}
func (m *mem) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.data[off:], p), nil
}
func (m *mem) Flush() error { m.mu.Lock(); m.flushed++; m.mu.Unlock(); return nil }

func TestCopyFillsTargetFromCheckpoint(t *testing.T) {
	const size = 6<<20 + 4096 // a partial last chunk
	src, dst := &mem{data: make([]byte, size)}, &mem{data: make([]byte, size)}
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range src.data {
		src.data[i] = byte(rng.UintN(256))
	}
	var lbns []uint64
	err := Run(context.Background(), Job{Source: src, Target: dst, Plan: walk.Plan{Size: size,
		Lock: func(int64, int64) func() { return func() {} }, Progress: func(l uint64) { lbns = append(lbns, l) }}})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(src.data, dst.data) {
		t.Fatal("target differs from source")
	}
	if dst.flushed == 0 || lbns[len(lbns)-1] != size/512 {
		t.Fatalf("flushes %d, checkpoints %v", dst.flushed, lbns)
	}
	// Resume: only bytes at or after the checkpoint are copied.
	dst2 := &mem{data: make([]byte, size)}
	if err := Run(context.Background(), Job{Source: src, Target: dst2, Plan: walk.Plan{Size: size, StartLBN: (2 << 20) / 512,
		Lock: func(int64, int64) func() { return func() {} }}}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dst2.data[:2<<20], make([]byte, 2<<20)) {
		t.Fatal("resumed copy wrote below its checkpoint")
	}
	if !bytes.Equal(dst2.data[2<<20:], src.data[2<<20:]) {
		t.Fatal("resumed copy missed bytes above its checkpoint")
	}
}
