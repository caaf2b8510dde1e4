package template

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"reflect"
	"testing"
)

func testSections() []Section {
	return []Section{{ID: "machine", Version: 1, Data: []byte(`{"name":"a"}`)}, {ID: "vcpu.0", Version: 1, Data: make([]byte, 100)}}
}

func save(t *testing.T, s Store, mem []byte) *Template {
	t.Helper()
	tp, err := s.Save(Meta{MemBytes: uint64(len(mem)), VCPUs: 1, From: "a"}, testSections(), func(w io.Writer) error {
		_, err := w.Write(mem)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return tp
}

// TestStore: a template is its content: saved twice it is one, found by a prefix, read back
// whole, and pushed into another store with the same id; a push changed in transit is refused.
func TestStore(t *testing.T) {
	s := Store{Dir: t.TempDir()}
	mem := bytes.Repeat([]byte("godwit template "), 4096*4)
	clear(mem[4096 : 3*4096]) // a hole in the file, and none in the stream
	clear(mem[len(mem)-4096:])
	a := save(t, s, mem)
	if b := save(t, s, mem); b.ID != a.ID {
		t.Fatalf("the same content saved twice has ids %s and %s", a.ID, b.ID)
	}
	if all, _ := s.List(); len(all) != 1 {
		t.Fatalf("store lists %d templates, want 1", len(all))
	}
	f, err := s.Find(a.ID.Short())
	if err != nil || f.ID != a.ID {
		t.Fatalf("find %s: %v, %v", a.ID.Short(), f, err)
	}
	if _, err := s.Find("ffff"); err == nil {
		t.Fatal("found a template that is not there")
	}
	secs, err := a.Sections()
	if err != nil || !reflect.DeepEqual(secs, testSections()) {
		t.Fatalf("sections read back: %v, %v", secs, err)
	}
	if got, _ := os.ReadFile(a.MemoryPath()); !bytes.Equal(got, mem) {
		t.Fatal("memory read back differs")
	}

	var stream bytes.Buffer
	n, err := a.Export(&stream)
	if err != nil || n != int64(stream.Len()) {
		t.Fatalf("export: %d bytes, %v", n, err)
	}
	raw := stream.Bytes()
	if len(raw) > len(mem)-2*4096 {
		t.Errorf("the push stream of %d bytes of memory with 3 zero pages has %d bytes", len(mem), len(raw))
	}
	other := Store{Dir: t.TempDir()}
	got, had, err := other.Import(bytes.NewReader(raw))
	if err != nil || had || got.ID != a.ID {
		t.Fatalf("import: %v (held already %v), %v", got, had, err)
	}
	if _, had, err := other.Import(bytes.NewReader(raw)); err != nil || !had {
		t.Fatalf("second import: held already %v, %v", had, err)
	}
	bad := append([]byte(nil), raw...)
	bad[len(bad)-16-4096-1] ^= 1 // the last byte of data, before the end marker and the zero page
	third := Store{Dir: t.TempDir()}
	if _, _, err := third.Import(bytes.NewReader(bad)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("a changed push: %v, want ErrCorrupt", err)
	}
	if _, _, err := third.Import(bytes.NewReader(raw[:len(raw)-10])); err == nil {
		t.Fatal("a push cut short was taken")
	}
	if all, _ := third.List(); len(all) != 0 {
		t.Fatalf("failed pushes left %d templates", len(all))
	}
}

func FuzzDecodeState(f *testing.F) {
	b, _ := EncodeState(testSections())
	f.Add(b)
	f.Fuzz(func(t *testing.T, p []byte) {
		secs, err := DecodeState(p)
		if err != nil {
			if !errors.Is(err, errState) {
				t.Fatalf("error without errState: %v", err)
			}
			return
		}
		again, err := EncodeState(secs)
		if err != nil || !bytes.Equal(again, p) {
			t.Fatalf("re-encoded state differs (%v):\n%x\n%x", err, again, p)
		}
	})
}

func FuzzReadPushHeader(f *testing.F) {
	dir := f.TempDir()
	s := Store{Dir: dir}
	mem := bytes.Repeat([]byte{7}, 8192)
	tp, err := s.Save(Meta{MemBytes: uint64(len(mem)), VCPUs: 1}, testSections(), func(w io.Writer) error { _, err := w.Write(mem); return err })
	if err != nil {
		f.Fatal(err)
	}
	var stream bytes.Buffer
	tp.Export(&stream)
	f.Add(stream.Bytes()[:stream.Len()-len(mem)])
	f.Fuzz(func(t *testing.T, p []byte) {
		m, state, err := readHeader(bytes.NewReader(p))
		if err != nil {
			return
		}
		if uint64(len(state)) != uint64(m.StateBytes) || m.MemBytes == 0 {
			t.Fatalf("accepted a header whose state (%d bytes) or memory (%d) does not match its meta", len(state), m.MemBytes)
		}
	})
}

type memAt []byte

func (m memAt) WriteAt(p []byte, off int64) (int, error) { return copy(m[off:], p), nil }

func FuzzReadMemory(f *testing.F) {
	const size = 4 * 4096
	ext := func(off, n uint64) []byte {
		b := make([]byte, 16)
		binary.LittleEndian.PutUint64(b, off)
		binary.LittleEndian.PutUint64(b[8:], n)
		return b
	}
	good := append(ext(4096, 4096), bytes.Repeat([]byte{1}, 4096)...)
	f.Add(append(good, ext(size, 0)...))
	f.Add(ext(size, 0))
	f.Fuzz(func(t *testing.T, p []byte) {
		mem := make(memAt, size)
		h := sha256.New()
		if err := readMemory(bytes.NewReader(p), mem, size, h); err != nil {
			return
		}
		// Accepted: the hash covers the whole memory as written.
		if want := sha256.Sum256(mem); !bytes.Equal(h.Sum(nil), want[:]) {
			t.Fatal("the hash of an accepted stream is not the hash of the memory it wrote")
		}
	})
}
