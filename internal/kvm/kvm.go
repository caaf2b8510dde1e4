// Package kvm is godwit's binding to the Linux KVM API: system, VM and vCPU file descriptors,
// memory slots with dirty logging, and the x86-64 register, MSR, CPUID, FPU/XSAVE, event and
// clock state a migrating VMM saves and restores. It holds mechanism only; policy (what to set
// up, when to log) lives in internal/vmm. Errors name the ioctl that failed.
package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// DevicePath is where the KVM device lives.
const DevicePath = "/dev/kvm"

// ErrNoKVM reports that /dev/kvm cannot be opened.
var ErrNoKVM = errors.New("kvm: /dev/kvm is not available")

// System is an open /dev/kvm.
type System struct {
	fd       int
	runSize  int
	msrIndex []uint32
}

// Open opens the KVM device at path (DevicePath when empty) and checks the API version.
func Open(path string) (*System, error) {
	if path == "" {
		path = DevicePath
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENXIO) {
			return nil, fmt.Errorf("%w: open %s: %v (this host offers no hardware virtualization to godwit; on a machine without KVM, run godwit inside the nested KVM host: go run ./tools/kvmhost -- godwit ...)", ErrNoKVM, path, err)
		}
		return nil, fmt.Errorf("%w: open %s: %v", ErrNoKVM, path, err)
	}
	s := &System{fd: fd}
	v, err := ioctl(fd, ioGetAPIVersion, 0)
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("kvm: KVM_GET_API_VERSION: %w", err)
	}
	if v != 12 {
		s.Close()
		return nil, fmt.Errorf("kvm: API version %d, want 12", v)
	}
	n, err := ioctl(fd, ioGetVCPUMmapSize, 0)
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("kvm: KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	s.runSize = int(n)
	return s, nil
}

// Close releases the device.
func (s *System) Close() error { return unix.Close(s.fd) }

// CheckExtension returns KVM_CHECK_EXTENSION's answer for cap (0: not supported).
func (s *System) CheckExtension(cap int) int {
	r, err := ioctl(s.fd, ioCheckExtension, uintptr(cap))
	if err != nil {
		return 0
	}
	return int(r)
}

// SupportedCPUID returns the CPUID entries KVM can offer a guest.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) {
	for n := 64; n <= 4096; n *= 2 {
		buf := make([]byte, 8+n*40)
		binary.LittleEndian.PutUint32(buf, uint32(n))
		if _, err := ioctlBytes(s.fd, ioGetSupportedCPUID, buf); err != nil {
			if errors.Is(err, unix.E2BIG) {
				continue
			}
			return nil, fmt.Errorf("kvm: KVM_GET_SUPPORTED_CPUID: %w", err)
		}
		return decodeCPUID(buf), nil
	}
	return nil, errors.New("kvm: KVM_GET_SUPPORTED_CPUID: more than 4096 entries")
}

// MSRIndexList returns the MSRs KVM saves and restores for a vCPU.
func (s *System) MSRIndexList() ([]uint32, error) {
	if s.msrIndex != nil {
		return s.msrIndex, nil
	}
	for n := 256; n <= 16384; n *= 2 {
		buf := make([]byte, 4+4*n)
		binary.LittleEndian.PutUint32(buf, uint32(n))
		if _, err := ioctlBytes(s.fd, ioGetMSRIndexList, buf); err != nil {
			if errors.Is(err, unix.E2BIG) {
				continue
			}
			return nil, fmt.Errorf("kvm: KVM_GET_MSR_INDEX_LIST: %w", err)
		}
		got := binary.LittleEndian.Uint32(buf)
		list := make([]uint32, got)
		for i := range list {
			list[i] = binary.LittleEndian.Uint32(buf[4+4*i:])
		}
		s.msrIndex = list
		return list, nil
	}
	return nil, errors.New("kvm: KVM_GET_MSR_INDEX_LIST: too many MSRs")
}

// CreateVM creates a VM.
func (s *System) CreateVM() (*VM, error) {
	fd, err := ioctl(s.fd, ioCreateVM, 0)
	if err != nil {
		return nil, fmt.Errorf("kvm: KVM_CREATE_VM: %w", err)
	}
	unix.CloseOnExec(int(fd))
	return &VM{sys: s, fd: int(fd)}, nil
}

func decodeCPUID(buf []byte) []CPUIDEntry {
	n := binary.LittleEndian.Uint32(buf)
	out := make([]CPUIDEntry, n)
	for i := range out {
		b := buf[8+40*i:]
		out[i] = CPUIDEntry{
			Function: binary.LittleEndian.Uint32(b[0:]),
			Index:    binary.LittleEndian.Uint32(b[4:]),
			Flags:    binary.LittleEndian.Uint32(b[8:]),
			EAX:      binary.LittleEndian.Uint32(b[12:]),
			EBX:      binary.LittleEndian.Uint32(b[16:]),
			ECX:      binary.LittleEndian.Uint32(b[20:]),
			EDX:      binary.LittleEndian.Uint32(b[24:]),
		}
	}
	return out
}

func encodeCPUID(entries []CPUIDEntry) []byte {
	buf := make([]byte, 8+40*len(entries))
	binary.LittleEndian.PutUint32(buf, uint32(len(entries)))
	for i, e := range entries {
		b := buf[8+40*i:]
		binary.LittleEndian.PutUint32(b[0:], e.Function)
		binary.LittleEndian.PutUint32(b[4:], e.Index)
		binary.LittleEndian.PutUint32(b[8:], e.Flags)
		binary.LittleEndian.PutUint32(b[12:], e.EAX)
		binary.LittleEndian.PutUint32(b[16:], e.EBX)
		binary.LittleEndian.PutUint32(b[20:], e.ECX)
		binary.LittleEndian.PutUint32(b[24:], e.EDX)
	}
	return buf
}

// Available reports whether the KVM device at path can be opened, with the reason if not.
func Available(path string) error {
	s, err := Open(path)
	if err != nil {
		return err
	}
	return s.Close()
}
