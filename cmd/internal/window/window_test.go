package window

import (
	"testing"

	"github.com/shadow-project/shadow/bitmap"
)

// nextOf is a bitmap op's walk Next over bm (the agent's is the same).
func nextOf(bm *bitmap.Bitmap) func(off int64) (int64, bool) {
	cs := bm.ChunkSize()
	return func(off int64) (int64, bool) {
		c, ok := bm.NextFrom(uint64(off / cs))
		return int64(c) * cs, ok
	}
}

// A window holds Size of work: a full op's is Size of the
// volume; a bitmap op's stretches over its next chunks however sparse, and
// never past the volume or its last chunk.
func TestEnd(t *testing.T) {
	const chunk = 64 << 10
	const size = 1 << 30
	sparse, err := bitmap.New(chunk)
	if err != nil {
		t.Fatal(err)
	}
	// 600 chunks, one every 1 MiB.
	for i := range uint64(600) {
		sparse.Add(i * 16)
	}
	dense, _ := bitmap.New(chunk)
	for i := range uint64(size / chunk) {
		dense.Add(i)
	}
	perWindow := int64(Size / chunk)
	for _, tc := range []struct {
		name   string
		off, n int64
		size   int64
		next   func(int64) (int64, bool)
		want   int64
	}{
		{name: "full op", off: 0, n: 1 << 20, size: size, want: Size},
		{name: "full op at the end", off: size - (1 << 20), n: 1 << 20, size: size, want: size},
		{name: "dense bitmap", off: 0, n: chunk, size: size, next: nextOf(dense), want: Size},
		// 256 chunks of work, 1 MiB apart: the window ends after the 256th.
		{name: "sparse bitmap", off: 0, n: chunk, size: size, next: nextOf(sparse), want: (perWindow-1)*(1<<20) + chunk},
		// Fewer chunks left than a window holds: it ends after the last.
		{name: "sparse tail", off: 500 << 20, n: chunk, size: size, next: nextOf(sparse), want: 599<<20 + chunk},
		{name: "last chunk", off: 599 << 20, n: chunk, size: size, next: nextOf(sparse), want: 599<<20 + chunk},
		{name: "partial last chunk", off: size - 4096, n: 4096, size: size, next: nextOf(dense), want: size},
	} {
		if got := End(tc.off, tc.n, tc.size, tc.next); got != tc.want {
			t.Errorf("%s: End(%d, %d) = %d, want %d", tc.name, tc.off, tc.n, got, tc.want)
		}
	}
}
