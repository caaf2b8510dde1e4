package vmm

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/godwit-vm/godwit/internal/guestmem"
	"github.com/godwit-vm/godwit/internal/kvm"
	"github.com/godwit-vm/godwit/migration"
)

// Localizing: a VM whose memory is in a memory file on shared memory (after a migration on
// shared memory, the memory of a pool both hosts reach, slower than this host's own) moves
// into memory of its own process while the guest runs: a pre-copy within one process. Every
// populated page is copied with the dirty log on, then the pages written meanwhile, round by
// round, until few are left; then the vCPUs pause, the last pages are copied, the RAM slot is
// created again on the new memory, and they run on. The memory file is left as it was, for its
// owner to remove.

// localizeEnough is how few dirty pages end the live rounds: copying them in the pause takes
// well under a millisecond.
const localizeEnough = 1024

// localizeRounds bounds the live rounds: a guest that writes faster than pages are copied
// pauses for what is left after them.
const localizeRounds = 30

// LocalizeReport says how the memory moved.
type LocalizeReport struct {
	From     string  `json:"from"`     // the memory file the memory was in
	Pages    uint64  `json:"pages"`    // pages copied, over all rounds
	Rounds   int     `json:"rounds"`   // live rounds, before the pause
	Final    uint64  `json:"final"`    // pages copied in the pause
	PauseMS  float64 `json:"pause_ms"` // how long the vCPUs stood still
	TotalMS  float64 `json:"total_ms"` // from the start to the guest running on its own memory
	Resident uint64  `json:"resident"` // bytes of guest memory in the new memory afterwards
}

// Localize moves guest memory out of its memory file into memory of this process, with the
// guest running (see above). It fails, leaving the VM on its memory file and running, when the
// memory is not in a file or a migration uses the dirty log. A migration away must not start
// while it runs (a migration that logs dirty pages is refused; one on shared memory or a
// handover would give the destination the file the guest is leaving): the caller keeps them
// apart.
func (m *Machine) Localize(ctx context.Context) (LocalizeReport, error) {
	t0 := time.Now()
	m.mu.Lock()
	st, logging, busy, file := m.state, m.logDirty, m.localizing, m.cfg.MemoryFile
	if file != "" && st == StateRunning && !logging && !busy {
		m.localizing = true
	}
	m.mu.Unlock()
	rep := LocalizeReport{From: file}
	switch {
	case file == "":
		return rep, errors.New("vmm: localize: the VM's memory is its own already (not in a memory file)")
	case st != StateRunning:
		return rep, fmt.Errorf("vmm: localize: the machine is %s", st)
	case busy:
		return rep, errors.New("vmm: localize: it runs already")
	case logging:
		return rep, errors.New("vmm: localize: a migration uses the dirty log")
	}
	defer func() {
		m.mu.Lock()
		m.localizing = false
		m.mu.Unlock()
	}()
	if m.pc.Load() != nil {
		return rep, errors.New("vmm: localize: pages are still arriving by post-copy")
	}
	old := m.mem
	local, err := guestmem.NewRegion(old.Name, old.GPA, old.Size)
	if err != nil {
		return rep, fmt.Errorf("vmm: localize: %w", err)
	}
	src := MigrationSource{M: m}
	if err := src.StartDirtyLog(); err != nil {
		local.Close()
		return rep, fmt.Errorf("vmm: localize: %w", err)
	}
	fail := func(err error) (LocalizeReport, error) {
		src.StopDirtyLog()
		local.Close()
		return rep, fmt.Errorf("vmm: localize: %w", err)
	}
	pop, err := src.Populated()
	if err != nil {
		return fail(err)
	}
	set := pop[0]
	for {
		if err := ctx.Err(); err != nil {
			return fail(err)
		}
		n, err := copyPages(old, local, set, old.Pages(), rep.Rounds == 0)
		if err != nil {
			return fail(err)
		}
		rep.Pages += n
		rep.Rounds++
		dirty, err := src.FetchDirty()
		if err != nil {
			return fail(err)
		}
		set = dirty[0]
		if set.Count(old.Pages()) <= localizeEnough || rep.Rounds >= localizeRounds {
			break
		}
	}
	// The pause: the last pages, then the slot on the new memory.
	if err := m.Pause(); err != nil {
		return fail(err)
	}
	p0 := time.Now()
	resume := func() {
		if err := m.Resume(); err != nil {
			m.fail(fmt.Errorf("vmm: localize: resuming: %w", err))
		}
	}
	last, err := src.FetchDirty()
	if err == nil {
		set.Or(last[0])
		rep.Final, err = copyPages(old, local, set, old.Pages(), false)
	}
	if err != nil {
		resume()
		return fail(err)
	}
	rep.Pages += rep.Final
	if err := m.switchMemory(local); err != nil {
		// The VM cannot run on either memory for sure: a failed slot change is fatal.
		m.fail(err)
		return rep, err
	}
	resume()
	rep.PauseMS = float64(time.Since(p0).Microseconds()) / 1000
	old.Close() // unmapping it takes milliseconds: not in the pause
	rep.TotalMS = float64(time.Since(t0).Microseconds()) / 1000
	rep.Resident, _ = local.ResidentBytes()
	m.mu.Lock()
	m.localized = &rep
	m.mu.Unlock()
	return rep, nil
}

// copyPages copies the pages of set from one region to another through their mappings (no
// page of either is demand-paged: Localize runs after any post-copy), and returns how many it
// copied. The first copy (fill) allocates and maps the new pages a run at a time (FillAt);
// after it a page copies without a fault or a system call, which is what keeps the pause, a
// copy of scattered single pages, short.
func copyPages(from, to *guestmem.Region, set migration.Bitmap, pages uint64, fill bool) (uint64, error) {
	var n uint64
	var err error
	set.Runs(pages, func(first, count uint64) bool {
		off, end := first*guestmem.PageSize, (first+count)*guestmem.PageSize
		if fill {
			err = to.FillAt(from.Mem[off:end], int64(off))
		} else {
			copy(to.Mem[off:end], from.Mem[off:end])
		}
		n += count
		return err == nil
	})
	return n, err
}

// switchMemory makes local the guest's RAM, with its vCPUs paused: KVM moves no slot in
// place, so the slot goes and comes back on the new mapping, dirty logging off.
func (m *Machine) switchMemory(local *guestmem.Region) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.life.Lock()
	defer m.life.Unlock()
	m.stopFreePages()
	if m.ring != nil {
		if err := m.stopRing(); err != nil {
			return fmt.Errorf("vmm: localize: %w", err)
		}
	}
	if err := m.vm.DeleteMemorySlot(ramSlot); err != nil {
		return fmt.Errorf("vmm: localize: %w", err)
	}
	if err := m.vm.SetMemorySlot(kvm.MemorySlot{Slot: ramSlot, Mem: local.Mem}); err != nil {
		return fmt.Errorf("vmm: localize: %w", err)
	}
	m.mem.TakeVMMDirty(nil)
	m.mem = local
	m.logDirty = false
	m.cfg.MemoryFile, m.memoryID = "", guestmem.MemoryID{}
	return nil
}
