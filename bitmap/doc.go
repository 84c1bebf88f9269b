// Package bitmap will own the write bitmaps: roaring bitmaps of chunk
// numbers kept per writer host on the HBMM masters, the writer's cache of
// bits known set, minicopy bitmaps, persisted write logs for controller
// minimerge, and their versioned, checksummed encoding for disk and wire.
package bitmap
