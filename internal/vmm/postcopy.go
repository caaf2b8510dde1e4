package vmm

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/guestmem"
	"github.com/godwit-vm/godwit/internal/uffd"
	"github.com/godwit-vm/godwit/migration"
)

// Post-copy on the destination: guest RAM is registered with userfaultfd in MISSING mode, so the
// first access to a page that is not there yet blocks until the engine places it.
//
// Page states, per page of RAM:
//   - missing: in the set ArmPostcopy was given and not placed yet. Its first access is reported
//     once on Faults; the accessor waits (a vCPU in the kernel, inside KVM_RUN; the VMM itself in
//     ensurePresent, on a Go channel, never in the kernel).
//   - complete: not in that set, or placed since. A complete page that is a hole of the memfd
//     (never written anywhere) still raises a userfaultfd fault on its first touch through the
//     mapping; the reader resolves it here at once with a zero page, without reporting it.
//
// The VMM's own accesses to guest RAM (mailboxes, WriteGuest, ReadPages) go through
// ensurePresent first and then use pread/pwrite on the memfd: pread of a missing page would read
// zeros instead of the page, pwrite would fill it so the real content could no longer be
// installed, and a Go access through the mapping could hang the runtime.

// PostcopyStats are the figures of the machine's demand paging (the current or last one).
type PostcopyStats struct {
	Armed bool `json:"armed"`
	// Missing is the number of pages ArmPostcopy made missing; Left how many have not arrived.
	Missing uint64 `json:"missing"`
	Left    uint64 `json:"left"`
	// Faults are the first accesses reported on Faults: by vCPUs (or the kernel on behalf of
	// the VMM) and by the VMM's own accesses (VMMFaults, included in Faults).
	Faults    uint64 `json:"faults"`
	VMMFaults uint64 `json:"vmm_faults"`
	// RepeatFaults are further fault events on pages already reported (several vCPUs, or a
	// retry after a signal): not reported again.
	RepeatFaults uint64 `json:"repeat_faults"`
	// LocalZero counts first touches of complete holes, resolved here with a zero page.
	LocalZero uint64 `json:"local_zero"`
	// PagesPlaced counts the pages PlacePages and PlaceZero installed; PagesExisting those
	// they found present already and left alone.
	PagesPlaced   uint64 `json:"pages_placed"`
	PagesExisting uint64 `json:"pages_existing"`
}

type postcopy struct {
	m       *Machine
	u       *uffd.UFFD
	base    uintptr
	size    uint64
	pages   uint64
	zeroOK  atomic.Bool // UFFDIO_ZEROPAGE allowed on the range and not refused
	zeroBuf []byte      // one zero page, for UFFDIO_COPY when it is not

	faults     chan migration.Fault
	stop       chan struct{} // closed at shutdown: senders and waiters give up
	readerDone chan struct{}
	sendMu     sync.RWMutex // held shared by senders, exclusively to close faults
	sendClosed bool

	mu       sync.Mutex
	missing  guestmem.Bitmap // pages still to arrive
	reported guestmem.Bitmap // missing pages reported on faults
	changed  chan struct{}   // closed and replaced whenever pages arrive
	closed   bool
	stats    PostcopyStats
	failure  error // the reader's fatal error, if any
}

// armPostcopy makes the pages of missing demand-paged. The machine must not have started.
// Faults are sent on faults, which shutdown closes.
func (m *Machine) armPostcopy(missing migration.Bitmap, faults chan migration.Fault) error {
	if st, _ := m.State(); st != StateCreated {
		return fmt.Errorf("vmm: arm post-copy: machine is %s, want created (arm before Start)", st)
	}
	if m.pc.Load() != nil {
		return errors.New("vmm: arm post-copy: armed already")
	}
	pages := m.mem.Pages()
	bm, err := m.ramBitmap(missing)
	if err != nil {
		return fmt.Errorf("vmm: arm post-copy: %w", err)
	}
	// Discard every missing page this side holds so that it reads as absent: a copy from
	// pre-copy is stale. Usually done already, while the state arrived (DiscardStale).
	if !m.staleDiscarded {
		if err := m.discardStale(bm); err != nil {
			return fmt.Errorf("vmm: arm post-copy: %w", err)
		}
	}
	u, err := uffd.Open()
	if err != nil {
		return fmt.Errorf("vmm: arm post-copy: %w", err)
	}
	base, size := uffd.Addr(m.mem.Mem), m.mem.Size
	ioctls, err := u.Register(base, size)
	if err != nil {
		u.Close()
		return fmt.Errorf("vmm: arm post-copy of guest RAM: %w", err)
	}
	if ioctls&(uffd.IoctlCopy|uffd.IoctlWake) != uffd.IoctlCopy|uffd.IoctlWake {
		u.Close()
		return fmt.Errorf("vmm: arm post-copy: the kernel offers no UFFDIO_COPY/WAKE on guest RAM (ioctls 0x%x)", ioctls)
	}
	n := bm.Count()
	pc := &postcopy{
		m: m, u: u, base: base, size: size, pages: pages,
		zeroBuf: make([]byte, guest.PageSize),
		faults:  faults, stop: make(chan struct{}), readerDone: make(chan struct{}),
		missing: bm, reported: guestmem.NewBitmap(pages), changed: make(chan struct{}),
		stats: PostcopyStats{Armed: true, Missing: n, Left: n},
	}
	pc.zeroOK.Store(ioctls&uffd.IoctlZeroPage != 0)
	m.pc.Store(pc)
	go pc.reader()
	return nil
}

// ramBitmap returns a copy of missing for guest RAM, without bits past its last page.
func (m *Machine) ramBitmap(missing migration.Bitmap) (guestmem.Bitmap, error) {
	pages := m.mem.Pages()
	if uint64(len(missing)) < (pages+63)/64 {
		return nil, fmt.Errorf("bitmap of %d words for %d pages", len(missing), pages)
	}
	bm := guestmem.NewBitmap(pages)
	copy(bm, missing)
	if pages%64 != 0 {
		bm[len(bm)-1] &= 1<<(pages%64) - 1
	}
	return bm, nil
}

// discardStale punches the pages of missing that this side holds: one punch per run, so as
// few runs as will do: only pages with data need it (after pure post-copy there are none), and
// a run may span holes, so it ends only at a page that must be kept.
func (m *Machine) discardStale(missing guestmem.Bitmap) error {
	pages := m.mem.Pages()
	held, err := m.mem.Populated()
	if err != nil {
		return err
	}
	stale, punchable := guestmem.NewBitmap(pages), guestmem.NewBitmap(pages)
	for i := range held {
		stale[i] = held[i] & missing[i]
		punchable[i] = ^(held[i] &^ missing[i]) // not a page to keep
	}
	if pages%64 != 0 {
		punchable[len(punchable)-1] &= 1<<(pages%64) - 1
	}
	migration.Bitmap(punchable).Runs(pages, func(first, n uint64) bool {
		if anySet(stale, first, n) {
			err = m.mem.PunchPages(first, n)
		}
		return err == nil
	})
	return err
}

// reader turns userfaultfd events into Faults and serves first touches of complete holes.
func (pc *postcopy) reader() {
	defer close(pc.readerDone)
	msgs := make([]uffd.Msg, 64)
	var out []migration.Fault
	var local []uint64
	for {
		n, err := pc.u.Read(msgs)
		if err != nil {
			if !errors.Is(err, uffd.ErrClosed) && !pc.stopping() {
				pc.fatal(err)
			}
			return
		}
		now := time.Now()
		out, local = out[:0], local[:0]
		pc.mu.Lock()
		for _, msg := range msgs[:n] {
			if msg.Event != uffd.EventPagefault {
				continue
			}
			off := uintptr(msg.Address) - pc.base
			if uintptr(msg.Address) < pc.base || uint64(off) >= pc.size {
				continue
			}
			p := uint64(off) / guest.PageSize
			switch {
			case !pc.missing.Test(p):
				local = append(local, p)
			case pc.reported.Test(p):
				pc.stats.RepeatFaults++
			default:
				pc.reported.Set(p)
				pc.stats.Faults++
				out = append(out, migration.Fault{Region: 0, Page: p, At: now})
			}
		}
		pc.mu.Unlock()
		for _, p := range local {
			// A complete page: a hole touched for the first time (zero it), or a page placed
			// after its fault was raised (EEXIST: it is only woken).
			res, err := pc.zero(p, 1)
			if err != nil {
				if pc.stopping() {
					// Disarm or abort unregistered the memory meanwhile: the faulting thread
					// was woken and takes an ordinary fault now. Nothing is wrong.
					return
				}
				pc.fatal(err)
				return
			}
			if res.Installed > 0 {
				pc.mu.Lock()
				pc.stats.LocalZero++
				pc.mu.Unlock()
			}
		}
		for _, f := range out {
			pc.send(f)
		}
	}
}

// stopping reports whether shutdown has begun.
func (pc *postcopy) stopping() bool {
	select {
	case <-pc.stop:
		return true
	default:
		return false
	}
}

func (pc *postcopy) fatal(err error) {
	pc.mu.Lock()
	if pc.failure == nil {
		pc.failure = err
	}
	pc.mu.Unlock()
	pc.m.fail(fmt.Errorf("vmm: post-copy: %w", err))
}

// send reports f on the channel unless post-copy is ending.
func (pc *postcopy) send(f migration.Fault) {
	pc.sendMu.RLock()
	defer pc.sendMu.RUnlock()
	if pc.sendClosed {
		return
	}
	select {
	case pc.faults <- f:
	case <-pc.stop:
	}
}

// zero installs n zero pages from page first.
func (pc *postcopy) zero(first, n uint64) (uffd.Result, error) {
	addr := pc.base + uintptr(first*guest.PageSize)
	if pc.zeroOK.Load() {
		res, err := pc.u.ZeroPage(addr, n*guest.PageSize, uffd.Options{})
		if err == nil || !(errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP)) || res.Installed+res.Existing > 0 {
			return res, err
		}
		pc.zeroOK.Store(false) // refused for this memory: copy zero pages instead from now on
	}
	var res uffd.Result
	for i := uint64(0); i < n; i++ {
		r, err := pc.u.Copy(addr+uintptr(i*guest.PageSize), pc.zeroBuf, uffd.Options{})
		res.Installed += r.Installed
		res.Existing += r.Existing
		if err != nil {
			return res, err
		}
	}
	return res, nil
}

// place installs pages [first, first+n) (from src, or zero when src is nil) and wakes their
// waiters.
func (pc *postcopy) place(first, n uint64, src []byte) error {
	var res uffd.Result
	var err error
	if src == nil {
		res, err = pc.zero(first, n)
	} else {
		res, err = pc.u.Copy(pc.base+uintptr(first*guest.PageSize), src, uffd.Options{})
	}
	if err != nil {
		return fmt.Errorf("vmm: place pages %d+%d: %w", first, n, err)
	}
	pc.mu.Lock()
	for p := first; p < first+n; p++ {
		if pc.missing.Test(p) {
			pc.missing.Unset(p)
			pc.stats.Left--
		}
	}
	pc.stats.PagesPlaced += res.Installed / guest.PageSize
	pc.stats.PagesExisting += res.Existing / guest.PageSize
	close(pc.changed)
	pc.changed = make(chan struct{})
	pc.mu.Unlock()
	return nil
}

// ensurePresent makes sure guest RAM [gpa, gpa+size) is here before the VMM reads or writes
// it through the memfd: while post-copy is armed, missing pages of the range are reported as
// faults (once) and waited for, on a Go channel. It returns an error when ctx ends first or
// post-copy is torn down with the pages still missing.
func (m *Machine) ensurePresent(ctx context.Context, gpa, size uint64) error {
	pc := m.pc.Load()
	if pc == nil || size == 0 {
		return nil
	}
	first, last := gpa/guest.PageSize, (gpa+size-1)/guest.PageSize
	if last >= pc.pages {
		last = pc.pages - 1
	}
	for {
		pc.mu.Lock()
		var out []migration.Fault
		waiting := false
		for p := first; p <= last; p++ {
			if !pc.missing.Test(p) {
				continue
			}
			waiting = true
			if !pc.reported.Test(p) {
				pc.reported.Set(p)
				pc.stats.Faults++
				pc.stats.VMMFaults++
				out = append(out, migration.Fault{Region: 0, Page: p, At: time.Now()})
			}
		}
		closed, changed := pc.closed, pc.changed
		pc.mu.Unlock()
		if !waiting {
			return nil
		}
		if closed {
			return fmt.Errorf("vmm: guest memory 0x%x+%d is not here and post-copy has ended", gpa, size)
		}
		for _, f := range out {
			pc.send(f)
		}
		select {
		case <-changed:
		case <-pc.stop:
		case <-ctx.Done():
			return fmt.Errorf("vmm: waiting for guest memory 0x%x+%d to arrive: %w", gpa, size, ctx.Err())
		}
	}
}

// shutdown ends demand paging: waiters are released (vCPUs waiting in the kernel fault their
// pages in as zero, VMM accessors get an error), the reader stops and Faults is closed.
func (pc *postcopy) shutdown() error {
	pc.mu.Lock()
	if pc.closed {
		pc.mu.Unlock()
		return nil
	}
	pc.closed = true
	pc.stats.Armed = false
	close(pc.stop)
	pc.mu.Unlock()
	err := pc.u.Unregister(pc.base, pc.size)
	if cerr := pc.u.Close(); err == nil {
		err = cerr
	}
	<-pc.readerDone
	pc.sendMu.Lock()
	pc.sendClosed = true
	close(pc.faults)
	pc.sendMu.Unlock()
	pc.m.lastPC.Store(pc)
	return err
}

// disarmPostcopy ends demand paging once every page is here.
func (m *Machine) disarmPostcopy() error {
	pc := m.pc.Load()
	if pc == nil {
		return errors.New("vmm: disarm post-copy: not armed")
	}
	pc.mu.Lock()
	left, failure := pc.stats.Left, pc.failure
	var firstLeft uint64
	if left > 0 {
		migration.Bitmap(pc.missing).Runs(pc.pages, func(first, _ uint64) bool { firstLeft = first; return false })
	}
	pc.mu.Unlock()
	if failure != nil {
		return fmt.Errorf("vmm: disarm post-copy: demand paging failed: %w", failure)
	}
	if left > 0 {
		return fmt.Errorf("vmm: disarm post-copy: %d pages are still missing (the first is page %d)", left, firstLeft)
	}
	if !m.pc.CompareAndSwap(pc, nil) {
		return errors.New("vmm: disarm post-copy: disarmed concurrently")
	}
	if err := pc.shutdown(); err != nil {
		return fmt.Errorf("vmm: disarm post-copy: %w", err)
	}
	return nil
}

// stopPostcopy tears demand paging down whatever its state (abort, close).
func (m *Machine) stopPostcopy() {
	if pc := m.pc.Swap(nil); pc != nil {
		pc.shutdown()
	}
}

// PostcopyStats returns the figures of the current demand paging, or of the last one.
func (m *Machine) PostcopyStats() (PostcopyStats, bool) {
	pc := m.pc.Load()
	if pc == nil {
		pc = m.lastPC.Load()
	}
	if pc == nil {
		return PostcopyStats{}, false
	}
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return pc.stats, true
}

// Heartbeats is the number of heartbeats the guest has sent so far, across migrations.
func (m *Machine) Heartbeats() uint64 {
	m.pv.mu.Lock()
	defer m.pv.mu.Unlock()
	return m.pv.heartbeats
}

// MigrationDestination as a migration.PostcopyDestination.

var (
	_ migration.PostcopyDestination = (*MigrationDestination)(nil)
	_ migration.StaleDiscarder      = (*MigrationDestination)(nil)
	_ migration.ProgressCounter     = (*MigrationDestination)(nil)
	_ migration.ProgressCounter     = MigrationSource{}
)

// ArmPostcopy discards the pages of missing (one bitmap, the RAM region) and registers guest
// RAM with userfaultfd: from now on their first access waits until they are placed.
func (d *MigrationDestination) ArmPostcopy(missing []migration.Bitmap) error {
	if err := d.checkSet("arm post-copy", missing); err != nil {
		return err
	}
	d.fmu.Lock()
	defer d.fmu.Unlock()
	if d.faultsGiven {
		return errors.New("vmm: arm post-copy: armed already")
	}
	if err := d.M.armPostcopy(missing[0], d.faultChan()); err != nil {
		return err
	}
	d.faultsGiven = true // the machine's post-copy closes it from now on
	return nil
}

// checkSet checks a page set handed to op: one bitmap, for the RAM region of a prepared machine.
func (d *MigrationDestination) checkSet(op string, missing []migration.Bitmap) error {
	if d.M == nil {
		return fmt.Errorf("vmm: %s before the machine was prepared", op)
	}
	if len(missing) != 1 {
		return fmt.Errorf("vmm: %s: %d bitmaps, this machine has 1 region", op, len(missing))
	}
	return nil
}

// DiscardStale punches the pages of missing that this side holds, ahead of ArmPostcopy
// (migration.StaleDiscarder): nothing may write guest memory between the two.
func (d *MigrationDestination) DiscardStale(missing []migration.Bitmap) error {
	if err := d.checkSet("discard stale pages", missing); err != nil {
		return err
	}
	d.fmu.Lock()
	defer d.fmu.Unlock()
	m := d.M
	if st, _ := m.State(); st != StateCreated || m.pc.Load() != nil {
		return fmt.Errorf("vmm: discard stale pages: machine is %s (armed: %v), want created and not armed", st, m.pc.Load() != nil)
	}
	bm, err := m.ramBitmap(missing[0])
	if err == nil {
		err = m.discardStale(bm)
	}
	if err != nil {
		return fmt.Errorf("vmm: discard stale pages: %w", err)
	}
	m.staleDiscarded = true
	return nil
}

// faultChan returns the Faults channel, made on first use. d.fmu is held.
func (d *MigrationDestination) faultChan() chan migration.Fault {
	if d.faults == nil {
		// Outstanding faults are few (a vCPU waits on one page at a time); the buffer only
		// keeps the reader from waiting on the engine.
		d.faults = make(chan migration.Fault, 4096)
	}
	return d.faults
}

// Faults delivers first accesses to missing pages. The channel is the same before and after
// ArmPostcopy; DisarmPostcopy and Abort close it.
func (d *MigrationDestination) Faults() <-chan migration.Fault {
	d.fmu.Lock()
	defer d.fmu.Unlock()
	return d.faultChan()
}

func (d *MigrationDestination) armed(r int, first, n uint64) (*postcopy, error) {
	if _, err := d.region(r, first, n); err != nil {
		return nil, err
	}
	pc := d.M.pc.Load()
	if pc == nil {
		return nil, fmt.Errorf("vmm: place pages %d+%d: post-copy is not armed", first, n)
	}
	return pc, nil
}

// PlacePages installs pages with UFFDIO_COPY and wakes their waiters; present pages are kept.
func (d *MigrationDestination) PlacePages(r int, first uint64, src []byte) error {
	if len(src)%guest.PageSize != 0 {
		return fmt.Errorf("vmm: place pages: %d bytes is not a whole number of pages", len(src))
	}
	n := uint64(len(src)) / guest.PageSize
	pc, err := d.armed(r, first, n)
	if err != nil || n == 0 {
		return err
	}
	return pc.place(first, n, src)
}

// PlaceZero installs zero pages (UFFDIO_ZEROPAGE, or a copy of zeros where that is refused).
func (d *MigrationDestination) PlaceZero(r int, first, n uint64) error {
	pc, err := d.armed(r, first, n)
	if err != nil || n == 0 {
		return err
	}
	return pc.place(first, n, nil)
}

// DisarmPostcopy unregisters guest RAM, stops the reader and closes Faults. It refuses while
// pages are still missing (they would read as zero afterwards); Abort tears down regardless.
func (d *MigrationDestination) DisarmPostcopy() error {
	if d.M == nil {
		return errors.New("vmm: disarm post-copy: no machine")
	}
	return d.M.disarmPostcopy()
}

// ProgressCount is the number of heartbeats the guest has sent (the source's count continues
// here after RestoreState).
func (d *MigrationDestination) ProgressCount() uint64 {
	if d.M == nil {
		return 0
	}
	return d.M.Heartbeats()
}

// ProgressCount is the number of heartbeats the guest has sent so far.
func (s MigrationSource) ProgressCount() uint64 { return s.M.Heartbeats() }

// anySet reports whether b has a bit set in [first, first+n).
func anySet(b guestmem.Bitmap, first, n uint64) bool {
	end := first + n
	for i := first; i < end; {
		w := i / 64
		mask := ^uint64(0) << (i % 64)
		if next := (w + 1) * 64; end < next {
			mask &= 1<<(end%64) - 1
		}
		if b[w]&mask != 0 {
			return true
		}
		i = (w + 1) * 64
	}
	return false
}
