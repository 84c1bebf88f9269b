// Package merge will own the merge engines (full merge, HBMM minimerge,
// controller minimerge): walking their work in LBN order from a checkpoint
// under the VU's range locks, reporting progress and completion back to the
// shadowset core, and stopping promptly on cancel. It decides nothing: the
// core says what to run, where and from which LBN.
package merge
