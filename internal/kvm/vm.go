package kvm

import (
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// VM is a KVM virtual machine.
type VM struct {
	sys       *System
	fd        int
	ringBytes int // each vCPU's dirty ring, once EnableDirtyRing succeeded
}

// System returns the device the VM was created on.
func (v *VM) System() *System { return v.sys }

// Close releases the VM. Its vCPUs must be closed first.
func (v *VM) Close() error { return unix.Close(v.fd) }

// CheckExtension asks the VM (some capabilities are per VM) about cap.
func (v *VM) CheckExtension(cap int) int {
	r, err := ioctl(v.fd, ioCheckExtension, uintptr(cap))
	if err != nil {
		return 0
	}
	return int(r)
}

// SetTSSAddr places the three pages Intel VMX needs for real-mode emulation. Harmless on AMD.
func (v *VM) SetTSSAddr(gpa uint64) error {
	if _, err := ioctl(v.fd, ioSetTSSAddr, uintptr(gpa)); err != nil {
		return fmt.Errorf("kvm: KVM_SET_TSS_ADDR 0x%x: %w", gpa, err)
	}
	return nil
}

// SetIdentityMapAddr places the one page Intel VMX needs for its identity map. Harmless on AMD.
func (v *VM) SetIdentityMapAddr(gpa uint64) error {
	if err := ioctlPtr(v.fd, ioSetIdentityMapAddr, &gpa); err != nil {
		return fmt.Errorf("kvm: KVM_SET_IDENTITY_MAP_ADDR 0x%x: %w", gpa, err)
	}
	return nil
}

// MemorySlot describes one guest memory slot backed by a host mapping.
type MemorySlot struct {
	Slot     uint32
	GPA      uint64
	Mem      []byte // host mapping; len is the slot size
	LogDirty bool
}

// SetMemorySlot creates or changes a slot. Setting LogDirty on an existing slot starts dirty
// logging for it; clearing it stops logging.
func (v *VM) SetMemorySlot(s MemorySlot) error {
	r := userspaceMemoryRegion{
		Slot:          s.Slot,
		GuestPhysAddr: s.GPA,
		MemorySize:    uint64(len(s.Mem)),
		UserspaceAddr: sliceAddr(s.Mem),
	}
	if s.LogDirty {
		r.Flags |= MemLogDirtyPages
	}
	if err := ioctlPtr(v.fd, ioSetUserMemoryRegion, &r); err != nil {
		return fmt.Errorf("kvm: KVM_SET_USER_MEMORY_REGION slot %d gpa 0x%x size %d log %v: %w", s.Slot, s.GPA, len(s.Mem), s.LogDirty, err)
	}
	return nil
}

// DeleteMemorySlot removes a slot (its guest memory is then unmapped from the VM), so that it
// can be created again on other host memory: KVM moves no slot in place.
func (v *VM) DeleteMemorySlot(slot uint32) error {
	r := userspaceMemoryRegion{Slot: slot}
	if err := ioctlPtr(v.fd, ioSetUserMemoryRegion, &r); err != nil {
		return fmt.Errorf("kvm: KVM_SET_USER_MEMORY_REGION deleting slot %d: %w", slot, err)
	}
	return nil
}

// EnableManualDirtyLogProtect switches the VM to KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: reading the
// dirty log no longer re-protects pages; ClearDirtyLog does, for just the pages named. This
// lets the caller re-arm tracking exactly for the pages it is about to copy.
func (v *VM) EnableManualDirtyLogProtect() error {
	c := enableCap{Cap: CapManualDirtyLogProtect2, Args: [4]uint64{dirtyLogManualProtectEnable}}
	if err := ioctlPtr(v.fd, ioEnableCap, &c); err != nil {
		return fmt.Errorf("kvm: KVM_ENABLE_CAP MANUAL_DIRTY_LOG_PROTECT2: %w", err)
	}
	return nil
}

// DirtyRingMax is the largest dirty ring a vCPU may have, in bytes, and whether KVM offers
// the ring with acquire/release ordering (KVM_CAP_DIRTY_LOG_RING_ACQ_REL); 0 when it offers
// no ring.
func (v *VM) DirtyRingMax() (bytes int, acqRel bool) {
	if n := v.CheckExtension(CapDirtyLogRingAcqRel); n > 0 {
		return n, true
	}
	return v.CheckExtension(CapDirtyLogRing), false
}

// EnableDirtyRing gives every vCPU created from now on a dirty ring of bytes (a power of two,
// at least a page, at most DirtyRingMax): with dirty logging on, KVM appends each page a vCPU
// dirties to that vCPU's ring instead of a bitmap, and KVM_GET_DIRTY_LOG is refused. It must
// be called before the first vCPU is created.
func (v *VM) EnableDirtyRing(bytes int) error {
	max, acqRel := v.DirtyRingMax()
	if bytes <= 0 || bytes&(bytes-1) != 0 || bytes < unix.Getpagesize() || bytes > max {
		return fmt.Errorf("kvm: dirty ring of %d bytes: want a power of two from %d to %d", bytes, unix.Getpagesize(), max)
	}
	which := CapDirtyLogRing
	if acqRel {
		which = CapDirtyLogRingAcqRel
	}
	c := enableCap{Cap: uint32(which), Args: [4]uint64{uint64(bytes)}}
	if err := ioctlPtr(v.fd, ioEnableCap, &c); err != nil {
		return fmt.Errorf("kvm: KVM_ENABLE_CAP dirty ring (%d bytes): %w", bytes, err)
	}
	v.ringBytes = bytes
	return nil
}

// DirtyRingEntries is how many pages each vCPU's dirty ring holds (0: no ring).
func (v *VM) DirtyRingEntries() int { return v.ringBytes / dirtyGFNSize }

// ResetDirtyRings write-protects again every page whose ring entry was harvested (marked
// reset), so that its next write is logged, and recycles those entries. It returns how many.
func (v *VM) ResetDirtyRings() (int, error) {
	n, err := ioctl(v.fd, ioResetDirtyRings, 0)
	if err != nil {
		return 0, fmt.Errorf("kvm: KVM_RESET_DIRTY_RINGS: %w", err)
	}
	return int(n), nil
}

// GetDirtyLog fills bitmap (one bit per page of the slot, 64-bit words) with the slot's dirty
// pages. Without manual protection it also clears the log and re-protects the pages.
func (v *VM) GetDirtyLog(slot uint32, bitmap []uint64) error {
	d := dirtyLog{Slot: slot, Bitmap: userPtr(bitmap)}
	err := ioctlPtr(v.fd, ioGetDirtyLog, &d)
	runtime.KeepAlive(bitmap)
	if err != nil {
		return fmt.Errorf("kvm: KVM_GET_DIRTY_LOG slot %d: %w", slot, err)
	}
	return nil
}

// ClearDirtyLog clears the dirty bits set in bitmap, for pages [first, first+64*len(bitmap)),
// and write-protects those pages again so that the next write is logged. first must be a
// multiple of 64.
func (v *VM) ClearDirtyLog(slot uint32, first uint64, numPages uint32, bitmap []uint64) error {
	c := clearDirtyLog{Slot: slot, NumPages: numPages, FirstPage: first, Bitmap: userPtr(bitmap)}
	err := ioctlPtr(v.fd, ioClearDirtyLog, &c)
	runtime.KeepAlive(bitmap)
	if err != nil {
		return fmt.Errorf("kvm: KVM_CLEAR_DIRTY_LOG slot %d pages %d+%d: %w", slot, first, numPages, err)
	}
	return nil
}

// Clock returns kvmclock's state (KVM_GET_CLOCK).
func (v *VM) Clock() (ClockData, error) {
	var c ClockData
	if err := ioctlPtr(v.fd, ioGetClock, &c); err != nil {
		return c, fmt.Errorf("kvm: KVM_GET_CLOCK: %w", err)
	}
	return c, nil
}

// SetClock restores kvmclock (KVM_SET_CLOCK). Only the clock value and flags matter.
func (v *VM) SetClock(c ClockData) error {
	c.HostTSC = 0
	c.Flags &= 0 // the realtime flag would ask KVM to add elapsed wall time; godwit decides that itself
	c.Realtime = 0
	if err := ioctlPtr(v.fd, ioSetClock, &c); err != nil {
		return fmt.Errorf("kvm: KVM_SET_CLOCK: %w", err)
	}
	return nil
}

// CreateVCPU creates vCPU id and maps its run structure.
func (v *VM) CreateVCPU(id int) (*VCPU, error) {
	fd, err := ioctl(v.fd, ioCreateVCPU, uintptr(id))
	if err != nil {
		return nil, fmt.Errorf("kvm: KVM_CREATE_VCPU %d: %w", id, err)
	}
	unix.CloseOnExec(int(fd))
	run, err := unix.Mmap(int(fd), 0, v.sys.runSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(int(fd))
		return nil, fmt.Errorf("kvm: mmap kvm_run of vCPU %d (%d bytes): %w", id, v.sys.runSize, err)
	}
	c := &VCPU{vm: v, id: id, fd: int(fd), run: runPage(run)}
	if v.ringBytes > 0 {
		ring, err := unix.Mmap(int(fd), int64(dirtyLogPageOffset*unix.Getpagesize()), v.ringBytes, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			unix.Munmap(run)
			unix.Close(int(fd))
			return nil, fmt.Errorf("kvm: mmap dirty ring of vCPU %d (%d bytes): %w", id, v.ringBytes, err)
		}
		c.ring = newDirtyRing(ring)
	}
	return c, nil
}
