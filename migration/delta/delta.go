// Package delta is the delta page encoding: a page sent as the words in which it differs from
// the copy sent before, for pages a guest rewrites with small changes (XBZRLE's idea, with
// 8-byte words instead of bytes). The source keeps the copies it sent in a bounded [Cache];
// the destination keeps none: it applies the delta to the page it holds, which is that copy.
//
// # Format
//
// The data of an EncDelta page is a sequence of runs, each
//
//	uvarint skip   words (8 bytes each) kept, counted from the end of the previous run
//	uvarint n      words replaced, at least 1
//	n*8 bytes      the new words
//
// with no bytes after the last run. Runs stay within the page; an empty delta is not valid (a
// page sent unchanged is one run of its last word).
package delta

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/godwit-vm/godwit/migration/pages"
)

const wordSize = 8

// Encode appends the delta that turns old into page (both one page long, a multiple of 8
// bytes) to dst and returns it.
func Encode(dst, old, page []byte) []byte {
	words := len(page) / wordSize
	word := func(b []byte, i int) uint64 { return binary.LittleEndian.Uint64(b[i*wordSize:]) }
	last, runs := 0, 0 // end of the previous run, in words; runs written
	for i := 0; i < words; {
		if word(old, i) == word(page, i) {
			i++
			continue
		}
		j := i + 1
		for j < words && word(old, j) != word(page, j) {
			j++
		}
		dst = binary.AppendUvarint(dst, uint64(i-last))
		dst = binary.AppendUvarint(dst, uint64(j-i))
		dst = append(dst, page[i*wordSize:j*wordSize]...)
		last, i = j, j
		runs++
	}
	if runs == 0 && words > 0 {
		// Unchanged: the last word as the one run.
		dst = binary.AppendUvarint(dst, uint64(words-1))
		dst = binary.AppendUvarint(dst, 1)
		dst = append(dst, page[(words-1)*wordSize:]...)
	}
	return dst
}

// Apply applies data, a delta of the format above, to page in place. On an error page may be
// partly changed.
func Apply(page, data []byte) error {
	words := uint64(len(page) / wordSize)
	var pos uint64
	runs := 0
	for len(data) > 0 {
		skip, k := binary.Uvarint(data)
		if k <= 0 {
			return fmt.Errorf("delta: run %d: bad skip count", runs)
		}
		data = data[k:]
		n, k := binary.Uvarint(data)
		if k <= 0 {
			return fmt.Errorf("delta: run %d: bad word count", runs)
		}
		data = data[k:]
		if n == 0 {
			return fmt.Errorf("delta: run %d: replaces no word", runs)
		}
		if skip > words-pos || n > words-pos-skip {
			return fmt.Errorf("delta: run %d: words %d+%d after %d pass the page's %d", runs, skip, n, pos, words)
		}
		if uint64(len(data)) < n*wordSize {
			return fmt.Errorf("delta: run %d: %d words announced, %d bytes left", runs, n, len(data))
		}
		pos += skip
		copy(page[pos*wordSize:], data[:n*wordSize])
		data = data[n*wordSize:]
		pos += n
		runs++
	}
	if runs == 0 {
		return errors.New("delta: empty")
	}
	return nil
}

// Cache holds the copy of each page last sent, for the pages it has room for: direct-mapped
// by page (a page whose slot another took is sent whole, and takes the slot back). Its
// methods are safe for concurrent use: the connections of one migration share it, since a
// page may take a different connection in each round.
type Cache struct {
	ps    int
	slots []slot
	mem   []byte
	locks [64]sync.Mutex
}

type slot struct {
	ref   pages.Ref
	valid bool
}

// NewCache makes a cache of about bytes of pages of ps bytes (one page at least).
func NewCache(bytes uint64, ps int) *Cache {
	n := max(1, int(bytes/uint64(ps)))
	return &Cache{ps: ps, slots: make([]slot, n), mem: make([]byte, n*ps)}
}

// Pages is how many pages the cache holds at most.
func (c *Cache) Pages() int { return len(c.slots) }

// lock finds ref's slot, locks it and returns it, its page and the unlock.
func (c *Cache) lock(ref pages.Ref) (s *slot, page []byte, unlock func()) {
	h := uint64(ref.Index)*0x9e3779b97f4a7c15 ^ uint64(ref.Region)*0xbf58476d1ce4e5b9
	i := int((h >> 17) % uint64(len(c.slots)))
	mu := &c.locks[i%len(c.locks)]
	mu.Lock()
	return &c.slots[i], c.mem[i*c.ps : (i+1)*c.ps], mu.Unlock
}

// Encoder is the delta encoding as a pages.Encoder over a Cache. Every page the migration
// sends must pass through it, by Encode or by Record, so that the cache never holds a copy
// the destination does not: pages.Classifier calls Record for the pages it sends without
// asking it (zero pages, pages sent raw by choice, pages another encoder took first).
type Encoder struct {
	c   *Cache
	off atomic.Bool
}

// NewEncoder makes an encoder over a cache of about cacheBytes.
func NewEncoder(cacheBytes uint64, ps int) *Encoder {
	return &Encoder{c: NewCache(cacheBytes, ps)}
}

// Cache is the encoder's cache.
func (e *Encoder) Cache() *Cache { return e.c }

// Stop makes every later Encode decline and Record do nothing: from a post-copy switch on the
// destination no longer holds the pages' older copies.
func (e *Encoder) Stop() { e.off.Store(true) }

func (e *Encoder) Kind() pages.Kind { return pages.Delta }

// Encode appends page's delta to its cached copy and takes page as the new copy. It declines
// pages not in the cache (and caches them) and deltas longer than three quarters of a page.
func (e *Encoder) Encode(dst []byte, ref pages.Ref, page []byte) ([]byte, bool) {
	if e.off.Load() || len(page) != e.c.ps {
		return dst, false
	}
	c := e.c
	s, old, unlock := c.lock(ref)
	defer unlock()
	hit := s.valid && s.ref == ref
	out := dst
	ok := false
	if hit {
		out = Encode(dst, old, page)
		ok = len(out)-len(dst) <= c.ps*3/4
		if !ok {
			out = dst
		}
	}
	copy(old, page)
	s.ref, s.valid = ref, true
	return out, ok
}

// Record takes page as the copy sent of ref (a page sent without Encode), as Encode would.
func (e *Encoder) Record(ref pages.Ref, page []byte) {
	if e.off.Load() || len(page) != e.c.ps {
		return
	}
	s, cached, unlock := e.c.lock(ref)
	defer unlock()
	copy(cached, page)
	*s = slot{ref: ref, valid: true}
}

// Decoder applies deltas to the pages the destination holds.
type Decoder struct{}

func (Decoder) Kind() pages.Kind { return pages.Delta }

// Decode applies data to page, which must hold the page's copy sent before.
func (Decoder) Decode(page []byte, _ pages.Ref, data []byte) error { return Apply(page, data) }
