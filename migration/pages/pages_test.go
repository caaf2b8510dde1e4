package pages

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

func naiveZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

func TestIsZero(t *testing.T) {
	buf := make([]byte, 3*4096+13)
	for _, n := range []int{0, 1, 7, 8, 63, 64, 65, 4095, 4096, 4097, len(buf) - 1} {
		for off := 0; off < 9; off++ {
			if off+n > len(buf) {
				continue
			}
			p := buf[off : off+n]
			if !IsZero(p) {
				t.Fatalf("len %d off %d: zero buffer reported non-zero", n, off)
			}
			// Every single set byte position must be found, including in the tail.
			for i := 0; i < n; i++ {
				p[i] = 1 << (i % 8)
				if IsZero(p) {
					t.Fatalf("len %d off %d: byte %d set, reported zero", n, off, i)
				}
				p[i] = 0
			}
		}
	}
}

func FuzzIsZero(f *testing.F) {
	f.Add([]byte{}, uint16(0))
	f.Add(make([]byte, 4096), uint16(4095))
	f.Fuzz(func(t *testing.T, p []byte, at uint16) {
		if got, want := IsZero(p), naiveZero(p); got != want {
			t.Fatalf("IsZero = %v, byte loop = %v", got, want)
		}
	})
}

// halfEncoder accepts pages whose first byte is odd and encodes them as their first half.
type halfEncoder struct{}

func (halfEncoder) Kind() Kind { return Compressed }
func (halfEncoder) Encode(dst []byte, _ Ref, page []byte) ([]byte, bool) {
	if page[0]%2 == 0 {
		return dst, false
	}
	return append(dst, page[:len(page)/2]...), true
}

func TestClassify(t *testing.T) {
	c := &Classifier{Encoders: []Encoder{halfEncoder{}}}
	var scratch []byte
	zero := make([]byte, 4096)
	odd := bytes.Repeat([]byte{3}, 4096)
	even := bytes.Repeat([]byte{2}, 4096)
	if k, d := c.Classify(Ref{}, zero, &scratch); k != Zero || d != nil {
		t.Fatalf("zero page: %v, %d bytes", k, len(d))
	}
	if k, d := c.Classify(Ref{}, odd, &scratch); k != Compressed || len(d) != 2048 {
		t.Fatalf("odd page: %v, %d bytes", k, len(d))
	}
	if k, d := c.Classify(Ref{}, even, &scratch); k != Raw || &d[0] != &even[0] {
		t.Fatalf("even page: %v, want raw aliasing the page", k)
	}
	want := Counters{Zero: 1, Raw: 1, Compressed: 1}
	if c.Counters != want {
		t.Fatalf("counters %v, want %v", c.Counters, want)
	}
	if c.Counters.Total() != 3 {
		t.Fatalf("total %d", c.Counters.Total())
	}
}

func BenchmarkIsZero(b *testing.B) {
	p := make([]byte, 4096)
	b.SetBytes(int64(len(p)))
	for b.Loop() {
		if !IsZero(p) {
			b.Fatal("not zero")
		}
	}
}

func BenchmarkBytesEqualZero(b *testing.B) {
	p := make([]byte, 4096)
	z := make([]byte, 4096)
	b.SetBytes(int64(len(p)))
	for b.Loop() {
		if !bytes.Equal(p, z) {
			b.Fatal("not zero")
		}
	}
}

func BenchmarkClassifyRandom(b *testing.B) {
	p := make([]byte, 4096)
	for i := range p {
		p[i] = byte(rand.IntN(256))
	}
	c := &Classifier{}
	var s []byte
	b.SetBytes(int64(len(p)))
	for b.Loop() {
		c.Classify(Ref{}, p, &s)
	}
}

// recording is an encoder that accepts pages whose first byte is its mark, and records the
// others it is told of.
type recording struct {
	mark     byte
	encoded  []Ref
	recorded []Ref
}

func (r *recording) Kind() Kind { return Delta }

func (r *recording) Encode(dst []byte, ref Ref, page []byte) ([]byte, bool) {
	if page[0] != r.mark {
		r.recorded = append(r.recorded, ref) // asked and declined: it sees the page too
		return dst, false
	}
	r.encoded = append(r.encoded, ref)
	return append(dst, 1), true
}

func (r *recording) Record(ref Ref, _ []byte) { r.recorded = append(r.recorded, ref) }

// TestClassifyRecords: a Recorder hears of every page it was not asked about: zero pages,
// pages sent raw by choice, pages an encoder before it took.
func TestClassifyRecords(t *testing.T) {
	first := &recording{mark: 1}
	rec := &recording{mark: 2}
	c := Classifier{Encoders: []Encoder{first, rec}}
	page := func(b byte) []byte { p := make([]byte, 4096); p[0] = b; return p }
	var scratch []byte
	for i, b := range []byte{0, 1, 2, 3} { // zero, taken by first, by rec, raw
		c.Classify(Ref{Index: uint64(i)}, page(b), &scratch)
	}
	c.Raw = true
	c.Classify(Ref{Index: 4}, page(2), &scratch) // raw by choice
	seen := map[uint64]bool{}
	for _, r := range append(rec.encoded, rec.recorded...) {
		seen[r.Index] = true
	}
	for i := range uint64(5) {
		if !seen[i] {
			t.Errorf("page %d: the recorder never heard of it (encoded %v, recorded %v)", i, rec.encoded, rec.recorded)
		}
	}
	if len(rec.encoded) != 1 || rec.encoded[0].Index != 2 {
		t.Errorf("encoded %v, want page 2", rec.encoded)
	}
}
