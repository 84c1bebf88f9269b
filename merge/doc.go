// Package merge owns the merge engine: making every member agree with the
// merge master, chunk by chunk in LBN order from a checkpoint, under the
// VU's range locks, reporting checkpoints only after the rewritten members
// are flushed (sub-package walk holds the loop it shares with copy). It
// decides nothing: the shadowset core says what to merge, where and from
// which LBN. Full merge today; minimerge passes a Want filter from the
// write bitmaps.
package merge
