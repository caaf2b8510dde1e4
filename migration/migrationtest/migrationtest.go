// Package migrationtest provides an in-memory guest for testing the migration engine without
// KVM: a Source over byte slices with dirty tracking, pause, throttle and heartbeats; a
// Destination that records what it receives; a writer goroutine that dirties pages at a chosen
// rate; and Compare, the correctness oracle that every migration test ends with.
//
// It is also the reference for how a VMM should behave behind the engine's interfaces.
package migrationtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/godwit-vm/godwit/migration"
)

// Hook is called at the start of every interface method with the method's name and how many
// times it has been called (1 for the first call). A non-nil error is returned by the method
// without doing anything else. Hooks inject faults, cancel contexts at chosen points, or play
// the guest by writing pages at exact moments.
type Hook func(op string, n int) error

// ErrPaused is returned by Guest.Write while the guest is paused.
var ErrPaused = errors.New("migrationtest: guest is paused")

// Guest is a fake running VM. It implements migration.Source, migration.Throttler and
// migration.ProgressClock. All methods are safe for concurrent use.
type Guest struct {
	Hook Hook

	mu        sync.Mutex
	desc      migration.Description
	ps        int
	mem       [][]byte
	populated []migration.Bitmap
	dirty     []migration.Bitmap
	logging   bool
	paused    bool
	throttle  int
	maxThr    int
	sections  []migration.Section
	lastBeat  time.Time
	calls     map[string]int
	writes    uint64
	beats     uint64
	pool      []byte // FillPool's distinct pages, which a writer with Pool set copies
}

// NewGuest returns a guest with all-zero, never-touched memory (all holes) and, for every
// device in d.Devices, an empty state section of version 1.
func NewGuest(d migration.Description) *Guest {
	g := &Guest{desc: d, ps: int(d.Layout.PageSize), calls: map[string]int{}}
	for _, r := range d.Layout.Regions {
		n := r.Size / d.Layout.PageSize
		g.mem = append(g.mem, make([]byte, r.Size))
		g.populated = append(g.populated, migration.NewBitmap(n))
		g.dirty = append(g.dirty, migration.NewBitmap(n))
	}
	for _, id := range d.Devices {
		g.sections = append(g.sections, migration.Section{ID: id, Version: 1, Data: []byte{}})
	}
	return g
}

// SimpleDescription is a description with one region of the given size, page size 4 KiB,
// one vCPU and two devices.
func SimpleDescription(size uint64) migration.Description {
	return migration.Description{
		Layout:  migration.Layout{PageSize: 4096, Regions: []migration.Region{{Name: "ram", GPA: 0, Size: size}}},
		VCPUs:   1,
		Devices: []string{"vcpu0", "serial"},
	}
}

func (g *Guest) hook(op string) error {
	g.mu.Lock()
	g.calls[op]++
	n := g.calls[op]
	h := g.Hook
	g.mu.Unlock()
	if h != nil {
		return h(op, n)
	}
	return nil
}

// Calls is how many times op was called.
func (g *Guest) Calls(op string) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.calls[op]
}

// Fill gives the guest deterministic content: each page becomes a hole (untouched) with
// probability holes, a touched all-zero page with probability zeros, else random data.
func (g *Guest) Fill(seed uint64, holes, zeros float64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	rng := rand.New(rand.NewPCG(seed, 1))
	src := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), 7})
	for r, m := range g.mem {
		for p := 0; p < len(m)/g.ps; p++ {
			pg := m[p*g.ps : (p+1)*g.ps]
			x := rng.Float64()
			switch {
			case x < holes:
				clear(pg)
				g.populated[r].Clear(uint64(p))
				continue
			case x < holes+zeros:
				clear(pg)
			default:
				src.Read(pg)
			}
			g.populated[r].Set(uint64(p))
			if g.logging {
				g.dirty[r].Set(uint64(p))
			}
		}
	}
}

// FillText is Fill with text in place of random data: words from a small dictionary, which
// compress to about a quarter.
func (g *Guest) FillText(seed uint64, holes, zeros float64) {
	g.Fill(seed, holes, zeros)
	g.mu.Lock()
	defer g.mu.Unlock()
	words := strings.Fields("migration page guest memory round dirty stream zero copy host vcpu state frame batch link")
	rng := rand.New(rand.NewPCG(seed, 3))
	for r, m := range g.mem {
		for p := 0; p < len(m)/g.ps; p++ {
			pg := m[p*g.ps : (p+1)*g.ps]
			if !g.populated[r].Has(uint64(p)) || isZero(pg) {
				continue
			}
			for i := 0; i < len(pg); {
				i += copy(pg[i:], words[rng.IntN(len(words))])
				if i < len(pg) {
					pg[i] = ' '
					i++
				}
			}
		}
	}
}

// FillPool is Fill with each data page a copy of one of pool distinct random pages, as in a
// guest whose memory holds many copies of the same data.
func (g *Guest) FillPool(seed uint64, pool int, holes, zeros float64) {
	g.Fill(seed, holes, zeros)
	g.mu.Lock()
	defer g.mu.Unlock()
	src := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), 9})
	contents := make([]byte, pool*g.ps)
	src.Read(contents)
	g.pool = contents
	rng := rand.New(rand.NewPCG(seed, 5))
	for r, m := range g.mem {
		for p := 0; p < len(m)/g.ps; p++ {
			pg := m[p*g.ps : (p+1)*g.ps]
			if g.populated[r].Has(uint64(p)) && !isZero(pg) {
				k := rng.IntN(pool)
				copy(pg, contents[k*g.ps:(k+1)*g.ps])
			}
		}
	}
}

func isZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// Write is a guest store of data at byte off of page p of region r. It fails while paused.
func (g *Guest) Write(r int, p uint64, off int, data []byte) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.write(r, p, off, data)
}

func (g *Guest) write(r int, p uint64, off int, data []byte) error {
	if g.paused {
		return ErrPaused
	}
	copy(g.mem[r][int(p)*g.ps+off:], data)
	g.populated[r].Set(p)
	if g.logging {
		g.dirty[r].Set(p)
	}
	g.writes++
	return nil
}

// Touch writes a fresh 8-byte value into page p of region r, so the page differs from every
// earlier version of itself.
func (g *Guest) Touch(r int, p uint64) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.touch(r, p)
}

func (g *Guest) touch(r int, p uint64) error {
	var v [8]byte
	n := g.writes + 1
	for i := range v {
		v[i] = byte(n >> (8 * i))
	}
	off := int(n*8) % g.ps
	return g.write(r, p, off, v[:])
}

// Writes is the number of guest stores so far.
func (g *Guest) Writes() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.writes
}

// SetState sets a device's state section.
func (g *Guest) SetState(id string, version uint32, data []byte) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for i := range g.sections {
		if g.sections[i].ID == id {
			g.sections[i] = migration.Section{ID: id, Version: version, Data: bytes.Clone(data)}
			return
		}
	}
	g.sections = append(g.sections, migration.Section{ID: id, Version: version, Data: bytes.Clone(data)})
}

// Running reports whether the guest's vCPUs run (not paused).
func (g *Guest) Running() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return !g.paused
}

// CurrentThrottle is the throttle in force; MaxThrottle the highest ever set.
func (g *Guest) CurrentThrottle() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.throttle
}

func (g *Guest) MaxThrottle() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.maxThr
}

// Logging reports whether dirty logging is on.
func (g *Guest) Logging() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.logging
}

// Memory returns a copy of region r.
func (g *Guest) Memory(r int) []byte {
	g.mu.Lock()
	defer g.mu.Unlock()
	return bytes.Clone(g.mem[r])
}

// Heartbeat records a guest heartbeat at t (host time). The writer does this every tick.
func (g *Guest) Heartbeat(t time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.paused {
		g.lastBeat = t
		g.beats++
	}
}

// ProgressCount is the number of heartbeats so far (migration.ProgressCounter).
func (g *Guest) ProgressCount() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.beats
}

// --- migration.Source ---

func (g *Guest) Describe() migration.Description { return g.desc }

func (g *Guest) Populated() ([]migration.Bitmap, error) {
	if err := g.hook("Populated"); err != nil {
		return nil, err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return cloneBitmaps(g.populated), nil
}

func (g *Guest) StartDirtyLog() error {
	if err := g.hook("StartDirtyLog"); err != nil {
		return err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.clearDirty()
	g.logging = true
	return nil
}

func (g *Guest) FetchDirty() ([]migration.Bitmap, error) {
	if err := g.hook("FetchDirty"); err != nil {
		return nil, err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.logging {
		return nil, errors.New("migrationtest: FetchDirty without dirty logging")
	}
	out := g.dirty
	g.clearDirty()
	return out, nil
}

func (g *Guest) StopDirtyLog() error {
	if err := g.hook("StopDirtyLog"); err != nil {
		return err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.logging = false
	return nil
}

func (g *Guest) ReadPages(r int, first uint64, dst []byte) error {
	if err := g.hook("ReadPages"); err != nil {
		return err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	off := int(first) * g.ps
	if r < 0 || r >= len(g.mem) || len(dst)%g.ps != 0 || off+len(dst) > len(g.mem[r]) {
		return fmt.Errorf("migrationtest: ReadPages(region %d, page %d, %d bytes) out of range", r, first, len(dst))
	}
	copy(dst, g.mem[r][off:])
	return nil
}

// ViewPages is migration.PageViewer: the pages themselves. The engine may ask only while the
// guest is paused (a view of a running guest races with its writer): asking otherwise panics.
// A Hook error for "ViewPages" makes it decline, so that the engine falls back to ReadPages.
func (g *Guest) ViewPages(r int, first, n uint64) []byte {
	if g.hook("ViewPages") != nil {
		return nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.paused {
		panic(fmt.Sprintf("migrationtest: ViewPages(region %d, page %d, %d pages) while the guest runs", r, first, n))
	}
	off, end := int(first)*g.ps, int(first+n)*g.ps
	if r < 0 || r >= len(g.mem) || end > len(g.mem[r]) {
		return nil
	}
	return g.mem[r][off:end:end]
}

func (g *Guest) Pause() error {
	if err := g.hook("Pause"); err != nil {
		return err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.paused = true
	return nil
}

func (g *Guest) Resume() error {
	if err := g.hook("Resume"); err != nil {
		return err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.paused = false
	return nil
}

func (g *Guest) SaveState() ([]migration.Section, error) {
	if err := g.hook("SaveState"); err != nil {
		return nil, err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.paused {
		return nil, errors.New("migrationtest: SaveState while running")
	}
	out := make([]migration.Section, len(g.sections))
	for i, s := range g.sections {
		out[i] = migration.Section{ID: s.ID, Version: s.Version, Data: bytes.Clone(s.Data)}
	}
	return out, nil
}

func (g *Guest) SetThrottle(percent int) error {
	if err := g.hook("SetThrottle"); err != nil {
		return err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.throttle = percent
	g.maxThr = max(g.maxThr, percent)
	return nil
}

func (g *Guest) LastProgress() time.Time {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.lastBeat
}

func cloneBitmaps(in []migration.Bitmap) []migration.Bitmap {
	out := make([]migration.Bitmap, len(in))
	for i, b := range in {
		out[i] = b.Clone()
	}
	return out
}

// clearDirty starts new dirty sets; g.mu is held.
func (g *Guest) clearDirty() {
	dirty := make([]migration.Bitmap, len(g.dirty))
	for r, b := range g.dirty {
		dirty[r] = migration.NewBitmap(b.Pages())
	}
	g.dirty = dirty
}

// WriterConfig describes a guest workload for RunWriter.
type WriterConfig struct {
	Rate       int           // page writes per second at throttle 0
	Tick       time.Duration // how often the writer wakes; default 1ms
	Region     int           // region written
	First      uint64        // first page of the working set
	WorkingSet uint64        // pages in the working set; 0 = the whole region
	Seed       uint64
	// Pool makes every write copy one of FillPool's pages over the page: content moves between
	// pages, and a page becomes a copy of pages sent before.
	Pool bool
}

// RunWriter starts a goroutine that writes pages like a busy guest: every tick it touches
// Rate*Tick*(100-throttle)/100 pseudo-random pages of the working set and records a heartbeat.
// It stops when ctx is done; the returned function waits for that.
func (g *Guest) RunWriter(ctx context.Context, cfg WriterConfig) (wait func()) {
	if cfg.Tick <= 0 {
		cfg.Tick = time.Millisecond
	}
	if cfg.WorkingSet == 0 {
		cfg.WorkingSet = uint64(len(g.mem[cfg.Region])/g.ps) - cfg.First
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		rng := rand.New(rand.NewPCG(cfg.Seed, 2))
		t := time.NewTicker(cfg.Tick)
		defer t.Stop()
		var carry float64
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-t.C:
				g.mu.Lock()
				if !g.paused {
					g.lastBeat = now
					g.beats++
					carry += float64(cfg.Rate) * cfg.Tick.Seconds() * float64(100-g.throttle) / 100
					for ; carry >= 1; carry-- {
						p := cfg.First + rng.Uint64N(cfg.WorkingSet)
						if n := len(g.pool) / g.ps; cfg.Pool && n > 0 {
							k := rng.IntN(n)
							g.write(cfg.Region, p, 0, g.pool[k*g.ps:(k+1)*g.ps])
							continue
						}
						g.touch(cfg.Region, p)
					}
				}
				g.mu.Unlock()
			}
		}
	}()
	return func() { <-done }
}

// Dest is a fake destination VM. It implements migration.Destination and
// migration.FirstProgress. All methods are safe for concurrent use.
type Dest struct {
	Hook Hook
	// FirstBeatDelay is how long after Start the guest's first heartbeat comes (default 1ms);
	// negative means it never comes.
	FirstBeatDelay time.Duration
	// WriteRate, when positive, makes WritePages take len(src)/WriteRate seconds: a
	// destination slower to place pages than the link is to carry them.
	WriteRate float64

	mu       sync.Mutex
	desc     migration.Description
	mem      [][]byte
	sections []migration.Section
	state    string // "", "prepared", "restored", "running", "aborted"
	startAt  time.Time
	calls    map[string]int
	zeroed   uint64
	written  uint64
}

// NewDest returns an empty destination.
func NewDest() *Dest { return &Dest{calls: map[string]int{}} }

func (d *Dest) hook(op string) error {
	d.mu.Lock()
	d.calls[op]++
	n := d.calls[op]
	h := d.Hook
	d.mu.Unlock()
	if h != nil {
		return h(op, n)
	}
	return nil
}

// State is "" before Prepare, then "prepared", "restored", "running" or "aborted".
func (d *Dest) State() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.state
}

// Calls is how many times op was called.
func (d *Dest) Calls(op string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.calls[op]
}

// Placed is the number of pages written or zeroed so far.
func (d *Dest) Placed() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.written + d.zeroed
}

// Reset returns the destination to its initial state but keeps its memory buffers, which the
// next Prepare reuses (cleared) when the layout matches. Benchmarks use it so that they measure
// the engine rather than the kernel faulting in fresh memory.
func (d *Dest) Reset() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.state, d.sections, d.calls = "", nil, map[string]int{}
	d.written, d.zeroed = 0, 0
}

func (d *Dest) Prepare(desc migration.Description) error {
	if err := d.hook("Prepare"); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.state != "" {
		return fmt.Errorf("migrationtest: Prepare in state %q", d.state)
	}
	old := d.mem
	d.desc, d.mem = desc, nil
	for i, r := range desc.Layout.Regions {
		if i < len(old) && uint64(len(old[i])) == r.Size {
			clear(old[i])
			d.mem = append(d.mem, old[i])
			continue
		}
		d.mem = append(d.mem, make([]byte, r.Size))
	}
	d.state = "prepared"
	return nil
}

func (d *Dest) region(r int, first, n uint64) ([]byte, error) {
	ps := d.desc.Layout.PageSize
	if d.state != "prepared" {
		return nil, fmt.Errorf("migrationtest: page write in state %q", d.state)
	}
	if r < 0 || r >= len(d.mem) || (first+n)*ps > uint64(len(d.mem[r])) {
		return nil, fmt.Errorf("migrationtest: pages [%d, +%d) of region %d out of range", first, n, r)
	}
	return d.mem[r][first*ps : (first+n)*ps], nil
}

func (d *Dest) WritePages(r int, first uint64, src []byte) error {
	if err := d.hook("WritePages"); err != nil {
		return err
	}
	d.mu.Lock()
	rate := d.WriteRate
	d.mu.Unlock()
	if rate > 0 {
		time.Sleep(time.Duration(float64(len(src)) / rate * float64(time.Second)))
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	ps := d.desc.Layout.PageSize
	if uint64(len(src))%ps != 0 {
		return fmt.Errorf("migrationtest: WritePages with %d bytes, not whole pages", len(src))
	}
	m, err := d.region(r, first, uint64(len(src))/ps)
	if err != nil {
		return err
	}
	copy(m, src)
	d.written += uint64(len(src)) / ps
	return nil
}

// ReadPages reads back pages placed (migration.PageReader, for deltas).
func (d *Dest) ReadPages(r int, first uint64, dst []byte) error {
	if err := d.hook("ReadPages"); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	ps := d.desc.Layout.PageSize
	if uint64(len(dst))%ps != 0 {
		return fmt.Errorf("migrationtest: ReadPages with %d bytes, not whole pages", len(dst))
	}
	m, err := d.region(r, first, uint64(len(dst))/ps)
	if err != nil {
		return err
	}
	copy(dst, m)
	return nil
}

func (d *Dest) ZeroPages(r int, first, n uint64) error {
	if err := d.hook("ZeroPages"); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	m, err := d.region(r, first, n)
	if err != nil {
		return err
	}
	clear(m)
	d.zeroed += n
	return nil
}

func (d *Dest) RestoreState(s []migration.Section) error {
	if err := d.hook("RestoreState"); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.state != "prepared" {
		return fmt.Errorf("migrationtest: RestoreState in state %q", d.state)
	}
	d.sections = s
	d.state = "restored"
	return nil
}

func (d *Dest) Start() error {
	if err := d.hook("Start"); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.state != "restored" {
		return fmt.Errorf("migrationtest: Start in state %q", d.state)
	}
	d.state = "running"
	d.startAt = time.Now()
	return nil
}

func (d *Dest) Abort() {
	d.hook("Abort")
	d.mu.Lock()
	defer d.mu.Unlock()
	d.state = "aborted"
	d.mem = nil
	d.sections = nil
}

func (d *Dest) WaitFirstProgress(ctx context.Context) (time.Time, error) {
	if err := d.hook("WaitFirstProgress"); err != nil {
		return time.Time{}, err
	}
	d.mu.Lock()
	delay, start := d.FirstBeatDelay, d.startAt
	d.mu.Unlock()
	if delay == 0 {
		delay = time.Millisecond
	}
	if delay < 0 {
		<-ctx.Done()
		return time.Time{}, ctx.Err()
	}
	t := time.NewTimer(time.Until(start.Add(delay)))
	defer t.Stop()
	select {
	case <-t.C:
		return start.Add(delay), nil
	case <-ctx.Done():
		return time.Time{}, ctx.Err()
	}
}

// Compare is the correctness oracle: the destination's memory, state sections and shape must
// equal the (paused or stopped) source's, byte for byte. It names the first differing pages.
func Compare(g *Guest, d *Dest) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.state != "running" {
		return fmt.Errorf("migrationtest: destination is %q, not running", d.state)
	}
	if d.desc.VCPUs != g.desc.VCPUs || fmt.Sprint(d.desc.Layout) != fmt.Sprint(g.desc.Layout) || fmt.Sprint(d.desc.Devices) != fmt.Sprint(g.desc.Devices) {
		return fmt.Errorf("migrationtest: destination description %+v, source %+v", d.desc, g.desc)
	}
	var errs []error
	for r := range g.mem {
		if bytes.Equal(g.mem[r], d.mem[r]) {
			continue
		}
		var bad []int
		n := 0
		for p := 0; p < len(g.mem[r])/g.ps; p++ {
			if !bytes.Equal(g.mem[r][p*g.ps:(p+1)*g.ps], d.mem[r][p*g.ps:(p+1)*g.ps]) {
				n++
				if len(bad) < 8 {
					bad = append(bad, p)
				}
			}
		}
		errs = append(errs, fmt.Errorf("migrationtest: region %d: %d pages differ, first %v", r, n, bad))
	}
	if len(d.sections) != len(g.sections) {
		errs = append(errs, fmt.Errorf("migrationtest: destination has %d state sections, source %d", len(d.sections), len(g.sections)))
	} else {
		for i, s := range g.sections {
			o := d.sections[i]
			if o.ID != s.ID || o.Version != s.Version || !bytes.Equal(o.Data, s.Data) {
				errs = append(errs, fmt.Errorf("migrationtest: state section %d: destination %q v%d (%d bytes), source %q v%d (%d bytes)", i, o.ID, o.Version, len(o.Data), s.ID, s.Version, len(s.Data)))
			}
		}
	}
	return errors.Join(errs...)
}
