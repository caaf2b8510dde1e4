package kvm

import (
	"testing"
	"unsafe"
)

// The UAPI sizes, from <linux/kvm.h> on x86-64.
func TestStructSizes(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"kvm_regs", unsafe.Sizeof(Regs{}), 144},
		{"kvm_segment", unsafe.Sizeof(Segment{}), 24},
		{"kvm_dtable", unsafe.Sizeof(DTable{}), 16},
		{"kvm_sregs", unsafe.Sizeof(Sregs{}), 312},
		{"kvm_fpu", unsafe.Sizeof(FPU{}), 416},
		{"kvm_xsave", unsafe.Sizeof(XSave{}), 4096},
		{"kvm_xcrs", unsafe.Sizeof(XCRs{}), 392},
		{"kvm_vcpu_events", unsafe.Sizeof(VCPUEvents{}), 64},
		{"kvm_clock_data", unsafe.Sizeof(ClockData{}), 48},
		{"kvm_msr_entry", unsafe.Sizeof(MSREntry{}), 16},
		{"kvm_cpuid_entry2", unsafe.Sizeof(CPUIDEntry{}), 40},
		{"kvm_userspace_memory_region", unsafe.Sizeof(userspaceMemoryRegion{}), 32},
		{"kvm_dirty_log", unsafe.Sizeof(dirtyLog{}), 16},
		{"kvm_clear_dirty_log", unsafe.Sizeof(clearDirtyLog{}), 24},
		{"kvm_enable_cap", unsafe.Sizeof(enableCap{}), 104},
		{"kvm_dirty_gfn", unsafe.Sizeof(dirtyGFN{}), dirtyGFNSize},
		{"io exit", unsafe.Sizeof(IOExit{}), 16},
	} {
		if c.got != c.want {
			t.Errorf("%s: size %d, want %d", c.name, c.got, c.want)
		}
	}
	if ioResetDirtyRings != 0xAEC7 {
		t.Errorf("KVM_RESET_DIRTY_RINGS %#x, want 0xaec7", ioResetDirtyRings)
	}
	if ioRun != 0xAE80 || ioGetRegs != 0x8090AE81 || ioSetSregs != 0x4138AE84 || ioClearDirtyLog != 0xC018AEC0 || ioEnableCap != 0x4068AEA3 {
		t.Errorf("ioctl numbers: run %#x getregs %#x setsregs %#x clear %#x enablecap %#x", ioRun, ioGetRegs, ioSetSregs, ioClearDirtyLog, ioEnableCap)
	}
}
