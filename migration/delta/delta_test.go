package delta

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/godwit-vm/godwit/migration/pages"
)

const ps = 4096

func randomPage(rng *rand.Rand) []byte {
	p := make([]byte, ps)
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
	return p
}

// TestRoundTrip: Apply(old, Encode(old, new)) is new, for changes of every shape, and the delta
// of a small change is small.
func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for trial := range 500 {
		old := randomPage(rng)
		page := bytes.Clone(old)
		changes := trial % 20
		for range changes {
			off := rng.IntN(ps)
			n := 1 + rng.IntN(64)
			for i := off; i < min(ps, off+n); i++ {
				page[i] = byte(rng.Uint32())
			}
		}
		if trial%50 == 0 {
			page = randomPage(rng) // all changed
		}
		d := Encode(nil, old, page)
		got := bytes.Clone(old)
		if err := Apply(got, d); err != nil {
			t.Fatalf("trial %d: Apply: %v", trial, err)
		}
		if !bytes.Equal(got, page) {
			t.Fatalf("trial %d: the page after Apply differs", trial)
		}
		if trial%50 != 0 && len(d) > changes*(72+2+4)+12 {
			t.Fatalf("trial %d: %d changes of at most 64 bytes took a %d-byte delta", trial, changes, len(d))
		}
	}
}

// TestApplyRejects: malformed deltas are errors, never a panic or a write past the page.
func TestApplyRejects(t *testing.T) {
	for _, c := range []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"no count", []byte{0}},
		{"zero words", []byte{0, 0}},
		{"past the end", []byte{0x80, 0x04, 1, 1, 2, 3, 4, 5, 6, 7, 8}},
		{"too long a run", []byte{0, 0x81, 0x04}},
		{"short data", []byte{0, 2, 1, 2, 3}},
		{"bad varint", []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}},
	} {
		page := make([]byte, ps)
		if err := Apply(page, c.data); err == nil {
			t.Errorf("%s: Apply(% x) accepted it", c.name, c.data)
		}
	}
}

// TestEncoderCache: the first send of a page declines (and caches it), a small change then
// goes as a delta, Record keeps the cache in step with pages sent without Encode, and a
// stopped encoder declines everything.
func TestEncoderCache(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	e := NewEncoder(64*ps, ps)
	ref := pages.Ref{Region: 0, Index: 7}
	v1 := randomPage(rng)
	if _, ok := e.Encode(nil, ref, v1); ok {
		t.Fatal("first send: encoded; want declined")
	}
	v2 := bytes.Clone(v1)
	v2[100] ^= 1
	d, ok := e.Encode(nil, ref, v2)
	if !ok || len(d) > 16 {
		t.Fatalf("one byte changed: ok %v, %d bytes", ok, len(d))
	}
	dst := bytes.Clone(v1)
	if err := (Decoder{}).Decode(dst, ref, d); err != nil || !bytes.Equal(dst, v2) {
		t.Fatalf("decode: %v", err)
	}
	// Sent zero (Record), then changed a little: the delta is against zero, not v2.
	zero := make([]byte, ps)
	e.Record(ref, zero)
	v3 := bytes.Clone(zero)
	v3[5] = 9
	d, ok = e.Encode(nil, ref, v3)
	got := make([]byte, ps)
	if !ok || Apply(got, d) != nil || !bytes.Equal(got, v3) {
		t.Fatalf("after Record: ok %v, delta does not turn zero into the page", ok)
	}
	e.Stop()
	if _, ok := e.Encode(nil, ref, v3); ok {
		t.Fatal("stopped encoder encoded")
	}
}

// FuzzApply: any data either applies within the page or is an error.
func FuzzApply(f *testing.F) {
	rng := rand.New(rand.NewPCG(5, 6))
	old := randomPage(rng)
	page := bytes.Clone(old)
	page[10], page[4000] = 1, 2
	f.Add(Encode(nil, old, page))
	f.Add(Encode(nil, old, randomPage(rng)))
	f.Add([]byte{0, 1, 1, 2, 3, 4, 5, 6, 7, 8})
	f.Fuzz(func(t *testing.T, data []byte) {
		p := make([]byte, ps)
		if err := Apply(p, data); err != nil {
			return
		}
		if len(p) != ps {
			t.Fatal("page size changed")
		}
	})
}

func BenchmarkEncode(b *testing.B) {
	rng := rand.New(rand.NewPCG(7, 8))
	old := randomPage(rng)
	page := bytes.Clone(old)
	copy(page[1024:], randomPage(rng)[:64])
	b.SetBytes(ps)
	var dst []byte
	for b.Loop() {
		dst = Encode(dst[:0], old, page)
	}
}
