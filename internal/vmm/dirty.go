package vmm

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/godwit-vm/godwit/internal/kvm"
	"github.com/godwit-vm/godwit/migration"
)

// Dirty tracking (Config.DirtyTracking).
//
// With bitmaps, each FetchDirty reads the slot's whole dirty bitmap (KVM_GET_DIRTY_LOG) and
// re-protects the pages it names (KVM_CLEAR_DIRTY_LOG, manual protection): its cost follows
// the memory's size, dirty or not. With the dirty ring (KVM_CAP_DIRTY_LOG_RING), KVM appends
// each page a vCPU dirties to that vCPU's ring; FetchDirty harvests the entries written since
// the last harvest and re-protects just those pages (KVM_RESET_DIRTY_RINGS): its cost follows
// the dirty pages. A vCPU whose ring fills exits (KVM_EXIT_DIRTY_RING_FULL); its thread
// harvests every ring into the pending set, which the next FetchDirty returns, and re-enters.
// No page is lost: a page is re-protected only after its entry is in the pending set, and read
// by the migration only after that.
const (
	DirtyAuto   = "auto"
	DirtyRing   = "ring"
	DirtyBitmap = "bitmap"
)

// MaxDirtyRingBytes caps the ring godwit asks for by default: 65536 entries per vCPU, enough
// for 256 MiB of writes between two harvests. MinDirtyRingBytes is the smallest ring worth
// having: one page of entries.
const (
	MaxDirtyRingBytes = 1 << 20
	MinDirtyRingBytes = 4096
)

// dirtyRing is the machine's side of the vCPUs' dirty rings.
type dirtyRing struct {
	mu        sync.Mutex
	pending   migration.Bitmap // harvested since the last FetchDirty; of no pages while logging is off
	harvested atomic.Uint64    // entries taken from the rings
	fullExits atomic.Uint64    // KVM_EXIT_DIRTY_RING_FULL seen
	entries   int              // per vCPU; kept here since the VM goes with Close, and stats do not
}

// setUpDirtyTracking chooses the ring or bitmaps before any vCPU exists (KVM takes the ring
// only then) and enables it.
func (m *Machine) setUpDirtyTracking() error {
	want := m.cfg.DirtyTracking
	max, _ := m.vm.DirtyRingMax()
	auto := false
	switch want {
	case "", DirtyAuto:
		auto = true
		if max >= MinDirtyRingBytes {
			want = DirtyRing
		} else {
			want = DirtyBitmap
		}
	case DirtyRing:
		if max < MinDirtyRingBytes {
			return fmt.Errorf("vmm: dirty tracking %q: this KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING); use %q", DirtyRing, DirtyBitmap)
		}
	case DirtyBitmap:
	default:
		return fmt.Errorf("vmm: dirty tracking %q: want %s, %s or %s", want, DirtyAuto, DirtyRing, DirtyBitmap)
	}
	if want == DirtyRing {
		bytes := m.cfg.DirtyRingBytes
		if bytes == 0 {
			bytes = min(max, MaxDirtyRingBytes)
		}
		err := m.vm.EnableDirtyRing(bytes)
		if err == nil {
			m.ring = &dirtyRing{entries: m.vm.DirtyRingEntries()}
			return nil
		}
		if !auto {
			return fmt.Errorf("vmm: %w", err)
		}
		// Offered but refused: bitmaps do the job too.
	}
	if m.sys.CheckExtension(kvm.CapManualDirtyLogProtect2) == 0 {
		return errors.New("vmm: KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, which dirty tracking by bitmap needs")
	}
	return m.vm.EnableManualDirtyLogProtect()
}

// StopWindowScaling names the machine's stop-window work that grows with memory
// (migration.StopWindowScaler): with bitmaps, the last dirty fetch reads and clears a bit per
// page of memory, written or not; a ring's harvest costs the entries it holds, and nothing
// else in the pause (state, the last pages) depends on memory's size.
func (m *Machine) StopWindowScaling() []string {
	if m.ring == nil {
		return []string{"final_round_ms: dirty tracking by bitmap reads and clears KVM's dirty log, a bit per page of memory, in the last fetch (run the VM with --dirty-tracking ring where KVM offers it)"}
	}
	return nil
}

// DirtyTracking says how the machine tracks dirty pages, for reports: "ring (N entries per
// vCPU)" or "bitmap".
func (m *Machine) DirtyTracking() string {
	if m.ring == nil {
		return DirtyBitmap
	}
	return fmt.Sprintf("%s (%d entries per vCPU)", DirtyRing, m.ring.entries)
}

// harvestLocked moves the entries of every vCPU's ring into the pending set (or drops them
// while logging is off) and re-protects their pages. m.ring.mu must be held.
func (m *Machine) harvestLocked() error {
	pending := m.ring.pending
	n := 0
	for _, v := range m.vcpus {
		n += v.kvm.HarvestDirty(func(slot uint32, page uint64) {
			if slot == ramSlot && page < pending.Pages() {
				pending.Set(page)
			}
		})
	}
	if n == 0 {
		return nil
	}
	m.ring.harvested.Add(uint64(n))
	_, err := m.vm.ResetDirtyRings()
	return err
}

// harvestDirtyFull empties the rings for a vCPU that found its own full.
func (m *Machine) harvestDirtyFull() error {
	m.ring.fullExits.Add(1)
	m.ring.mu.Lock()
	defer m.ring.mu.Unlock()
	return m.harvestLocked()
}

// startRing begins collecting harvested pages; entries left from an earlier logging period
// are dropped first.
func (m *Machine) startRing() error {
	m.ring.mu.Lock()
	defer m.ring.mu.Unlock()
	m.ring.pending = migration.Bitmap{}
	if err := m.harvestLocked(); err != nil {
		return err
	}
	m.ring.pending = migration.NewBitmap(m.mem.Pages())
	return nil
}

// fetchRing returns the pages dirtied since the last fetch, re-protected. It costs what the
// rings held and a pointer per chunk of pages for the next set (migration.Bitmap), not a bit
// per page of memory.
func (m *Machine) fetchRing() (migration.Bitmap, error) {
	m.ring.mu.Lock()
	defer m.ring.mu.Unlock()
	if err := m.harvestLocked(); err != nil {
		return migration.Bitmap{}, err
	}
	b := m.ring.pending
	if b.Pages() == 0 {
		return b, errors.New("vmm: FetchDirty without StartDirtyLog")
	}
	m.ring.pending = migration.NewBitmap(m.mem.Pages())
	return b, nil
}

// stopRing drops what the rings still hold once logging is off.
func (m *Machine) stopRing() error {
	m.ring.mu.Lock()
	defer m.ring.mu.Unlock()
	m.ring.pending = migration.Bitmap{}
	return m.harvestLocked()
}
