package compress

import (
	"bytes"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"

	"github.com/godwit-vm/godwit/migration/pages"
)

const ps = 4096

// textPage is words from a small dictionary, like the guest's text content.
func textPage(seed uint64) []byte {
	words := strings.Fields("migration page guest memory round dirty stream zero copy host vcpu state frame batch link")
	rng := rand.New(rand.NewPCG(seed, 1))
	var b []byte
	for len(b) < ps {
		b = append(b, words[rng.IntN(len(words))]...)
		b = append(b, ' ')
	}
	return b[:ps]
}

func randomPage(seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, 2))
	b := make([]byte, ps)
	for i := 0; i < ps; i += 8 {
		v := rng.Uint64()
		for k := range 8 {
			b[i+k] = byte(v >> (8 * k))
		}
	}
	return b
}

func codec(t testing.TB, level string) (*Encoder, *Decoder) {
	e, err := NewEncoder(level, ps)
	if err != nil {
		t.Fatal(err)
	}
	d, err := NewDecoder(ps)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close(); d.Close() })
	return e, d
}

// TestRoundTrip: text pages compress at every level and decode to themselves; random pages
// are declined; appended frames leave what dst held before them alone.
func TestRoundTrip(t *testing.T) {
	for _, level := range Levels {
		e, d := codec(t, level)
		prefix := []byte("before")
		for seed := range uint64(20) {
			page := textPage(seed)
			out, ok := e.Encode(append([]byte(nil), prefix...), pages.Ref{Index: seed}, page)
			if !ok {
				t.Fatalf("level %s: a text page was declined", level)
			}
			if !bytes.Equal(out[:len(prefix)], prefix) {
				t.Fatalf("level %s: Encode changed what dst held", level)
			}
			frame := out[len(prefix):]
			if len(frame) > ps/2 {
				t.Errorf("level %s: a text page took %d bytes", level, len(frame))
			}
			got := make([]byte, ps)
			if err := d.Decode(got, pages.Ref{Index: seed}, frame); err != nil {
				t.Fatalf("level %s: %v", level, err)
			}
			if !bytes.Equal(got, page) {
				t.Fatalf("level %s: page %d decoded wrong", level, seed)
			}
		}
		dst := []byte("x")
		if out, ok := e.Encode(dst, pages.Ref{}, randomPage(1)); ok || len(out) != 1 {
			t.Errorf("level %s: a random page was not declined (ok %v, %d bytes)", level, ok, len(out))
		}
	}
	if _, err := NewEncoder("fast", ps); err == nil {
		t.Error("an unknown level was accepted")
	}
}

// TestS2RoundTrip: text pages go as S2 blocks and decode to themselves, appended after what dst
// held; random pages are declined; what is not one block of exactly one page is refused.
func TestS2RoundTrip(t *testing.T) {
	e, d := NewS2Encoder(ps), S2Decoder{PageSize: ps}
	if e.Kind() != pages.S2 || d.Kind() != pages.S2 {
		t.Fatalf("kinds %v, %v", e.Kind(), d.Kind())
	}
	prefix := []byte("before")
	var block []byte
	for seed := range uint64(20) {
		page := textPage(seed)
		out, ok := e.Encode(append([]byte(nil), prefix...), pages.Ref{Index: seed}, page)
		if !ok || !bytes.Equal(out[:len(prefix)], prefix) || len(out)-len(prefix) > ps/2 {
			t.Fatalf("page %d: ok %v, %d bytes, prefix kept %v", seed, ok, len(out)-len(prefix), bytes.Equal(out[:len(prefix)], prefix))
		}
		block = out[len(prefix):]
		got := make([]byte, ps)
		if err := d.Decode(got, pages.Ref{Index: seed}, block); err != nil || !bytes.Equal(got, page) {
			t.Fatalf("page %d: decoded wrong (%v)", seed, err)
		}
	}
	if out, ok := e.Encode([]byte("x"), pages.Ref{}, randomPage(1)); ok || len(out) != 1 {
		t.Errorf("a random page was not declined (ok %v, %d bytes)", ok, len(out))
	}
	// A block has no checksum of its own (the wire frame has one): only its shape is checked.
	for name, data := range map[string][]byte{
		"empty": nil, "truncated": block[:len(block)-3], "half a page": s2.Encode(nil, textPage(2)[:ps/2]),
		"two pages": s2.Encode(nil, bytes.Repeat(textPage(3), 2)),
		"garbage":   []byte("not an s2 block"), "two blocks": append(bytes.Clone(block), block...),
	} {
		if err := d.Decode(make([]byte, ps), pages.Ref{Index: 7}, data); err == nil {
			t.Errorf("%s: decoded without an error", name)
		}
	}
	if err := d.Decode(make([]byte, ps-1), pages.Ref{}, block); err == nil {
		t.Error("a short buffer was accepted")
	}
}

// FuzzDecodeS2: any input decodes to exactly a page or fails; it never writes past the page
// nor panics.
func FuzzDecodeS2(f *testing.F) {
	block, _ := NewS2Encoder(ps).Encode(nil, pages.Ref{}, textPage(5))
	f.Add(block)
	f.Add(block[:len(block)/2])
	f.Add([]byte{0x80, 0x20, 0x00})
	d := S2Decoder{PageSize: ps}
	f.Fuzz(func(t *testing.T, data []byte) { decodeInPage(t, d, data) })
}

// decodeInPage decodes data into a page followed by guard bytes, and fails if the decoder wrote
// past the page.
func decodeInPage(t *testing.T, d pages.Decoder, data []byte) {
	buf := make([]byte, ps+64)
	for i := ps; i < len(buf); i++ {
		buf[i] = 0xa5
	}
	if err := d.Decode(buf[:ps], pages.Ref{}, data); err != nil {
		return
	}
	for i := ps; i < len(buf); i++ {
		if buf[i] != 0xa5 {
			t.Fatalf("Decode wrote past the page at %d", i)
		}
	}
}

// TestDecodeRejects: anything that is not one frame of exactly one page is an error.
func TestDecodeRejects(t *testing.T) {
	e, d := codec(t, "")
	frame, _ := e.Encode(nil, pages.Ref{}, textPage(1))
	z, err := zstd.NewWriter(nil, zstd.WithEncoderCRC(false))
	if err != nil {
		t.Fatal(err)
	}
	defer z.Close()
	half := z.EncodeAll(textPage(2)[:ps/2], nil)
	double := z.EncodeAll(bytes.Repeat(textPage(3), 2), nil)
	flipped := bytes.Clone(frame)
	flipped[len(flipped)/2] ^= 0xff
	cases := map[string][]byte{
		"empty":             nil,
		"garbage":           []byte("not a zstd frame at all"),
		"truncated":         frame[:len(frame)-3],
		"half a page":       half,
		"two pages":         double,
		"two frames":        append(bytes.Clone(frame), frame...),
		"a corrupted frame": flipped,
	}
	for name, data := range cases {
		page := make([]byte, ps)
		if err := d.Decode(page, pages.Ref{Index: 7}, data); err == nil {
			t.Errorf("%s: decoded without an error", name)
		}
	}
	if err := d.Decode(make([]byte, ps-1), pages.Ref{}, frame); err == nil {
		t.Error("a short buffer was accepted")
	}
}

// FuzzDecode: any input decodes to exactly a page or fails; it never writes past the page nor
// panics.
func FuzzDecode(f *testing.F) {
	e, err := NewEncoder("", ps)
	if err != nil {
		f.Fatal(err)
	}
	frame, _ := e.Encode(nil, pages.Ref{}, textPage(5))
	f.Add(frame)
	f.Add(frame[:len(frame)/2])
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd})
	d, err := NewDecoder(ps)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) { decodeInPage(t, d, data) })
}

// BenchmarkCodec: ns per page to encode (or decline) and decode text and random pages, and
// the text's ratio, at each zstd level and with S2.
func BenchmarkCodec(b *testing.B) {
	for _, level := range append(slices.Clone(Levels), "s2") {
		for _, kind := range []string{"text", "random"} {
			b.Run(level+"/"+kind, func(b *testing.B) {
				var e *Encoder
				var d pages.Decoder
				if level == "s2" {
					e, d = NewS2Encoder(ps), S2Decoder{PageSize: ps}
				} else {
					e, d = codec(b, level)
				}
				var in [64][]byte
				for i := range in {
					if kind == "text" {
						in[i] = textPage(uint64(i))
					} else {
						in[i] = randomPage(uint64(i))
					}
				}
				var frames [64][]byte
				size := 0
				for i := range in {
					if out, ok := e.Encode(nil, pages.Ref{}, in[i]); ok {
						frames[i] = out
						size += len(out)
					}
				}
				page := make([]byte, ps)
				scratch := make([]byte, 0, ps)
				var encNS, decNS int64
				for n := 0; n < b.N; n++ {
					i := n % len(in)
					t0 := b.Elapsed()
					e.Encode(scratch[:0], pages.Ref{}, in[i])
					t1 := b.Elapsed()
					if frames[i] != nil {
						if err := d.Decode(page, pages.Ref{}, frames[i]); err != nil {
							b.Fatal(err)
						}
					}
					decNS += int64(b.Elapsed() - t1)
					encNS += int64(t1 - t0)
				}
				b.ReportMetric(float64(encNS)/float64(b.N), "encode-ns/page")
				b.ReportMetric(float64(decNS)/float64(b.N), "decode-ns/page")
				if size > 0 {
					b.ReportMetric(float64(size)/float64(ps*len(in)), "ratio")
				}
			})
		}
	}
}
