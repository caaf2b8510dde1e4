package kvm

import (
	"sync/atomic"
	"unsafe"
)

// dirtyRing is a vCPU's dirty ring as mapped from its fd: KVM writes an entry and then sets its
// dirty flag (a release); the VMM reads the flag (an acquire), then the entry, and hands it
// back by setting the reset flag (a release), which KVM_RESET_DIRTY_RINGS acts on. next is the
// VMM's free-running index of the first entry not harvested yet.
type dirtyRing struct {
	mem  []byte
	gfns []dirtyGFN
	next uint32
}

func newDirtyRing(mem []byte) *dirtyRing {
	n := len(mem) / dirtyGFNSize
	return &dirtyRing{mem: mem, gfns: unsafe.Slice((*dirtyGFN)(unsafe.Pointer(&mem[0])), n)}
}

// harvest passes each entry KVM filled since the last call to fn and marks it for reset.
func (r *dirtyRing) harvest(fn func(slot uint32, page uint64)) int {
	mask := uint32(len(r.gfns) - 1)
	n := 0
	for {
		e := &r.gfns[r.next&mask]
		// Go's atomics are sequentially consistent, which is at least the acquire and
		// release KVM_CAP_DIRTY_LOG_RING_ACQ_REL asks of the VMM.
		if atomic.LoadUint32(&e.Flags)&dirtyGFNDirty == 0 {
			return n
		}
		fn(e.Slot, e.Offset)
		atomic.StoreUint32(&e.Flags, dirtyGFNReset)
		r.next++
		n++
	}
}

// HarvestDirty passes fn every page the vCPU dirtied since the last harvest, as its slot and
// page within the slot, and marks the entries so that VM.ResetDirtyRings re-protects the pages.
// It may run while the vCPU runs, but not on two threads at once for one vCPU. It returns how
// many entries it took; 0 without a ring.
func (c *VCPU) HarvestDirty(fn func(slot uint32, page uint64)) int {
	if c.ring == nil {
		return 0
	}
	return c.ring.harvest(fn)
}
