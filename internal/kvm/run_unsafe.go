package kvm

import "unsafe"

// runPage gives typed access to the vCPU's shared struct kvm_run mapping.
// Offsets follow <linux/kvm.h>: the header is 32 bytes, then the exit union.
type runPage []byte

const (
	runImmediateExit = 1
	runExitReason    = 8
	runUnion         = 32
)

func (r runPage) exitReason() uint32 { return *(*uint32)(unsafe.Pointer(&r[runExitReason])) }

// setImmediateExit may be called from another thread to stop the vCPU. immediate_exit is a
// single byte; an x86 byte store is atomic, and the tgkill that follows it (or the vCPU's own
// next KVM_RUN) is a full barrier before the kernel reads it.
func (r runPage) setImmediateExit(v bool) {
	var b uint8
	if v {
		b = 1
	}
	*(*uint8)(unsafe.Pointer(&r[runImmediateExit])) = b
}

// IOExit is the io member of the exit union.
type IOExit struct {
	Direction uint8
	Size      uint8
	Port      uint16
	Count     uint32
	Offset    uint64
}

func (r runPage) io() IOExit { return *(*IOExit)(unsafe.Pointer(&r[runUnion])) }

// ioData returns the bytes of the current port I/O access inside the run page.
func (r runPage) ioData() []byte {
	e := r.io()
	n := uint64(e.Size) * uint64(e.Count)
	return r[e.Offset : e.Offset+n]
}

// MMIOExit is the mmio member of the exit union.
type MMIOExit struct {
	PhysAddr uint64
	Data     [8]byte
	Len      uint32
	IsWrite  uint8
}

func (r runPage) mmio() MMIOExit { return *(*MMIOExit)(unsafe.Pointer(&r[runUnion])) }

// internalError returns the suberror and up to 16 data words of KVM_EXIT_INTERNAL_ERROR.
func (r runPage) internalError() (uint32, []uint64) {
	sub := *(*uint32)(unsafe.Pointer(&r[runUnion]))
	n := *(*uint32)(unsafe.Pointer(&r[runUnion+4]))
	if n > 16 {
		n = 16
	}
	data := make([]uint64, n)
	for i := range data {
		data[i] = *(*uint64)(unsafe.Pointer(&r[runUnion+8+8*i]))
	}
	return sub, data
}

// failEntry returns the hardware entry failure reason of KVM_EXIT_FAIL_ENTRY.
func (r runPage) failEntry() uint64 { return *(*uint64)(unsafe.Pointer(&r[runUnion])) }
