// Package bitmap owns the write bitmaps of a shadow set: sets of chunk
// numbers (a chunk is a fixed, power-of-two number of bytes per bit,
// 64 KiB by default, chosen per set) kept on roaring bitmaps.
//
// It provides:
//
//   - [Bitmap], a concurrency-safe set of chunk numbers: an HBMM master
//     bitmap, a minicopy bitmap, or the work set of a merge or copy walk;
//   - its versioned, checksummed encoding for disk and wire
//     ([Bitmap.MarshalBinary], [Decode]), which refuses bad input with
//     [ErrCorrupt], [ErrTruncated] or [ErrVersion] instead of trusting it;
//   - [Tracker], the writer side of HBMM on one host: it sets a write's
//     chunks in every sink bitmap (the HBMM master and each minicopy
//     bitmap) before the write may be issued, and keeps a cache of chunks
//     known set everywhere so that only the first write to a chunk pays;
//   - [SinceFlush], the chunks written since the set's last successful
//     flush, from which the automatic minicopy bitmap of a member expelled
//     after an I/O error is built.
//
// The package makes no decisions and does no I/O: when to reset a bitmap,
// where to store it and whom to send it to belong to the core and the agent.
// What it guarantees is the ordering the design's invariants rely on: a
// chunk is in every sink when [Tracker.Mark] returns (invariant 2), and a
// reset invalidates the cache before it clears a sink (invariant 5).
package bitmap
