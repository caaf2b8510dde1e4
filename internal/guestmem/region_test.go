package guestmem

import (
	"bytes"
	"testing"
)

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
	r.TakeVMMDirty(d)
	if d.Count() != 1 || !d.Test(5) {
		t.Fatalf("VMM dirty = %d pages, want page 5 only", d.Count())
	}
	d.Clear()
	r.TakeVMMDirty(d)
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
