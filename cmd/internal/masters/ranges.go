package masters

import (
	"iter"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/bitmap/wire"
)

// Batches yields b's chunks as maximal runs, at most n runs per batch: the
// bit-sets that copy a whole bitmap to a master (n: wire.MaxRanges). The
// batch slice is reused between yields.
func Batches(b *bitmap.Bitmap, n int) iter.Seq[[]wire.Range] {
	return func(yield func([]wire.Range) bool) {
		batch := make([]wire.Range, 0, min(n, 64))
		var cur wire.Range
		open := false
		emit := func(r wire.Range) bool {
			batch = append(batch, r)
			if len(batch) < n {
				return true
			}
			ok := yield(batch)
			batch = batch[:0]
			return ok
		}
		for c := range b.Chunks() {
			if open && c == cur.Last+1 {
				cur.Last = c
				continue
			}
			if open && !emit(cur) {
				return
			}
			cur, open = wire.Range{First: c, Last: c}, true
		}
		if open && !emit(cur) {
			return
		}
		if len(batch) > 0 {
			yield(batch)
		}
	}
}
