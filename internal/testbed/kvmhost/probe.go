package kvmhost

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"syscall"
	"time"
	"unsafe"
)

// Probe is what ProbeKVM measured.
type Probe struct {
	APIVersion int
	// ExitsPerSec is how many guest exits (an OUT instruction each, handled here and resumed)
	// one vCPU completes per second: the cost of a VM exit round trip.
	ExitsPerSec float64
	// LoopItersPerSec is the speed of a tight dec/jnz loop inside the guest, in iterations per
	// second; NativeItersPerSec is the same loop in Go outside the guest, for comparison.
	LoopItersPerSec   float64
	NativeItersPerSec float64
}

func (p Probe) String() string {
	s := fmt.Sprintf("KVM API %d: %.0f exits/s, real-mode guest loop %.3g iter/s (native %.3g iter/s, ratio %.3f)",
		p.APIVersion, p.ExitsPerSec, p.LoopItersPerSec, p.NativeItersPerSec, p.LoopItersPerSec/p.NativeItersPerSec)
	if p.LoopItersPerSec < p.NativeItersPerSec/20 {
		s += "; this loop runs at CPL0, which some hosts (PVM) emulate: godwit's guests run at CPL3"
	}
	return s
}

// KVM ioctl numbers and structure offsets (linux/kvm.h, x86-64).
const (
	kvmGetAPIVersion       = 0xAE00
	kvmCreateVM            = 0xAE01
	kvmGetVCPUMmapSize     = 0xAE04
	kvmCreateVCPU          = 0xAE41
	kvmSetUserMemoryRegion = 0x4020AE46 // _IOW(0xAE, 0x46, 32 bytes)
	kvmRun                 = 0xAE80
	kvmSetRegs             = 0x4090AE82 // _IOW(0xAE, 0x82, struct kvm_regs: 144 bytes)
	kvmGetSregs            = 0x8138AE83 // _IOR(0xAE, 0x83, struct kvm_sregs: 312 bytes)
	kvmSetSregs            = 0x4138AE84

	kvmExitIO  = 2
	kvmExitHLT = 5

	sregsSize = 312
	regsSize  = 144
)

func ioctl(fd uintptr, req uintptr, arg uintptr) (uintptr, error) {
	for {
		r, _, e := syscall.Syscall(syscall.SYS_IOCTL, fd, req, arg)
		if e == syscall.EINTR {
			continue
		}
		if e != 0 {
			return r, e
		}
		return r, nil
	}
}

// ProbeKVM checks that /dev/kvm really runs guests: it creates a VM with one vCPU in real mode
// and runs two tiny programs, one exiting to us with OUT in a loop and one spinning in a
// counted loop, each for about d. It proves KVM_CREATE_VM, memory slots, KVM_RUN and exit
// handling work (all a nested setup can get wrong) and measures how fast they are.
func ProbeKVM(d time.Duration) (Probe, error) {
	var p Probe
	// A vCPU belongs to the thread that runs it.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	kvm, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return p, err
	}
	defer kvm.Close()
	v, err := ioctl(kvm.Fd(), kvmGetAPIVersion, 0)
	if err != nil {
		return p, fmt.Errorf("KVM_GET_API_VERSION: %w", err)
	}
	p.APIVersion = int(v)
	vmfd, err := ioctl(kvm.Fd(), kvmCreateVM, 0)
	if err != nil {
		return p, fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	defer syscall.Close(int(vmfd))

	const memSize = 64 << 10
	mem, err := syscall.Mmap(-1, 0, memSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	if err != nil {
		return p, fmt.Errorf("mmap guest memory: %w", err)
	}
	defer syscall.Munmap(mem)
	// struct kvm_userspace_memory_region: slot u32, flags u32, guest_phys_addr, memory_size,
	// userspace_addr u64.
	var region [32]byte
	binary.LittleEndian.PutUint64(region[16:], memSize)
	binary.LittleEndian.PutUint64(region[24:], uint64(uintptr(unsafe.Pointer(&mem[0]))))
	if _, err := ioctl(vmfd, kvmSetUserMemoryRegion, uintptr(unsafe.Pointer(&region[0]))); err != nil {
		return p, fmt.Errorf("KVM_SET_USER_MEMORY_REGION: %w", err)
	}
	runtime.KeepAlive(region)

	// 16-bit real-mode code.
	// 0x1000: out 0x10, al; jmp 0x1000                       (exit loop)
	// 0x1100: mov ecx, N; 1: dec ecx; jnz 1b; out 0x11, al; hlt  (spin loop)
	copy(mem[0x1000:], []byte{0xE6, 0x10, 0xEB, 0xFC})
	// Few enough that a host emulating CPL0 (PVM: about 2M iterations/s) takes about a second.
	const spinIters = 2_000_000
	spin := []byte{0x66, 0xB9, 0, 0, 0, 0, 0x66, 0x49, 0x75, 0xFC, 0xE6, 0x11, 0xF4}
	binary.LittleEndian.PutUint32(spin[2:], spinIters)
	copy(mem[0x1100:], spin)

	vcpufd, err := ioctl(vmfd, kvmCreateVCPU, 0)
	if err != nil {
		return p, fmt.Errorf("KVM_CREATE_VCPU: %w", err)
	}
	defer syscall.Close(int(vcpufd))
	runSize, err := ioctl(kvm.Fd(), kvmGetVCPUMmapSize, 0)
	if err != nil {
		return p, fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	run, err := syscall.Mmap(int(vcpufd), 0, int(runSize), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		return p, fmt.Errorf("mmap kvm_run: %w", err)
	}
	defer syscall.Munmap(run)

	// Flat real mode: CS base 0 instead of the reset vector's 0xffff0000.
	var sregs [sregsSize]byte
	if _, err := ioctl(vcpufd, kvmGetSregs, uintptr(unsafe.Pointer(&sregs[0]))); err != nil {
		return p, fmt.Errorf("KVM_GET_SREGS: %w", err)
	}
	binary.LittleEndian.PutUint64(sregs[0:], 0)  // cs.base
	binary.LittleEndian.PutUint16(sregs[12:], 0) // cs.selector
	if _, err := ioctl(vcpufd, kvmSetSregs, uintptr(unsafe.Pointer(&sregs[0]))); err != nil {
		return p, fmt.Errorf("KVM_SET_SREGS: %w", err)
	}
	setRIP := func(rip uint64) error {
		var regs [regsSize]byte
		binary.LittleEndian.PutUint64(regs[16*8:], rip) // rip
		binary.LittleEndian.PutUint64(regs[17*8:], 2)   // rflags: reserved bit 1
		_, err := ioctl(vcpufd, kvmSetRegs, uintptr(unsafe.Pointer(&regs[0])))
		return err
	}
	// runOnce enters the guest and returns the exit reason and, for port I/O, the port.
	runOnce := func() (uint32, uint16, error) {
		if _, err := ioctl(vcpufd, kvmRun, 0); err != nil {
			return 0, 0, fmt.Errorf("KVM_RUN: %w", err)
		}
		reason := binary.LittleEndian.Uint32(run[8:])
		port := binary.LittleEndian.Uint16(run[32+2:]) // kvm_run.io.port
		return reason, port, nil
	}

	if err := setRIP(0x1000); err != nil {
		return p, fmt.Errorf("KVM_SET_REGS: %w", err)
	}
	start := time.Now()
	exits := 0
	for time.Since(start) < d || exits == 0 {
		reason, port, err := runOnce()
		if err != nil {
			return p, err
		}
		if reason != kvmExitIO || port != 0x10 {
			return p, fmt.Errorf("exit loop: unexpected exit reason %d (port %#x), want I/O on port 0x10", reason, port)
		}
		exits++
	}
	p.ExitsPerSec = float64(exits) / time.Since(start).Seconds()

	if err := setRIP(0x1100); err != nil {
		return p, fmt.Errorf("KVM_SET_REGS: %w", err)
	}
	start = time.Now()
	reason, port, err := runOnce()
	if err != nil {
		return p, err
	}
	if reason != kvmExitIO || port != 0x11 {
		return p, fmt.Errorf("spin loop: unexpected exit reason %d (port %#x), want I/O on port 0x11", reason, port)
	}
	p.LoopItersPerSec = spinIters / time.Since(start).Seconds()
	if reason, _, err := runOnce(); err != nil || reason != kvmExitHLT {
		return p, errors.Join(err, fmt.Errorf("spin loop: exit reason %d after the loop, want HLT (%d)", reason, kvmExitHLT))
	}

	start = time.Now()
	nativeSpin(spinIters)
	p.NativeItersPerSec = spinIters / time.Since(start).Seconds()
	return p, nil
}

//go:noinline
func nativeSpin(n uint32) {
	for n != 0 {
		n--
		spinSink = n
	}
}

var spinSink uint32
