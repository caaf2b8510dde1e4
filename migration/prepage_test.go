package migration_test

import (
	"reflect"
	"testing"

	"github.com/godwit-vm/godwit/migration"
)

// drainPolicy takes pages from p until it offers none, clearing each from pending as the
// driver does; at marks (index -> page) it reports a demand fault first.
func drainPolicy(p migration.Prepager, pending []migration.Bitmap, faults map[int]migration.PageRef) []migration.PageRef {
	var out []migration.PageRef
	for {
		if f, ok := faults[len(out)]; ok {
			pending[f.Region].Clear(f.Page)
			p.Demanded(f)
			out = append(out, f)
			delete(faults, len(out)-1)
			continue
		}
		r, ok := p.Next()
		if !ok {
			return out
		}
		if !pending[r.Region].Has(r.Page) {
			panic("policy offered a page that is not pending")
		}
		pending[r.Region].Clear(r.Page)
		out = append(out, r)
	}
}

func pendingSet(sizes []uint64, pages ...migration.PageRef) []migration.Bitmap {
	set := make([]migration.Bitmap, len(sizes))
	for r, n := range sizes {
		set[r] = migration.NewBitmap(n)
	}
	for _, p := range pages {
		set[p.Region].Set(p.Page)
	}
	return set
}

func all(sizes []uint64) []migration.PageRef {
	var out []migration.PageRef
	for r, n := range sizes {
		for p := range n {
			out = append(out, migration.PageRef{Region: r, Page: p})
		}
	}
	return out
}

func refs(r int, pages ...uint64) []migration.PageRef {
	out := make([]migration.PageRef, len(pages))
	for i, p := range pages {
		out[i] = migration.PageRef{Region: r, Page: p}
	}
	return out
}

func TestPrepagerSequential(t *testing.T) {
	sizes := []uint64{70, 3}
	pending := pendingSet(sizes, append(refs(0, 1, 2, 65, 69), refs(1, 0, 2)...)...)
	p, _ := migration.NewPrepager(migration.PrepageSequential, pending, sizes, nil)
	got := drainPolicy(p, pending, nil)
	if want := append(refs(0, 1, 2, 65, 69), refs(1, 0, 2)...); !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestPrepagerBubble(t *testing.T) {
	sizes := []uint64{10, 4}
	pending := pendingSet(sizes, all(sizes)...)
	pending[0].Clear(7) // sent already: skipped
	p, _ := migration.NewPrepager(migration.PrepageBubble, pending, sizes, nil)
	// Before any fault: sequential. A fault at page 5 after two pages: outward from it, above
	// first; once region 0 is covered, sequential again (region 1).
	got := drainPolicy(p, pending, map[int]migration.PageRef{2: {Region: 0, Page: 5}})
	want := append(refs(0, 0, 1, 5, 6, 4, 8, 3, 9, 2), refs(1, 0, 1, 2, 3)...)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	// A newer fault moves the bubble.
	pending = pendingSet(sizes, all(sizes)...)
	p, _ = migration.NewPrepager(migration.PrepageBubble, pending, sizes, nil)
	got = drainPolicy(p, pending, map[int]migration.PageRef{0: {Region: 0, Page: 2}, 3: {Region: 1, Page: 2}})
	want = []migration.PageRef{{0, 2}, {0, 3}, {0, 1}, {1, 2}, {1, 3}, {1, 1}, {1, 0}, {0, 0}, {0, 4}, {0, 5}, {0, 6}, {0, 7}, {0, 8}, {0, 9}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestPrepagerHot(t *testing.T) {
	sizes := []uint64{6, 3}
	pending := pendingSet(sizes, all(sizes)...)
	pending[0].Clear(4) // hot, but sent already
	heat := [][]uint32{{0, 3, 1, 3, 9, 0}, {2}}
	p, _ := migration.NewPrepager(migration.PrepageHot, pending, sizes, heat)
	got := drainPolicy(p, pending, nil)
	// By heat, ties in page order (region, page), then the rest in order.
	want := []migration.PageRef{{0, 1}, {0, 3}, {1, 0}, {0, 2}, {0, 0}, {0, 5}, {1, 1}, {1, 2}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestPrepagerNone(t *testing.T) {
	sizes := []uint64{4}
	pending := pendingSet(sizes, all(sizes)...)
	p, _ := migration.NewPrepager(migration.PrepageNone, pending, sizes, nil)
	if got := drainPolicy(p, pending, map[int]migration.PageRef{0: {Region: 0, Page: 2}}); !reflect.DeepEqual(got, refs(0, 2)) {
		t.Fatalf("none pushed %v", got)
	}
	p.(migration.Idler).Idle()
	if got := drainPolicy(p, pending, nil); !reflect.DeepEqual(got, refs(0, 0, 1, 3)) {
		t.Fatalf("none after idle pushed %v", got)
	}
	if _, err := migration.NewPrepager("random", nil, nil, nil); err == nil {
		t.Fatalf("unknown policy accepted")
	}
}
