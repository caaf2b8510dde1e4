package guestmem

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A clone region is guest memory cloned from a template: the template's memory file mapped
// privately (MAP_PRIVATE), so that every clone reads the template's pages from the one copy in
// the page cache until it writes one, which the kernel then copies into the clone's own memory.
// The pages a clone wrote are exactly its private anonymous pages (/proc/self/pagemap tells
// them from the template's), which is what a migration of a clone sends; and they are private
// anonymous memory, which KSM can merge across clones (MADV_MERGEABLE).
//
// The price: a clone's memory is no file another process can map, so a clone cannot be handed
// over by its memory file, migrated on shared memory, or demand-paged (userfaultfd registers
// only anonymous and shmem memory for missing pages in a way godwit can place atomically).
// pread and pwrite of /proc/self/mem at the mapping's address stand in for the memfd's: they
// reach the clone's view of each page (a write copies it, as the guest's would), from a system
// call, so no Go code faults on the mapping.

// CloneRegion maps the template memory file path (exactly size bytes) privately as a region.
func CloneRegion(name string, gpa, size uint64, path string) (*Region, error) {
	if size == 0 || size%PageSize != 0 || gpa%PageSize != 0 {
		return nil, fmt.Errorf("guestmem: region %q at 0x%x size %d: not page aligned", name, gpa, size)
	}
	tfd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("guestmem: template memory %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(tfd, &st); err != nil {
		unix.Close(tfd)
		return nil, fmt.Errorf("guestmem: template memory %s: %w", path, err)
	}
	if uint64(st.Size) != size {
		unix.Close(tfd)
		return nil, fmt.Errorf("guestmem: template memory %s holds %d bytes, the VM has %d", path, st.Size, size)
	}
	// PROT_WRITE on a read-only file is allowed for a private mapping: writes go to copies.
	mem, err := unix.Mmap(tfd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_NORESERVE)
	if err != nil {
		unix.Close(tfd)
		return nil, fmt.Errorf("guestmem: mmap template memory %s (%d bytes): %w", path, size, err)
	}
	self, err := unix.Open("/proc/self/mem", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Munmap(mem)
		unix.Close(tfd)
		return nil, fmt.Errorf("guestmem: clone of %s: /proc/self/mem: %w", path, err)
	}
	// Not fatal: KSM may be built out; merging is a bonus.
	unix.Madvise(mem, unix.MADV_MERGEABLE)
	return &Region{Name: name, GPA: gpa, Size: size, Mem: mem, fd: self,
		clone: &cloneOf{template: tfd, base: int64(uintptr(unsafe.Pointer(&mem[0])))}}, nil
}

// cloneOf is what a clone region keeps beside the Region's fields.
type cloneOf struct {
	template int   // the template's memory file, open while mapped
	base     int64 // the mapping's address: the offset of guest byte 0 in /proc/self/mem
}

// IsClone reports whether the region maps a template privately (CloneRegion).
func (r *Region) IsClone() bool { return r.clone != nil }

// fileOffset is where guest byte off is in r.fd.
func (r *Region) fileOffset(off int64) int64 {
	if r.clone != nil {
		return r.clone.base + off
	}
	return off
}

// pagemap bits (Documentation/admin-guide/mm/pagemap.rst).
const (
	pmPresent = 1 << 63
	pmSwapped = 1 << 62
	pmFile    = 1 << 61 // file page or shared anonymous
)

// ownPages returns the pages of a clone that are its own (written since the clone: private
// anonymous, present or swapped), from /proc/self/pagemap. The others read as the template.
func (r *Region) ownPages() (Bitmap, error) {
	f, err := unix.Open("/proc/self/pagemap", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("guestmem: clone %q: /proc/self/pagemap: %w", r.Name, err)
	}
	defer unix.Close(f)
	b := NewBitmap(r.Pages())
	const chunk = 1 << 16 // pages per read: 512 KiB of entries
	buf := make([]byte, chunk*8)
	for first := uint64(0); first < r.Pages(); first += chunk {
		n := min(chunk, r.Pages()-first)
		off := (uint64(r.clone.base)/PageSize + first) * 8
		got, err := unix.Pread(f, buf[:n*8], int64(off))
		if err != nil || uint64(got) != n*8 {
			return nil, fmt.Errorf("guestmem: clone %q: reading pagemap at %d: %d of %d bytes: %v", r.Name, off, got, n*8, err)
		}
		for i := uint64(0); i < n; i++ {
			e := binary.LittleEndian.Uint64(buf[i*8:])
			if (e&pmPresent != 0 && e&pmFile == 0) || e&pmSwapped != 0 {
				b.Set(first + i)
			}
		}
	}
	return b, nil
}

// PopulatedFlat returns the pages that may hold data as if the region were no clone: its own
// pages and the template's that are not holes of its file. What a migration to a host without
// the template sends.
func (r *Region) PopulatedFlat() (Bitmap, error) {
	if r.clone == nil {
		return r.Populated()
	}
	b, err := r.ownPages()
	if err != nil {
		return nil, err
	}
	size := int64(r.Size)
	for off := int64(0); off < size; {
		data, err := unix.Seek(r.clone.template, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("guestmem: clone %q: SEEK_DATA in its template at %d: %w", r.Name, off, err)
		}
		hole, err := unix.Seek(r.clone.template, data, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("guestmem: clone %q: SEEK_HOLE in its template at %d: %w", r.Name, data, err)
		}
		first, last := uint64(data)/PageSize, min((uint64(hole)+PageSize-1)/PageSize, r.Pages())
		b.SetRange(first, last-first)
		off = int64(last * PageSize)
	}
	return b, nil
}

func (c *cloneOf) close() error { return unix.Close(c.template) }
