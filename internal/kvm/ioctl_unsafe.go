package kvm

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Every ioctl but KVM_RUN is retried on EINTR: the Go runtime interrupts threads with signals
// for preemption at any time, and those ioctls (KVM_CREATE_VM among them) can be cut short.

// ioctl issues a request whose argument is a plain integer.
func ioctl(fd int, req, arg uintptr) (uintptr, error) {
	for {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return r, errno
		}
		return r, nil
	}
}

// ioctlRun enters the guest once; EINTR is the caller's to see (a kick or a signal).
func ioctlRun(fd int) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), ioRun, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// ioctlPtr issues a request whose argument points at v. v must not contain Go pointers the
// kernel would follow (user pointers travel as uint64).
func ioctlPtr[T any](fd int, req uintptr, v *T) error {
	for {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(v)))
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return errno
		}
		return nil
	}
}

// ioctlBytes issues a request whose argument is a byte buffer (variable-length structures such
// as kvm_msrs and kvm_cpuid2 are built in one).
func ioctlBytes(fd int, req uintptr, b []byte) (uintptr, error) {
	for {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&b[0])))
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return r, errno
		}
		return r, nil
	}
}

// userPtr is the address of the first word of a bitmap, passed to KVM as a user pointer.
// The caller keeps the slice alive across the ioctl (runtime.KeepAlive).
func userPtr(words []uint64) uint64 { return uint64(uintptr(unsafe.Pointer(&words[0]))) }

// sliceAddr is the address of a mapped byte slice, for memory slots.
func sliceAddr(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }
