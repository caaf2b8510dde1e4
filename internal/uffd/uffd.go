// Package uffd is godwit's userfaultfd binding: demand paging of a memory range by this
// process. A range registered in MISSING mode raises a fault event for every first access to a
// page that is not there (no page in the page cache, for shared memory); the accessing thread
// sleeps in the kernel until the page is installed with Copy or ZeroPage and woken.
//
// Only what godwit's post-copy destination needs is here: open (USERFAULTFD_IOC_NEW on
// /dev/userfaultfd, else the userfaultfd(2) system call), the API handshake, Register and
// Unregister in MISSING mode, Copy, ZeroPage and Wake, and reading fault events. The file
// descriptor is non-blocking; Read waits in poll(2) on it and on an eventfd, so Close stops a
// blocked reader at once.
//
// Go hazard: a goroutine that touches a missing page of a registered range through the mapping
// blocks inside the kernel where the Go runtime cannot preempt it, and the next stop-the-world
// garbage collection waits for it forever. Touch such memory only from inside a system call
// (pread/pwrite/write that name the mapping as a buffer, KVM_RUN), where the thread counts as
// being in a syscall, or only after the page is known present.
package uffd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl request numbers and flags (include/uapi/linux/userfaultfd.h).
const (
	iocNew       = 0xaa00     // USERFAULTFD_IOC_NEW: _IO(0xAA, 0)
	iocAPI       = 0xc018aa3f // UFFDIO_API: _IOWR(0xAA, 0x3F, struct uffdio_api)
	iocRegister  = 0xc020aa00 // UFFDIO_REGISTER: _IOWR(0xAA, 0x00, struct uffdio_register)
	iocUnregiter = 0x8010aa01 // UFFDIO_UNREGISTER: _IOR(0xAA, 0x01, struct uffdio_range)
	iocWake      = 0x8010aa02 // UFFDIO_WAKE: _IOR(0xAA, 0x02, struct uffdio_range)
	iocCopy      = 0xc028aa03 // UFFDIO_COPY: _IOWR(0xAA, 0x03, struct uffdio_copy)
	iocZeroPage  = 0xc020aa04 // UFFDIO_ZEROPAGE: _IOWR(0xAA, 0x04, struct uffdio_zeropage)

	apiVersion = 0xaa // UFFD_API

	modeMissing  = 1 << 0 // UFFDIO_REGISTER_MODE_MISSING
	modeDontWake = 1 << 0 // UFFDIO_COPY_MODE_DONTWAKE, UFFDIO_ZEROPAGE_MODE_DONTWAKE

	msgSize = 32 // sizeof(struct uffd_msg)
)

// Bits of the ioctls masks UFFDIO_API and UFFDIO_REGISTER report (1 << _UFFDIO_*).
const (
	IoctlRegister   = 1 << 0x00
	IoctlUnregister = 1 << 0x01
	IoctlWake       = 1 << 0x02
	IoctlCopy       = 1 << 0x03
	IoctlZeroPage   = 1 << 0x04
	IoctlAPI        = 1 << 0x3f
)

// Features UFFDIO_API reports (UFFD_FEATURE_*), the ones godwit cares about.
const (
	FeatureMissingShmem = 1 << 5
	FeatureThreadID     = 1 << 8
)

// Events of a Msg (UFFD_EVENT_*).
const (
	EventPagefault = 0x12
	EventFork      = 0x13
	EventRemap     = 0x14
	EventRemove    = 0x15
	EventUnmap     = 0x16
)

// Page fault flags of a Msg (UFFD_PAGEFAULT_FLAG_*).
const (
	FlagWrite = 1 << 0
	FlagWP    = 1 << 1
	FlagMinor = 1 << 2
)

// ErrClosed is returned by every operation on a closed UFFD, and by a Read that Close ended.
var ErrClosed = errors.New("uffd: closed")

// Msg is one event read from the userfaultfd (struct uffd_msg). For EventPagefault, Address is
// the faulting address (rounded down to the page unless the exact-address feature was asked
// for) and Flags says what kind of access it was; Args holds the raw event arguments of the
// other events.
type Msg struct {
	Event   uint8
	Flags   uint64
	Address uint64
	Args    [3]uint64 // the union as three words: flags/address/ptid for a page fault
}

// UFFD is one userfaultfd. Its methods may be called from several goroutines at once.
type UFFD struct {
	// mu is held shared by every operation and exclusively by Close, so that the descriptors
	// are never closed (and their numbers reused) under a system call still using them.
	mu       sync.RWMutex
	fd       int
	stop     int // eventfd: readable once Close has begun
	closed   bool
	closing  chan struct{}
	once     sync.Once
	features uint64
	ioctls   uint64
	pageSize uint64
}

// Open creates a userfaultfd that handles faults from kernel code as well as user code (so
// KVM's and system calls' accesses to registered memory fault too; that needs privilege:
// access to /dev/userfaultfd, or CAP_SYS_PTRACE for the system call), and does the API
// handshake asking for no optional features.
func Open() (*UFFD, error) {
	fd, err := openFd()
	if err != nil {
		return nil, err
	}
	u := &UFFD{fd: fd, stop: -1, closing: make(chan struct{}), pageSize: uint64(os.Getpagesize())}
	api := struct{ API, Features, Ioctls uint64 }{API: apiVersion}
	if err := ioctlPtr(fd, iocAPI, unsafe.Pointer(&api)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("uffd: UFFDIO_API handshake: %w", err)
	}
	u.features, u.ioctls = api.Features, api.Ioctls
	u.stop, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("uffd: eventfd: %w", err)
	}
	return u, nil
}

// devicePath is the userfaultfd device (a variable so that tests can take the fallback).
var devicePath = "/dev/userfaultfd"

func openFd() (int, error) {
	const flags = unix.O_CLOEXEC | unix.O_NONBLOCK
	dev, errDev := unix.Open(devicePath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if errDev == nil {
		fd, err := ioctl(dev, iocNew, flags)
		unix.Close(dev)
		if err == nil {
			return int(fd), nil
		}
		errDev = fmt.Errorf("USERFAULTFD_IOC_NEW: %w", err)
	}
	for {
		fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, flags, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return -1, fmt.Errorf("uffd: open: %s: %v; userfaultfd(2): %w", devicePath, errDev, errno)
		}
		return int(fd), nil
	}
}

// Features is the feature mask the kernel offered in the API handshake.
func (u *UFFD) Features() uint64 { return u.features }

// Ioctls is the mask of ioctls (Ioctl*) the kernel reported for the descriptor itself.
func (u *UFFD) Ioctls() uint64 { return u.ioctls }

// Fd is the userfaultfd descriptor, still owned by u.
func (u *UFFD) Fd() int { return u.fd }

// PageSize is the granularity of every range argument.
func (u *UFFD) PageSize() uint64 { return u.pageSize }

// Addr is the address of the first byte of b, for the range arguments. It does not touch b.
func Addr(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

// acquire takes the shared lock for one operation, failing once Close has begun.
func (u *UFFD) acquire() error {
	u.mu.RLock()
	if u.closed {
		u.mu.RUnlock()
		return ErrClosed
	}
	return nil
}

func (u *UFFD) checkRange(op string, start uintptr, n uint64) error {
	if n == 0 || uint64(start)%u.pageSize != 0 || n%u.pageSize != 0 || uint64(start)+n < uint64(start) {
		return fmt.Errorf("uffd: %s [0x%x, +0x%x): range not page aligned or empty", op, start, n)
	}
	return nil
}

type uffdRange struct{ Start, Len uint64 }

// Register registers [start, start+n) in MISSING mode and returns the mask of range ioctls
// (Ioctl*) the kernel allows on it: shared memory gets Copy, ZeroPage and Wake.
func (u *UFFD) Register(start uintptr, n uint64) (ioctls uint64, err error) {
	if err := u.checkRange("register", start, n); err != nil {
		return 0, err
	}
	if err := u.acquire(); err != nil {
		return 0, err
	}
	defer u.mu.RUnlock()
	reg := struct {
		Range  uffdRange
		Mode   uint64
		Ioctls uint64
	}{Range: uffdRange{uint64(start), n}, Mode: modeMissing}
	if err := ioctlPtr(u.fd, iocRegister, unsafe.Pointer(&reg)); err != nil {
		return 0, fmt.Errorf("uffd: UFFDIO_REGISTER missing [0x%x, +0x%x): %w", start, n, err)
	}
	return reg.Ioctls, nil
}

// Unregister ends demand paging of [start, start+n). Threads waiting on pages of the range
// are woken; a page still missing then faults in the ordinary way (zero for shared memory).
func (u *UFFD) Unregister(start uintptr, n uint64) error {
	if err := u.checkRange("unregister", start, n); err != nil {
		return err
	}
	if err := u.acquire(); err != nil {
		return err
	}
	defer u.mu.RUnlock()
	r := uffdRange{uint64(start), n}
	if err := ioctlPtr(u.fd, iocUnregiter, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("uffd: UFFDIO_UNREGISTER [0x%x, +0x%x): %w", start, n, err)
	}
	return nil
}

// Wake wakes the threads waiting on pages of [start, start+n).
func (u *UFFD) Wake(start uintptr, n uint64) error {
	if err := u.checkRange("wake", start, n); err != nil {
		return err
	}
	if err := u.acquire(); err != nil {
		return err
	}
	defer u.mu.RUnlock()
	return u.wake(start, n)
}

func (u *UFFD) wake(start uintptr, n uint64) error {
	r := uffdRange{uint64(start), n}
	if err := ioctlPtr(u.fd, iocWake, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("uffd: UFFDIO_WAKE [0x%x, +0x%x): %w", start, n, err)
	}
	return nil
}

// Result says what a Copy or ZeroPage did, in bytes.
type Result struct {
	Installed uint64 // pages installed by this call
	Existing  uint64 // pages that were present already (EEXIST) and were left as they are
}

// Options of Copy and ZeroPage.
type Options struct {
	// DontWake installs the pages without waking their waiters; one Wake over the whole
	// range afterwards wakes them (cheaper for many small installs).
	DontWake bool
}

// Copy atomically installs len(src) bytes from src at dst (both page multiples; dst inside a
// registered range) and, unless opts.DontWake, wakes the threads waiting on them. Pages that
// are present already are skipped (and woken, as something else installed them); the copy
// goes on with the next page. A partial copy by the kernel is continued.
func (u *UFFD) Copy(dst uintptr, src []byte, opts Options) (Result, error) {
	n := uint64(len(src))
	if err := u.checkRange("copy", dst, n); err != nil {
		return Result{}, err
	}
	return u.fill("UFFDIO_COPY", dst, n, opts, func(off uint64, mode uint64) (int64, error) {
		c := struct {
			Dst, Src, Len, Mode uint64
			Copy                int64
		}{Dst: uint64(dst) + off, Src: uint64(Addr(src[off:])), Len: n - off, Mode: mode}
		err := ioctlOnce(u.fd, iocCopy, unsafe.Pointer(&c))
		runtime.KeepAlive(src)
		return c.Copy, err
	})
}

// ZeroPage atomically installs n bytes of zero pages at dst, with the same rules as Copy.
func (u *UFFD) ZeroPage(dst uintptr, n uint64, opts Options) (Result, error) {
	if err := u.checkRange("zeropage", dst, n); err != nil {
		return Result{}, err
	}
	return u.fill("UFFDIO_ZEROPAGE", dst, n, opts, func(off uint64, mode uint64) (int64, error) {
		z := struct {
			Range    uffdRange
			Mode     uint64
			ZeroPage int64
		}{Range: uffdRange{uint64(dst) + off, n - off}, Mode: mode}
		err := ioctlOnce(u.fd, iocZeroPage, unsafe.Pointer(&z))
		return z.ZeroPage, err
	})
}

// fill drives one UFFDIO_COPY or UFFDIO_ZEROPAGE over [dst, dst+n) to the end. call issues the
// ioctl for the rest of the range from off and returns the kernel's progress field (bytes done,
// or -errno when nothing was done) and the ioctl's error.
func (u *UFFD) fill(op string, dst uintptr, n uint64, opts Options, call func(off, mode uint64) (int64, error)) (Result, error) {
	if err := u.acquire(); err != nil {
		return Result{}, err
	}
	defer u.mu.RUnlock()
	var mode uint64
	if opts.DontWake {
		mode = modeDontWake
	}
	var res Result
	for off := uint64(0); off < n; {
		done, err := call(off, mode)
		switch {
		case err == nil:
			res.Installed += n - off
			off = n
		case done > 0:
			// Partial: the kernel did done bytes (and woke them) and says EAGAIN; go on.
			res.Installed += uint64(done)
			off += uint64(done)
		case errors.Is(err, unix.EEXIST):
			// The page at off is present already: leave it, wake whoever may wait on it
			// (whatever installed it may not have), and continue with the next one.
			res.Existing += u.pageSize
			if !opts.DontWake {
				if err := u.wake(dst+uintptr(off), u.pageSize); err != nil {
					return res, err
				}
			}
			off += u.pageSize
		case errors.Is(err, unix.EINTR), errors.Is(err, unix.EAGAIN):
			// Interrupted, or the mappings changed under the kernel before any progress.
		default:
			return res, fmt.Errorf("uffd: %s [0x%x, +0x%x) at +0x%x: %w", op, dst, n, off, err)
		}
	}
	return res, nil
}

// Read waits for fault events and stores up to len(msgs) of them in msgs (at most 64 per call).
// It returns ErrClosed once Close has been called, also when it was waiting then.
func (u *UFFD) Read(msgs []Msg) (int, error) {
	if len(msgs) == 0 {
		return 0, nil
	}
	if err := u.acquire(); err != nil {
		return 0, err
	}
	defer u.mu.RUnlock()
	var buf [64 * msgSize]byte
	want := min(len(msgs), 64) * msgSize
	for {
		select {
		case <-u.closing:
			return 0, ErrClosed
		default:
		}
		k, err := unix.Read(u.fd, buf[:want])
		if err == nil {
			if k%msgSize != 0 {
				return 0, fmt.Errorf("uffd: read: %d bytes, not a whole number of %d-byte messages", k, msgSize)
			}
			for i := 0; i < k/msgSize; i++ {
				msgs[i] = decodeMsg(buf[i*msgSize : (i+1)*msgSize])
			}
			return k / msgSize, nil
		}
		if err != unix.EAGAIN && err != unix.EINTR {
			return 0, fmt.Errorf("uffd: read: %w", err)
		}
		if err == unix.EINTR {
			continue
		}
		fds := []unix.PollFd{{Fd: int32(u.fd), Events: unix.POLLIN}, {Fd: int32(u.stop), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, -1); err != nil && err != unix.EINTR {
			return 0, fmt.Errorf("uffd: poll: %w", err)
		}
		if fds[1].Revents != 0 {
			return 0, ErrClosed
		}
		if fds[0].Revents&(unix.POLLERR|unix.POLLNVAL) != 0 {
			return 0, fmt.Errorf("uffd: poll: revents 0x%x", fds[0].Revents)
		}
	}
}

func decodeMsg(b []byte) Msg {
	le := func(off int) uint64 { return binary.LittleEndian.Uint64(b[off:]) }
	m := Msg{Event: b[0], Args: [3]uint64{le(8), le(16), le(24)}}
	if m.Event == EventPagefault {
		m.Flags, m.Address = m.Args[0], m.Args[1]
	}
	return m
}

// Close stops blocked readers (they return ErrClosed), waits for operations in flight, and
// closes the userfaultfd. Closing it unregisters every range it still had; threads waiting on
// missing pages are woken and fault those pages in the ordinary way. Safe to call twice.
func (u *UFFD) Close() error {
	u.mu.RLock()
	if u.closed {
		u.mu.RUnlock()
		return nil
	}
	u.mu.RUnlock()
	// Wake readers first: they hold the shared lock while they poll. The eventfd stays
	// readable, so a reader that polls later returns at once too.
	u.once.Do(func() {
		close(u.closing)
		one := [8]byte{1}
		unix.Write(u.stop, one[:])
	})
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return nil
	}
	u.closed = true
	err1 := unix.Close(u.fd)
	err2 := unix.Close(u.stop)
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("uffd: close: %w", err)
	}
	return nil
}

// ioctl issues a request with an integer argument, retrying on EINTR.
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

// ioctlPtr issues a request whose argument is a structure, retrying on EINTR.
func ioctlPtr(fd int, req uintptr, p unsafe.Pointer) error {
	for {
		err := ioctlOnce(fd, req, p)
		if err == unix.EINTR {
			continue
		}
		return err
	}
}

// ioctlOnce issues a request once; the caller looks at partial progress before retrying.
func ioctlOnce(fd int, req uintptr, p unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(p))
	if errno != 0 {
		return errno
	}
	return nil
}
