// Package copy will own the copy engines (full copy and minicopy): filling
// a copy target from a source member in LBN order from a checkpoint,
// recording a checkpoint only after the target is flushed below it, and
// reporting progress and completion to the shadowset core. Import it under
// an alias (it shadows the builtin copy).
package copy
