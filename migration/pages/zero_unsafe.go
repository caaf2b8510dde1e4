//go:build amd64 || arm64 || 386 || ppc64le || riscv64 || loong64 || s390x || ppc64

package pages

import "unsafe"

// IsZero reports whether p is all zero bytes. It ORs eight 64-bit words per step (these
// architectures load unaligned words without faulting) and stops at the first 64-byte block
// with a set bit.
func IsZero(p []byte) bool {
	n := len(p) / 64
	if n > 0 {
		w := unsafe.Slice((*uint64)(unsafe.Pointer(unsafe.SliceData(p))), n*8)
		for i := 0; i+8 <= len(w); i += 8 {
			if w[i]|w[i+1]|w[i+2]|w[i+3]|w[i+4]|w[i+5]|w[i+6]|w[i+7] != 0 {
				return false
			}
		}
	}
	for _, b := range p[n*64:] {
		if b != 0 {
			return false
		}
	}
	return true
}
