package vmm

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/guestmem"
	"github.com/godwit-vm/godwit/internal/kvm"
	"github.com/godwit-vm/godwit/migration"
)

// The machine's side of the migration engine: MigrationSource and MigrationDestination
// implement the engine's interfaces over a Machine. The engine knows nothing of KVM; this is
// the only place where the two meet.

const ramSlot = 0

func (m *Machine) layout() migration.Layout {
	return migration.Layout{PageSize: guest.PageSize, Regions: []migration.Region{{Name: "ram", GPA: 0, Size: m.cfg.MemBytes}}}
}

// deviceIDs lists the state sections SaveState writes, in order.
func (m *Machine) deviceIDs() []string {
	ids := []string{sectionMachine}
	for i := range m.vcpus {
		ids = append(ids, sectionVCPUPrefix+strconv.Itoa(i))
	}
	if m.caps.adjustClock {
		ids = append(ids, sectionClock)
	}
	return append(ids, sectionPV)
}

// MigrationSource lets the engine migrate m away. Flatten migrates a clone as a VM of its own,
// template pages included, to a host that does not hold its template.
type MigrationSource struct {
	M       *Machine
	Flatten bool
}

var (
	_ migration.Source           = MigrationSource{}
	_ migration.Throttler        = MigrationSource{}
	_ migration.ProgressClock    = MigrationSource{}
	_ migration.PageViewer       = MigrationSource{}
	_ migration.StopWindowScaler = MigrationSource{}

	_ migration.FreePageReporter = MigrationSource{}
	_ migration.PageReader       = (*MigrationDestination)(nil)
)

func (s MigrationSource) Describe() migration.Description {
	d := migration.Description{Layout: s.M.layout(), VCPUs: len(s.M.vcpus), Devices: s.M.deviceIDs()}
	if c := s.M.cfg.Clone; c != nil && !s.Flatten {
		d.Base = c.ID
	}
	return d
}

// SharedMemoryID is the id of the memory file guest RAM is in (Config.MemoryFile), for a
// migration on shared memory.
func (s MigrationSource) SharedMemoryID() ([16]byte, bool) {
	s.M.mu.Lock()
	defer s.M.mu.Unlock()
	return s.M.memoryID, s.M.cfg.MemoryFile != ""
}

// MemoryFDs returns the memfd of guest RAM, for a handover; it stays the machine's.
func (s MigrationSource) MemoryFDs() ([]int, error) {
	if s.M.mem.IsClone() {
		return nil, fmt.Errorf("vmm: %s is a clone of a template: its memory is no file to hand over", s.M.cfg.Name)
	}
	return []int{s.M.mem.Fd()}, nil
}

func (s MigrationSource) Populated() ([]migration.Bitmap, error) {
	populated := s.M.mem.Populated
	if s.Flatten {
		populated = s.M.mem.PopulatedFlat
	}
	b, err := populated()
	if err != nil {
		return nil, err
	}
	return []migration.Bitmap{migration.BitmapOf(b)}, nil
}

// StartDirtyLog turns on KVM's dirty log for guest RAM (see dirty.go). Pages are
// write-protected again only when FetchDirty takes them, right before they are read.
func (s MigrationSource) StartDirtyLog() error {
	m := s.M
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.logDirty {
		// One user at a time: the log's rounds are its own (a second migration, or
		// Localize, would take pages the first never sees).
		if m.localizing {
			return errors.New("vmm: the VM is moving its memory out of its memory file (localize); try again when it is done")
		}
		return errors.New("vmm: the dirty log is on already: another migration uses it")
	}
	if m.ring != nil {
		if err := m.startRing(); err != nil {
			return err
		}
	}
	if err := m.vm.SetMemorySlot(kvm.MemorySlot{Slot: ramSlot, Mem: m.mem.Mem, LogDirty: true}); err != nil {
		return err
	}
	m.mem.TakeVMMDirty(nil) // writes before now are in Populated
	m.logDirty = true
	return nil
}

// FetchDirty returns the pages the guest or the VMM wrote since the last call and re-arms
// tracking for them (KVM_CLEAR_DIRTY_LOG, or KVM_RESET_DIRTY_RINGS) before the caller reads
// them, so a write that races with the read is caught in the next round.
func (s MigrationSource) FetchDirty() ([]migration.Bitmap, error) {
	m := s.M
	// A free page report is taken before or after a fetch, never during one (freepages.go).
	m.free.mu.Lock()
	defer m.free.mu.Unlock()
	if m.ring != nil {
		b, err := m.fetchRing()
		if err != nil {
			return nil, err
		}
		m.mem.TakeVMMDirty(b.SetRange)
		return []migration.Bitmap{b}, nil
	}
	pages := m.mem.Pages()
	b := guestmem.NewBitmap(pages)
	if err := m.vm.GetDirtyLog(ramSlot, b); err != nil {
		return nil, err
	}
	if err := m.vm.ClearDirtyLog(ramSlot, 0, uint32(pages), b); err != nil {
		return nil, err
	}
	m.mem.TakeVMMDirty(b.SetRange)
	return []migration.Bitmap{migration.BitmapOf(b)}, nil
}

func (s MigrationSource) StopDirtyLog() error {
	m := s.M
	m.mu.Lock()
	defer m.mu.Unlock()
	m.stopFreePages()
	if !m.logDirty {
		return nil
	}
	if err := m.vm.SetMemorySlot(kvm.MemorySlot{Slot: ramSlot, Mem: m.mem.Mem}); err != nil {
		return err
	}
	m.logDirty = false
	if m.ring != nil {
		return m.stopRing()
	}
	return nil
}

// DirtyTracking says how the source tracks dirty pages (migration.DirtyTracker).
func (s MigrationSource) DirtyTracking() string { return s.M.DirtyTracking() }

func (s MigrationSource) StopWindowScaling() []string { return s.M.StopWindowScaling() }

// ReadPages reads through the memfd (pread): it never faults pages in through the mapping, so
// reading a page that was punched meanwhile costs no memory.
//
// On a machine that is itself still receiving by post-copy, missing pages are fetched first.
func (s MigrationSource) ReadPages(r int, first uint64, dst []byte) error {
	if r != 0 {
		return fmt.Errorf("vmm: read pages: no region %d", r)
	}
	if err := s.M.ensurePresent(context.Background(), first*guest.PageSize, uint64(len(dst))); err != nil {
		return err
	}
	n, err := s.M.mem.ReadAt(dst, int64(first*guest.PageSize))
	if err != nil {
		return err
	}
	if n != len(dst) {
		return fmt.Errorf("vmm: read pages %d+%d: short read of %d bytes", first, len(dst)/guest.PageSize, n)
	}
	return nil
}

// ViewPages gives the engine guest memory itself while the VM is paused
// (migration.PageViewer): its pages are checksummed and written to the socket straight from
// the mapping, with no copy. Not on a machine that is still receiving by post-copy: a page
// that has not arrived would block whoever touched it, and Go code must never (ReadPages
// fetches it first).
func (s MigrationSource) ViewPages(r int, first, n uint64) []byte {
	mem := s.M.mem
	if r != 0 || s.M.pc.Load() != nil || first+n > mem.Pages() || first+n < first {
		return nil
	}
	return mem.Mem[first*guest.PageSize : (first+n)*guest.PageSize : (first+n)*guest.PageSize]
}

func (s MigrationSource) Pause() error  { return s.M.Pause() }
func (s MigrationSource) Resume() error { return s.M.Resume() }

func (s MigrationSource) SaveState() ([]migration.Section, error) {
	secs, err := s.M.SaveState()
	if err != nil {
		return nil, err
	}
	out := make([]migration.Section, len(secs))
	for i, x := range secs {
		out[i] = migration.Section{ID: x.ID, Version: x.Version, Data: x.Data}
	}
	return out, nil
}

func (s MigrationSource) SetThrottle(percent int) error { return s.M.SetThrottle(percent) }
func (s MigrationSource) LastProgress() time.Time       { return s.M.LastHeartbeat() }

// MigrationDestination builds a machine from an incoming migration. Template holds the
// settings the stream does not carry (name, KVM device, console); memory size and vCPU count
// come from the source's description.
type MigrationDestination struct {
	Template Config
	// Bases finds the memory file of a template this host holds, for a VM cloned from it
	// (migration.BaseHolder); nil: this destination takes no clones.
	Bases func(id [32]byte) (memoryPath string, err error)
	// M is the machine once Prepare has built it.
	M *Machine

	fmu          sync.Mutex
	faults       chan migration.Fault // Faults, made on first use
	faultsGiven  bool                 // handed to the machine's post-copy, which closes it
	faultsClosed bool

	writing atomic.Int32 // WritePages calls in progress (several with extra streams)
}

var (
	_ migration.Destination   = (*MigrationDestination)(nil)
	_ migration.FirstProgress = (*MigrationDestination)(nil)
	_ migration.MemoryAdopter = (*MigrationDestination)(nil)
	_ migration.MemoryFiles   = MigrationSource{}

	_ migration.SharedMemory        = MigrationSource{}
	_ migration.SharedMemoryAdopter = (*MigrationDestination)(nil)
	_ migration.BaseHolder          = (*MigrationDestination)(nil)
)

// HasBase reports whether this host holds the template a clone was cloned from.
func (d *MigrationDestination) HasBase(id [32]byte) error {
	_, err := d.baseMemory(id)
	return err
}

func (d *MigrationDestination) baseMemory(id [32]byte) (string, error) {
	if d.Bases == nil {
		return "", fmt.Errorf("vmm: this destination was started without a template store")
	}
	return d.Bases(id)
}

func (d *MigrationDestination) Prepare(desc migration.Description) error {
	return d.build(desc, nil)
}

// AdoptMemory builds the machine on the memory another VMM on this host handed over (a
// handover): nothing is written to it here.
func (d *MigrationDestination) AdoptMemory(desc migration.Description, fds []int) error {
	if len(fds) != 1 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return fmt.Errorf("vmm: %d memory files handed over, this VMM has one region", len(fds))
	}
	return d.build(desc, &fds[0])
}

// AdoptSharedMemory builds the machine on this host's mapping of the memory file the source's
// memory is in (Template.MemoryFile, which must carry the label id): nothing is written to it.
func (d *MigrationDestination) AdoptSharedMemory(desc migration.Description, id [16]byte) error {
	if d.Template.MemoryFile == "" {
		return fmt.Errorf("vmm: the VM's memory is on shared memory, and this destination maps no memory file (godwit run --incoming ... --memory-file PATH)")
	}
	mid := guestmem.MemoryID(id)
	d.Template.memoryID = &mid
	defer func() { d.Template.memoryID = nil }()
	return d.build(desc, nil)
}

// build makes the machine of an incoming migration, on memory handed over when memoryFD is
// set (which it then owns).
func (d *MigrationDestination) build(desc migration.Description, memoryFD *int) error {
	l := desc.Layout
	if l.PageSize != guest.PageSize || len(l.Regions) != 1 || l.Regions[0].GPA != 0 {
		if memoryFD != nil {
			unix.Close(*memoryFD)
		}
		return fmt.Errorf("vmm: incoming VM has a memory layout this VMM cannot build (page size %d, %d regions)", l.PageSize, len(l.Regions))
	}
	cfg := d.Template
	cfg.MemBytes, cfg.VCPUs = l.Regions[0].Size, desc.VCPUs
	cfg.Image, cfg.Params = nil, nil
	cfg.memoryFD = memoryFD
	if desc.Base != ([32]byte{}) {
		path, err := d.baseMemory(desc.Base)
		if err != nil {
			return err
		}
		cfg.Clone = &CloneSource{ID: desc.Base, MemoryPath: path}
	}
	m, err := New(cfg)
	if err != nil {
		return err
	}
	known := map[string]bool{}
	for _, id := range m.deviceIDs() {
		known[id] = true
	}
	for _, id := range desc.Devices {
		if !known[id] {
			m.Close()
			return fmt.Errorf("vmm: incoming VM has a component %q this VMM does not have", id)
		}
	}
	d.M = m
	return nil
}

func (d *MigrationDestination) region(r int, first, n uint64) (*guestmem.Region, error) {
	if d.M == nil {
		return nil, fmt.Errorf("vmm: pages arrived before the machine was prepared")
	}
	mem := d.M.mem
	if r != 0 || first+n > mem.Pages() || first+n < first {
		return nil, fmt.Errorf("vmm: pages %d+%d of region %d are outside guest memory (%d pages)", first, n, r, mem.Pages())
	}
	return mem, nil
}

// WritePages writes through the memfd (pwrite): the pages of fresh memory are allocated by the
// kernel in one call per batch instead of one user page fault per page, which dominates the
// receiver's cost where page faults are expensive (nested virtualization above all).
func (d *MigrationDestination) WritePages(r int, first uint64, src []byte) error {
	mem, err := d.region(r, first, uint64(len(src))/guest.PageSize)
	if err != nil {
		return err
	}
	if d.M.pc.Load() != nil { // armed: a pwrite would hide a missing page from userfaultfd
		return d.PlacePages(r, first, src)
	}
	// Alone, pwrite is the cheapest way in. While another stream's pages are being written
	// too, the mapping lets both allocate at once (pwrite serialises on the memfd).
	defer d.writing.Add(-1)
	if d.writing.Add(1) > 1 {
		return mem.FillAt(src, int64(first*guest.PageSize))
	}
	_, err = mem.WriteAt(src, int64(first*guest.PageSize))
	return err
}

// ReadPages reads back pages already written (pread), for deltas (migration.PageReader).
func (d *MigrationDestination) ReadPages(r int, first uint64, dst []byte) error {
	mem, err := d.region(r, first, uint64(len(dst))/guest.PageSize)
	if err != nil {
		return err
	}
	n, err := mem.ReadAt(dst, int64(first*guest.PageSize))
	if err == nil && n != len(dst) {
		err = fmt.Errorf("vmm: read %d of %d bytes at page %d", n, len(dst), first)
	}
	return err
}

// ZeroPages punches the pages: a hole reads as zero and holds no memory. A clone's hole would
// read as its template's page, so zeros are written there.
func (d *MigrationDestination) ZeroPages(r int, first, n uint64) error {
	mem, err := d.region(r, first, n)
	if err != nil {
		return err
	}
	if mem.IsClone() {
		zero := make([]byte, min(n, 256)*guest.PageSize)
		for done := uint64(0); done < n; {
			k := min(n-done, uint64(len(zero))/guest.PageSize)
			if _, err := mem.WriteAt(zero[:k*guest.PageSize], int64((first+done)*guest.PageSize)); err != nil {
				return err
			}
			done += k
		}
		return nil
	}
	if d.M.pc.Load() != nil { // armed: a hole would be a page that is not there
		return d.PlaceZero(r, first, n)
	}
	return mem.PunchPages(first, n)
}

func (d *MigrationDestination) RestoreState(secs []migration.Section) error {
	if d.M == nil {
		return fmt.Errorf("vmm: state arrived before the machine was prepared")
	}
	in := make([]Section, len(secs))
	for i, x := range secs {
		in[i] = Section{ID: x.ID, Version: x.Version, Data: x.Data}
	}
	return d.M.RestoreState(in)
}

func (d *MigrationDestination) Start() error { return d.M.Start() }

// Abort discards the machine; demand paging, if armed, is torn down first (Faults is closed,
// vCPUs and VMM accessors waiting for pages are released).
func (d *MigrationDestination) Abort() {
	if d.M != nil {
		d.M.Close()
		d.M = nil
	}
	d.fmu.Lock()
	if d.faults != nil && !d.faultsGiven && !d.faultsClosed {
		close(d.faults) // never armed: nobody else closes it
		d.faultsClosed = true
	}
	d.fmu.Unlock()
}

func (d *MigrationDestination) WaitFirstProgress(ctx context.Context) (time.Time, error) {
	return d.M.WaitFirstHeartbeat(ctx)
}

// VCPUsOf is the number of vCPUs of a machine whose state has the components ids (one
// section per vCPU): what a VMM that holds an incoming machine's memory and state, and not the
// source's Hello, counts them by.
func VCPUsOf(ids []string) int {
	n := 0
	for _, id := range ids {
		if strings.HasPrefix(id, sectionVCPUPrefix) {
			n++
		}
	}
	return n
}
