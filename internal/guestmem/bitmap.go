package guestmem

import "math/bits"

// Bitmap holds one bit per page, 64 pages per word, in the layout KVM's dirty log uses.
type Bitmap []uint64

// NewBitmap returns a bitmap for pages pages.
func NewBitmap(pages uint64) Bitmap { return make(Bitmap, (pages+63)/64) }

// Set marks page i.
func (b Bitmap) Set(i uint64) { b[i/64] |= 1 << (i % 64) }

// Unset unmarks page i.
func (b Bitmap) Unset(i uint64) { b[i/64] &^= 1 << (i % 64) }

// Test reports whether page i is marked.
func (b Bitmap) Test(i uint64) bool { return b[i/64]&(1<<(i%64)) != 0 }

// SetRange marks pages [first, first+n).
func (b Bitmap) SetRange(first, n uint64) {
	for i := first; i < first+n; {
		if i%64 == 0 && i+64 <= first+n {
			b[i/64] = ^uint64(0)
			i += 64
			continue
		}
		b.Set(i)
		i++
	}
}

// Or merges o into b.
func (b Bitmap) Or(o Bitmap) {
	for i := range b {
		b[i] |= o[i]
	}
}

// Count returns how many pages are marked.
func (b Bitmap) Count() uint64 {
	var n int
	for _, w := range b {
		n += bits.OnesCount64(w)
	}
	return uint64(n)
}

// Clear unmarks every page.
func (b Bitmap) Clear() { clear(b) }
