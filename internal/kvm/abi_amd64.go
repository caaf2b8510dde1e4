package kvm

import "strconv"

// Mirrors of the x86-64 structures of <linux/kvm.h>. Field order and sizes follow the kernel's
// UAPI exactly; abi_test.go pins every size so a mistake fails the build's tests, not a guest.

// Regs mirrors struct kvm_regs.
type Regs struct {
	RAX, RBX, RCX, RDX uint64
	RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11   uint64
	R12, R13, R14, R15 uint64
	RIP, RFLAGS        uint64
}

// Segment mirrors struct kvm_segment.
type Segment struct {
	Base     uint64
	Limit    uint32
	Selector uint16
	Type     uint8
	Present  uint8
	DPL      uint8
	DB       uint8
	S        uint8
	L        uint8
	G        uint8
	AVL      uint8
	Unusable uint8
	_        uint8
}

// DTable mirrors struct kvm_dtable (GDTR, IDTR).
type DTable struct {
	Base  uint64
	Limit uint16
	_     [3]uint16
}

// Sregs mirrors struct kvm_sregs.
type Sregs struct {
	CS, DS, ES, FS, GS, SS Segment
	TR, LDT                Segment
	GDT, IDT               DTable
	CR0, CR2, CR3, CR4     uint64
	CR8                    uint64
	EFER                   uint64
	APICBase               uint64
	InterruptBitmap        [4]uint64
}

// FPU mirrors struct kvm_fpu (legacy x87/SSE state, used where XSAVE is not offered).
type FPU struct {
	FPR        [8][16]uint8
	FCW        uint16
	FSW        uint16
	FTWX       uint8
	_          uint8
	LastOpcode uint16
	LastIP     uint64
	LastDP     uint64
	XMM        [16][16]uint8
	MXCSR      uint32
	_          uint32
}

// XSave mirrors struct kvm_xsave: the XSAVE area as KVM lays it out (legacy region, header,
// extended components). 4 KiB is the size of KVM_GET_XSAVE; larger areas need KVM_GET_XSAVE2.
type XSave struct {
	Region [1024]uint32
}

// XCR mirrors struct kvm_xcr.
type XCR struct {
	XCR   uint32
	_     uint32
	Value uint64
}

// XCRs mirrors struct kvm_xcrs.
type XCRs struct {
	NrXCRs uint32
	Flags  uint32
	XCRs   [16]XCR
	_      [16]uint64
}

// VCPUEvents mirrors struct kvm_vcpu_events as an opaque block: godwit saves and restores it
// whole and never interprets it, so a layout change inside cannot be misread.
type VCPUEvents struct {
	Data [64]byte
}

// MPState mirrors struct kvm_mp_state.
type MPState struct {
	State uint32
}

// ClockData mirrors struct kvm_clock_data.
type ClockData struct {
	Clock    uint64
	Flags    uint32
	_        uint32
	Realtime uint64
	HostTSC  uint64
	_        [4]uint32
}

// MSREntry mirrors struct kvm_msr_entry.
type MSREntry struct {
	Index uint32
	_     uint32
	Data  uint64
}

// CPUIDEntry mirrors struct kvm_cpuid_entry2.
type CPUIDEntry struct {
	Function uint32
	Index    uint32
	Flags    uint32
	EAX      uint32
	EBX      uint32
	ECX      uint32
	EDX      uint32
	_        [3]uint32
}

// userspaceMemoryRegion mirrors struct kvm_userspace_memory_region.
type userspaceMemoryRegion struct {
	Slot          uint32
	Flags         uint32
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
}

// dirtyLog mirrors struct kvm_dirty_log.
type dirtyLog struct {
	Slot   uint32
	_      uint32
	Bitmap uint64 // user pointer
}

// clearDirtyLog mirrors struct kvm_clear_dirty_log.
type clearDirtyLog struct {
	Slot      uint32
	NumPages  uint32
	FirstPage uint64
	Bitmap    uint64 // user pointer
}

// enableCap mirrors struct kvm_enable_cap.
type enableCap struct {
	Cap   uint32
	Flags uint32
	Args  [4]uint64
	_     [64]uint8
}

// ioctl request numbers: _IO/_IOR/_IOW/_IOWR(KVMIO = 0xAE, nr, size).
const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2
	kvmio    = 0xAE
)

func ioc(dir, nr, size uintptr) uintptr { return dir<<30 | size<<16 | kvmio<<8 | nr }

var (
	ioGetAPIVersion       = ioc(iocNone, 0x00, 0)
	ioCreateVM            = ioc(iocNone, 0x01, 0)
	ioGetMSRIndexList     = ioc(iocRead|iocWrite, 0x02, 4)
	ioCheckExtension      = ioc(iocNone, 0x03, 0)
	ioGetVCPUMmapSize     = ioc(iocNone, 0x04, 0)
	ioGetSupportedCPUID   = ioc(iocRead|iocWrite, 0x05, 8)
	ioCreateVCPU          = ioc(iocNone, 0x41, 0)
	ioGetDirtyLog         = ioc(iocWrite, 0x42, 16)
	ioSetUserMemoryRegion = ioc(iocWrite, 0x46, 32)
	ioSetTSSAddr          = ioc(iocNone, 0x47, 0)
	ioSetIdentityMapAddr  = ioc(iocWrite, 0x48, 8)
	ioSetClock            = ioc(iocWrite, 0x7b, 48)
	ioGetClock            = ioc(iocRead, 0x7c, 48)
	ioRun                 = ioc(iocNone, 0x80, 0)
	ioGetRegs             = ioc(iocRead, 0x81, 144)
	ioSetRegs             = ioc(iocWrite, 0x82, 144)
	ioGetSregs            = ioc(iocRead, 0x83, 312)
	ioSetSregs            = ioc(iocWrite, 0x84, 312)
	ioGetMSRs             = ioc(iocRead|iocWrite, 0x88, 8)
	ioSetMSRs             = ioc(iocWrite, 0x89, 8)
	ioGetFPU              = ioc(iocRead, 0x8c, 416)
	ioSetFPU              = ioc(iocWrite, 0x8d, 416)
	ioSetCPUID2           = ioc(iocWrite, 0x90, 8)
	ioGetMPState          = ioc(iocRead, 0x98, 4)
	ioSetMPState          = ioc(iocWrite, 0x99, 4)
	ioGetVCPUEvents       = ioc(iocRead, 0x9f, 64)
	ioSetVCPUEvents       = ioc(iocWrite, 0xa0, 64)
	ioSetTSCKHz           = ioc(iocNone, 0xa2, 0)
	ioGetTSCKHz           = ioc(iocNone, 0xa3, 0)
	ioEnableCap           = ioc(iocWrite, 0xa3, 104)
	ioGetXSave            = ioc(iocRead, 0xa4, 4096)
	ioSetXSave            = ioc(iocWrite, 0xa5, 4096)
	ioGetXCRs             = ioc(iocRead, 0xa6, 392)
	ioSetXCRs             = ioc(iocWrite, 0xa7, 392)
	ioClearDirtyLog       = ioc(iocRead|iocWrite, 0xc0, 24)
	ioResetDirtyRings     = ioc(iocNone, 0xc7, 0)
)

// Capabilities (KVM_CAP_*) godwit asks about.
const (
	CapUserMemory               = 3
	CapSetTSSAddr               = 4
	CapExtCPUID                 = 7
	CapSyncMMU                  = 16
	CapGetTSCKHz                = 61
	CapTSCControl               = 60
	CapXSave                    = 55
	CapXCRs                     = 56
	CapAdjustClock              = 39
	CapVCPUEvents               = 41
	CapImmediateExit            = 136
	CapManualDirtyLogProtect2   = 168
	CapDirtyLogRing             = 192
	CapDirtyLogRingAcqRel       = 223
	dirtyLogManualProtectEnable = 1
)

// Exit reasons (KVM_EXIT_*).
const (
	ExitUnknown       = 0
	ExitException     = 1
	ExitIO            = 2
	ExitHypercall     = 3
	ExitDebug         = 4
	ExitHLT           = 5
	ExitMMIO          = 6
	ExitIRQWindowOpen = 7
	ExitShutdown      = 8
	ExitFailEntry     = 9
	ExitIntr          = 10
	ExitInternalError = 17
	ExitDirtyRingFull = 31
	ExitSystemEvent   = 24
)

// Port I/O directions.
const (
	IOIn  = 0
	IOOut = 1
)

// MemLogDirtyPages is KVM_MEM_LOG_DIRTY_PAGES.
const MemLogDirtyPages = 1

// MP states.
const (
	MPStateRunnable = 0
)

// MSR indices worth saving for a 64-bit guest.
const (
	MSRTSC          = 0x10
	MSRSysenterCS   = 0x174
	MSRSysenterESP  = 0x175
	MSRSysenterEIP  = 0x176
	MSRPAT          = 0x277
	MSRMiscEnable   = 0x1a0
	MSRTSCAdjust    = 0x3b
	MSRStar         = 0xc0000081
	MSRLStar        = 0xc0000082
	MSRCStar        = 0xc0000083
	MSRSyscallMask  = 0xc0000084
	MSRKernelGSBase = 0xc0000102
	MSRTSCAux       = 0xc0000103
)

// exitName names an exit reason for error messages.
func exitName(reason uint32) string {
	names := map[uint32]string{
		ExitUnknown: "unknown", ExitException: "exception", ExitIO: "io", ExitHypercall: "hypercall",
		ExitDebug: "debug", ExitHLT: "hlt", ExitMMIO: "mmio", ExitShutdown: "shutdown (triple fault)",
		ExitFailEntry: "fail entry", ExitIntr: "intr", ExitInternalError: "internal error",
		ExitSystemEvent: "system event",
	}
	if n, ok := names[reason]; ok {
		return n
	}
	return "reason " + strconv.FormatUint(uint64(reason), 10)
}

// dirtyGFN mirrors struct kvm_dirty_gfn, one entry of a vCPU's dirty ring.
type dirtyGFN struct {
	Flags  uint32 // dirtyGFNDirty when KVM filled it, dirtyGFNReset once harvested
	Slot   uint32 // address space << 16 | slot
	Offset uint64 // page within the slot
}

const (
	dirtyGFNDirty = 1 << 0 // KVM_DIRTY_GFN_F_DIRTY
	dirtyGFNReset = 1 << 1 // KVM_DIRTY_GFN_F_RESET
	// dirtyLogPageOffset is KVM_DIRTY_LOG_PAGE_OFFSET on x86: the ring's page offset in the
	// vCPU's mmap.
	dirtyLogPageOffset = 64
	dirtyGFNSize       = 16
)
