// Package demand makes guest memory demand-paged for the destination of a post-copy migration:
// a guestmem.Region is registered with userfaultfd in MISSING mode, so the first access to a
// page that has not arrived yet blocks until it is placed.
//
// Page states, per page of the region:
//   - missing: in the set Arm was given and not placed yet. Its first access is reported once
//     as a migration.Fault; the accessor waits (a vCPU or a system call in the kernel; the VMM
//     itself in Ensure, on a Go channel, never in the kernel).
//   - complete: not in that set, or placed since. A complete page that is a hole of the memfd
//     (never written anywhere) still raises a userfaultfd fault on its first touch through the
//     mapping; the reader resolves it at once with a zero page, without reporting it.
//
// Go code must never touch a missing page through the mapping: it would block in the kernel
// where Go's preemption cannot reach it, and the next stop-the-world would wait forever. Reach
// memory with pread/pwrite on the memfd after Ensure, or through system calls that fault in the
// kernel (a goroutine in a system call does not hold up the runtime).
//
// The package is the whole destination side of demand paging short of the vCPUs, so that it
// can be measured without KVM on a real userfaultfd.
package demand

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/godwit-vm/godwit/internal/guestmem"
	"github.com/godwit-vm/godwit/internal/uffd"
	"github.com/godwit-vm/godwit/migration"
)

// Stats are the figures of one demand paging.
type Stats struct {
	Armed bool `json:"armed"`
	// Missing is the number of pages Arm made missing; Left how many have not arrived.
	Missing uint64 `json:"missing"`
	Left    uint64 `json:"left"`
	// Faults are the first accesses reported as migration.Faults: by vCPUs (or the kernel on
	// behalf of the VMM) and by the VMM's own accesses (VMMFaults, included in Faults).
	Faults    uint64 `json:"faults"`
	VMMFaults uint64 `json:"vmm_faults"`
	// RepeatFaults are further fault events on pages already reported (several vCPUs, or a
	// retry after a signal): not reported again.
	RepeatFaults uint64 `json:"repeat_faults"`
	// LocalZero counts first touches of complete holes, resolved here with a zero page.
	LocalZero uint64 `json:"local_zero"`
	// PagesPlaced counts the pages Place installed; PagesExisting those it found present
	// already and left alone.
	PagesPlaced   uint64 `json:"pages_placed"`
	PagesExisting uint64 `json:"pages_existing"`
}

// ErrEnded is returned by Ensure when demand paging ends with the pages still missing.
var ErrEnded = errors.New("demand paging has ended")

// Config says where a Pager reports.
type Config struct {
	// Region is the migration region index put in every Fault.
	Region int
	// Faults receives the first access to each missing page. Shutdown closes it.
	Faults chan migration.Fault
	// OnFatal is called once, from the reader, if demand paging breaks (the userfaultfd fails):
	// the accessors of missing pages can no longer be served. It may be nil.
	OnFatal func(error)
}

// Pager serves the userfaultfd of one region while it is armed.
type Pager struct {
	mem     *guestmem.Region
	cfg     Config
	u       *uffd.UFFD
	base    uintptr
	pages   uint64
	zeroOK  atomic.Bool // UFFDIO_ZEROPAGE allowed on the range and not refused
	zeroBuf []byte      // one zero page, for UFFDIO_COPY when it is not

	stop       chan struct{} // closed at shutdown: senders and waiters give up
	readerDone chan struct{}
	sendMu     sync.RWMutex // held shared by senders, exclusively to close Faults
	sendClosed bool

	mu       sync.Mutex
	missing  migration.Bitmap // pages still to arrive
	reported map[uint64]bool  // missing pages reported as faults (few: no bitmap of memory's size to allocate in the stop window)
	changed  chan struct{}    // closed and replaced whenever pages arrive
	closed   bool
	stats    Stats
	failure  error // the reader's fatal error, if any
}

// SetFor returns a copy of missing for mem, the form DiscardStale and Arm take (the caller
// keeps its own). missing may be larger than mem needs, not smaller; pages past mem's last
// are ignored. It costs what the set holds (migration.Bitmap), not mem's size.
func SetFor(mem *guestmem.Region, missing migration.Bitmap) (migration.Bitmap, error) {
	if pages := mem.Pages(); missing.Pages() < pages {
		return migration.Bitmap{}, fmt.Errorf("demand: bitmap of %d pages for %s's %d pages", missing.Pages(), mem.Name, pages)
	}
	return missing.Clone(), nil
}

// maxPunchGap is the most words (of 64 pages) between two runs of stale pages that
// DiscardStale looks through for a page to keep, to punch both as one: beyond it, two punches
// cost less than the look.
const maxPunchGap = 64

// DiscardStale punches the pages of missing that mem holds, so that they read as absent once
// armed (a copy from pre-copy is stale): one punch per run, and as few runs as will do. Only
// pages with data need it (after pure post-copy there are none), and a run may span holes and
// other pages of the set, so it ends only at a page that must be kept (held, not in the set).
func DiscardStale(mem *guestmem.Region, missing migration.Bitmap) error {
	pages := mem.Pages()
	if missing.Pages() < pages {
		return fmt.Errorf("demand: discard stale pages: bitmap of %d pages for %d pages", missing.Pages(), pages)
	}
	if n, err := mem.ResidentBytes(); err == nil && n == 0 {
		return nil // fresh memory (pure post-copy): nothing to discard, and no set to walk
	}
	held, err := mem.Populated()
	if err != nil {
		return fmt.Errorf("demand: discard stale pages: %w", err)
	}
	// kept reports whether a page of [from, to) is held and not in the set: the gap between
	// two runs of stale pages that must not be punched.
	kept := func(from, to uint64) bool {
		for w := from / 64; from < to && w <= (to-1)/64; w++ {
			k := held[w] &^ missing.Word(w)
			if w == from/64 {
				k &= ^uint64(0) << (from % 64)
			}
			if w == (to-1)/64 {
				k &= ^uint64(0) >> (63 - (to-1)%64)
			}
			if k != 0 {
				return true
			}
		}
		return false
	}
	var from, to uint64 // the punch being gathered: pages [from, to)
	missing.Words(pages, func(w, word uint64) bool {
		stale := held[w] & word
		for stale != 0 {
			f := uint64(bits.TrailingZeros64(stale))
			n := uint64(bits.TrailingZeros64(^(stale >> f))) // 64 when the run ends the word
			first := w*64 + f
			if to > from && first/64-to/64 <= maxPunchGap && !kept(to, first) {
				to = first + n
			} else {
				if to > from {
					if err = mem.PunchPages(from, to-from); err != nil {
						return false
					}
				}
				from, to = first, first+n
			}
			if f+n >= 64 {
				break
			}
			stale &^= (1<<n - 1) << f
		}
		return true
	})
	if err == nil && to > from {
		err = mem.PunchPages(from, to-from)
	}
	if err != nil {
		return fmt.Errorf("demand: discard stale pages: %w", err)
	}
	return nil
}

// Arm registers mem with a new userfaultfd and makes the pages of missing demand-paged. It
// keeps missing (the caller must not use it afterwards) and does not discard stale copies:
// call DiscardStale first when mem may hold pages of the set. Nothing may access mem through
// its mapping from Go code until Shutdown.
func Arm(mem *guestmem.Region, missing migration.Bitmap, cfg Config) (*Pager, error) {
	pages := mem.Pages()
	if missing.Pages() < pages {
		return nil, fmt.Errorf("demand: arm: bitmap of %d pages for %d pages", missing.Pages(), pages)
	}
	if cfg.Faults == nil {
		return nil, errors.New("demand: arm: no Faults channel")
	}
	u, err := uffd.Open()
	if err != nil {
		return nil, fmt.Errorf("demand: arm: %w", err)
	}
	base := uffd.Addr(mem.Mem)
	ioctls, err := u.Register(base, mem.Size)
	if err != nil {
		u.Close()
		return nil, fmt.Errorf("demand: arm: register %s: %w", mem.Name, err)
	}
	if ioctls&(uffd.IoctlCopy|uffd.IoctlWake) != uffd.IoctlCopy|uffd.IoctlWake {
		u.Close()
		return nil, fmt.Errorf("demand: arm: the kernel offers no UFFDIO_COPY/WAKE on %s (ioctls 0x%x)", mem.Name, ioctls)
	}
	n := missing.Count(pages)
	p := &Pager{
		mem: mem, cfg: cfg, u: u, base: base, pages: pages,
		zeroBuf: make([]byte, guestmem.PageSize),
		stop:    make(chan struct{}), readerDone: make(chan struct{}),
		missing: missing, reported: map[uint64]bool{}, changed: make(chan struct{}),
		stats: Stats{Armed: true, Missing: n, Left: n},
	}
	p.zeroOK.Store(ioctls&uffd.IoctlZeroPage != 0)
	go p.reader()
	return p, nil
}

// reader turns userfaultfd events into Faults and serves first touches of complete holes.
func (p *Pager) reader() {
	defer close(p.readerDone)
	msgs := make([]uffd.Msg, 64)
	var out []migration.Fault
	var local []uint64
	for {
		n, err := p.u.Read(msgs)
		if err != nil {
			if !errors.Is(err, uffd.ErrClosed) && !p.stopping() {
				p.fatal(err)
			}
			return
		}
		now := time.Now()
		out, local = out[:0], local[:0]
		p.mu.Lock()
		for _, msg := range msgs[:n] {
			if msg.Event != uffd.EventPagefault {
				continue
			}
			off := uintptr(msg.Address) - p.base
			if uintptr(msg.Address) < p.base || uint64(off) >= p.mem.Size {
				continue
			}
			pg := uint64(off) / guestmem.PageSize
			switch {
			case !p.missing.Has(pg):
				local = append(local, pg)
			case p.reported[pg]:
				p.stats.RepeatFaults++
			default:
				p.reported[pg] = true
				p.stats.Faults++
				out = append(out, migration.Fault{Region: p.cfg.Region, Page: pg, At: now})
			}
		}
		p.mu.Unlock()
		for _, pg := range local {
			// A complete page: a hole touched for the first time (zero it), or a page placed
			// after its fault was raised (EEXIST: it is only woken).
			res, err := p.zero(pg, 1)
			if err != nil {
				if p.stopping() {
					// Shutdown unregistered the memory meanwhile: the faulting thread was
					// woken and takes an ordinary fault now. Nothing is wrong.
					return
				}
				p.fatal(err)
				return
			}
			if res.Installed > 0 {
				p.mu.Lock()
				p.stats.LocalZero++
				p.mu.Unlock()
			}
		}
		for _, f := range out {
			p.send(f)
		}
	}
}

// stopping reports whether shutdown has begun.
func (p *Pager) stopping() bool {
	select {
	case <-p.stop:
		return true
	default:
		return false
	}
}

func (p *Pager) fatal(err error) {
	p.mu.Lock()
	first := p.failure == nil
	if first {
		p.failure = err
	}
	p.mu.Unlock()
	if first && p.cfg.OnFatal != nil {
		p.cfg.OnFatal(fmt.Errorf("demand: %s: %w", p.mem.Name, err))
	}
}

// send reports f unless demand paging is ending.
func (p *Pager) send(f migration.Fault) {
	p.sendMu.RLock()
	defer p.sendMu.RUnlock()
	if p.sendClosed {
		return
	}
	select {
	case p.cfg.Faults <- f:
	case <-p.stop:
	}
}

// zero installs n zero pages from page first.
func (p *Pager) zero(first, n uint64) (uffd.Result, error) {
	addr := p.base + uintptr(first*guestmem.PageSize)
	if p.zeroOK.Load() {
		res, err := p.u.ZeroPage(addr, n*guestmem.PageSize, uffd.Options{})
		if err == nil || !(errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP)) || res.Installed+res.Existing > 0 {
			return res, err
		}
		p.zeroOK.Store(false) // refused for this memory: copy zero pages instead from now on
	}
	var res uffd.Result
	for i := uint64(0); i < n; i++ {
		r, err := p.u.Copy(addr+uintptr(i*guestmem.PageSize), p.zeroBuf, uffd.Options{})
		res.Installed += r.Installed
		res.Existing += r.Existing
		if err != nil {
			return res, err
		}
	}
	return res, nil
}

// Place installs pages [first, first+n) atomically (from src, n pages of it, or zero pages when
// src is nil) and wakes whoever waits for them; pages present already are kept. Placing no
// pages does nothing.
func (p *Pager) Place(first, n uint64, src []byte) error {
	if first > p.pages || n > p.pages-first || (src != nil && uint64(len(src)) != n*guestmem.PageSize) {
		return fmt.Errorf("demand: place pages %d+%d (%d bytes) outside %s's %d pages", first, n, len(src), p.mem.Name, p.pages)
	}
	if n == 0 {
		return nil
	}
	var res uffd.Result
	var err error
	if src == nil {
		res, err = p.zero(first, n)
	} else {
		res, err = p.u.Copy(p.base+uintptr(first*guestmem.PageSize), src, uffd.Options{})
	}
	if err != nil {
		return fmt.Errorf("demand: place pages %d+%d: %w", first, n, err)
	}
	p.mu.Lock()
	for pg := first; pg < first+n; pg++ {
		if p.missing.Has(pg) {
			p.missing.Clear(pg)
			p.stats.Left--
		}
	}
	p.stats.PagesPlaced += res.Installed / guestmem.PageSize
	p.stats.PagesExisting += res.Existing / guestmem.PageSize
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
	return nil
}

// Ensure makes sure pages [first, first+n) are here before the caller reads or writes them
// through the memfd: missing pages of the range are reported as faults (once) and waited for,
// on a Go channel. It returns an error wrapping ctx's when ctx ends first, or ErrEnded when
// demand paging ends with pages of the range still missing.
func (p *Pager) Ensure(ctx context.Context, first, n uint64) error {
	if n == 0 {
		return nil
	}
	last := min(first+n-1, p.pages-1)
	for {
		p.mu.Lock()
		var out []migration.Fault
		waiting := false
		for pg := first; pg <= last; pg++ {
			if !p.missing.Has(pg) {
				continue
			}
			waiting = true
			if !p.reported[pg] {
				p.reported[pg] = true
				p.stats.Faults++
				p.stats.VMMFaults++
				out = append(out, migration.Fault{Region: p.cfg.Region, Page: pg, At: time.Now()})
			}
		}
		closed, changed := p.closed, p.changed
		p.mu.Unlock()
		if !waiting {
			return nil
		}
		if closed {
			return ErrEnded
		}
		for _, f := range out {
			p.send(f)
		}
		select {
		case <-changed:
		case <-p.stop:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Complete returns nil once every page has arrived and nothing failed, else an error that says
// what is left (with the first missing page) or what broke.
func (p *Pager) Complete() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.failure != nil {
		return fmt.Errorf("demand paging failed: %w", p.failure)
	}
	if p.stats.Left > 0 {
		var firstLeft uint64
		p.missing.Runs(p.pages, func(first, _ uint64) bool { firstLeft = first; return false })
		return fmt.Errorf("%d pages are still missing (the first is page %d)", p.stats.Left, firstLeft)
	}
	return nil
}

// Shutdown ends demand paging whatever is left: waiters are released (threads waiting in the
// kernel fault their pages in as zero, Ensure returns ErrEnded), the reader stops and Faults
// is closed. Later calls do nothing.
func (p *Pager) Shutdown() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.stats.Armed = false
	close(p.stop)
	p.mu.Unlock()
	err := p.u.Unregister(p.base, p.mem.Size)
	if cerr := p.u.Close(); err == nil {
		err = cerr
	}
	<-p.readerDone
	p.sendMu.Lock()
	p.sendClosed = true
	close(p.cfg.Faults)
	p.sendMu.Unlock()
	if err != nil {
		return fmt.Errorf("demand: shut down %s: %w", p.mem.Name, err)
	}
	return nil
}

// Stats returns the current figures.
func (p *Pager) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stats
}
