package migration

import (
	"math/rand/v2"
	"testing"
)

// TestBitmapRanges checks every operation against page-by-page answers on random sets, over
// sizes that end mid-word, mid-chunk and on chunk boundaries, with runs that cross chunks and
// chunks left absent.
func TestBitmapRanges(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	for iter := range 300 {
		n := 1 + rng.Uint64N(700)
		switch iter % 3 {
		case 1:
			n = 1 + rng.Uint64N(4*chunkPages)
		case 2:
			n = chunkPages * (1 + rng.Uint64N(3))
		}
		b, want := NewBitmap(n), make([]bool, n)
		for range rng.IntN(12) {
			first := rng.Uint64N(n)
			k := rng.Uint64N(n - first + 1)
			if rng.IntN(3) > 0 {
				k = min(k, 3)
			}
			b.SetRange(first, k)
			for i := first; i < first+k; i++ {
				want[i] = true
			}
		}
		for range rng.IntN(4) {
			i := rng.Uint64N(n)
			b.Clear(i)
			want[i] = false
		}
		runs, count := 0, uint64(0)
		var wantRuns [][2]uint64
		for i := range n {
			if b.Has(i) != want[i] {
				t.Fatalf("iteration %d: page %d: Has %v, want %v", iter, i, b.Has(i), want[i])
			}
			if want[i] {
				count++
				if i == 0 || !want[i-1] {
					runs++
					wantRuns = append(wantRuns, [2]uint64{i, 0})
				}
				wantRuns[len(wantRuns)-1][1]++
			}
		}
		for range 5 { // Any, next and prev against the page-by-page answer
			first := rng.Uint64N(n)
			k := rng.Uint64N(n - first + 1)
			want1 := false
			for i := first; i < first+k; i++ {
				want1 = want1 || want[i]
			}
			if got := b.Any(first, k); got != want1 {
				t.Fatalf("iteration %d: Any(%d, %d) = %v, want %v", iter, first, k, got, want1)
			}
			nextSet, nextClear := n, n
			for i := n; i > first; i-- {
				if want[i-1] {
					nextSet = i - 1
				} else {
					nextClear = i - 1
				}
			}
			if got, _ := b.next(first, n, true); got != nextSet {
				t.Fatalf("iteration %d: next(%d, set) = %d, want %d", iter, first, got, nextSet)
			}
			if got, _ := b.next(first, n, false); got != nextClear {
				t.Fatalf("iteration %d: next(%d, clear) = %d, want %d", iter, first, got, nextClear)
			}
			prev, found := uint64(0), false
			for i := first + 1; i > 0; i-- {
				if want[i-1] {
					prev, found = i-1, true
					break
				}
			}
			if got, ok := b.prev(first); ok != found || got != prev {
				t.Fatalf("iteration %d: prev(%d) = %d, %v; want %d, %v", iter, first, got, ok, prev, found)
			}
		}
		if got := b.runCount(n); got != runs {
			t.Fatalf("iteration %d: runCount %d, want %d", iter, got, runs)
		}
		if got := b.Count(n); got != count {
			t.Fatalf("iteration %d: Count %d, want %d", iter, got, count)
		}
		k := 0
		b.Runs(n, func(first, c uint64) bool {
			if k >= len(wantRuns) || wantRuns[k] != [2]uint64{first, c} {
				t.Fatalf("iteration %d: run %d is %d+%d, want %v", iter, k, first, c, wantRuns)
			}
			k++
			return true
		})
		if k != len(wantRuns) {
			t.Fatalf("iteration %d: %d runs, want %d", iter, k, len(wantRuns))
		}

		// Bits past n do not count.
		extra := b.Clone()
		extra.n = (n + 63) / 64 * 64
		extra.SetRange(n, extra.n-n)
		if got := extra.runCount(n); got != runs {
			t.Fatalf("iteration %d: runCount with bits past the end %d, want %d", iter, got, runs)
		}
		if extra.Count(n) != count || !extra.Equal(b, n) {
			t.Fatalf("iteration %d: bits past the end counted", iter)
		}

		// The words form, Or, Clone and Equal.
		words := make([]uint64, (n+63)/64)
		b.Words(n, func(w, word uint64) bool {
			words[w] = word
			return true
		})
		back := BitmapOf(words)
		if !back.Equal(b, n) || back.Count(n) != count {
			t.Fatalf("iteration %d: BitmapOf(Words) differs", iter)
		}
		other := NewBitmap(n)
		i := rng.Uint64N(n)
		other.Set(i)
		union := b.Clone()
		union.Or(other)
		if !union.Has(i) || union.Count(n) != count+map[bool]uint64{true: 0, false: 1}[want[i]] {
			t.Fatalf("iteration %d: Or lost or added pages", iter)
		}
		if b.Has(i) != want[i] {
			t.Fatalf("iteration %d: Or of a clone changed the original", iter)
		}
		if want[i] != union.Equal(b, n) {
			t.Fatalf("iteration %d: Equal is %v after adding page %d (held: %v)", iter, union.Equal(b, n), i, want[i])
		}
	}
}

// TestBitmapSparse checks that a set allocates only the chunks its pages fall in.
func TestBitmapSparse(t *testing.T) {
	b := NewBitmap(256 << 30 >> 12)
	b.Set(5)
	b.SetRange(3*chunkPages-2, 4)
	o := NewBitmap(b.Pages())
	o.Set(b.Pages() - 1)
	b.Or(o)
	held := 0
	for _, ch := range b.chunks {
		if ch != nil {
			held++
		}
	}
	if held != 4 {
		t.Fatalf("%d chunks allocated, want 4", held)
	}
	if got := b.Count(b.Pages()); got != 6 {
		t.Fatalf("Count %d, want 6", got)
	}
	if p, ok := b.prev(b.Pages() - 2); !ok || p != 3*chunkPages+1 {
		t.Fatalf("prev = %d, %v", p, ok)
	}
}

// TestBitmapAndNot checks AndNot against a plain set, across chunks, with absent chunks on
// either side.
func TestBitmapAndNot(t *testing.T) {
	const n = 5*chunkPages + 17
	rng := rand.New(rand.NewPCG(1, 2))
	for trial := range 50 {
		a, o := NewBitmap(n), NewBitmap(n)
		want := map[uint64]bool{}
		for range 300 {
			p := rng.Uint64N(n)
			if trial%5 == 0 {
				p %= chunkPages // one chunk only: the others absent in a
			}
			a.Set(p)
			want[p] = true
		}
		for range 300 {
			p := rng.Uint64N(n)
			if trial%7 == 0 {
				p = n - 1 - p%chunkPages // the last chunk only
			}
			o.Set(p)
			delete(want, p)
		}
		a.AndNot(o)
		for p := range uint64(n) {
			if a.Has(p) != want[p] {
				t.Fatalf("trial %d: page %d: in the set %v, want %v", trial, p, a.Has(p), want[p])
			}
		}
		if got := a.Count(n); got != uint64(len(want)) {
			t.Fatalf("trial %d: Count %d, want %d", trial, got, len(want))
		}
	}
}
