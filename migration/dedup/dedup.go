// Package dedup is the duplicate page encoding: a page whose content the destination holds
// already, in a page sent before in this migration, travels as a reference to that page (28
// bytes instead of a page). The source keeps an [Index] of the pages it sent, by content; the
// destination keeps nothing: it checks the reference against the page it holds and copies it.
//
// # Format
//
// The data of an EncDedup page is
//
//	u32 region, u64 page   the page referred to, which the destination holds
//	16 bytes               the first 16 bytes of the SHA-256 of the content
//
// The index finds candidates by a fast 128-bit hash with a seed of the migration's own, which a
// guest cannot aim at; the SHA-256 is computed only for the pages sent as references, and the
// destination refuses a reference whose page does not hash to it. So no collision of the fast
// hash, accidental or crafted, can copy the wrong content: at worst the migration fails.
//
// # When a reference is safe
//
// Pages of one round may go on any connection and arrive in any order, but the destination
// places every page of a round before it acknowledges it, and the next round starts only then.
// So page R, sent in round m, holds that content at the destination for a page of round n on
// connection k when R has not been sent since and either
//   - m < n and R is not in round n's set (no newer copy of R can overtake the reference), or
//   - m == n and R went on connection k (the destination places one connection's pages in
//     order).
//
// The index checks both at every lookup: it records the round in which each page was last
// sent, whatever its encoding. After a switch to post-copy the same rules hold with the set of
// missing pages as one more round, but the guest runs at the destination and may change any
// page it holds: a reference can fail there. The destination then fetches the page again, and
// the source drops that content ([Index.Forget]).
package dedup

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/zeebo/xxh3"

	"github.com/godwit-vm/godwit/migration/pages"
)

// Size is the data of one reference (wire.DedupSize).
const Size = 28

// sumSize is how much of the SHA-256 a reference carries.
const sumSize = 16

// DefaultEntries bounds the index unless the caller says: 2M pages of distinct content (8 GiB of
// 4 KiB pages), at about 50 bytes each. Past it, new content is not indexed (the pages already
// indexed still serve as references).
const DefaultEntries = 2 << 20

// Index is the source's record of the pages sent in one migration: by content, the page that
// holds it at the destination, and for every page the round it was last sent in. Its methods
// are safe for concurrent use by the connections' encoders ([Index.Lane]).
type Index struct {
	hash    HashFunc
	seed    uint64
	max     int64
	entries atomic.Int64
	shards  [64]shard
	last    [][]atomic.Uint32 // per region and page: the round it was last sent in; 0: never
	round   atomic.Uint32
	pending atomic.Pointer[func(r int, p uint64) bool]
}

type shard struct {
	mu sync.Mutex
	m  map[uint64][]entry // by the fast hash's low half: the pages that hold the content
}

// entry is a page that holds one content at the destination. A content has one entry per
// connection at most: in the round it went, a page serves references on its own connection
// only, so each connection keeps its own.
type entry struct {
	check  uint64 // the fast hash's high half
	page   uint64
	region uint32
	round  uint32 // the round it was sent in
	lane   uint32 // the connection it went on
}

// HashFunc is the index's fast hash of a page's content.
type HashFunc func(page []byte, seed uint64) xxh3.Uint128

// SetHash replaces the fast hash (xxh3-128 with the index's seed) before the index is used:
// for tests that force collisions.
func (x *Index) SetHash(h HashFunc) { x.hash = h }

func (x *Index) sum(page []byte) xxh3.Uint128 { return x.hash(page, x.seed) }

// NewIndex makes an index for regions of the given page counts, of at most maxEntries
// contents (0: DefaultEntries).
func NewIndex(regionPages []uint64, maxEntries int) *Index {
	if maxEntries <= 0 {
		maxEntries = DefaultEntries
	}
	var seed [8]byte
	rand.Read(seed[:])
	x := &Index{hash: xxh3.Hash128Seed, seed: binary.LittleEndian.Uint64(seed[:]), max: int64(maxEntries), last: make([][]atomic.Uint32, len(regionPages))}
	for r, n := range regionPages {
		x.last[r] = make([]atomic.Uint32, n)
	}
	for i := range x.shards {
		x.shards[i].m = map[uint64][]entry{}
	}
	return x
}

// StartRound tells the index that round n (1, 2, ...) starts, with the pages it will send:
// pending says whether a page is in the round's set. It must be called before any page of the
// round is encoded, while no encoder runs, and pending must not change during the round.
func (x *Index) StartRound(n uint32, pending func(r int, p uint64) bool) {
	x.pending.Store(&pending)
	x.round.Store(n)
}

// Entries is how many contents the index holds.
func (x *Index) Entries() int { return int(x.entries.Load()) }

// Lane is the encoder for pages sent on connection k (0: the main one).
func (x *Index) Lane(k int) *Encoder { return &Encoder{x: x, lane: uint32(k)} }

// usable says whether e holds its content at the destination for a page of round n on lane k.
func (x *Index) usable(e entry, n, k uint32) bool {
	if x.gone(e, n) {
		return false
	}
	return e.round < n || e.lane == k
}

// gone says whether e's page has been sent again since e, or will be in round n: it will
// never serve a reference again.
func (x *Index) gone(e entry, n uint32) bool {
	if x.last[e.region][e.page].Load() != e.round {
		return true
	}
	if e.round == n {
		return false
	}
	pending := x.pending.Load()
	return pending != nil && (*pending)(int(e.region), e.page)
}

// Encoder is the dedup encoding of one connection's pages, as a pages.Encoder. Every page the
// migration sends must pass through it, by Encode or by Record, so that the index knows when a
// page it refers to changes at the destination.
type Encoder struct {
	x    *Index
	lane uint32
}

func (e *Encoder) Kind() pages.Kind { return pages.Dedup }

// Encode appends a reference to a page that holds page's content at the destination, if there
// is one, and otherwise takes ref as the page that holds it from now on.
func (e *Encoder) Encode(dst []byte, ref pages.Ref, page []byte) ([]byte, bool) {
	x := e.x
	if ref.Region >= len(x.last) || ref.Index >= uint64(len(x.last[ref.Region])) {
		return dst, false
	}
	n := x.round.Load()
	x.last[ref.Region][ref.Index].Store(n)
	h := x.sum(page)
	sh := &x.shards[h.Lo%uint64(len(x.shards))]
	sh.mu.Lock()
	for _, old := range sh.m[h.Lo] {
		if old.check == h.Hi && (old.region != uint32(ref.Region) || old.page != ref.Index) && x.usable(old, n, e.lane) {
			sh.mu.Unlock()
			sum := sha256.Sum256(page)
			dst = binary.LittleEndian.AppendUint32(dst, old.region)
			dst = binary.LittleEndian.AppendUint64(dst, old.page)
			return append(dst, sum[:sumSize]...), true
		}
	}
	e.take(sh, h, ref, n)
	sh.mu.Unlock()
	return dst, false
}

// take makes ref, sent whole (or as another encoding) in round n, this connection's page that
// holds the content hashed to h; sh is h's shard, locked. Entries that will never serve again
// go.
func (e *Encoder) take(sh *shard, h xxh3.Uint128, ref pages.Ref, n uint32) {
	x := e.x
	list, had := sh.m[h.Lo]
	if !had && x.entries.Load() >= x.max {
		return
	}
	keep := list[:0]
	for _, old := range list {
		if old.check == h.Hi && old.lane != e.lane && !x.gone(old, n) {
			keep = append(keep, old)
		}
	}
	sh.m[h.Lo] = append(keep, entry{check: h.Hi, page: ref.Index, region: uint32(ref.Region), round: n, lane: e.lane})
	if !had {
		x.entries.Add(1)
	}
}

// Record hears of a page sent without Encode: a zero page, or a page sent raw while the
// encoders are off.
func (e *Encoder) Record(ref pages.Ref, page []byte) {
	x := e.x
	if ref.Region >= len(x.last) || ref.Index >= uint64(len(x.last[ref.Region])) {
		return
	}
	n := x.round.Load()
	x.last[ref.Region][ref.Index].Store(n)
	if pages.IsZero(page) {
		return // zero pages travel as a marker anyway
	}
	h := x.sum(page)
	sh := &x.shards[h.Lo%uint64(len(x.shards))]
	sh.mu.Lock()
	e.take(sh, h, ref, n)
	sh.mu.Unlock()
}

// Forget drops every page that holds page's content: a reference to one of them failed at the
// destination, whose guest has changed it. The next page with this content goes whole and
// takes its place.
func (x *Index) Forget(page []byte) {
	h := x.sum(page)
	sh := &x.shards[h.Lo%uint64(len(x.shards))]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if _, ok := sh.m[h.Lo]; ok {
		delete(sh.m, h.Lo)
		x.entries.Add(-1)
	}
}

// Reference is a decoded EncDedup page.
type Reference struct {
	Region int
	Page   uint64
	Sum    [sumSize]byte
}

// Parse decodes a reference (Size bytes).
func Parse(data []byte) (Reference, error) {
	if len(data) != Size {
		return Reference{}, fmt.Errorf("dedup: reference of %d bytes, want %d", len(data), Size)
	}
	ref := Reference{Region: int(binary.LittleEndian.Uint32(data)), Page: binary.LittleEndian.Uint64(data[4:])}
	copy(ref.Sum[:], data[12:])
	return ref, nil
}

// ErrMismatch is a page referred to that does not hold the content the reference names.
var ErrMismatch = errors.New("dedup: the page referred to holds other content")

// Check says whether page, read from the page a reference names, is the content it stands for.
func (ref Reference) Check(page []byte) error {
	sum := sha256.Sum256(page)
	if [sumSize]byte(sum[:sumSize]) != ref.Sum {
		return ErrMismatch
	}
	return nil
}
