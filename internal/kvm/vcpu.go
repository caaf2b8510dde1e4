package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// VCPU is one virtual CPU. Run must be called from a single OS thread (the caller locks it);
// Kick may be called from any thread.
type VCPU struct {
	vm   *VM
	id   int
	fd   int
	run  runPage
	ring *dirtyRing // with VM.EnableDirtyRing
}

// ID is the vCPU's index.
func (c *VCPU) ID() int { return c.id }

// Close unmaps and releases the vCPU.
func (c *VCPU) Close() error {
	if c.ring != nil {
		unix.Munmap(c.ring.mem)
	}
	unix.Munmap(c.run)
	return unix.Close(c.fd)
}

// ErrInterrupted reports that KVM_RUN returned early because of a signal or immediate_exit.
var ErrInterrupted = errors.New("kvm: run interrupted")

// Run enters the guest until the next exit and returns the exit reason. It returns
// ErrInterrupted when a signal or SetImmediateExit stopped it; any port I/O of the previous
// exit has then been completed, so the vCPU's state is consistent for saving.
func (c *VCPU) Run() (uint32, error) {
	if err := ioctlRun(c.fd); err != nil {
		if errors.Is(err, unix.EINTR) {
			return ExitIntr, ErrInterrupted
		}
		return 0, fmt.Errorf("kvm: KVM_RUN vCPU %d: %w", c.id, err)
	}
	return c.run.exitReason(), nil
}

// SetImmediateExit makes the next (or the current, once kicked) KVM_RUN return at once.
func (c *VCPU) SetImmediateExit(v bool) { c.run.setImmediateExit(v) }

// IO returns the port I/O exit and its data bytes (in the shared run page: write them for an
// IN, read them for an OUT).
func (c *VCPU) IO() (IOExit, []byte) { return c.run.io(), c.run.ioData() }

// MMIO returns the MMIO exit.
func (c *VCPU) MMIO() MMIOExit { return c.run.mmio() }

// ExitError describes an exit godwit does not handle, with whatever KVM told about it.
func (c *VCPU) ExitError(reason uint32) error {
	switch reason {
	case ExitInternalError:
		sub, data := c.run.internalError()
		return fmt.Errorf("kvm: vCPU %d: internal error, suberror %d, data %x", c.id, sub, data)
	case ExitFailEntry:
		return fmt.Errorf("kvm: vCPU %d: entry failed, hardware reason 0x%x", c.id, c.run.failEntry())
	case ExitMMIO:
		m := c.run.mmio()
		return fmt.Errorf("kvm: vCPU %d: access to unmapped guest address 0x%x (len %d, write %v)", c.id, m.PhysAddr, m.Len, m.IsWrite == 1)
	}
	regs, err := c.Regs()
	if err != nil {
		return fmt.Errorf("kvm: vCPU %d: unexpected exit %s", c.id, exitName(reason))
	}
	return fmt.Errorf("kvm: vCPU %d: unexpected exit %s at rip 0x%x", c.id, exitName(reason), regs.RIP)
}

// Regs reads the general-purpose registers.
func (c *VCPU) Regs() (Regs, error) {
	var r Regs
	if err := ioctlPtr(c.fd, ioGetRegs, &r); err != nil {
		return r, fmt.Errorf("kvm: KVM_GET_REGS vCPU %d: %w", c.id, err)
	}
	return r, nil
}

// SetRegs writes the general-purpose registers.
func (c *VCPU) SetRegs(r Regs) error {
	if err := ioctlPtr(c.fd, ioSetRegs, &r); err != nil {
		return fmt.Errorf("kvm: KVM_SET_REGS vCPU %d: %w", c.id, err)
	}
	return nil
}

// Sregs reads the special registers.
func (c *VCPU) Sregs() (Sregs, error) {
	var s Sregs
	if err := ioctlPtr(c.fd, ioGetSregs, &s); err != nil {
		return s, fmt.Errorf("kvm: KVM_GET_SREGS vCPU %d: %w", c.id, err)
	}
	return s, nil
}

// SetSregs writes the special registers.
func (c *VCPU) SetSregs(s Sregs) error {
	if err := ioctlPtr(c.fd, ioSetSregs, &s); err != nil {
		return fmt.Errorf("kvm: KVM_SET_SREGS vCPU %d: %w", c.id, err)
	}
	return nil
}

// FPU reads the legacy FPU/SSE state.
func (c *VCPU) FPU() (FPU, error) {
	var f FPU
	if err := ioctlPtr(c.fd, ioGetFPU, &f); err != nil {
		return f, fmt.Errorf("kvm: KVM_GET_FPU vCPU %d: %w", c.id, err)
	}
	return f, nil
}

// SetFPU writes the legacy FPU/SSE state.
func (c *VCPU) SetFPU(f FPU) error {
	if err := ioctlPtr(c.fd, ioSetFPU, &f); err != nil {
		return fmt.Errorf("kvm: KVM_SET_FPU vCPU %d: %w", c.id, err)
	}
	return nil
}

// XSave reads the XSAVE area (x87, SSE, AVX and other enabled components).
func (c *VCPU) XSave() (*XSave, error) {
	x := new(XSave)
	if err := ioctlPtr(c.fd, ioGetXSave, x); err != nil {
		return nil, fmt.Errorf("kvm: KVM_GET_XSAVE vCPU %d: %w", c.id, err)
	}
	return x, nil
}

// SetXSave writes the XSAVE area.
func (c *VCPU) SetXSave(x *XSave) error {
	if err := ioctlPtr(c.fd, ioSetXSave, x); err != nil {
		return fmt.Errorf("kvm: KVM_SET_XSAVE vCPU %d: %w", c.id, err)
	}
	return nil
}

// XCRs reads the extended control registers.
func (c *VCPU) XCRs() (XCRs, error) {
	var x XCRs
	if err := ioctlPtr(c.fd, ioGetXCRs, &x); err != nil {
		return x, fmt.Errorf("kvm: KVM_GET_XCRS vCPU %d: %w", c.id, err)
	}
	return x, nil
}

// SetXCRs writes the extended control registers.
func (c *VCPU) SetXCRs(x XCRs) error {
	if err := ioctlPtr(c.fd, ioSetXCRs, &x); err != nil {
		return fmt.Errorf("kvm: KVM_SET_XCRS vCPU %d: %w", c.id, err)
	}
	return nil
}

// Events reads pending exceptions, interrupts and NMIs.
func (c *VCPU) Events() (VCPUEvents, error) {
	var e VCPUEvents
	if err := ioctlPtr(c.fd, ioGetVCPUEvents, &e); err != nil {
		return e, fmt.Errorf("kvm: KVM_GET_VCPU_EVENTS vCPU %d: %w", c.id, err)
	}
	return e, nil
}

// SetEvents writes pending exceptions, interrupts and NMIs.
func (c *VCPU) SetEvents(e VCPUEvents) error {
	if err := ioctlPtr(c.fd, ioSetVCPUEvents, &e); err != nil {
		return fmt.Errorf("kvm: KVM_SET_VCPU_EVENTS vCPU %d: %w", c.id, err)
	}
	return nil
}

// MPState reads the multiprocessing state.
func (c *VCPU) MPState() (MPState, error) {
	var m MPState
	if err := ioctlPtr(c.fd, ioGetMPState, &m); err != nil {
		return m, fmt.Errorf("kvm: KVM_GET_MP_STATE vCPU %d: %w", c.id, err)
	}
	return m, nil
}

// SetMPState writes the multiprocessing state.
func (c *VCPU) SetMPState(m MPState) error {
	if err := ioctlPtr(c.fd, ioSetMPState, &m); err != nil {
		return fmt.Errorf("kvm: KVM_SET_MP_STATE vCPU %d: %w", c.id, err)
	}
	return nil
}

// MSRs reads the given MSRs. KVM stops at the first it cannot read; that is an error here.
func (c *VCPU) MSRs(indices []uint32) ([]MSREntry, error) {
	if len(indices) == 0 {
		return nil, nil
	}
	buf := make([]byte, 8+16*len(indices))
	binary.LittleEndian.PutUint32(buf, uint32(len(indices)))
	for i, idx := range indices {
		binary.LittleEndian.PutUint32(buf[8+16*i:], idx)
	}
	n, err := ioctlBytes(c.fd, ioGetMSRs, buf)
	if err != nil {
		return nil, fmt.Errorf("kvm: KVM_GET_MSRS vCPU %d: %w", c.id, err)
	}
	if int(n) != len(indices) {
		return nil, fmt.Errorf("kvm: KVM_GET_MSRS vCPU %d: read %d of %d, stopped at MSR 0x%x", c.id, n, len(indices), indices[n])
	}
	out := make([]MSREntry, len(indices))
	for i := range out {
		out[i] = MSREntry{Index: indices[i], Data: binary.LittleEndian.Uint64(buf[8+16*i+8:])}
	}
	return out, nil
}

// SetMSRs writes the given MSRs, all or an error naming the first refused.
func (c *VCPU) SetMSRs(entries []MSREntry) error {
	if len(entries) == 0 {
		return nil
	}
	buf := make([]byte, 8+16*len(entries))
	binary.LittleEndian.PutUint32(buf, uint32(len(entries)))
	for i, e := range entries {
		binary.LittleEndian.PutUint32(buf[8+16*i:], e.Index)
		binary.LittleEndian.PutUint64(buf[8+16*i+8:], e.Data)
	}
	n, err := ioctlBytes(c.fd, ioSetMSRs, buf)
	if err != nil {
		return fmt.Errorf("kvm: KVM_SET_MSRS vCPU %d: %w", c.id, err)
	}
	if int(n) != len(entries) {
		return fmt.Errorf("kvm: KVM_SET_MSRS vCPU %d: wrote %d of %d, refused MSR 0x%x = 0x%x", c.id, n, len(entries), entries[n].Index, entries[n].Data)
	}
	return nil
}

// SetCPUID sets what CPUID reports to the guest.
func (c *VCPU) SetCPUID(entries []CPUIDEntry) error {
	if _, err := ioctlBytes(c.fd, ioSetCPUID2, encodeCPUID(entries)); err != nil {
		return fmt.Errorf("kvm: KVM_SET_CPUID2 vCPU %d (%d entries): %w", c.id, len(entries), err)
	}
	return nil
}

// TSCKHz returns the guest TSC frequency.
func (c *VCPU) TSCKHz() (uint32, error) {
	r, err := ioctl(c.fd, ioGetTSCKHz, 0)
	if err != nil {
		return 0, fmt.Errorf("kvm: KVM_GET_TSC_KHZ vCPU %d: %w", c.id, err)
	}
	return uint32(r), nil
}

// SetTSCKHz sets the guest TSC frequency (needs TSC scaling when it differs from the host's).
func (c *VCPU) SetTSCKHz(khz uint32) error {
	if _, err := ioctl(c.fd, ioSetTSCKHz, uintptr(khz)); err != nil {
		return fmt.Errorf("kvm: KVM_SET_TSC_KHZ vCPU %d to %d kHz: %w", c.id, khz, err)
	}
	return nil
}
