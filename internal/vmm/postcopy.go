package vmm

import (
	"context"
	"errors"
	"fmt"

	"github.com/godwit-vm/godwit/internal/demand"
	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/migration"
)

// Post-copy on the destination: guest RAM is demand-paged by internal/demand (userfaultfd in
// MISSING mode), so the first access to a page that is not there yet blocks until the engine
// places it: a vCPU waits in the kernel, inside KVM_RUN; the VMM itself waits in ensurePresent,
// on a Go channel, never in the kernel.
//
// The VMM's own accesses to guest RAM (mailboxes, WriteGuest, ReadPages) go through
// ensurePresent first and then use pread/pwrite on the memfd: pread of a missing page would read
// zeros instead of the page, pwrite would fill it so the real content could no longer be
// installed, and a Go access through the mapping could hang the runtime.

// PostcopyStats are the figures of the machine's demand paging (the current or last one).
type PostcopyStats = demand.Stats

// armPostcopy makes the pages of missing demand-paged. The machine must not have started.
// Faults are sent on faults, which shutdown closes.
func (m *Machine) armPostcopy(missing migration.Bitmap, faults chan migration.Fault) error {
	if st, _ := m.State(); st != StateCreated {
		return fmt.Errorf("vmm: arm post-copy: machine is %s, want created (arm before Start)", st)
	}
	if m.pc.Load() != nil {
		return errors.New("vmm: arm post-copy: armed already")
	}
	// Discard every missing page this side holds so that it reads as absent: a copy from
	// pre-copy is stale. Usually done already, while the state arrived (DiscardStale).
	bm := m.discarded
	m.discarded = migration.Bitmap{}
	if bm.Pages() == 0 {
		var err error
		if bm, err = demand.SetFor(m.mem, missing); err != nil {
			return fmt.Errorf("vmm: arm post-copy: %w", err)
		}
		if err := demand.DiscardStale(m.mem, bm); err != nil {
			return fmt.Errorf("vmm: arm post-copy: %w", err)
		}
	}
	pc, err := demand.Arm(m.mem, bm, demand.Config{
		Region:  0,
		Faults:  faults,
		OnFatal: func(err error) { m.fail(fmt.Errorf("vmm: post-copy: %w", err)) },
	})
	if err != nil {
		return fmt.Errorf("vmm: arm post-copy: %w", err)
	}
	m.pc.Store(pc)
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
	first := gpa / guest.PageSize
	n := (gpa+size-1)/guest.PageSize - first + 1
	switch err := pc.Ensure(ctx, first, n); {
	case err == nil:
		return nil
	case errors.Is(err, demand.ErrEnded):
		return fmt.Errorf("vmm: guest memory 0x%x+%d is not here and post-copy has ended", gpa, size)
	default:
		return fmt.Errorf("vmm: waiting for guest memory 0x%x+%d to arrive: %w", gpa, size, err)
	}
}

// readPresent reads guest RAM at gpa into b through the memfd, once ensurePresent has the
// pages here.
func (m *Machine) readPresent(ctx context.Context, gpa uint64, b []byte) error {
	if err := m.ensurePresent(ctx, gpa, uint64(len(b))); err != nil {
		return err
	}
	_, err := m.mem.ReadAt(b, int64(gpa))
	return err
}

// disarmPostcopy ends demand paging once every page is here.
func (m *Machine) disarmPostcopy() error {
	pc := m.pc.Load()
	if pc == nil {
		return errors.New("vmm: disarm post-copy: not armed")
	}
	if err := pc.Complete(); err != nil {
		return fmt.Errorf("vmm: disarm post-copy: %w", err)
	}
	if !m.pc.CompareAndSwap(pc, nil) {
		return errors.New("vmm: disarm post-copy: disarmed concurrently")
	}
	m.lastPC.Store(pc)
	m.releaseKept()
	if err := pc.Shutdown(); err != nil {
		return fmt.Errorf("vmm: disarm post-copy: %w", err)
	}
	return nil
}

// stopPostcopy tears demand paging down whatever its state (abort, close).
func (m *Machine) stopPostcopy() {
	if pc := m.pc.Swap(nil); pc != nil {
		m.lastPC.Store(pc)
		pc.Shutdown()
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
	return pc.Stats(), true
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
	bm, err := demand.SetFor(m.mem, missing[0])
	if err == nil {
		err = demand.DiscardStale(m.mem, bm)
	}
	if err != nil {
		return fmt.Errorf("vmm: discard stale pages: %w", err)
	}
	m.discarded = bm // the pager's copy of the set, ready for ArmPostcopy
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

func (d *MigrationDestination) armed(r int, first, n uint64) (*demand.Pager, error) {
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
	return pc.Place(first, n, src)
}

// PlaceZero installs zero pages (UFFDIO_ZEROPAGE, or a copy of zeros where that is refused).
func (d *MigrationDestination) PlaceZero(r int, first, n uint64) error {
	pc, err := d.armed(r, first, n)
	if err != nil || n == 0 {
		return err
	}
	return pc.Place(first, n, nil)
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
