// Package pages decides how each guest page travels: not at all (a hole), as a zero marker, as
// raw bytes, compressed, as a reference to an identical page sent before (dedup) or as a
// delta to the version sent before. It knows nothing of the stream format: the migration engine maps a [Kind] to the wire
// encoding with the same number.
//
// Zero detection runs on every page of every round, so it reads memory a word at a time and
// returns at the first non-zero word (most non-zero pages are rejected within the first cache
// line).
package pages

import "fmt"

// Kind is how a page was sent. The first six values equal the wire encodings.
type Kind uint8

const (
	Zero       Kind = 0 // all zero: sent as a marker without data
	Raw        Kind = 1 // sent as is
	Compressed Kind = 2 // sent compressed (package compress)
	Dedup      Kind = 3 // sent as a reference to an identical page sent before (package dedup)
	Delta      Kind = 4 // sent as a delta to the version sent before (package delta)
	S2         Kind = 5 // sent as an S2 block (package compress): cheaper than zstd, larger
	Hole       Kind = 6 // never populated: not sent at all
	Free       Kind = 7 // reported free by the guest: not sent (its content does not matter)
	Base       Kind = 8 // the template's page, unchanged: not sent (the destination clones the template)
	NumKinds        = 9
)

func (k Kind) String() string {
	switch k {
	case Zero:
		return "zero"
	case Raw:
		return "raw"
	case Compressed:
		return "compressed"
	case Dedup:
		return "dedup"
	case Delta:
		return "delta"
	case S2:
		return "s2"
	case Hole:
		return "hole"
	case Free:
		return "free"
	case Base:
		return "base"
	}
	return fmt.Sprintf("kind %d", uint8(k))
}

// Ref names a page: its region and index within the region. Encoders that keep history
// (delta, dedup) key it by Ref.
type Ref struct {
	Region int
	Index  uint64
}

// Encoder is an optional page encoding (compression, dedup, delta). Encoders are tried in
// order after zero detection; the first that accepts a page wins, and a page no encoder
// accepts is sent raw.
type Encoder interface {
	Kind() Kind
	// Encode appends the encoded form of page to dst and returns it with ok = true, or
	// returns dst unchanged with ok = false to decline (for example when compression would
	// not save enough). The encoded form is at most len(page) bytes.
	Encode(dst []byte, ref Ref, page []byte) (out []byte, ok bool)
}

// Decoder is the receiving half of an Encoder.
type Decoder interface {
	Kind() Kind
	// Decode reconstructs the page named ref into page (one page long) from data.
	Decode(page []byte, ref Ref, data []byte) error
}

// Counters counts pages by kind. The zero value is ready.
type Counters [NumKinds]uint64

// Add counts n pages of kind k.
func (c *Counters) Add(k Kind, n uint64) { c[k] += n }

// Get is the count for kind k.
func (c *Counters) Get(k Kind) uint64 { return c[k] }

// Total is the count over all kinds but holes, free and base pages (the pages that were sent).
func (c *Counters) Total() uint64 {
	var t uint64
	for k, n := range c {
		if Kind(k) != Hole && Kind(k) != Free && Kind(k) != Base {
			t += n
		}
	}
	return t
}

// Merge adds o's counts to c's.
func (c *Counters) Merge(o *Counters) {
	for k, n := range o {
		c[k] += n
	}
}

// Classifier picks each page's kind and counts them.
type Classifier struct {
	Encoders []Encoder
	Counters Counters
	// Encoded counts the bytes of encoded data of the pages an encoder took, by kind (the
	// other kinds stay 0): with the page size it gives what each encoding saved.
	Encoded Counters
	// Raw, while set, tries no encoder: pages go zero or raw.
	Raw bool
}

// Merge adds o's counts to c's and resets o's.
func (c *Classifier) Merge(o *Classifier) {
	c.Counters.Merge(&o.Counters)
	c.Encoded.Merge(&o.Encoded)
	o.Counters, o.Encoded = Counters{}, Counters{}
}

// Classify decides how page travels and returns its kind and data: nil for Zero, page itself
// for Raw, the encoded form appended to *scratch otherwise. Returned data aliases page or
// *scratch and stays valid until they are reused.
func (c *Classifier) Classify(ref Ref, page []byte, scratch *[]byte) (Kind, []byte) {
	if IsZero(page) {
		c.Counters[Zero]++
		c.record(0, ref, page)
		return Zero, nil
	}
	encoders := c.Encoders
	if c.Raw {
		encoders = nil
	}
	for i, e := range encoders {
		start := len(*scratch)
		out, ok := e.Encode(*scratch, ref, page)
		if ok && len(out)-start > 0 && len(out)-start <= len(page) {
			*scratch = out
			c.Counters[e.Kind()]++
			c.Encoded[e.Kind()] += uint64(len(out) - start)
			c.record(i+1, ref, page)
			return e.Kind(), out[start:]
		}
	}
	c.record(len(encoders), ref, page)
	c.Counters[Raw]++
	return Raw, page
}

// Recorder is an optional Encoder capability, for encoders that keep track of the pages sent
// (delta, dedup):
// Record hears of every page sent without the encoder's Encode (a zero page, a page sent raw
// by choice, a page an encoder before it took), as it goes.
type Recorder interface {
	Record(ref Ref, page []byte)
}

// record tells the recorders among Encoders[from:], which were not asked, of page.
func (c *Classifier) record(from int, ref Ref, page []byte) {
	for _, e := range c.Encoders[from:] {
		if r, ok := e.(Recorder); ok {
			r.Record(ref, page)
		}
	}
}
