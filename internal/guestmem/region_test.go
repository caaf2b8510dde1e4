package guestmem

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func nowNanos() int64 { return time.Now().UnixNano() }

func TestRegionHolesDirtyAndPunch(t *testing.T) {
	r, err := NewRegion("test", 0x100000, 64*PageSize)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	pop, err := r.Populated()
	if err != nil {
		t.Fatal(err)
	}
	if pop.Count() != 0 {
		t.Fatalf("fresh region has %d populated pages, want 0", pop.Count())
	}
	if err := r.WriteGPA(0x100000+5*PageSize+100, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	r.Mem[40*PageSize] = 1 // a guest-style write: populated, but not VMM-dirty
	pop, _ = r.Populated()
	if pop.Count() != 2 || !pop.Test(5) || !pop.Test(40) {
		t.Fatalf("populated = %d pages (5: %v, 40: %v), want pages 5 and 40", pop.Count(), pop.Test(5), pop.Test(40))
	}
	d := NewBitmap(r.Pages())
	r.TakeVMMDirty(d.SetRange)
	if d.Count() != 1 || !d.Test(5) {
		t.Fatalf("VMM dirty = %d pages, want page 5 only", d.Count())
	}
	d.Clear()
	r.TakeVMMDirty(d.SetRange)
	if d.Count() != 0 {
		t.Fatalf("VMM dirty not cleared by TakeVMMDirty")
	}
	buf := make([]byte, 5)
	if _, err := r.ReadAt(buf, 5*PageSize+100); err != nil || !bytes.Equal(buf, []byte("hello")) {
		t.Fatalf("ReadAt = %q, %v", buf, err)
	}
	if err := r.PunchPages(5, 1); err != nil {
		t.Fatal(err)
	}
	// Read through pread: a read fault through the shared mapping would allocate the page again.
	if _, err := r.ReadAt(buf, 5*PageSize+100); err != nil || !bytes.Equal(buf, make([]byte, 5)) {
		t.Fatalf("punched page reads %q, %v; want zeros", buf, err)
	}
	pop, _ = r.Populated()
	if pop.Count() != 1 || !pop.Test(40) {
		t.Fatalf("after punch populated = %d pages, want page 40 only", pop.Count())
	}
	if err := r.WriteGPA(0x100000+64*PageSize-2, []byte("abc")); err == nil {
		t.Fatal("write past the end succeeded")
	}
}

func TestBitmapSetRange(t *testing.T) {
	b := NewBitmap(300)
	b.SetRange(3, 200)
	if b.Count() != 200 || b.Test(2) || !b.Test(3) || !b.Test(202) || b.Test(203) {
		t.Fatalf("SetRange(3,200): count %d", b.Count())
	}
	b.Unset(64)
	if b.Count() != 199 || b.Test(64) || !b.Test(63) || !b.Test(65) {
		t.Fatalf("Unset(64): count %d", b.Count())
	}
}

// walk is the reference answer: SEEK_DATA/SEEK_HOLE over the whole region.
func walk(t testing.TB, r *Region) Bitmap {
	b := NewBitmap(r.Pages())
	if _, err := r.seekRuns(b, 0, -1); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestPopulatedMatchesWalk: with more runs than the walk takes first, mincore answers for the
// rest (its answer is complete here: no swap), and Populated equals the full walk, for pages
// written through the mapping, through pwrite, and after punches; with few runs the walk alone
// answers.
func TestPopulatedMatchesWalk(t *testing.T) {
	const pages = 8192 + 17 // not a multiple of 64: the last bitmap word is partial
	r, err := NewRegion("resident", 0, pages*PageSize)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	check := func(what string, want int, mincoreToo bool) {
		t.Helper()
		got, err := r.Populated()
		if err != nil {
			t.Fatal(err)
		}
		ref := walk(t, r)
		if got.Count() != uint64(want) || ref.Count() != uint64(want) {
			t.Fatalf("%s: Populated %d pages, walk %d, want %d", what, got.Count(), ref.Count(), want)
		}
		for i := range ref {
			if got[i] != ref[i] {
				t.Fatalf("%s: word %d: Populated %#x, walk %#x", what, i, got[i], ref[i])
			}
		}
		if !mincoreToo {
			return
		}
		// The mincore part on its own, from a page that is not word aligned.
		b := NewBitmap(r.Pages())
		off, err := r.seekRuns(b, 0, 5)
		if err != nil {
			t.Fatal(err)
		}
		blocks, _ := r.blocks()
		if !r.residentFrom(b, off, blocks) {
			t.Fatalf("%s: mincore's answer from byte %d was not complete", what, off)
		}
		for i := range ref {
			if b[i] != ref[i] {
				t.Fatalf("%s: word %d: walk+mincore %#x, walk %#x", what, i, b[i], ref[i])
			}
		}
	}
	check("fresh", 0, false)
	for i := 10; i < 20; i++ { // a few runs: the walk answers alone
		r.Mem[i*PageSize] = 1
	}
	check("one run", 10, true)
	rng := rand.New(rand.NewPCG(1, 2))
	written := map[uint64]bool{}
	for i := uint64(10); i < 20; i++ {
		written[i] = true
	}
	for len(written) < 1500 { // hundreds of runs: mincore answers for the rest
		p := rng.Uint64N(pages)
		written[p] = true
		r.Mem[p*PageSize+rng.Uint64N(PageSize)] = 1
	}
	r.Mem[(pages-1)*PageSize] = 1
	written[pages-1] = true
	if err := r.WriteGPA(7*PageSize, []byte("pwrite")); err != nil {
		t.Fatal(err)
	}
	written[7] = true
	check("written", len(written), true)
	n := 0
	for p := range written {
		if n == 300 {
			break
		}
		if err := r.PunchPages(p, 1); err != nil {
			t.Fatal(err)
		}
		n++
	}
	check("punched", len(written)-n, true)
}

// BenchmarkPopulated compares Populated with the plain walk on a 1 GiB region with 16384
// pages written at random (the runs a random writer leaves): ns/op of each, and the walk's
// time as a multiple of Populated's.
func BenchmarkPopulated(b *testing.B) {
	const pages = 1 << 18
	r, err := NewRegion("bench", 0, pages*PageSize)
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 16384; i++ {
		r.Mem[rng.Uint64N(pages)*PageSize] = 1
	}
	time := func(f func()) float64 {
		t0 := nowNanos()
		f()
		return float64(nowNanos() - t0)
	}
	var walkNS, popNS float64
	for i := 0; i < b.N; i++ {
		walkNS += time(func() { walk(b, r) })
		popNS += time(func() {
			if _, err := r.Populated(); err != nil {
				b.Fatal(err)
			}
		})
	}
	b.ReportMetric(walkNS/float64(b.N), "walk-ns/op")
	b.ReportMetric(popNS/float64(b.N), "populated-ns/op")
	b.ReportMetric(walkNS/popNS, "walk/populated")
}

// TestVMMDirtyManyWrites: past maxDirtyRuns separate writes the region keeps a bitmap; every
// page written is still taken once, and the next take is empty.
func TestVMMDirtyManyWrites(t *testing.T) {
	r, err := NewRegion("many", 0, 128<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	const writes = 3 * maxDirtyRuns
	for i := range uint64(writes) {
		if err := r.WriteGPA(i*2*PageSize, []byte{1}); err != nil { // every other page
			t.Fatal(err)
		}
	}
	d := NewBitmap(r.Pages())
	r.TakeVMMDirty(d.SetRange)
	if d.Count() != writes || !d.Test(0) || d.Test(1) || !d.Test(2*(writes-1)) {
		t.Fatalf("VMM dirty = %d pages, want the %d written", d.Count(), writes)
	}
	d.Clear()
	r.WriteGPA(7*PageSize, []byte{1})
	r.TakeVMMDirty(d.SetRange)
	if d.Count() != 1 || !d.Test(7) {
		t.Fatalf("after a take, one write: %d pages dirty", d.Count())
	}
}

// BenchmarkWaysIn compares the ways a receiver can put pages into guest memory, for 256 MiB
// in 256 KiB batches (a page batch's size): pwrite through the memfd (WriteAt), a copy through
// the mapping that faults each page in, and FillAt (one MADV_POPULATE_WRITE per batch, then
// the copy). Each runs into fresh memory (a new region: the pages are allocated on the way)
// and into pages it has put there once already. It reports ns per page; a receiver that reads from a
// socket straight into the mapping pays at least the copy's cost, in place of pwrite's.
func BenchmarkWaysIn(b *testing.B) {
	const size, batch = 256 << 20, 256 << 10
	src := make([]byte, batch)
	for i := range src {
		src[i] = byte(i*7 + 1)
	}
	ways := []struct {
		name string
		put  func(r *Region, off int64) error
	}{
		{"pwrite", func(r *Region, off int64) error { _, err := r.WriteAt(src, off); return err }},
		{"copy", func(r *Region, off int64) error { copy(r.Mem[off:], src); return nil }},
		{"populate+copy", func(r *Region, off int64) error { return r.FillAt(src, off) }},
	}
	for _, w := range ways {
		for _, fresh := range []bool{true, false} {
			name := w.name + "/present"
			if fresh {
				name = w.name + "/fresh"
			}
			b.Run(name, func(b *testing.B) {
				var ns float64
				for i := 0; i < b.N; i++ {
					r, err := NewRegion("waysin", 0, size)
					if err != nil {
						b.Fatal(err)
					}
					pass := func() {
						for off := int64(0); off < size; off += batch {
							if err := w.put(r, off); err != nil {
								b.Fatal(err)
							}
						}
					}
					if !fresh {
						pass() // the same way once: pages allocated, and mapped where it maps
					}
					t0 := nowNanos()
					pass()
					ns += float64(nowNanos() - t0)
					r.Close()
				}
				b.ReportMetric(ns/float64(b.N)/(size/PageSize), "ns/page")
			})
		}
	}
}

// TestFileRegion: a memory file on tmpfs is created with its label, opened again only by its
// id and size, and refused elsewhere; its populated pages are those written.
func TestFileRegion(t *testing.T) {
	path := filepath.Join("/dev/shm", fmt.Sprintf("godwit-test-%d", os.Getpid()))
	defer os.Remove(path)
	r, id, err := CreateFileRegion("ram", 0, 64*PageSize, path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, _, err := CreateFileRegion("ram", 0, 64*PageSize, path); err == nil || !strings.Contains(err.Error(), "exists already") {
		t.Fatalf("creating it twice: %v", err)
	}
	if _, err := r.WriteAt([]byte("guest"), 5*PageSize); err != nil {
		t.Fatal(err)
	}
	o, err := OpenFileRegion("ram", 0, 64*PageSize, path, id)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if string(o.Mem[5*PageSize:5*PageSize+5]) != "guest" {
		t.Fatalf("the second mapping reads %q", o.Mem[5*PageSize:5*PageSize+5])
	}
	if b, err := o.Populated(); err != nil || b.Count() != 1 || !b.Test(5) {
		t.Fatalf("populated %v (%d pages): %v", b, b.Count(), err)
	}
	other := id
	other[0] ^= 1
	for _, c := range []struct {
		size uint64
		id   MemoryID
		want string
	}{
		{64 * PageSize, other, "not the migrating VM's"},
		{32 * PageSize, id, "holds"},
	} {
		if _, err := OpenFileRegion("ram", 0, c.size, path, c.id); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("open with size %d, id %s: %v, want %q", c.size, c.id, err, c.want)
		}
	}
	disk := filepath.Join(".", fmt.Sprintf("godwit-test-%d.mem", os.Getpid()))
	defer os.Remove(disk)
	if _, _, err := CreateFileRegion("ram", 0, 64*PageSize, disk); err == nil || !strings.Contains(err.Error(), "not on shared memory") {
		t.Errorf("a memory file on %s: %v", disk, err)
	}
}
