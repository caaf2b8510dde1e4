package template

import (
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// A template travels between stores (godwit template push) as one stream, little endian:
//
//	"GWTP"  magic
//	u32     format version (1)
//	u32     meta length (at most maxMetaBytes), Meta as JSON
//	u64     state length (the meta's state_bytes, at most maxStateBytes), the state file
//	u64     memory length (the meta's mem_bytes, at most maxMemoryBytes)
//	then the memory's data as extents, ascending and not overlapping:
//	  u64   offset (page aligned), u64 length (page aligned, not 0, inside the memory), bytes
//	and an end marker: u64 offset = the memory length, u64 length 0.
//	Bytes in no extent are zero: the holes of the template's file, which take no bytes.
//
// The receiver hashes what arrives and keeps it only if the hash is the meta's id: a stream
// cut short or changed in transit never becomes a template.
const (
	pushMagic      = "GWTP"
	pushVersion    = 1
	maxMetaBytes   = 1 << 16
	maxStateBytes  = 64 << 20
	maxMemoryBytes = 1 << 40
)

// ErrCorrupt: a pushed template's content does not hash to its id.
var ErrCorrupt = errors.New("template: content does not match its id")

// Export writes t as a push stream and returns the bytes written.
func (t *Template) Export(w io.Writer) (int64, error) {
	state, err := os.ReadFile(filepath.Join(t.Dir, stateFile))
	if err != nil {
		return 0, fmt.Errorf("template %s: %w", t.ID.Short(), err)
	}
	mem, err := os.Open(t.MemoryPath())
	if err != nil {
		return 0, fmt.Errorf("template %s: %w", t.ID.Short(), err)
	}
	defer mem.Close()
	mj, _ := json.Marshal(t.Meta)
	hdr := []byte(pushMagic)
	hdr = binary.LittleEndian.AppendUint32(hdr, pushVersion)
	hdr = binary.LittleEndian.AppendUint32(hdr, uint32(len(mj)))
	hdr = append(hdr, mj...)
	hdr = binary.LittleEndian.AppendUint64(hdr, uint64(len(state)))
	hdr = append(hdr, state...)
	hdr = binary.LittleEndian.AppendUint64(hdr, t.Meta.MemBytes)
	cw := &countingWriter{w: w}
	if _, err := cw.Write(hdr); err != nil {
		return cw.n, fmt.Errorf("template %s: sending: %w", t.ID.Short(), err)
	}
	size := int64(t.Meta.MemBytes)
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(mem.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return cw.n, fmt.Errorf("template %s: SEEK_DATA at %d: %w", t.ID.Short(), off, err)
		}
		hole, err := unix.Seek(int(mem.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return cw.n, fmt.Errorf("template %s: SEEK_HOLE at %d: %w", t.ID.Short(), data, err)
		}
		data, hole = data&^(page-1), min((hole+page-1)&^(page-1), size)
		ext := binary.LittleEndian.AppendUint64(nil, uint64(data))
		ext = binary.LittleEndian.AppendUint64(ext, uint64(hole-data))
		if _, err := cw.Write(ext); err != nil {
			return cw.n, fmt.Errorf("template %s: sending: %w", t.ID.Short(), err)
		}
		if n, err := io.Copy(cw, io.NewSectionReader(mem, data, hole-data)); err != nil || n != hole-data {
			return cw.n, fmt.Errorf("template %s: sending memory at %d: %d of %d bytes: %v", t.ID.Short(), data, n, hole-data, err)
		}
		off = hole
	}
	end := binary.LittleEndian.AppendUint64(nil, uint64(size))
	if _, err := cw.Write(binary.LittleEndian.AppendUint64(end, 0)); err != nil {
		return cw.n, fmt.Errorf("template %s: sending: %w", t.ID.Short(), err)
	}
	return cw.n, nil
}

const page = 4096

// readMemory reads the extents of a push stream into f (size bytes, truncated to it) and
// feeds h with the whole memory, zeros of the gaps included.
func readMemory(r io.Reader, f io.WriterAt, size int64, h io.Writer) error {
	zeros := make([]byte, 1<<20)
	hashZeros := func(n int64) {
		for n > 0 {
			k := min(n, int64(len(zeros)))
			h.Write(zeros[:k])
			n -= k
		}
	}
	var pos int64 // the memory is hashed up to here
	for {
		var ext [16]byte
		if _, err := io.ReadFull(r, ext[:]); err != nil {
			return fmt.Errorf("extent at %d: %w", pos, err)
		}
		off, n := int64(binary.LittleEndian.Uint64(ext[:])), int64(binary.LittleEndian.Uint64(ext[8:]))
		if uint64(off) == uint64(size) && n == 0 {
			hashZeros(size - pos)
			return nil
		}
		if off < pos || off%page != 0 || n <= 0 || n%page != 0 || off > size || n > size-off {
			return fmt.Errorf("extent %d+%d: not page aligned, out of order or outside the %d bytes", uint64(off), uint64(n), size)
		}
		hashZeros(off - pos)
		if got, err := io.CopyN(io.MultiWriter(&offsetWriter{f: f, off: off}, h), r, n); err != nil {
			return fmt.Errorf("extent %d+%d: %d bytes: %w", off, n, got, err)
		}
		pos = off + n
	}
}

type offsetWriter struct {
	f   io.WriterAt
	off int64
}

// discardAt drops what a push stream holds for a template the store has already.
type discardAt struct{}

func (discardAt) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }

func (w *offsetWriter) Write(p []byte) (int, error) {
	n, err := w.f.WriteAt(p, w.off)
	w.off += int64(n)
	return n, err
}

// readHeader reads a push stream up to its memory: the meta and the state.
func readHeader(r io.Reader) (Meta, []byte, error) {
	var m Meta
	bad := func(format string, args ...any) (Meta, []byte, error) {
		return m, nil, fmt.Errorf("template: push stream: "+format, args...)
	}
	var fixed [12]byte
	if _, err := io.ReadFull(r, fixed[:]); err != nil {
		return bad("header: %v", err)
	}
	if string(fixed[:4]) != pushMagic {
		return bad("no %q header (%q): not a template", pushMagic, fixed[:4])
	}
	if v := binary.LittleEndian.Uint32(fixed[4:]); v != pushVersion {
		return bad("format version %d, this godwit reads %d", v, pushVersion)
	}
	ml := binary.LittleEndian.Uint32(fixed[8:])
	if ml > maxMetaBytes {
		return bad("meta of %d bytes, at most %d", ml, maxMetaBytes)
	}
	mj := make([]byte, ml)
	if _, err := io.ReadFull(r, mj); err != nil {
		return bad("meta: %v", err)
	}
	if err := json.Unmarshal(mj, &m); err != nil {
		return bad("meta: %v", err)
	}
	if _, err := ParseID(m.ID); err != nil {
		return bad("meta: %v", err)
	}
	var l [8]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return bad("state length: %v", err)
	}
	sl := binary.LittleEndian.Uint64(l[:])
	if sl > maxStateBytes || sl != uint64(m.StateBytes) {
		return bad("state of %d bytes: its meta says %d, at most %d", sl, m.StateBytes, maxStateBytes)
	}
	state := make([]byte, sl)
	if _, err := io.ReadFull(r, state); err != nil {
		return bad("state: %v", err)
	}
	if _, err := DecodeState(state); err != nil {
		return bad("%v", err)
	}
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return bad("memory length: %v", err)
	}
	if n := binary.LittleEndian.Uint64(l[:]); n != m.MemBytes || n > maxMemoryBytes || n == 0 {
		return bad("memory of %d bytes: its meta says %d, at most %d", n, m.MemBytes, uint64(maxMemoryBytes))
	}
	return m, state, nil
}

// Import reads a push stream into the store. It returns the template and whether the store
// held it already (the stream is then read to its end and dropped).
func (s Store) Import(r io.Reader) (*Template, bool, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	meta, state, err := readHeader(br)
	if err != nil {
		return nil, false, err
	}
	id, _ := ParseID(meta.ID)
	if t, err := s.Get(id); err == nil {
		return t, true, readMemory(br, discardAt{}, int64(meta.MemBytes), io.Discard)
	}
	tmp, err := s.begin()
	if err != nil {
		return nil, false, err
	}
	defer os.RemoveAll(tmp)
	f, err := os.OpenFile(filepath.Join(tmp, memoryFile), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o400)
	if err != nil {
		return nil, false, fmt.Errorf("template: %w", err)
	}
	h := sha256.New()
	err = f.Truncate(int64(meta.MemBytes))
	if err == nil {
		err = readMemory(br, f, int64(meta.MemBytes), h)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, false, fmt.Errorf("template %s: push stream: memory: %w", id.Short(), err)
	}
	h.Write(state)
	if got := ID(h.Sum(nil)); got != id {
		return nil, false, fmt.Errorf("%w: template %s arrived with content %s", ErrCorrupt, id.Short(), got.Short())
	}
	t, err := s.commit(tmp, meta, state, id)
	return t, false, err
}
