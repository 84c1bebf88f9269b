// Package wlog owns the write logs kept with the members, for sets that
// use controller minimerge (mount --write-log): our emulation of the
// write logs a storage controller keeps. Each member holds, in the
// write-log region of its reserved area (meta.Area's LogOffset and
// LogLength), a bitmap of coarse extents. Before any data write reaches
// the member, the extents it touches have their bits durable there
// (DESIGN.md invariants 2 and 9); a bit is cleared only once the data is
// flushed and the extent has been idle. Because the log lives on the
// members, it survives the loss of every host: a restart after a crash
// loads the logs of all members and merges only the logged extents
// (their union), instead of the whole volume.
//
// # Format
//
// The region is an array of 4 KiB blocks, each written whole by one
// range-limited synchronous write (device.SyncWriter):
//
//   - block 0, the header: magic "SHDWWLOG", version, bits per block,
//     extent size, volume size, number of bitmap blocks, a random log ID
//     drawn by Format, CRC32C;
//   - blocks 1..n, bitmap blocks: magic "SHDWWLBM", block index, the log
//     ID, a sequence number bumped on every write of the block, CRC32C,
//     then BitsPerBlock (32256) bits, one per extent, in extent order.
//
// The extent size is the requested one (4 MiB by default, as DRBD's
// activity-log extents) rounded up to a power of two, or the smallest
// power of two of at least 64 KiB that gives every extent of the volume
// a bit in the region, whichever is larger (ChooseExtentSize). The
// standard region (254 blocks) fits 8,160,768 extents: 64 KiB extents up
// to about 498 GiB, 4 MiB extents up to about 31 TiB.
//
// Load refuses what it cannot vouch for: ErrBlank for a region of
// zeroes, ErrTorn for a checksum mismatch or an unreadable block,
// ErrCorrupt for the rest (bad magic, unknown version, a header that
// does not fit the volume or the region, a block of another log ID, bits
// past the volume). None of these is a refusal to mount: a log that says
// nothing trustworthy costs a full merge (DESIGN.md invariant 10).
//
// # Why coarse extents and group commit
//
// A data write must wait for its bit to be on stable storage, so every
// new bit costs a synchronous write. DRBD's activity log shows the way
// out, and this package follows it: make the unit coarse, so that almost
// every write lands in an extent already set and pays nothing but an
// atomic add (a working set of a few hundred 4 MiB extents covers most
// loads), and never flush the whole member for a bit: only the 4 KiB
// log block is written, with RWF_DSYNC. When bits are needed while a
// block's write is in flight, the Acquires wait for the next write of
// that block, which carries them all: one synchronous write per batch,
// as a group-commit WAL does. A coarse unit costs at merge time (a 4 KiB
// write makes its whole extent merged after a crash), which is the
// trade DRBD makes with al-extents; the write bitmaps of HBMM stay fine
// grained.
//
// # Why clearing needs a flush after the last write, and idleness
//
// A bit may leave the log only when the member can no longer differ
// from the others because of writes to that extent. A write that
// returned may still sit in the member's volatile cache; only a flush
// issued after it completed proves it is on stable storage. So Release
// records the flush epoch in which each extent's last write completed,
// FlushBegin opens a new epoch, and Sweep clears only extents whose last
// write is in an epoch some successful flush covered and that have no
// write in flight (DESIGN.md invariant 5, for write logs). Idleness is
// about cost, not safety: clearing a hot extent would make its next
// write pay a synchronous log write again, so an extent is cleared only
// after it has stayed clean for the idle period, as md clears its
// bitmap bits and DRBD evicts cold extents. A failed flush stops all
// clearing: the member's data may be lost whatever later flushes say.
//
// # Usage
//
// One Log per member of a set mounted with write logs. The caller:
//
//  1. At mount, calls Open on every member. If any fails (ErrBlank,
//     ErrTorn, ErrCorrupt), the set needs a full merge: FormatDirty the
//     logs (or Format them if no merge is owed, e.g. a new set).
//     Otherwise it runs a controller minimerge of the union of the
//     Logged extents and calls Unpin on each log as ranges complete.
//  2. Wraps every data write to the member in Acquire (before issuing
//     it; on error, do not issue it) and Release (after it finished,
//     whatever the outcome).
//  3. Calls FlushBegin before each flush of the member and FlushDone
//     after it, and flushes the member from time to time, for instance
//     when the set goes idle, or bits are never cleared.
//  4. Calls Sweep periodically with the time (the package never reads
//     the clock) and the idle period.
//  5. At an orderly dismount: flush, Sweep with idle 0, Close.
//
// Two implementations of device.SyncWriter back it: the os device
// (pwritev2 with RWF_DSYNC) and device.Faulty, whose simulated power
// loss keeps synchronously written ranges, which is how the tests prove
// that every write not covered by a completed flush has its extent in
// the log after a crash.
package wlog
