//go:build !(amd64 || arm64 || 386 || ppc64le || riscv64 || loong64 || s390x || ppc64)

package pages

import "encoding/binary"

// IsZero reports whether p is all zero bytes, eight bytes at a time.
func IsZero(p []byte) bool {
	for len(p) >= 8 {
		if binary.LittleEndian.Uint64(p) != 0 {
			return false
		}
		p = p[8:]
	}
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}
