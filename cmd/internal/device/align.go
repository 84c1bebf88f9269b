package device

import "unsafe"

// MinAlign is the smallest direct-I/O alignment we ever use: a 512-byte
// sector. A device with a larger logical block size uses that instead.
const MinAlign = 512

// AlignedBuffer returns a zeroed slice of n bytes whose first byte sits at
// an address that is a multiple of align (a power of two). Direct I/O
// needs the memory aligned as well as the offset; callers that allocate
// their buffers with it (and align offsets and lengths) take Direct
// devices' fast path, with no bounce copy.
//
// It over-allocates by align bytes and slices: Go's collector does not
// move heap objects, so the address stays aligned for the buffer's life.
func AlignedBuffer(n, align int) []byte {
	if align <= 1 {
		return make([]byte, n)
	}
	if align&(align-1) != 0 {
		panic("device: alignment is not a power of two")
	}
	b := make([]byte, n+align)
	off := 0
	if r := int(uintptr(unsafe.Pointer(unsafe.SliceData(b))) & uintptr(align-1)); r != 0 {
		off = align - r
	}
	return b[off : off+n : off+n]
}

// IsAligned tells whether p starts at an address that is a multiple of
// align. An empty slice counts as aligned.
func IsAligned(p []byte, align int) bool {
	if len(p) == 0 || align <= 1 {
		return true
	}
	return uintptr(unsafe.Pointer(unsafe.SliceData(p)))&uintptr(align-1) == 0
}

func alignDown(x, a int64) int64 { return x &^ (a - 1) }
func alignUp(x, a int64) int64   { return (x + a - 1) &^ (a - 1) }
