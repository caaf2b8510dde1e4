package vmm

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/migration"
)

// Free page reporting, the machine's side of migration.FreePageReporter.
//
// StartFreePages asks every vCPU (CmdReportFree at its next heartbeat) for its free pages;
// the guest lists them in its mailbox and writes PortFreePages, holding each listed page out of
// its allocator until the write returns, then answers PortFreeDone. From then on it reports each
// page it frees. The vCPU thread takes a list in its I/O exit, under free.mu, which FetchDirty
// holds too, so a list is never taken in the middle of a fetch: it clears the pages' entries
// from the dirty log (the writes before the report, which no longer matter) and adds them to
// the set TakeFreePages returns. A write after the report lands in the log as usual, and the
// engine, taking the reports right after each fetch, then no longer counts the page free.
// Lists that arrive while no migration asked for them are ignored.
type freeReports struct {
	mu        sync.Mutex
	on        bool             // between StartFreePages and StopDirtyLog
	taken     migration.Bitmap // reported since the last TakeFreePages
	waiting   map[int]bool     // vCPUs yet to answer CmdReportFree
	supported int              // vCPUs that answered that they report
	answered  chan struct{}    // closed once waiting is empty
	reported  atomic.Uint64    // pages reported while on, over the machine's life
}

// readPageList reads vCPU id's mailbox list of n page frame numbers (PortFreePages,
// PortBalloonInflate: what names the list), checked against the memory. On a machine still
// receiving by post-copy the read may wait for the mailbox page; the vCPU sits in its exit
// meanwhile, so the list holds still.
func (m *Machine) readPageList(id int, n uint32, what string) ([]uint64, error) {
	if n > guest.MbFreeMax {
		return nil, fmt.Errorf("vmm: vCPU %d: %s of %d pages; the list holds %d at most", id, what, n, guest.MbFreeMax)
	}
	b, err := m.pv.readMailbox(context.Background(), id, guest.MbFreeList, 4*int(n))
	if err != nil {
		return nil, fmt.Errorf("vmm: vCPU %d: reading its %s: %w", id, what, err)
	}
	pfns := make([]uint64, n)
	for i := range pfns {
		pfns[i] = uint64(binary.LittleEndian.Uint32(b[4*i:]))
		if pfns[i] >= m.mem.Pages() {
			return nil, fmt.Errorf("vmm: vCPU %d: %s names page frame 0x%x, beyond the memory's %d pages", id, what, pfns[i], m.mem.Pages())
		}
	}
	return pfns, nil
}

// freePagesReported takes vCPU id's list of n free pages (PortFreePages).
func (m *Machine) freePagesReported(id int, n uint32) error {
	if n == 0 {
		return nil
	}
	// Read before taking the lock: the read may wait (readPageList).
	pfns, err := m.readPageList(id, n, "free page report")
	if err != nil {
		return err
	}
	f := &m.free
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.on {
		return nil
	}
	if err := m.forgetDirty(pfns); err != nil {
		return fmt.Errorf("vmm: vCPU %d: clearing the dirty log of %d pages reported free: %w", id, n, err)
	}
	for _, pfn := range pfns {
		f.taken.Set(pfn)
	}
	f.reported.Add(uint64(n))
	return nil
}

// forgetDirty clears pfns from the dirty log: from the rings' pending set once the rings are
// harvested, or from KVM's bitmap (KVM_CLEAR_DIRTY_LOG of just these pages, which also
// write-protects them again so that their next write is logged).
func (m *Machine) forgetDirty(pfns []uint64) error {
	if m.ring != nil {
		m.ring.mu.Lock()
		defer m.ring.mu.Unlock()
		if err := m.harvestLocked(); err != nil {
			return err
		}
		for _, p := range pfns {
			if p < m.ring.pending.Pages() {
				m.ring.pending.Clear(p)
			}
		}
		return nil
	}
	lo, hi := pfns[0], pfns[0]
	for _, p := range pfns {
		lo, hi = min(lo, p), max(hi, p)
	}
	lo &^= 63
	words := make([]uint64, (hi-lo)/64+1)
	for _, p := range pfns {
		words[(p-lo)/64] |= 1 << ((p - lo) % 64)
	}
	n := min(uint64(len(words))*64, m.mem.Pages()-lo)
	return m.vm.ClearDirtyLog(ramSlot, lo, uint32(n), words)
}

// freeDone takes vCPU id's answer to CmdReportFree (PortFreeDone): supported is 1 when the
// workload reports.
func (m *Machine) freeDone(id int, supported uint32) {
	f := &m.free
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.waiting[id] {
		return
	}
	delete(f.waiting, id)
	if supported == 1 {
		f.supported++
	}
	if len(f.waiting) == 0 {
		close(f.answered)
	}
}

// StartFreePages asks the guest for its free pages and waits for every vCPU's answer, or
// until ctx is done (then it goes on with what has arrived). Logging must be on.
func (s MigrationSource) StartFreePages(ctx context.Context) (bool, error) {
	m := s.M
	f := &m.free
	exited := m.pv.exitedVCPUs()
	f.mu.Lock()
	f.on = true
	f.taken = migration.NewBitmap(m.mem.Pages())
	f.supported = 0
	f.waiting = map[int]bool{}
	answered := make(chan struct{})
	f.answered = answered
	for id, ex := range exited {
		if !ex {
			f.waiting[id] = true
			m.pv.reportFree[id].Store(true)
		}
	}
	if len(f.waiting) == 0 {
		close(answered)
	}
	f.mu.Unlock()
	select {
	case <-answered:
	case <-ctx.Done():
	case <-m.done:
		return false, m.pv.failedErr("free page report")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.supported > 0, nil
}

// TakeFreePages returns the pages reported free since the last call.
func (s MigrationSource) TakeFreePages() ([]migration.Bitmap, error) {
	f := &s.M.free
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.on {
		return nil, fmt.Errorf("vmm: TakeFreePages without StartFreePages")
	}
	b := f.taken
	f.taken = migration.NewBitmap(s.M.mem.Pages())
	return []migration.Bitmap{b}, nil
}

// stopFreePages ignores reports from now on (StopDirtyLog).
func (m *Machine) stopFreePages() {
	f := &m.free
	f.mu.Lock()
	defer f.mu.Unlock()
	f.on = false
	f.taken = migration.Bitmap{}
	for i := range m.pv.reportFree {
		m.pv.reportFree[i].Store(false)
	}
}
