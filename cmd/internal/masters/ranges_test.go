package masters

import (
	"slices"
	"testing"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/bitmap/wire"
)

func TestBatches(t *testing.T) {
	b, _ := bitmap.New(4096)
	for _, c := range []uint64{0, 1, 2, 5, 9, 10, 12} {
		b.Add(c)
	}
	var got [][]wire.Range
	for batch := range Batches(b, 2) {
		got = append(got, slices.Clone(batch))
	}
	want := [][]wire.Range{{{First: 0, Last: 2}, {First: 5, Last: 5}}, {{First: 9, Last: 10}, {First: 12, Last: 12}}}
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("Batches = %v, want %v", got, want)
	}
	b.Add(20)
	n := 0
	for batch := range Batches(b, 2) {
		n += len(batch)
	}
	if n != 5 {
		t.Fatalf("%d ranges in all, want 5 (a last, short batch)", n)
	}
	empty, _ := bitmap.New(4096)
	for range Batches(empty, 2) {
		t.Fatal("an empty bitmap gave a batch")
	}
}
