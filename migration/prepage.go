package migration

import (
	"cmp"
	"fmt"
	"slices"
	"time"
)

// PageRef names one page of guest memory.
type PageRef struct {
	Region int
	Page   uint64
}

// Prepager orders the source's background push during post-copy. Like PrecopyPolicy it is a
// deterministic state machine without I/O or clock: the driver asks it for the next page to
// push, tells it about the destination's demand faults, and clears each page it sends from
// the pending set the policy was built over (the policy only reads that set). Demanded pages
// always go before whatever Next offers; that is the driver's rule, not the policy's.
type Prepager interface {
	// Next returns a page still set in pending, or false when the policy offers none now
	// (PrepageNone always; the others once pending is empty).
	Next() (PageRef, bool)
	// Demanded tells the policy that the destination faulted on p (requested it).
	Demanded(p PageRef)
}

// NewPrepager returns the policy named (one of the Prepage constants; "" is
// PrepageSequential) over pending, one bitmap per region of sizes[r] pages. heat, used by
// PrepageHot only, counts per page how often the guest dirtied it before the switch (nil or
// short slices count as zero).
func NewPrepager(policy string, pending []Bitmap, sizes []uint64, heat [][]uint32) (Prepager, error) {
	seq := &seqPrepager{pending: pending, sizes: sizes}
	switch policy {
	case PrepageNone:
		return &nonePrepager{seq: seq}, nil
	case PrepageSequential, "":
		return seq, nil
	case PrepageBubble:
		return &bubblePrepager{seq: seq}, nil
	case PrepageHot:
		return newHotPrepager(seq, heat), nil
	}
	return nil, fmt.Errorf("migration: unknown prepaging policy %q (want %s, %s, %s or %s)", policy, PrepageNone, PrepageSequential, PrepageBubble, PrepageHot)
}

// Idler is implemented by policies that push nothing at first (PrepageNone): the driver calls
// Idle once the destination has asked for nothing for NoneIdle, and from then on the policy
// pushes the rest sequentially, so that the migration ends even if the guest never touches
// some pages.
type Idler interface{ Idle() }

// NoneIdle is how long PrepageNone waits without a request before it pushes the rest.
const NoneIdle = 100 * time.Millisecond

// nonePrepager pushes nothing while the destination keeps asking: pages arrive by demand.
type nonePrepager struct {
	seq  *seqPrepager
	idle bool
}

func (n *nonePrepager) Next() (PageRef, bool) {
	if !n.idle {
		return PageRef{}, false
	}
	return n.seq.Next()
}

func (n *nonePrepager) Demanded(PageRef) {}
func (n *nonePrepager) Idle()            { n.idle = true }

// seqPrepager pushes in ascending page order, region by region.
type seqPrepager struct {
	pending []Bitmap
	sizes   []uint64
	r       int
	next    uint64
}

func (s *seqPrepager) Next() (PageRef, bool) {
	for ; s.r < len(s.pending); s.r, s.next = s.r+1, 0 {
		if p, ok := s.pending[s.r].next(s.next, s.sizes[s.r], true); ok {
			s.next = p + 1
			return PageRef{s.r, p}, true
		}
	}
	return PageRef{}, false
}

func (s *seqPrepager) Demanded(PageRef) {}

// bubblePrepager pushes outward from the most recent demand fault, alternately above and
// below it (the pages a guest touching memory with locality is likely to touch next), skipping
// pages already sent. A new fault moves the bubble; once a bubble has covered its region, or
// before the first fault, it pushes sequentially.
type bubblePrepager struct {
	seq    *seqPrepager
	active bool
	r      int
	up     uint64 // next page to look at above the fault
	down   uint64 // one more than the next page to look at below it (0: none left)
	turn   bool   // true: below next
}

func (b *bubblePrepager) Demanded(p PageRef) {
	b.active, b.r, b.up, b.down, b.turn = true, p.Region, p.Page+1, p.Page, false
}

func (b *bubblePrepager) Next() (PageRef, bool) {
	for b.active {
		bm, n := b.seq.pending[b.r], b.seq.sizes[b.r]
		upLeft, downLeft := b.up < n, b.down > 0
		if !upLeft && !downLeft {
			b.active = false
			break
		}
		if (b.turn && downLeft) || !upLeft {
			b.turn = false
			if p, ok := bm.prev(b.down - 1); ok {
				b.down = p
				return PageRef{b.r, p}, true
			}
			b.down = 0
			continue
		}
		b.turn = true
		if p, ok := bm.next(b.up, n, true); ok {
			b.up = p + 1
			return PageRef{b.r, p}, true
		}
		b.up = n
	}
	return b.seq.Next()
}

// hotPrepager pushes the pages the guest dirtied most often before the switch first (ties in
// page order), then the rest sequentially.
type hotPrepager struct {
	seq  *seqPrepager
	hot  []hotPage
	next int
}

type hotPage struct {
	ref  PageRef
	heat uint32
}

func newHotPrepager(seq *seqPrepager, heat [][]uint32) *hotPrepager {
	h := &hotPrepager{seq: seq}
	for r := range seq.pending {
		if r >= len(heat) {
			break
		}
		for p, c := range heat[r][:min(uint64(len(heat[r])), seq.sizes[r])] {
			if c > 0 && seq.pending[r].Has(uint64(p)) {
				h.hot = append(h.hot, hotPage{PageRef{r, uint64(p)}, c})
			}
		}
	}
	slices.SortFunc(h.hot, func(a, b hotPage) int {
		if c := cmp.Compare(b.heat, a.heat); c != 0 {
			return c
		}
		if c := cmp.Compare(a.ref.Region, b.ref.Region); c != 0 {
			return c
		}
		return cmp.Compare(a.ref.Page, b.ref.Page)
	})
	return h
}

func (h *hotPrepager) Next() (PageRef, bool) {
	for ; h.next < len(h.hot); h.next++ {
		if p := h.hot[h.next].ref; h.seq.pending[p.Region].Has(p.Page) {
			h.next++
			return p, true
		}
	}
	return h.seq.Next()
}

func (h *hotPrepager) Demanded(PageRef) {}

// addHeat counts each page set in dirty once more in heat (allocated on first use).
func addHeat(heat [][]uint32, dirty []Bitmap, sizes []uint64) {
	for r, bm := range dirty {
		if heat[r] == nil {
			heat[r] = make([]uint32, sizes[r])
		}
		bm.Runs(sizes[r], func(first, count uint64) bool {
			for p := first; p < first+count; p++ {
				if heat[r][p] < ^uint32(0) {
					heat[r][p]++
				}
			}
			return true
		})
	}
}
