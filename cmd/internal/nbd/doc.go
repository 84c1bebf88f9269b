// Package nbd is shadow's Network Block Device server: it owns the NBD wire
// protocol between a client (nbdfuse, nbdcopy, qemu, fio, a kernel nbd
// client) and the block devices the agent exports, one export per VU. It
// does no I/O of its own; every byte goes through the Backend of the export
// the client selected.
//
// # Why it is hand-written
//
// The Go NBD libraries are too limited for a shadow set member.
// github.com/pojntfx/go-nbd (v0.3.2) handles one request at a time per
// connection, implements only READ, WRITE and DISC (no FLUSH, FUA, TRIM or
// WRITE_ZEROES, so a client cannot make a write durable), sends a READ reply
// header before the data is read (a backend error then breaks the stream),
// and has no read-only flag. The cgo libnbd bindings are a client only.
//
// # What it implements
//
//   - Fixed newstyle negotiation with NO_ZEROES: NBD_OPT_GO, NBD_OPT_INFO,
//     NBD_OPT_LIST, NBD_OPT_ABORT and NBD_OPT_EXPORT_NAME; every other option
//     (STARTTLS, STRUCTURED_REPLY, META_CONTEXT, ...) gets NBD_REP_ERR_UNSUP
//     after its data is consumed, and negotiation continues.
//   - NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE (minimum 1, preferred 4096,
//     maximum Options.MaxRequest), and NBD_INFO_NAME / NBD_INFO_DESCRIPTION
//     when the client asks for them.
//   - Transmission flags HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM,
//     SEND_WRITE_ZEROES and CAN_MULTI_CONN, plus READ_ONLY for read-only
//     exports.
//   - Commands READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (with FUA and NO_HOLE)
//     and DISC, answered with simple replies only.
//
// The empty export name selects the default export, which exists only while
// exactly one export is registered. A read-only export advertises the same
// commands plus READ_ONLY; WRITE, TRIM and WRITE_ZEROES then fail with EPERM.
//
// # Errors
//
// A request that is well formed but invalid never reaches the Backend: an
// unknown command or flag, a zero length, a FLUSH with a range, or a
// READ/WRITE over Options.MaxRequest gets EINVAL; a READ or TRIM past the
// end EINVAL, a WRITE or WRITE_ZEROES past the end ENOSPC; a modification of
// a read-only export EPERM. A rejected WRITE's payload is read and dropped
// (up to 64 MiB; beyond that the connection is closed), so the connection
// stays usable. A bad request magic, like any other loss of framing, closes
// the connection. Backend errors map to ENOSPC (ENOSPC, EDQUOT, EFBIG), EPERM
// (EPERM, EROFS), EINVAL, ESHUTDOWN, and EIO for everything else.
//
// WRITE_ZEROES with NO_HOLE is carried out with Backend.WriteAt of zero
// blocks, since Backend.Zero may deallocate and cannot be told not to.
//
// # Concurrency
//
// One goroutine per connection reads requests and starts a goroutine per
// valid request, bounded per connection by Options.MaxInFlight requests and
// a byte budget, so a slow backend call does not stall the ones behind it.
// Replies go out in completion order, matched by cookie; a mutex keeps each
// reply header and its READ payload contiguous on the wire. A write is
// acknowledged only after Backend.WriteAt returns, so a FLUSH that calls
// Backend.Flush after it arrives covers every write acknowledged before it,
// on this connection and on any other (CAN_MULTI_CONN). The Backend must
// therefore make Flush cover all completed writes of the export, whichever
// connection issued them.
//
// Section names in comments ([Request message], ...) refer to the protocol
// specification, NetworkBlockDevice/nbd doc/proto.md.
package nbd
