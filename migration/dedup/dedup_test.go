package dedup

import (
	"bytes"
	"testing"

	"github.com/godwit-vm/godwit/migration/pages"
)

const ps = 4096

func content(b byte) []byte { return bytes.Repeat([]byte{b, 1, 2, 3}, ps/4) }

// encode runs one page through e and returns the page it refers to, or -1 if it went whole.
func encode(t *testing.T, e *Encoder, index uint64, page []byte) int64 {
	t.Helper()
	out, ok := e.Encode(nil, pages.Ref{Index: index}, page)
	if !ok {
		return -1
	}
	ref, err := Parse(out)
	if err != nil {
		t.Fatal(err)
	}
	if err := ref.Check(page); err != nil {
		t.Fatalf("reference to page %d does not check against its own content: %v", ref.Page, err)
	}
	return int64(ref.Page)
}

// TestRules walks the rules of a safe reference: within a round only on the connection the page
// went on; in a later round on any, unless the page is in that round's set; never after the page
// was sent again or its content forgotten.
func TestRules(t *testing.T) {
	x := NewIndex([]uint64{16}, 0)
	a, b := x.Lane(0), x.Lane(1)
	none := func(int, uint64) bool { return false }
	x.StartRound(1, func(int, uint64) bool { return true })
	if got := encode(t, a, 0, content(7)); got != -1 {
		t.Fatalf("first copy went as a reference to %d", got)
	}
	if got := encode(t, a, 1, content(7)); got != 0 {
		t.Fatalf("same connection, same round: got %d, want a reference to 0", got)
	}
	if got := encode(t, b, 2, content(7)); got != -1 {
		t.Fatalf("other connection, same round: got a reference to %d", got)
	}
	if got := encode(t, b, 3, content(7)); got != 2 {
		t.Fatalf("other connection, its own copy: got %d, want 2", got)
	}

	// Round 2 sends page 0 again: it serves nobody; page 2 is not in the set and serves all.
	x.StartRound(2, func(_ int, p uint64) bool { return p == 0 || p >= 4 })
	if got := encode(t, a, 4, content(7)); got != 2 {
		t.Fatalf("round 2: got %d, want a reference to 2 (0 is in the round's set)", got)
	}
	if got := encode(t, b, 0, content(9)); got != -1 {
		t.Fatalf("new content went as a reference to %d", got)
	}
	// Page 1 (a reference to 0's content in round 1) is as good a copy as any.
	x.StartRound(3, none)
	if got := encode(t, a, 5, content(9)); got != 0 {
		t.Fatalf("round 3: got %d, want a reference to 0 (its new content)", got)
	}
	if got := encode(t, a, 6, content(7)); got == 0 || got == -1 {
		t.Fatalf("round 3: old content of page 0 referred to %d", got)
	}

	// A page sent again (zero, recorded) no longer holds its old content.
	x.StartRound(4, func(_ int, p uint64) bool { return p == 0 })
	a.Record(pages.Ref{Index: 0}, make([]byte, ps))
	x.StartRound(5, none)
	if got := encode(t, b, 7, content(9)); got == 0 {
		t.Fatalf("a reference to page 0, which went as zero since")
	}
	// A content forgotten goes whole once, and its page serves from then on.
	x.Forget(content(9))
	if got := encode(t, a, 8, content(9)); got != -1 {
		t.Fatalf("after Forget: a reference to %d", got)
	}
	if got := encode(t, a, 9, content(9)); got != 8 {
		t.Fatalf("after Forget: got %d, want a reference to 8", got)
	}
}

// TestCheck: a reference checks only against the content it was made for.
func TestCheck(t *testing.T) {
	x := NewIndex([]uint64{4}, 0)
	e := x.Lane(0)
	x.StartRound(1, func(int, uint64) bool { return true })
	e.Encode(nil, pages.Ref{Index: 0}, content(1))
	out, ok := e.Encode(nil, pages.Ref{Index: 1}, content(1))
	if !ok || len(out) != Size {
		t.Fatalf("no reference: %v, %d bytes", ok, len(out))
	}
	ref, err := Parse(out)
	if err != nil || ref.Region != 0 || ref.Page != 0 {
		t.Fatalf("parsed %+v, %v", ref, err)
	}
	other := content(1)
	other[ps-1] ^= 1
	if err := ref.Check(other); err != ErrMismatch {
		t.Fatalf("a page one bit off checked: %v", err)
	}
	if _, err := Parse(out[:Size-1]); err == nil {
		t.Fatal("a short reference parsed")
	}
}

// TestBound: past the bound new content is not indexed, and what is indexed still serves.
func TestBound(t *testing.T) {
	x := NewIndex([]uint64{8}, 2)
	e := x.Lane(0)
	x.StartRound(1, func(int, uint64) bool { return true })
	for i := range 3 {
		e.Encode(nil, pages.Ref{Index: uint64(i)}, content(byte(i+1)))
	}
	if x.Entries() != 2 {
		t.Fatalf("%d entries, bound 2", x.Entries())
	}
	if _, ok := e.Encode(nil, pages.Ref{Index: 3}, content(1)); !ok {
		t.Fatal("an indexed content did not serve")
	}
	if _, ok := e.Encode(nil, pages.Ref{Index: 4}, content(3)); ok {
		t.Fatal("content past the bound served")
	}
}

func FuzzParse(f *testing.F) {
	f.Add(make([]byte, Size))
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, data []byte) {
		ref, err := Parse(data)
		if err != nil {
			return
		}
		if len(data) != Size {
			t.Fatalf("parsed %d bytes", len(data))
		}
		_ = ref.Check(make([]byte, ps))
	})
}
