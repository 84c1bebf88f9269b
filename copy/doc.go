// Package copy owns the copy engine: filling a copy target from a source
// member in LBN order from a checkpoint, under the VU's range locks,
// recording a checkpoint only after the target is flushed below it. The
// shadowset core decides what to copy and where. Import it under an alias:
// it shadows the builtin copy.
package copy
