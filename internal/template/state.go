package template

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unicode/utf8"
)

// Section is one component's saved state (the VMM's state sections, as a migration moves them).
type Section struct {
	ID      string
	Version uint32
	Data    []byte
}

// The state file, little endian:
//
//	"GWTS"  magic
//	u32     format version (1)
//	u32     section count (at most maxSections)
//	then per section:
//	  u8    id length (1..255), the id (UTF-8, unique in the file)
//	  u32   the section's own version
//	  u32   data length (at most maxSectionBytes), the data
//
// and nothing after the last section.
const (
	stateMagic      = "GWTS"
	stateVersion    = 1
	maxSections     = 4200 // a machine section, up to 4096 vCPUs, the clock and devices
	maxSectionBytes = 16 << 20
)

// EncodeState makes a state file of secs.
func EncodeState(secs []Section) ([]byte, error) {
	if len(secs) > maxSections {
		return nil, fmt.Errorf("template: %d state sections, at most %d", len(secs), maxSections)
	}
	b := append([]byte(stateMagic), 0, 0, 0, 0, 0, 0, 0, 0)
	binary.LittleEndian.PutUint32(b[4:], stateVersion)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(secs)))
	for _, s := range secs {
		if s.ID == "" || len(s.ID) > 255 || len(s.Data) > maxSectionBytes {
			return nil, fmt.Errorf("template: state section %q of %d bytes: id empty or over 255 bytes, or data over %d", s.ID, len(s.Data), maxSectionBytes)
		}
		b = append(b, byte(len(s.ID)))
		b = append(b, s.ID...)
		b = binary.LittleEndian.AppendUint32(b, s.Version)
		b = binary.LittleEndian.AppendUint32(b, uint32(len(s.Data)))
		b = append(b, s.Data...)
	}
	return b, nil
}

// errState marks a malformed state file.
var errState = errors.New("template: malformed state")

// DecodeState reads a state file, trusting nothing in it.
func DecodeState(b []byte) ([]Section, error) {
	bad := func(format string, args ...any) ([]Section, error) {
		return nil, fmt.Errorf("%w: %s", errState, fmt.Sprintf(format, args...))
	}
	if len(b) < 12 || string(b[:4]) != stateMagic {
		return bad("no %q header", stateMagic)
	}
	if v := binary.LittleEndian.Uint32(b[4:]); v != stateVersion {
		return bad("format version %d, this godwit reads %d", v, stateVersion)
	}
	n := binary.LittleEndian.Uint32(b[8:])
	if n > maxSections {
		return bad("%d sections, at most %d", n, maxSections)
	}
	// Each section takes 10 bytes at least: a short file cannot make us allocate much.
	if uint64(n)*10 > uint64(len(b)) {
		return bad("%d sections cannot fit in %d bytes", n, len(b))
	}
	secs := make([]Section, 0, n)
	seen := make(map[string]bool, n)
	off := 12
	for i := uint32(0); i < n; i++ {
		if off >= len(b) {
			return bad("section %d: the file ends at %d", i, off)
		}
		l := int(b[off])
		off++
		if l == 0 || len(b)-off < l+8 {
			return bad("section %d: id of %d bytes at %d does not fit", i, l, off)
		}
		id := string(b[off : off+l])
		off += l
		if !utf8.ValidString(id) || seen[id] {
			return bad("section %d: id %q is not UTF-8 or repeated", i, id)
		}
		seen[id] = true
		ver := binary.LittleEndian.Uint32(b[off:])
		size := binary.LittleEndian.Uint32(b[off+4:])
		off += 8
		if size > maxSectionBytes || uint64(len(b)-off) < uint64(size) {
			return bad("section %q: %d bytes of data at %d, the file has %d", id, size, off, len(b)-off)
		}
		secs = append(secs, Section{ID: id, Version: ver, Data: append([]byte(nil), b[off:off+int(size)]...)})
		off += int(size)
	}
	if off != len(b) {
		return bad("%d bytes after the last section", len(b)-off)
	}
	return secs, nil
}
