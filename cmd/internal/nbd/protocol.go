package nbd

import (
	"errors"
	"syscall"
)

// Wire constants, named as in the specification. All integers on the wire
// are big-endian.
const (
	nbdMagic         = 0x4e42444d41474943 // "NBDMAGIC", greeting
	ihaveoptMagic    = 0x49484156454F5054 // "IHAVEOPT", greeting and option requests
	optReplyMagic    = 0x0003e889045565a9
	requestMagic     = 0x25609513
	simpleReplyMagic = 0x67446698
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle  = 1 << 0
	flagNoZeroes       = 1 << 1
	flagCFixedNewstyle = 1 << 0
	flagCNoZeroes      = 1 << 1

	serverHandshakeFlags = flagFixedNewstyle | flagNoZeroes
	knownClientFlags     = flagCFixedNewstyle | flagCNoZeroes
)

// Options.
const (
	optExportName = 1
	optAbort      = 2
	optList       = 3
	optStartTLS   = 5
	optInfo       = 6
	optGo         = 7
)

// Option reply types.
const (
	repAck        = 1
	repServer     = 2
	repInfo       = 3
	repErrUnsup   = 0x80000001
	repErrInvalid = 0x80000003
	repErrUnknown = 0x80000006
	repErrShut    = 0x80000007
)

// Information types carried by NBD_REP_INFO.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Transmission flags.
const (
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagCanMultiConn    = 1 << 8

	// baseTransmissionFlags is what every export advertises; exactly the
	// commands and flags this package implements.
	baseTransmissionFlags = tflagHasFlags | tflagSendFlush | tflagSendFUA |
		tflagSendTrim | tflagSendWriteZeroes | tflagCanMultiConn
)

// Commands.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6
)

// Command flags.
const (
	cmdFlagFUA    = 1 << 0
	cmdFlagNoHole = 1 << 1
)

// Error values of simple replies.
const (
	errPerm   = 1
	errIO     = 5
	errInval  = 22
	errNoSpc  = 28
	errShutdn = 108
)

// Size limits.
const (
	// maxStringLength is the protocol's hard limit on names and
	// descriptions [Conventions].
	maxStringLength = 4096

	// Block size constraints advertised in NBD_INFO_BLOCK_SIZE. The
	// preferred size is also the smallest MaxRequest we accept, because
	// clients (libnbd, qemu) ignore or reject an advertisement whose
	// maximum is below the preferred size.
	minimumBlockSize   = 1
	preferredBlockSize = 4096

	defaultMaxRequest  = 32 << 20
	largestMaxRequest  = 1 << 30
	defaultMaxInFlight = 64

	// drainLimit is how large a rejected WRITE payload may be and still be
	// read and discarded so the connection survives. The specification
	// asks servers not to treat up to 32 MiB as a denial of service;
	// libnbd's relaxed mode sends up to 64 MiB.
	drainLimit = 64 << 20

	// Negotiation bounds against a client that never gets to the point.
	// The largest valid OPT_GO is 4+4096+2+2*65535 bytes; anything above
	// maxOptionLength is not worth reading.
	maxOptionLength = 1 << 20
	maxOptions      = 64
)

// errno maps a Backend error to the NBD error sent to the client. The
// specification lists the few values a client understands; everything else
// is an I/O error.
func errno(err error) uint32 {
	switch {
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return errNoSpc
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EROFS):
		return errPerm
	case errors.Is(err, syscall.EINVAL):
		return errInval
	case errors.Is(err, syscall.ESHUTDOWN):
		return errShutdn
	default:
		return errIO
	}
}

// commandName is for log lines.
func commandName(typ uint16) string {
	switch typ {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disc"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdWriteZeroes:
		return "write_zeroes"
	default:
		return "unknown"
	}
}
