package migration

import (
	"fmt"
	"math/bits"
)

// Bitmap is a set of pages of one region: bit i (bit i%64 of word i/64) is page i. It is the
// layout of KVM's dirty log, so a VMM can hand its words over unchanged. Bits past the end of
// the region are ignored.
type Bitmap []uint64

// NewBitmap returns an empty bitmap for n pages.
func NewBitmap(n uint64) Bitmap { return make(Bitmap, (n+63)/64) }

// newFaultedBitmap is NewBitmap with its memory faulted in ahead (one store per 4 KiB page),
// for a bitmap the stop window fills: there a first touch would cost a page fault per 4 KiB,
// which is expensive where the host hands out fresh memory slowly.
func newFaultedBitmap(n uint64) Bitmap {
	b := NewBitmap(n)
	for i := 0; i < len(b); i += 512 {
		b[i] = 0
	}
	return b
}

// Set adds page i.
func (b Bitmap) Set(i uint64) { b[i/64] |= 1 << (i % 64) }

// Clear removes page i.
func (b Bitmap) Clear(i uint64) { b[i/64] &^= 1 << (i % 64) }

// Has reports whether page i is in the set.
func (b Bitmap) Has(i uint64) bool { return i/64 < uint64(len(b)) && b[i/64]&(1<<(i%64)) != 0 }

// SetRange adds pages [first, first+n).
func (b Bitmap) SetRange(first, n uint64) {
	wordMasks(first, n, func(w int, mask uint64) bool {
		b[w] |= mask
		return true
	})
}

// Any reports whether a page of [first, first+n) is in the set.
func (b Bitmap) Any(first, n uint64) bool {
	found := false
	wordMasks(first, n, func(w int, mask uint64) bool {
		found = b[w]&mask != 0
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

// runCount is the number of maximal runs of consecutive pages in the set among the first n:
// the pages in it whose predecessor is not.
func (b Bitmap) runCount(n uint64) int {
	c, carry := 0, uint64(0) // carry: the previous word's last bit
	for wi := range min(uint64(len(b)), (n+63)/64) {
		w := b[wi]
		if rem := n - wi*64; rem < 64 {
			w &= 1<<rem - 1
		}
		c += bits.OnesCount64(w &^ (w<<1 | carry))
		carry = w >> 63
	}
	return c
}

// Count is the number of pages in the set among the first n.
func (b Bitmap) Count(n uint64) uint64 {
	var c uint64
	full := n / 64
	for _, w := range b[:min(full, uint64(len(b)))] {
		c += uint64(bits.OnesCount64(w))
	}
	if rem := n % 64; rem != 0 && full < uint64(len(b)) {
		c += uint64(bits.OnesCount64(b[full] & (1<<rem - 1)))
	}
	return c
}

// Or adds every page of o.
func (b Bitmap) Or(o Bitmap) {
	for i := range min(len(b), len(o)) {
		b[i] |= o[i]
	}
}

// Runs yields the maximal runs of consecutive pages in the set among the first n, in order.
func (b Bitmap) Runs(n uint64, yield func(first, count uint64) bool) {
	i := uint64(0)
	for {
		start, ok := b.next(i, n, true)
		if !ok {
			return
		}
		end, _ := b.next(start, n, false)
		if !yield(start, end-start) {
			return
		}
		i = end
	}
}

// next returns the first page >= i and < n whose bit equals set; if there is none it returns
// n, false.
func (b Bitmap) next(i, n uint64, set bool) (uint64, bool) {
	for i < n {
		wi := i / 64
		var w uint64
		if wi < uint64(len(b)) {
			w = b[wi]
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
	}
	return n, false
}

// checkBitmaps verifies that a Source returned one bitmap per region, each long enough.
func checkBitmaps(what string, bms []Bitmap, l *Layout) error {
	if len(bms) != len(l.Regions) {
		return fmt.Errorf("migration: %s returned %d bitmaps for %d regions", what, len(bms), len(l.Regions))
	}
	for r, bm := range bms {
		n := l.Regions[r].Size / l.PageSize
		if uint64(len(bm)) < (n+63)/64 {
			return fmt.Errorf("migration: %s: region %d %q: bitmap of %d words, the region's %d pages need %d", what, r, l.Regions[r].Name, len(bm), n, (n+63)/64)
		}
	}
	return nil
}

// prev returns the last page <= i whose bit is set, if there is one.
func (b Bitmap) prev(i uint64) (uint64, bool) {
	for {
		wi := i / 64
		var w uint64
		if wi < uint64(len(b)) {
			w = b[wi]
		}
		w &= ^uint64(0) >> (63 - i%64) // ignore bits after i
		if w != 0 {
			return wi*64 + 63 - uint64(bits.LeadingZeros64(w)), true
		}
		if wi == 0 {
			return 0, false
		}
		i = wi*64 - 1
	}
}

// clone returns a copy of the bitmaps.
func cloneBitmaps(in []Bitmap) []Bitmap {
	out := make([]Bitmap, len(in))
	for i, b := range in {
		out[i] = append(Bitmap(nil), b...)
	}
	return out
}
