package guestmem

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestCloneRegion: a clone reads the template, keeps its writes to itself, reports exactly the
// pages it wrote as populated, and reads the template again where it drops them.
func TestCloneRegion(t *testing.T) {
	const pages = 64
	tmpl := make([]byte, pages*PageSize)
	for i := range tmpl {
		tmpl[i] = byte(i/PageSize + 1)
	}
	path := filepath.Join(t.TempDir(), "memory")
	if err := os.WriteFile(path, tmpl, 0o400); err != nil {
		t.Fatal(err)
	}
	if _, err := CloneRegion("ram", 0, (pages+1)*PageSize, path); err == nil {
		t.Fatal("a clone of the wrong size was accepted")
	}
	a, err := CloneRegion("ram", 0, pages*PageSize, path)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := CloneRegion("ram", 0, pages*PageSize, path)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()

	page := bytes.Repeat([]byte{0xee}, PageSize)
	if _, err := a.WriteAt(page, 5*PageSize); err != nil {
		t.Fatal(err)
	}
	a.Mem[9*PageSize] = 0xdd // as the guest writes
	got := make([]byte, PageSize)
	for _, c := range []struct {
		r    *Region
		pfn  int
		want byte
	}{{a, 5, 0xee}, {a, 9, 0xdd}, {a, 6, 7}, {b, 5, 6}, {b, 9, 10}} {
		if _, err := c.r.ReadAt(got, int64(c.pfn*PageSize)); err != nil {
			t.Fatal(err)
		}
		if got[0] != c.want {
			t.Errorf("page %d reads 0x%x, want 0x%x", c.pfn, got[0], c.want)
		}
	}
	pop, err := a.Populated()
	if err != nil {
		t.Fatal(err)
	}
	if pop.Count() != 2 || !pop.Test(5) || !pop.Test(9) {
		t.Errorf("clone a's own pages: %d (5: %v, 9: %v), want pages 5 and 9", pop.Count(), pop.Test(5), pop.Test(9))
	}
	if res, _ := a.ResidentBytes(); res != 2*PageSize {
		t.Errorf("clone a holds %d bytes of its own, want %d", res, 2*PageSize)
	}
	if flat, _ := a.PopulatedFlat(); flat.Count() != pages {
		t.Errorf("clone a flattened: %d pages, want all %d (the template's file has no holes)", flat.Count(), pages)
	}
	if pop, _ := b.Populated(); pop.Count() != 0 {
		t.Errorf("clone b, which only read, has %d pages of its own", pop.Count())
	}
	if err := a.PunchPages(5, 1); err != nil {
		t.Fatal(err)
	}
	a.ReadAt(got, 5*PageSize)
	if got[0] != 6 {
		t.Errorf("a dropped page reads 0x%x, want the template's 0x6", got[0])
	}
	on, _ := os.ReadFile(path)
	if !bytes.Equal(on, tmpl) {
		t.Error("the template's file changed")
	}
}
