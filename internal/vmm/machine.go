// Package vmm is godwit's virtual machine: a KVM VM with guest memory in one memfd region, one
// thread per vCPU, and the paravirtual port device the built-in guests talk to (console,
// heartbeats, sleep, verification). It can save and restore its whole state as versioned
// sections, which is what migration moves.
//
// Guest memory access rule: the destination of a post-copy migration may have pages that are
// not there yet (userfaultfd). Go code that touches such a page through the mapping would block
// inside the kernel where the garbage collector cannot stop it, so everything here reaches guest
// memory with pread/pwrite on the memfd (never the mapping, except the boot set-up of a fresh
// machine), and only after ensurePresent has made sure the pages are there: pread of a missing
// page reads zeros, and pwrite into one would fill it before its real content arrives.
package vmm

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/godwit-vm/godwit/internal/demand"
	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/guestmem"
	"github.com/godwit-vm/godwit/internal/kvm"
	"github.com/godwit-vm/godwit/migration"
)

// Config describes a machine to build.
type Config struct {
	Name      string
	MemBytes  uint64
	VCPUs     int
	KVMDevice string // "" = /dev/kvm
	// Image is the flat guest binary loaded at guest.EntryGPA; Params builds the params page
	// (guest.ParamsSize bytes) once the guest's TSC frequency is known. Both are nil for an
	// incoming machine, whose memory and state arrive by migration.
	Image  []byte
	Params func(tscKHz uint32) ([]byte, error)
	// Workload is an opaque description of what the guest runs, kept with the machine's state
	// so the destination of a migration can report it.
	Workload map[string]any
	// Console receives the guest's console text, one message per call.
	Console func(vcpu int, text string)
	// DirtyTracking is how dirty logging learns of the guest's writes: DirtyRing, DirtyBitmap,
	// or "" / DirtyAuto for the ring where KVM offers it. DirtyRingBytes is each vCPU's ring
	// (0: the largest KVM offers, up to MaxDirtyRingBytes).
	DirtyTracking  string
	DirtyRingBytes int

	// MemoryFile, when set, puts guest memory in this file on shared memory (tmpfs, hugetlbfs,
	// a DAX device) instead of a memfd: New creates it (it must not exist), except on the
	// destination of a shared-memory migration, which maps the source's (memoryID).
	MemoryFile string
	// Clone, when set, clones guest memory from a template (template.go): its memory file
	// mapped copy-on-write. The machine then boots no image; its state comes from the
	// template (NewClone) or from a migration.
	Clone *CloneSource

	// memoryFD, when set, is the file of guest memory handed over by another VMM (a
	// handover): New maps it instead of creating memory, and owns it from then on.
	memoryFD *int
	// memoryID, when set, is the id of the MemoryFile a shared-memory migration brings.
	memoryID *guestmem.MemoryID
}

// State of the machine's vCPUs.
type State string

const (
	StateCreated State = "created"
	StateRunning State = "running"
	StatePaused  State = "paused"
	StateExited  State = "exited"
	StateFailed  State = "failed"
	// StateReleased: the machine was closed; after a migration its guest lives elsewhere.
	StateReleased State = "released"
)

// Machine is one VM.
type Machine struct {
	cfg     Config
	sys     *kvm.System
	vm      *kvm.VM
	mem     *guestmem.Region
	vcpus   []*vcpu
	pv      *pvDevice
	created time.Time
	caps    capabilities

	// life guards the KVM objects and memory against release while readers use them.
	life     sync.RWMutex
	released bool

	ring    *dirtyRing    // nil: dirty tracking by bitmap
	free    freeReports   // the guest's free page reports (freepages.go)
	balloon balloonCounts // self-ballooning (balloon.go)

	mu       sync.Mutex
	state    State
	failure  error
	logDirty bool
	wg       sync.WaitGroup
	done     chan struct{} // closed when every vCPU thread has ended
	throttle atomic.Int32  // percent of time the vCPUs are held back (auto-converge)

	memoryID   guestmem.MemoryID // of Config.MemoryFile; zero with a memfd
	localized  *LocalizeReport   // once Localize moved memory out of its file (under mu)
	localizing bool              // while Localize runs (under mu)

	pc atomic.Pointer[demand.Pager] // demand paging while armed (destination of a post-copy)
	// discarded is the post-copy set DiscardStale punched the stale pages of already (an
	// empty Bitmap until then), the pager's copy of it, ready for ArmPostcopy: discarding is
	// done while the state arrives instead of in the stop window.
	discarded migration.Bitmap
	lastPC    atomic.Pointer[demand.Pager] // the last one, after it ended, for its figures
}

// New builds a machine. A machine with an Image boots that image when started; one without
// waits for RestoreState.
func New(cfg Config) (*Machine, error) {
	fdOwned := cfg.memoryFD != nil // until AdoptRegion takes it
	defer func() {
		if fdOwned {
			unix.Close(*cfg.memoryFD)
		}
	}()
	if cfg.VCPUs < 1 || cfg.VCPUs > guest.MaxVCPUs {
		return nil, fmt.Errorf("vmm: %d vCPUs: want 1..%d", cfg.VCPUs, guest.MaxVCPUs)
	}
	if cfg.MemBytes < guest.MinMemory || cfg.MemBytes > guest.MaxMemory {
		return nil, fmt.Errorf("vmm: memory %d bytes: want %d MiB..%d GiB", cfg.MemBytes, guest.MinMemory>>20, guest.MaxMemory>>30)
	}
	if cfg.MemBytes%(2<<20) != 0 {
		return nil, fmt.Errorf("vmm: memory %d bytes: want a multiple of 2 MiB", cfg.MemBytes)
	}
	if len(cfg.Image) > guest.ImageMax {
		return nil, fmt.Errorf("vmm: guest image of %d bytes exceeds %d", len(cfg.Image), guest.ImageMax)
	}
	if len(cfg.Image) > 0 && cfg.Params == nil {
		return nil, errors.New("vmm: a guest image needs its params")
	}
	if cfg.Clone != nil && (len(cfg.Image) > 0 || cfg.MemoryFile != "" || cfg.memoryFD != nil) {
		return nil, errors.New("vmm: a clone's memory is its template's: no image, memory file or memory handed over")
	}
	if cfg.memoryFD != nil && len(cfg.Image) > 0 {
		return nil, errors.New("vmm: memory handed over holds a guest already: no image to boot")
	}
	m := &Machine{cfg: cfg, created: time.Now(), state: StateCreated, done: make(chan struct{})}
	ok := false
	defer func() {
		if !ok {
			m.release()
		}
	}()
	var err error
	if m.sys, err = kvm.Open(cfg.KVMDevice); err != nil {
		return nil, err
	}
	if m.vm, err = m.sys.CreateVM(); err != nil {
		return nil, err
	}
	// Intel needs these three pages and one page outside guest RAM; AMD ignores them.
	if err = m.vm.SetTSSAddr(0xfffbd000); err != nil {
		return nil, err
	}
	if err = m.vm.SetIdentityMapAddr(0xfffbc000); err != nil {
		return nil, err
	}
	m.caps = capabilities{
		xsave:       m.sys.CheckExtension(kvm.CapXSave) > 0,
		xcrs:        m.sys.CheckExtension(kvm.CapXCRs) > 0,
		vcpuEvents:  m.sys.CheckExtension(kvm.CapVCPUEvents) > 0,
		adjustClock: m.sys.CheckExtension(kvm.CapAdjustClock) > 0,
	}
	if err = m.setUpDirtyTracking(); err != nil {
		return nil, err
	}
	switch {
	case cfg.Clone != nil:
		m.mem, err = guestmem.CloneRegion("ram", 0, cfg.MemBytes, cfg.Clone.MemoryPath)
	case cfg.memoryFD != nil:
		fdOwned = false
		m.mem, err = guestmem.AdoptRegion("ram", 0, cfg.MemBytes, *cfg.memoryFD)
	case cfg.MemoryFile != "" && cfg.memoryID != nil:
		m.mem, err = guestmem.OpenFileRegion("ram", 0, cfg.MemBytes, cfg.MemoryFile, *cfg.memoryID)
		m.memoryID = *cfg.memoryID
	case cfg.MemoryFile != "":
		m.mem, m.memoryID, err = guestmem.CreateFileRegion("ram", 0, cfg.MemBytes, cfg.MemoryFile)
	default:
		m.mem, err = guestmem.NewRegion("ram", 0, cfg.MemBytes)
	}
	if err != nil {
		return nil, err
	}
	if err = m.vm.SetMemorySlot(kvm.MemorySlot{Slot: 0, GPA: 0, Mem: m.mem.Mem}); err != nil {
		return nil, err
	}
	cpuid, err := m.sys.SupportedCPUID()
	if err != nil {
		return nil, err
	}
	m.pv = newPVDevice(m, cfg.VCPUs)
	for i := 0; i < cfg.VCPUs; i++ {
		c, err := m.vm.CreateVCPU(i)
		if err != nil {
			return nil, err
		}
		v := &vcpu{m: m, id: i, kvm: c, kick: make(chan struct{}, 1)}
		v.cond = sync.NewCond(&v.mu)
		m.vcpus = append(m.vcpus, v)
		if err = c.SetCPUID(cpuid); err != nil {
			return nil, err
		}
		if len(cfg.Image) > 0 {
			s, err := c.Sregs()
			if err != nil {
				return nil, err
			}
			if err = c.SetSregs(initialSregs(s, i)); err != nil {
				return nil, err
			}
			if err = c.SetRegs(initialRegs(i)); err != nil {
				return nil, err
			}
		}
	}
	if len(cfg.Image) > 0 {
		if err := m.boot(); err != nil {
			return nil, err
		}
	}
	ok = true
	return m, nil
}

// boot writes the boot-time guest memory of a fresh machine: GDT, TSSs, IDT, page tables,
// params, image.
// The memory is brand new, so writing through the mapping is safe here.
func (m *Machine) boot() error {
	if err := buildBootPages(m.mem.Mem, m.cfg.MemBytes, m.cfg.VCPUs); err != nil {
		return err
	}
	tsc, err := m.vcpus[0].kvm.TSCKHz()
	if err != nil {
		return err
	}
	params, err := m.cfg.Params(tsc)
	if err != nil {
		return err
	}
	if len(params) != guest.ParamsSize {
		return fmt.Errorf("vmm: params page of %d bytes, want %d", len(params), guest.ParamsSize)
	}
	copy(m.mem.Mem[guest.ParamsGPA:], params)
	copy(m.mem.Mem[guest.EntryGPA:], m.cfg.Image)
	m.pv.tscKHz = tsc
	return nil
}

// capabilities are the KVM extensions state save and restore depend on, asked once at creation
// so that the paused window of a migration spends no ioctls on them.
type capabilities struct {
	xsave, xcrs, vcpuEvents, adjustClock bool
}

// Name is the machine's name.
func (m *Machine) Name() string { return m.cfg.Name }

// Memory is the machine's guest RAM.
func (m *Machine) Memory() *guestmem.Region { return m.mem }

// VCPUs is the number of vCPUs.
func (m *Machine) VCPUs() int { return m.cfg.VCPUs }

// Config returns the configuration the machine was built with.
func (m *Machine) Config() Config { return m.cfg }

// State returns the vCPUs' state and, when failed, why.
func (m *Machine) State() (State, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state, m.failure
}

// Done is closed when every vCPU thread has ended (the guest exited, failed, or was closed).
func (m *Machine) Done() <-chan struct{} { return m.done }

// Start runs the vCPUs.
func (m *Machine) Start() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.state != StateCreated {
		return fmt.Errorf("vmm: start: machine is %s", m.state)
	}
	m.state = StateRunning
	m.pv.start(time.Now())
	m.wg.Add(len(m.vcpus))
	for _, v := range m.vcpus {
		go v.loop()
	}
	go func() {
		m.wg.Wait()
		close(m.done)
	}()
	return nil
}

// Pause stops every vCPU and returns once none is inside the guest. Port I/O in flight is
// completed first, so the saved state never holds a half-done instruction.
func (m *Machine) Pause() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch m.state {
	case StatePaused:
		return nil
	case StateRunning:
	default:
		return fmt.Errorf("vmm: pause: machine is %s", m.state)
	}
	for _, v := range m.vcpus {
		v.requestPause()
	}
	for _, v := range m.vcpus {
		v.waitParked()
	}
	m.state = StatePaused
	return nil
}

// Resume lets paused vCPUs run again.
func (m *Machine) Resume() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch m.state {
	case StateRunning:
		return nil
	case StatePaused:
	default:
		return fmt.Errorf("vmm: resume: machine is %s", m.state)
	}
	for _, v := range m.vcpus {
		v.resume()
	}
	m.state = StateRunning
	return nil
}

// SetThrottle holds the vCPUs back for percent of their time (0 disables), so that a guest
// that dirties memory faster than the link can carry converges.
func (m *Machine) SetThrottle(percent int) error {
	if percent < 0 || percent > 99 {
		return fmt.Errorf("vmm: throttle %d%%: want 0..99", percent)
	}
	m.throttle.Store(int32(percent))
	return nil
}

// Throttle returns the current throttle percentage.
func (m *Machine) Throttle() int { return int(m.throttle.Load()) }

// fail records the first fatal error and stops the other vCPUs.
func (m *Machine) fail(err error) {
	m.mu.Lock()
	if m.failure == nil {
		m.failure = err
		m.state = StateFailed
	}
	m.mu.Unlock()
	for _, v := range m.vcpus {
		v.requestStop()
	}
}

// Quit asks the guest to verify its memory and exit, waits for that (or ctx), and returns the
// final verification. The machine stays usable for Close.
func (m *Machine) Quit(ctx context.Context) (VerifyReport, error) {
	st, err := m.State()
	if st == StatePaused {
		if err := m.Resume(); err != nil {
			return VerifyReport{}, err
		}
	} else if st != StateRunning {
		return VerifyReport{}, fmt.Errorf("vmm: quit: machine is %s (%v)", st, err)
	}
	rep, err := m.pv.verify(ctx, guest.CmdExit)
	if err != nil {
		return rep, err
	}
	select {
	case <-m.done:
	case <-ctx.Done():
		return rep, fmt.Errorf("vmm: quit: vCPUs did not exit: %w", ctx.Err())
	}
	m.mu.Lock()
	if m.state == StateRunning {
		m.state = StateExited
	}
	m.mu.Unlock()
	return rep, nil
}

// Verify asks the guest to re-check every page it owns and returns the combined report.
func (m *Machine) Verify(ctx context.Context) (VerifyReport, error) {
	if st, err := m.State(); st != StateRunning {
		return VerifyReport{}, fmt.Errorf("vmm: verify: machine is %s (%v); the guest verifies only while it runs", st, err)
	}
	return m.pv.verify(ctx, guest.CmdVerify)
}

// Close stops the vCPUs if they run and releases everything.
func (m *Machine) Close() error {
	m.mu.Lock()
	started := m.state != StateCreated
	m.mu.Unlock()
	if started {
		for _, v := range m.vcpus {
			v.requestStop()
		}
	}
	// A vCPU waiting for a missing page is released (the page faults in as zero) only once
	// demand paging is torn down.
	m.stopPostcopy()
	if started {
		<-m.done
	}
	m.life.Lock()
	defer m.life.Unlock()
	if !m.released {
		m.release()
		m.released = true
	}
	return nil
}

func (m *Machine) release() {
	for _, v := range m.vcpus {
		v.kvm.Close()
	}
	m.vcpus = nil
	if m.vm != nil {
		m.vm.Close()
		m.vm = nil
	}
	if m.mem != nil {
		m.mem.Close()
		m.mem = nil
	}
	if m.sys != nil {
		m.sys.Close()
		m.sys = nil
	}
}

// WriteGuest writes b into guest memory at gpa as the VMM (not the guest): the pages join the
// dirty set. Tests use it to corrupt memory behind the guest's back.
// On a post-copy destination the pages are fetched first (they are reported as faults).
func (m *Machine) WriteGuest(gpa uint64, b []byte) error {
	if !m.mem.Contains(gpa, uint64(len(b))) {
		return m.mem.WriteGPA(gpa, b) // the error
	}
	if err := m.ensurePresent(context.Background(), gpa, uint64(len(b))); err != nil {
		return err
	}
	return m.mem.WriteGPA(gpa, b)
}

// vcpu is one vCPU and the thread that runs it.
type vcpu struct {
	m   *Machine
	id  int
	kvm *kvm.VCPU
	tid atomic.Int32

	mu       sync.Mutex
	cond     *sync.Cond
	pauseReq bool
	stopReq  bool
	parked   bool
	kick     chan struct{} // wakes a vCPU sleeping on behalf of the guest
	lastRun  time.Time     // when the guest was last entered, for throttling
}

func (v *vcpu) requestPause() {
	v.mu.Lock()
	v.pauseReq = true
	// Under v.mu so that it cannot interleave with checkpoint clearing immediate_exit.
	v.interrupt()
	v.mu.Unlock()
}

func (v *vcpu) requestStop() {
	v.mu.Lock()
	v.stopReq = true
	v.cond.Broadcast()
	v.interrupt()
	v.mu.Unlock()
}

// interrupt gets the vCPU out of the guest: immediate_exit covers the window before KVM_RUN
// is entered, the signal covers a vCPU already inside it, and kick covers a guest sleep.
func (v *vcpu) interrupt() {
	v.kvm.SetImmediateExit(true)
	if tid := v.tid.Load(); tid != 0 {
		// SIGURG is the Go runtime's own preemption signal: its handler tolerates stray
		// deliveries, and a thread inside KVM_RUN returns with EINTR.
		unix.Tgkill(unix.Getpid(), int(tid), unix.SIGURG)
	}
	select {
	case v.kick <- struct{}{}:
	default:
	}
}

func (v *vcpu) waitParked() {
	v.mu.Lock()
	for !v.parked && !v.stopReq {
		v.cond.Wait()
	}
	v.mu.Unlock()
}

func (v *vcpu) resume() {
	v.mu.Lock()
	v.pauseReq = false
	v.cond.Broadcast()
	v.mu.Unlock()
}

// checkpoint parks the thread while a pause is requested and says whether to stop.
func (v *vcpu) checkpoint() (stop bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.pauseReq && !v.stopReq {
		return false
	}
	// Complete any port I/O of the last exit so that the registers are final: with
	// immediate_exit set, KVM_RUN finishes the pending instruction and returns at once.
	v.kvm.SetImmediateExit(true)
	v.kvm.Run()
	for v.pauseReq && !v.stopReq {
		v.parked = true
		v.cond.Broadcast()
		v.cond.Wait()
	}
	v.parked = false
	v.kvm.SetImmediateExit(false)
	select { // a kick meant for the pause must not cut the guest's next sleep short
	case <-v.kick:
	default:
	}
	return v.stopReq
}

func (v *vcpu) loop() {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer v.m.wg.Done()
	v.tid.Store(int32(unix.Gettid()))
	defer v.tid.Store(0)
	for {
		if v.checkpoint() {
			return
		}
		v.lastRun = time.Now()
		reason, err := v.kvm.Run()
		if errors.Is(err, kvm.ErrInterrupted) {
			continue
		}
		if err != nil {
			v.m.fail(err)
			return
		}
		switch reason {
		case kvm.ExitIO:
			done, err := v.m.pv.handle(v)
			if err != nil {
				v.m.fail(err)
				return
			}
			if done {
				return
			}
		case kvm.ExitIntr:
		case kvm.ExitDirtyRingFull:
			// KVM will not enter the guest again until the ring has room.
			if err := v.m.harvestDirtyFull(); err != nil {
				v.m.fail(err)
				return
			}
		default:
			v.m.fail(fmt.Errorf("vmm: guest crashed: %w", v.kvm.ExitError(reason)))
			return
		}
	}
}

// sleep blocks the vCPU thread for d on the guest's behalf; a pause or stop cuts it short.
func (v *vcpu) sleep(d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	select {
	case <-t.C:
	case <-v.kick:
		t.Stop()
	}
}

// throttle holds the vCPU back so it runs only (100-p)% of the time.
func (v *vcpu) throttle() {
	p := v.m.throttle.Load()
	if p <= 0 {
		return
	}
	ran := time.Since(v.lastRun)
	v.sleep(ran * time.Duration(p) / time.Duration(100-p))
}
