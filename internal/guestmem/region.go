// Package guestmem holds guest memory: memfd-backed regions mapped shared (so they can be passed
// by fd, punched, and registered with userfaultfd), the pages the VMM itself wrote (OR'd with
// KVM's dirty log to form the dirty set), and the holes that cost nothing to migrate.
package guestmem

import (
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// PageSize is the guest page size godwit tracks and migrates.
const PageSize = 4096

// Region is one contiguous range of guest physical memory backed by a memfd.
type Region struct {
	Name string
	GPA  uint64
	Size uint64
	// Mem is the shared mapping of the memfd. Go code must not read pages of it that may be
	// missing under userfaultfd (see the package doc of internal/vmm); use ReadAt then.
	Mem []byte

	fd       int
	mu       sync.Mutex
	vmmDirty Bitmap // pages the VMM wrote since the last TakeVMMDirty
}

// NewRegion creates a zero-filled region of size bytes at gpa. Untouched pages stay holes in the
// memfd, so they use no host memory until written.
func NewRegion(name string, gpa, size uint64) (*Region, error) {
	if size == 0 || size%PageSize != 0 || gpa%PageSize != 0 {
		return nil, fmt.Errorf("guestmem: region %q at 0x%x size %d: not page aligned", name, gpa, size)
	}
	fd, err := unix.MemfdCreate("godwit:"+name, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("guestmem: memfd_create %q: %w", name, err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("guestmem: ftruncate %q to %d bytes: %w", name, size, err)
	}
	return mapRegion(name, gpa, size, fd)
}

// OpenRegion maps an existing memfd (handed over by another process).
func OpenRegion(name string, gpa, size uint64, fd int) (*Region, error) {
	return mapRegion(name, gpa, size, fd)
}

func mapRegion(name string, gpa, size uint64, fd int) (*Region, error) {
	mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("guestmem: mmap %q (%d bytes): %w", name, size, err)
	}
	return &Region{Name: name, GPA: gpa, Size: size, Mem: mem, fd: fd, vmmDirty: NewBitmap(size / PageSize)}, nil
}

// Fd returns the memfd (still owned by the region).
func (r *Region) Fd() int { return r.fd }

// Pages is the number of pages in the region.
func (r *Region) Pages() uint64 { return r.Size / PageSize }

// Close unmaps the region and closes its memfd.
func (r *Region) Close() error {
	err1 := unix.Munmap(r.Mem)
	err2 := unix.Close(r.fd)
	return errors.Join(err1, err2)
}

// Contains reports whether [gpa, gpa+n) lies in the region.
func (r *Region) Contains(gpa, n uint64) bool {
	return gpa >= r.GPA && gpa+n <= r.GPA+r.Size && gpa+n >= gpa
}

// WriteGPA writes b into guest memory at gpa through the memfd (pwrite, never through the
// mapping: under userfaultfd a store into a hole would fault in Go code) and records the pages
// as written by the VMM, so that they join the dirty set. On a post-copy destination the
// caller makes sure the pages are present first: a pwrite into a missing page would fill it
// and the page's real content could no longer be installed.
func (r *Region) WriteGPA(gpa uint64, b []byte) error {
	if !r.Contains(gpa, uint64(len(b))) {
		return fmt.Errorf("guestmem: write of %d bytes at 0x%x outside region %q [0x%x, 0x%x)", len(b), gpa, r.Name, r.GPA, r.GPA+r.Size)
	}
	off := gpa - r.GPA
	if len(b) > 0 {
		if _, err := r.WriteAt(b, int64(off)); err != nil {
			return err
		}
	}
	r.markDirty(off, uint64(len(b)))
	return nil
}

// ReadAt reads guest memory through the memfd with pread, never through the mapping, so it is
// safe on pages that userfaultfd has not filled yet (they read as zero).
func (r *Region) ReadAt(b []byte, off int64) (int, error) {
	n, err := unix.Pread(r.fd, b, off)
	if err != nil {
		return n, fmt.Errorf("guestmem: pread %q at %d: %w", r.Name, off, err)
	}
	return n, nil
}

// WriteAt writes guest memory through the memfd with pwrite. Filling fresh memory this way
// allocates its pages in the kernel without a user page fault per page, which a copy through
// the mapping would take.
func (r *Region) WriteAt(b []byte, off int64) (int, error) {
	n, err := unix.Pwrite(r.fd, b, off)
	if err != nil {
		return n, fmt.Errorf("guestmem: pwrite %q at %d: %w", r.Name, off, err)
	}
	if n != len(b) {
		return n, fmt.Errorf("guestmem: pwrite %q at %d: wrote %d of %d bytes", r.Name, off, n, len(b))
	}
	return n, nil
}

func (r *Region) markDirty(off, n uint64) {
	if n == 0 {
		return
	}
	first := off / PageSize
	last := (off + n - 1) / PageSize
	r.mu.Lock()
	r.vmmDirty.SetRange(first, last-first+1)
	r.mu.Unlock()
}

// TakeVMMDirty ORs the pages the VMM wrote since the previous call into dst and forgets them.
func (r *Region) TakeVMMDirty(dst Bitmap) {
	r.mu.Lock()
	dst.Or(r.vmmDirty)
	r.vmmDirty.Clear()
	r.mu.Unlock()
}

// Populated returns the pages that may hold data: everything that is not a hole of the memfd.
// Never-touched and punched pages are holes and cost nothing to migrate.
func (r *Region) Populated() (Bitmap, error) {
	b := NewBitmap(r.Pages())
	off := int64(0)
	size := int64(r.Size)
	for off < size {
		data, err := unix.Seek(r.fd, off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) { // no data after off
				break
			}
			return nil, fmt.Errorf("guestmem: SEEK_DATA %q at %d: %w", r.Name, off, err)
		}
		hole, err := unix.Seek(r.fd, data, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("guestmem: SEEK_HOLE %q at %d: %w", r.Name, data, err)
		}
		first := uint64(data) / PageSize
		last := (uint64(hole) + PageSize - 1) / PageSize
		if last > r.Pages() {
			last = r.Pages()
		}
		b.SetRange(first, last-first)
		off = hole
	}
	return b, nil
}

// PunchPages turns pages [first, first+n) into holes: they read as zero and free their memory.
func (r *Region) PunchPages(first, n uint64) error {
	if err := unix.Fallocate(r.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(first*PageSize), int64(n*PageSize)); err != nil {
		return fmt.Errorf("guestmem: punch %q pages %d+%d: %w", r.Name, first, n, err)
	}
	return nil
}

// ResidentBytes is how much of the region the host really holds (pages that are not holes).
func (r *Region) ResidentBytes() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(r.fd, &st); err != nil {
		return 0, fmt.Errorf("guestmem: fstat %q: %w", r.Name, err)
	}
	return uint64(st.Blocks) * 512, nil
}
