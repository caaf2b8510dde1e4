// Package guestmem holds guest memory: memfd-backed regions mapped shared (so they can be passed
// by fd, punched, and registered with userfaultfd), the pages the VMM itself wrote (OR'd with
// KVM's dirty log to form the dirty set), and the holes that cost nothing to migrate.
package guestmem

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"unsafe"

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
	// missing under userfaultfd (see the package doc of internal/demand); use ReadAt then.
	Mem []byte

	fd int
	// clone is set on a region cloned from a template (clone.go); fd is /proc/self/mem then.
	clone *cloneOf
	// label is the pages the file holds beyond guest memory (a memory file's label page).
	label uint64
	mu    sync.Mutex
	// The pages the VMM wrote since the last TakeVMMDirty: as runs while they are few, so
	// that taking them costs what was written, not the region's size; as a bitmap (and no
	// runs) once there are more than maxDirtyRuns.
	vmmRuns  []pageRun
	vmmDirty Bitmap
}

type pageRun struct{ first, n uint64 }

// maxDirtyRuns bounds the runs a Region keeps of the VMM's writes before it takes a bitmap.
const maxDirtyRuns = 4096

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

// AdoptRegion maps memory another VMM handed over, after checking that fd is a file of
// exactly size bytes that can be mapped shared (a memfd, or a file on tmpfs or hugetlbfs):
// anything else would be a different VM's memory, or one that the two processes do not share.
// The region owns fd from then on; on failure fd is closed.
func AdoptRegion(name string, gpa, size uint64, fd int) (*Region, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("guestmem: region %q handed over: fstat: %w", name, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil, fmt.Errorf("guestmem: region %q handed over is not a regular file (mode %#o)", name, st.Mode)
	}
	if uint64(st.Size) != size {
		unix.Close(fd)
		return nil, fmt.Errorf("guestmem: region %q handed over holds %d bytes, the layout says %d", name, st.Size, size)
	}
	return mapRegion(name, gpa, size, fd)
}

func mapRegion(name string, gpa, size uint64, fd int) (*Region, error) {
	mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("guestmem: mmap %q (%d bytes): %w", name, size, err)
	}
	return &Region{Name: name, GPA: gpa, Size: size, Mem: mem, fd: fd}, nil
}

// Fd returns the memfd (still owned by the region); -1 for a clone, which has none.
func (r *Region) Fd() int {
	if r.clone != nil {
		return -1
	}
	return r.fd
}

// Pages is the number of pages in the region.
func (r *Region) Pages() uint64 { return r.Size / PageSize }

// Close unmaps the region and closes its memfd.
func (r *Region) Close() error {
	err1 := unix.Munmap(r.Mem)
	err2 := unix.Close(r.fd)
	var err3 error
	if r.clone != nil {
		err3 = r.clone.close()
	}
	return errors.Join(err1, err2, err3)
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
	n, err := unix.Pread(r.fd, b, r.fileOffset(off))
	if err != nil {
		return n, fmt.Errorf("guestmem: pread %q at %d: %w", r.Name, off, err)
	}
	return n, nil
}

// WriteAt writes guest memory through the memfd with pwrite. Filling fresh memory this way
// allocates its pages in the kernel without a user page fault per page, which a copy through
// the mapping would take.
func (r *Region) WriteAt(b []byte, off int64) (int, error) {
	n, err := unix.Pwrite(r.fd, b, r.fileOffset(off))
	if err != nil {
		return n, fmt.Errorf("guestmem: pwrite %q at %d: %w", r.Name, off, err)
	}
	if n != len(b) {
		return n, fmt.Errorf("guestmem: pwrite %q at %d: wrote %d of %d bytes", r.Name, off, n, len(b))
	}
	return n, nil
}

// FillAt writes guest memory through the mapping, after allocating the pages of the range in
// one MADV_POPULATE_WRITE call (Linux 5.14; where it is refused, the copy faults them in).
// Unlike pwrite, which holds the memfd's inode lock, several goroutines filling different
// ranges allocate in parallel: where allocating fresh memory is the cost (a host that takes
// back freed memory, as one that reports free pages to its own host does), that is what lets
// several streams receive faster than one. Only for memory nobody demand-pages: a Go copy
// into a page userfaultfd still holds back would block the thread.
func (r *Region) FillAt(b []byte, off int64) error {
	if off < 0 || off+int64(len(b)) > int64(len(r.Mem)) {
		return fmt.Errorf("guestmem: fill %q at %d+%d: outside its %d bytes", r.Name, off, len(b), len(r.Mem))
	}
	dst := r.Mem[off : off+int64(len(b))]
	if len(dst) > 0 && off%PageSize == 0 && len(dst)%PageSize == 0 {
		unix.Madvise(dst, unix.MADV_POPULATE_WRITE)
	}
	copy(dst, b)
	return nil
}

func (r *Region) markDirty(off, n uint64) {
	if n == 0 {
		return
	}
	first := off / PageSize
	last := (off + n - 1) / PageSize
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case r.vmmDirty != nil:
		r.vmmDirty.SetRange(first, last-first+1)
	case len(r.vmmRuns) < maxDirtyRuns:
		r.vmmRuns = append(r.vmmRuns, pageRun{first, last - first + 1})
	default:
		r.vmmDirty = NewBitmap(r.Pages())
		for _, run := range r.vmmRuns {
			r.vmmDirty.SetRange(run.first, run.n)
		}
		r.vmmRuns = r.vmmRuns[:0]
		r.vmmDirty.SetRange(first, last-first+1)
	}
}

// TakeVMMDirty hands the pages the VMM wrote since the previous call to add, in runs, and
// forgets them (with add nil it only forgets them).
func (r *Region) TakeVMMDirty(add func(first, n uint64)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if add != nil {
		for _, run := range r.vmmRuns {
			add(run.first, run.n)
		}
		for w, word := range r.vmmDirty {
			for j := uint64(0); word != 0; j++ {
				if word&1 != 0 {
					add(uint64(w)*64+j, 1)
				}
				word >>= 1
			}
		}
	}
	r.vmmRuns = r.vmmRuns[:0]
	r.vmmDirty = nil
}

// Populated returns the pages that may hold data: everything that is not a hole of the memfd.
// Never-touched and punched pages are holes and cost nothing to migrate.
//
// Two ways to find them: walking the memfd's runs of data with SEEK_DATA and SEEK_HOLE costs
// two system calls per run (about 3.4 µs per run natively), which is tens of milliseconds for a
// guest that touched pages at random, and the post-copy switch runs this while the guest is
// paused; mincore answers for a whole range in one call at about 21 ns per page. So the walk
// goes first, and when it meets more than seekRunsFirst runs, mincore answers for the rest.
//
// A clone's populated pages are its own, those it wrote since the clone: the others are the
// template's, which a destination that clones the same template holds already.
func (r *Region) Populated() (Bitmap, error) {
	if r.clone != nil {
		return r.ownPages()
	}
	b := NewBitmap(r.Pages())
	blocks, err := r.blocks()
	if err != nil {
		return nil, err
	}
	if blocks == 0 {
		return b, nil
	}
	off, err := r.seekRuns(b, 0, seekRunsFirst)
	if err != nil || off >= int64(r.Size) {
		return b, err
	}
	if r.residentFrom(b, off, blocks) {
		return b, nil
	}
	_, err = r.seekRuns(b, off, -1)
	return b, err
}

// seekRunsFirst is how many runs of data Populated walks before it asks mincore: the walk is
// cheaper while runs are fewer than about one per 160 pages.
const seekRunsFirst = 256

// blocks is how many pages the memfd holds (swapped-out ones included).
func (r *Region) blocks() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(r.fd, &st); err != nil {
		return 0, fmt.Errorf("guestmem: fstat %q: %w", r.Name, err)
	}
	return uint64(st.Blocks)*512/PageSize - min(r.label, uint64(st.Blocks)*512/PageSize), nil
}

// seekRuns sets in b the pages of the runs of data from byte off on, at most maxRuns of them
// (no limit if negative), and returns the offset where it stopped: the region's size when it
// walked to the end.
func (r *Region) seekRuns(b Bitmap, off int64, maxRuns int) (int64, error) {
	size := int64(r.Size)
	for n := 0; off < size; n++ {
		if maxRuns >= 0 && n == maxRuns {
			return off, nil
		}
		data, err := unix.Seek(r.fd, off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) { // no data after off
				return size, nil
			}
			return off, fmt.Errorf("guestmem: SEEK_DATA %q at %d: %w", r.Name, off, err)
		}
		hole, err := unix.Seek(r.fd, data, unix.SEEK_HOLE)
		if err != nil {
			return off, fmt.Errorf("guestmem: SEEK_HOLE %q at %d: %w", r.Name, data, err)
		}
		first := uint64(data) / PageSize
		last := min((uint64(hole)+PageSize-1)/PageSize, r.Pages())
		b.SetRange(first, last-first)
		off = int64(last * PageSize)
	}
	return size, nil
}

// residentFrom sets in b the pages from byte off (page aligned) on that mincore reports
// resident: on a shared memfd mapping that is every page in the memfd's page cache, mapped by
// this process or not, which is every page with data except those swapped out. It reports
// whether the answer is complete: b then accounts for every page the memfd holds, as counted
// before (blocks) and after, so that a swapped page, or one populated or punched meanwhile,
// sends the caller back to the walk. b is left as it was when the answer is not complete.
func (r *Region) residentFrom(b Bitmap, off int64, blocks uint64) bool {
	p0, pages := uint64(off)/PageSize, r.Pages()
	vec := make([]byte, pages-p0)
	if err := mincore(r.Mem[p0*PageSize:], vec); err != nil {
		return false
	}
	res := NewBitmap(pages) // pages from p0 on; b has none there yet
	i := p0
	for ; i < pages && i%64 != 0; i++ { // up to a word boundary
		if vec[i-p0]&1 != 0 {
			res.Set(i)
		}
	}
	for ; i+64 <= pages; i += 64 {
		// Eight pages at a time: bit 0 of each byte, gathered into the top byte of the
		// product (each byte's bit lands at its own position, no carries overlap).
		chunk := vec[i-p0 : i-p0+64]
		var word uint64
		for k := 0; k < 8; k++ {
			x := binary.LittleEndian.Uint64(chunk[8*k:]) & 0x0101010101010101
			word |= (x * 0x0102040810204080 >> 56) << (8 * k)
		}
		res[i/64] = word
	}
	for ; i < pages; i++ {
		if vec[i-p0]&1 != 0 {
			res.Set(i)
		}
	}
	after, err := r.blocks()
	if err != nil || after != blocks || b.Count()+res.Count() != blocks {
		return false
	}
	b.Or(res)
	return true
}

// PunchPages turns pages [first, first+n) into holes: they read as zero and free their memory.
// A clone's pages read as the template's again instead (MADV_DONTNEED drops its copies): what
// the guest gives back has no content it relies on, and the template holds no extra memory.
func (r *Region) PunchPages(first, n uint64) error {
	if r.clone != nil {
		if err := unix.Madvise(r.Mem[first*PageSize:(first+n)*PageSize], unix.MADV_DONTNEED); err != nil {
			return fmt.Errorf("guestmem: clone %q: dropping pages %d+%d: %w", r.Name, first, n, err)
		}
		return nil
	}
	if err := unix.Fallocate(r.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(first*PageSize), int64(n*PageSize)); err != nil {
		return fmt.Errorf("guestmem: punch %q pages %d+%d: %w", r.Name, first, n, err)
	}
	return nil
}

// ResidentBytes is how much of the region the host really holds (pages that are not holes).
// A clone counts its own pages only: the template's are shared by every clone of it.
func (r *Region) ResidentBytes() (uint64, error) {
	if r.clone != nil {
		own, err := r.ownPages()
		if err != nil {
			return 0, err
		}
		return own.Count() * PageSize, nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(r.fd, &st); err != nil {
		return 0, fmt.Errorf("guestmem: fstat %q: %w", r.Name, err)
	}
	return uint64(st.Blocks) * 512, nil
}

// mincore fills vec with one byte per page of mem, bit 0 set when the page is resident.
// golang.org/x/sys/unix has no wrapper for it.
func mincore(mem, vec []byte) error {
	if len(mem) == 0 {
		return nil
	}
	_, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&mem[0])), uintptr(len(mem)), uintptr(unsafe.Pointer(&vec[0])))
	if e != 0 {
		return fmt.Errorf("mincore: %w", e)
	}
	return nil
}
