package migration

import (
	"fmt"
	"math/bits"
)

// Bitmap is a set of pages of one region, kept in chunks of chunkPages pages: a chunk no
// page of which was ever added is not allocated, and summaries say which chunks are and which
// of their words may hold pages. What changed since the last round is a few pages of a large
// memory, and every operation here goes by the summaries, so its cost follows the pages in
// the set (and a bit per chunk to scan, 2 KiB for 256 GiB of memory; a new set allocates a
// pointer per chunk, 128 KiB), not a bit per page: in the stop window a flat bitmap of a large
// VM costs milliseconds to copy, merge or walk. Bits past the end of the region are ignored.
//
// A Bitmap is a handle: copies share their pages (as a slice's do), and adding a page to one
// adds it to all.
type Bitmap struct {
	n      uint64   // pages it can hold
	chunks []*chunk // chunk c holds pages [c*chunkPages, (c+1)*chunkPages); nil: none of them
	live   []uint64 // bit c%64 of word c/64: chunk c is allocated
}

const (
	chunkWords = 64
	chunkPages = chunkWords * 64 // 16 MiB of 4 KiB pages
)

// chunk holds the pages of one chunk, bit i%64 of word i/64 for its page i (the layout of
// KVM's dirty log), and which of its words may be non-zero (a page added since its bit
// was set, or removed since: Clear leaves it).
type chunk struct {
	sum uint64 // bit i: w[i] may be non-zero
	w   [chunkWords]uint64
}

// NewBitmap returns an empty bitmap for n pages.
func NewBitmap(n uint64) Bitmap {
	c := (n + chunkPages - 1) / chunkPages
	return Bitmap{n: n, chunks: make([]*chunk, c), live: make([]uint64, (c+63)/64)}
}

// BitmapOf returns the pages of words, in the layout of KVM's dirty log (bit i%64 of word
// i/64 is page i): for a VMM whose dirty log or populated set comes in that form. It reads
// every word; words is not kept.
func BitmapOf(words []uint64) Bitmap {
	b := NewBitmap(uint64(len(words)) * 64)
	for w, word := range words {
		if word != 0 {
			b.or(uint64(w), word)
		}
	}
	return b
}

// Pages is the number of pages the bitmap can hold.
func (b Bitmap) Pages() uint64 { return b.n }

// chunk returns chunk c, nil if it is absent or past the end.
func (b Bitmap) chunk(c uint64) *chunk {
	if c >= uint64(len(b.chunks)) {
		return nil
	}
	return b.chunks[c]
}

// nextLive returns the first allocated chunk >= c.
func (b Bitmap) nextLive(c uint64) (uint64, bool) {
	for lw := c / 64; lw < uint64(len(b.live)); lw++ {
		l := b.live[lw]
		if lw == c/64 {
			l &= ^uint64(0) << (c % 64)
		}
		if l != 0 {
			return lw*64 + uint64(bits.TrailingZeros64(l)), true
		}
	}
	return 0, false
}

// Word returns word w (bit j is page w*64+j), zero where its chunk is absent.
func (b Bitmap) Word(w uint64) uint64 {
	if ch := b.chunk(w / chunkWords); ch != nil {
		return ch.w[w%chunkWords]
	}
	return 0
}

// or adds mask to word w, allocating its chunk if it is absent.
func (b Bitmap) or(w, mask uint64) {
	c := w / chunkWords
	ch := b.chunks[c]
	if ch == nil {
		ch = new(chunk)
		b.chunks[c] = ch
		b.live[c/64] |= 1 << (c % 64)
	}
	ch.w[w%chunkWords] |= mask
	ch.sum |= 1 << (w % chunkWords)
}

// Set adds page i.
func (b Bitmap) Set(i uint64) { b.or(i/64, 1<<(i%64)) }

// Clear removes page i.
func (b Bitmap) Clear(i uint64) {
	if ch := b.chunk(i / 64 / chunkWords); ch != nil {
		ch.w[i/64%chunkWords] &^= 1 << (i % 64)
	}
}

// Has reports whether page i is in the set.
func (b Bitmap) Has(i uint64) bool { return b.Word(i/64)&(1<<(i%64)) != 0 }

// SetRange adds pages [first, first+n).
func (b Bitmap) SetRange(first, n uint64) {
	wordMasks(first, n, func(w int, mask uint64) bool {
		b.or(uint64(w), mask)
		return true
	})
}

// Any reports whether a page of [first, first+n) is in the set.
func (b Bitmap) Any(first, n uint64) bool {
	found := false
	wordMasks(first, n, func(w int, mask uint64) bool {
		found = b.Word(uint64(w))&mask != 0
		return !found
	})
	return found
}

// wordMasks calls f, in order, with the index of each word that pages [first, first+n) touch
// and the mask of their bits in it, until f returns false.
func wordMasks(first, n uint64, f func(w int, mask uint64) bool) {
	end := first + n
	for i := first; i < end; {
		w := i / 64
		mask := ^uint64(0) << (i % 64)
		if next := (w + 1) * 64; end < next {
			mask &= 1<<(end%64) - 1
		}
		if !f(int(w), mask) {
			return
		}
		i = (w + 1) * 64
	}
}

// Words yields the words of the first n pages that hold a page of the set, in order, each
// with its index (bit j of word w is page w*64+j), for a VMM that keeps pages in the layout of
// KVM's dirty log. Words past n are left out and the last one is masked to n.
func (b Bitmap) Words(n uint64, yield func(w uint64, word uint64) bool) {
	n = min(n, b.n)
	words := (n + 63) / 64
	for lw, l := range b.live {
		for l != 0 {
			c := uint64(lw)*64 + uint64(bits.TrailingZeros64(l))
			l &= l - 1
			ch := b.chunks[c]
			for sum := ch.sum; sum != 0; sum &= sum - 1 {
				i := uint64(bits.TrailingZeros64(sum))
				wi := c*chunkWords + i
				if wi >= words {
					return
				}
				w := ch.w[i]
				if rem := n - wi*64; rem < 64 {
					w &= 1<<rem - 1
				}
				if w != 0 && !yield(wi, w) {
					return
				}
			}
		}
	}
}

// runCount is the number of maximal runs of consecutive pages in the set among the first n:
// the pages in it whose predecessor is not.
func (b Bitmap) runCount(n uint64) int {
	c, prev := 0, ^uint64(0) // prev: the index of the last word seen
	var carry uint64         // the previous word's last bit
	b.Words(n, func(wi, w uint64) bool {
		if wi != prev+1 {
			carry = 0
		}
		c += bits.OnesCount64(w &^ (w<<1 | carry))
		carry, prev = w>>63, wi
		return true
	})
	return c
}

// Count is the number of pages in the set among the first n.
func (b Bitmap) Count(n uint64) uint64 {
	var c uint64
	b.Words(n, func(_, w uint64) bool {
		c += uint64(bits.OnesCount64(w))
		return true
	})
	return c
}

// Or adds every page of o.
func (b Bitmap) Or(o Bitmap) {
	for lw := range min(len(b.live), len(o.live)) {
		for l := o.live[lw]; l != 0; l &= l - 1 {
			c := uint64(lw)*64 + uint64(bits.TrailingZeros64(l))
			if c >= uint64(len(b.chunks)) {
				return
			}
			oc, ch := o.chunks[c], b.chunks[c]
			if ch == nil {
				ch = new(chunk)
				b.chunks[c] = ch
				b.live[lw] |= 1 << (c % 64)
			}
			for sum := oc.sum; sum != 0; sum &= sum - 1 {
				i := bits.TrailingZeros64(sum)
				ch.w[i] |= oc.w[i]
			}
			ch.sum |= oc.sum
		}
	}
}

// AndNot removes every page of o.
func (b Bitmap) AndNot(o Bitmap) {
	for lw := range min(len(b.live), len(o.live)) {
		for l := o.live[lw] & b.live[lw]; l != 0; l &= l - 1 {
			c := uint64(lw)*64 + uint64(bits.TrailingZeros64(l))
			if c >= uint64(len(b.chunks)) || c >= uint64(len(o.chunks)) {
				return
			}
			oc, ch := o.chunks[c], b.chunks[c]
			// The summary keeps its bits: "may be non-zero" stays true of a word cleared.
			for sum := oc.sum & ch.sum; sum != 0; sum &= sum - 1 {
				i := bits.TrailingZeros64(sum)
				ch.w[i] &^= oc.w[i]
			}
		}
	}
}

// Equal reports whether b and o hold the same pages among the first n.
func (b Bitmap) Equal(o Bitmap, n uint64) bool {
	words := (n + 63) / 64
	for c := uint64(0); c*chunkWords < words; c++ {
		if b.chunk(c) == nil && o.chunk(c) == nil {
			continue
		}
		for w := c * chunkWords; w < min(words, (c+1)*chunkWords); w++ {
			diff := b.Word(w) ^ o.Word(w)
			if rem := n - w*64; rem < 64 {
				diff &= 1<<rem - 1
			}
			if diff != 0 {
				return false
			}
		}
	}
	return true
}

// Runs yields the maximal runs of consecutive pages in the set among the first n, in order.
func (b Bitmap) Runs(n uint64, yield func(first, count uint64) bool) {
	var start, end uint64 // the run being gathered, [start, end), if open
	open, stopped := false, false
	b.Words(n, func(wi, w uint64) bool {
		for w != 0 {
			f := uint64(bits.TrailingZeros64(w))
			k := uint64(bits.TrailingZeros64(^(w >> f))) // 64-f when the run ends the word
			first := wi*64 + f
			if open && first == end {
				end = first + k
			} else {
				if open && !yield(start, end-start) {
					stopped = true
					return false
				}
				start, end, open = first, first+k, true
			}
			if f+k >= 64 {
				break
			}
			w &^= (1<<k - 1) << f
		}
		return true
	})
	if open && !stopped {
		yield(start, end-start)
	}
}

// next returns the first page >= i and < n whose bit equals set; if there is none it returns
// n, false. Looking for a page in the set goes by the summaries: absent chunks and words that
// hold no page are skipped.
func (b Bitmap) next(i, n uint64, set bool) (uint64, bool) {
	for i < n {
		wi := i / 64
		c := wi / chunkWords
		ch := b.chunk(c)
		if ch == nil && set {
			next, ok := b.nextLive(c + 1)
			if !ok {
				return n, false
			}
			i = next * chunkPages
			continue
		}
		var w uint64
		if ch != nil {
			w = ch.w[wi%chunkWords]
		}
		if !set {
			w = ^w
		}
		w &= ^uint64(0) << (i % 64) // ignore bits before i
		if w != 0 {
			j := wi*64 + uint64(bits.TrailingZeros64(w))
			if j >= n {
				return n, false
			}
			return j, true
		}
		i = (wi + 1) * 64
		if set { // on to the chunk's next word that may hold a page
			if rest := ch.sum & (^uint64(0) << (wi%chunkWords + 1)); rest != 0 {
				i = (c*chunkWords + uint64(bits.TrailingZeros64(rest))) * 64
			} else {
				i = (c + 1) * chunkPages
			}
		}
	}
	return n, false
}

// prev returns the last page <= i whose bit is set, if there is one.
func (b Bitmap) prev(i uint64) (uint64, bool) {
	for {
		wi := i / 64
		c := wi / chunkWords
		ch := b.chunk(c)
		if ch == nil {
			if c == 0 {
				return 0, false
			}
			i = c*chunkPages - 1 // the chunk's pages are all absent
			continue
		}
		w := ch.w[wi%chunkWords] & (^uint64(0) >> (63 - i%64)) // ignore bits after i
		if w != 0 {
			return wi*64 + 63 - uint64(bits.LeadingZeros64(w)), true
		}
		if wi == 0 {
			return 0, false
		}
		i = wi*64 - 1
	}
}

// Clone returns a copy of the bitmap that shares no pages with it.
func (b Bitmap) Clone() Bitmap {
	out := Bitmap{n: b.n, chunks: make([]*chunk, len(b.chunks)), live: append([]uint64(nil), b.live...)}
	for lw, l := range b.live {
		for ; l != 0; l &= l - 1 {
			c := lw*64 + bits.TrailingZeros64(l)
			cp := *b.chunks[c]
			out.chunks[c] = &cp
		}
	}
	return out
}

// checkBitmaps verifies that a Source returned one bitmap per region, each large enough.
func checkBitmaps(what string, bms []Bitmap, l *Layout) error {
	if len(bms) != len(l.Regions) {
		return fmt.Errorf("migration: %s returned %d bitmaps for %d regions", what, len(bms), len(l.Regions))
	}
	for r, bm := range bms {
		n := l.Regions[r].Size / l.PageSize
		if bm.n < n {
			return fmt.Errorf("migration: %s: region %d %q: bitmap of %d pages, the region has %d", what, r, l.Regions[r].Name, bm.n, n)
		}
	}
	return nil
}

// cloneBitmaps returns a copy of the bitmaps.
func cloneBitmaps(in []Bitmap) []Bitmap {
	out := make([]Bitmap, len(in))
	for i, b := range in {
		out[i] = b.Clone()
	}
	return out
}
