package migration

import (
	"math/rand/v2"
	"testing"
)

// TestBitmapRanges checks SetRange, Any and runCount against page-by-page answers on random sets.
func TestBitmapRanges(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	for iter := range 300 {
		n := 1 + rng.Uint64N(700)
		b, want := NewBitmap(n), make([]bool, n)
		for range rng.IntN(12) {
			first := rng.Uint64N(n)
			k := rng.Uint64N(n - first + 1)
			if rng.IntN(3) == 0 {
				k = min(k, 3)
			}
			b.SetRange(first, k)
			for i := first; i < first+k; i++ {
				want[i] = true
			}
		}
		runs := 0
		for i := range n {
			if b.Has(i) != want[i] {
				t.Fatalf("iteration %d: page %d: Has %v, want %v", iter, i, b.Has(i), want[i])
			}
			if want[i] && (i == 0 || !want[i-1]) {
				runs++
			}
		}
		for range 5 { // Any against the page-by-page answer
			first := rng.Uint64N(n)
			k := rng.Uint64N(n - first + 1)
			want1 := false
			for i := first; i < first+k; i++ {
				want1 = want1 || want[i]
			}
			if got := b.Any(first, k); got != want1 {
				t.Fatalf("iteration %d: Any(%d, %d) = %v, want %v", iter, first, k, got, want1)
			}
		}
		if got := b.runCount(n); got != runs {
			t.Fatalf("iteration %d: runCount %d, want %d", iter, got, runs)
		}
		// Bits past n do not count.
		extra := append(Bitmap(nil), b...)
		if n%64 != 0 {
			extra[len(extra)-1] |= ^uint64(0) << (n % 64)
		}
		if got := extra.runCount(n); got != runs {
			t.Fatalf("iteration %d: runCount with bits past the end %d, want %d", iter, got, runs)
		}
	}
}
