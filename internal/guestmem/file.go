package guestmem

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// A memory file holds a region's memory in a file on shared memory (tmpfs, hugetlbfs, a DAX
// device), so that another host that maps the same file (disaggregated memory: in the testbed,
// the namespace hosts share one kernel) sees the guest's memory without a copy. Its layout is
// the region's size bytes of guest memory, then one label page: the magic below and a random
// id, which a migration names so that the destination can tell that it maps the very memory
// the source does, and not another VM's file of the same size.

// labelMagic opens the label page.
const labelMagic = "GODWIT-MEMORY-V1"

// MemoryID names one memory file.
type MemoryID [16]byte

func (id MemoryID) String() string { return hex.EncodeToString(id[:]) }

// Filesystem magic numbers (statfs f_type) of the file systems whose files are memory.
const (
	tmpfsMagic     = 0x01021994
	hugetlbfsMagic = 0x958458f6
)

// CreateFileRegion creates the memory file path for a new region of size bytes and maps it. The
// file must not exist (it could be another VM's memory); it must be on shared memory.
func CreateFileRegion(name string, gpa, size uint64, path string) (*Region, MemoryID, error) {
	var id MemoryID
	if size == 0 || size%PageSize != 0 || gpa%PageSize != 0 {
		return nil, id, fmt.Errorf("guestmem: region %q at 0x%x size %d: not page aligned", name, gpa, size)
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o600)
	if errors.Is(err, unix.EEXIST) {
		return nil, id, fmt.Errorf("guestmem: memory file %s exists already (another VM's memory, or a stale one: remove it first)", path)
	}
	if err != nil {
		return nil, id, fmt.Errorf("guestmem: memory file %s: %w", path, err)
	}
	fail := func(err error) (*Region, MemoryID, error) {
		unix.Close(fd)
		os.Remove(path)
		return nil, id, err
	}
	if err := checkShared(fd, path); err != nil {
		return fail(err)
	}
	if err := unix.Ftruncate(fd, int64(size+PageSize)); err != nil {
		return fail(fmt.Errorf("guestmem: memory file %s: ftruncate to %d bytes: %w", path, size+PageSize, err))
	}
	rand.Read(id[:])
	label := append([]byte(labelMagic), id[:]...)
	if _, err := unix.Pwrite(fd, label, int64(size)); err != nil {
		return fail(fmt.Errorf("guestmem: memory file %s: writing its label: %w", path, err))
	}
	r, err := mapRegion(name, gpa, size, fd)
	if err != nil {
		os.Remove(path) // mapRegion closed fd
		return nil, id, err
	}
	r.label = 1
	return r, id, nil
}

// OpenFileRegion maps the memory file path, which another VMM created, as a region of size
// bytes, after checking that it is on shared memory, of that size, and labelled with id.
func OpenFileRegion(name string, gpa, size uint64, path string, id MemoryID) (*Region, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("guestmem: memory file %s: %w", path, err)
	}
	fail := func(err error) (*Region, error) {
		unix.Close(fd)
		return nil, err
	}
	if err := checkShared(fd, path); err != nil {
		return fail(err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fail(fmt.Errorf("guestmem: memory file %s: %w", path, err))
	}
	if uint64(st.Size) != size+PageSize {
		return fail(fmt.Errorf("guestmem: memory file %s holds %d bytes, not the %d of the VM's memory and its label", path, st.Size, size+PageSize))
	}
	label := make([]byte, len(labelMagic)+len(id))
	if _, err := unix.Pread(fd, label, int64(size)); err != nil {
		return fail(fmt.Errorf("guestmem: memory file %s: reading its label: %w", path, err))
	}
	if !bytes.HasPrefix(label, []byte(labelMagic)) {
		return fail(fmt.Errorf("guestmem: %s is not a godwit memory file (no label after %d bytes)", path, size))
	}
	if got := MemoryID(label[len(labelMagic):]); got != id {
		return fail(fmt.Errorf("guestmem: memory file %s is memory %s, not the migrating VM's %s", path, got, id))
	}
	r, err := mapRegion(name, gpa, size, fd)
	if err != nil {
		return nil, err
	}
	r.label = 1
	return r, nil
}

// checkShared refuses a file that is not memory: one on a disk file system would be written
// back to the disk, and no other host sees it.
func checkShared(fd int, path string) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("guestmem: memory file %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFCHR {
		return nil // a DAX device
	}
	var fs unix.Statfs_t
	if err := unix.Fstatfs(fd, &fs); err != nil {
		return fmt.Errorf("guestmem: memory file %s: %w", path, err)
	}
	switch uint32(fs.Type) {
	case tmpfsMagic, hugetlbfsMagic:
		return nil
	}
	return fmt.Errorf("guestmem: memory file %s is not on shared memory (file system type %#x): put it on tmpfs (/dev/shm), hugetlbfs or a DAX device", path, fs.Type)
}
