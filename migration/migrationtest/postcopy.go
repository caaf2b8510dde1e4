package migrationtest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/godwit-vm/godwit/migration"
)

// ErrAborted is returned by PostcopyDest.Access when the destination was aborted.
var ErrAborted = errors.New("migrationtest: destination aborted")

// PostcopyDest is a fake destination with demand paging, behaving like a VMM over
// userfaultfd: after ArmPostcopy, a missing page reads as absent, and Access (a simulated
// vCPU's load) blocks on it until PlacePages or PlaceZero installs it; the first access to
// each missing page is reported on Faults. It implements migration.PostcopyDestination and
// migration.ProgressCounter (completed accesses) on top of Dest. RunVCPU drives accesses.
type PostcopyDest struct {
	*Dest

	pmu      sync.Mutex
	armed    bool
	disarmed bool
	absent   []migration.Bitmap
	missing  uint64 // pages absent
	waiters  map[key]chan struct{}
	faulted  map[key]bool
	faults   chan migration.Fault
	stop     chan struct{} // closed when Faults is about to close: senders give up
	sendMu   sync.RWMutex  // senders hold it shared; closing Faults takes it exclusively
	closed   bool          // Faults is closed (under sendMu)
	aborted  chan struct{}
	started  chan struct{}
	accesses atomic.Uint64
	nfaults  atomic.Uint64
	placed   uint64         // pages installed by Place calls (not already present)
	dupes    uint64         // pages passed to Place calls that were present already
	stores   map[key]uint64 // VCPUConfig.Store: the last value each page got (under Dest.mu)
}

type key struct {
	r int
	p uint64
}

// NewPostcopyDest returns an empty demand-paging destination.
func NewPostcopyDest() *PostcopyDest {
	return &PostcopyDest{
		Dest:    NewDest(),
		waiters: map[key]chan struct{}{},
		faulted: map[key]bool{},
		faults:  make(chan migration.Fault, 16),
		stop:    make(chan struct{}),
		aborted: make(chan struct{}),
		started: make(chan struct{}),
	}
}

// ArmPostcopy discards the pages in missing and makes them demand-paged.
func (d *PostcopyDest) ArmPostcopy(missing []migration.Bitmap) error {
	if err := d.hook("ArmPostcopy"); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.pmu.Lock()
	defer d.pmu.Unlock()
	if d.state != "prepared" || d.armed || d.disarmed {
		return fmt.Errorf("migrationtest: ArmPostcopy in state %q (armed %v, disarmed %v)", d.state, d.armed, d.disarmed)
	}
	if len(missing) != len(d.mem) {
		return fmt.Errorf("migrationtest: ArmPostcopy with %d bitmaps for %d regions", len(missing), len(d.mem))
	}
	ps := d.desc.Layout.PageSize
	d.absent = make([]migration.Bitmap, len(d.mem))
	for r, m := range d.mem {
		n := uint64(len(m)) / ps
		d.absent[r] = migration.NewBitmap(n)
		for p := range n {
			if missing[r].Has(p) {
				d.absent[r].Set(p)
				clear(m[p*ps : (p+1)*ps]) // an older copy from pre-copy is discarded
				d.missing++
			}
		}
	}
	d.armed = true
	return nil
}

// Faults delivers the first access to each missing page.
func (d *PostcopyDest) Faults() <-chan migration.Fault { return d.faults }

// Start starts the destination and releases the simulated vCPUs.
func (d *PostcopyDest) Start() error {
	if err := d.Dest.Start(); err != nil {
		return err
	}
	close(d.started)
	return nil
}

func (d *PostcopyDest) place(op string, r int, first, n uint64, src []byte) error {
	if err := d.hook(op); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.pmu.Lock()
	defer d.pmu.Unlock()
	ps := d.desc.Layout.PageSize
	if !d.armed {
		return fmt.Errorf("migrationtest: %s while not armed", op)
	}
	if d.state != "prepared" && d.state != "restored" && d.state != "running" {
		return fmt.Errorf("migrationtest: %s in state %q", op, d.state)
	}
	if r < 0 || r >= len(d.mem) || (first+n)*ps > uint64(len(d.mem[r])) || first+n < first {
		return fmt.Errorf("migrationtest: %s: pages [%d, +%d) of region %d out of range", op, first, n, r)
	}
	for i := range n {
		p := first + i
		if !d.absent[r].Has(p) {
			d.dupes++
			continue
		}
		dst := d.mem[r][p*ps : (p+1)*ps]
		if src != nil {
			copy(dst, src[i*ps:])
		} else {
			clear(dst)
		}
		d.absent[r].Clear(p)
		d.missing--
		d.placed++
		if w, ok := d.waiters[key{r, p}]; ok {
			close(w)
			delete(d.waiters, key{r, p})
		}
	}
	return nil
}

// PlacePages installs pages and wakes their waiters; pages present already are left alone.
func (d *PostcopyDest) PlacePages(r int, first uint64, src []byte) error {
	ps := d.desc.Layout.PageSize
	if uint64(len(src))%ps != 0 {
		return fmt.Errorf("migrationtest: PlacePages with %d bytes, not whole pages", len(src))
	}
	return d.place("PlacePages", r, first, uint64(len(src))/ps, src)
}

// PlaceZero installs zero pages.
func (d *PostcopyDest) PlaceZero(r int, first, n uint64) error {
	return d.place("PlaceZero", r, first, n, nil)
}

// DisarmPostcopy ends demand paging; every page must be present.
func (d *PostcopyDest) DisarmPostcopy() error {
	if err := d.hook("DisarmPostcopy"); err != nil {
		return err
	}
	d.pmu.Lock()
	if !d.armed {
		d.pmu.Unlock()
		return errors.New("migrationtest: DisarmPostcopy while not armed")
	}
	if d.missing != 0 {
		n := d.missing
		d.pmu.Unlock()
		return fmt.Errorf("migrationtest: DisarmPostcopy with %d pages missing", n)
	}
	d.armed, d.disarmed = false, true
	d.pmu.Unlock()
	d.closeFaults()
	return nil
}

func (d *PostcopyDest) closeFaults() {
	d.pmu.Lock()
	select {
	case <-d.stop:
	default:
		close(d.stop)
	}
	d.pmu.Unlock()
	d.sendMu.Lock()
	defer d.sendMu.Unlock()
	if !d.closed {
		d.closed = true
		close(d.faults)
	}
}

// Abort discards everything and fails every waiting access.
func (d *PostcopyDest) Abort() {
	d.Dest.Abort()
	d.pmu.Lock()
	select {
	case <-d.aborted:
	default:
		close(d.aborted)
	}
	d.armed = false
	d.pmu.Unlock()
	d.closeFaults()
}

// ProgressCount is the number of accesses completed.
func (d *PostcopyDest) ProgressCount() uint64 { return d.accesses.Load() }

// Missing is the number of pages still absent.
func (d *PostcopyDest) Missing() uint64 {
	d.pmu.Lock()
	defer d.pmu.Unlock()
	return d.missing
}

// DemandFaults is the number of faults delivered on Faults.
func (d *PostcopyDest) DemandFaults() uint64 { return d.nfaults.Load() }

// Placed is the number of pages installed by Place calls, and Duplicates the number passed to
// them that were present already.
func (d *PostcopyDest) PlacedPages() (placed, duplicates uint64) {
	d.pmu.Lock()
	defer d.pmu.Unlock()
	return d.placed, d.dupes
}

// Armed reports whether demand paging is on.
func (d *PostcopyDest) Armed() bool {
	d.pmu.Lock()
	defer d.pmu.Unlock()
	return d.armed
}

// Access is a vCPU's load from page p of region r: it returns at once if the page is present,
// else reports a fault (the first time) and blocks until the page is placed, ctx is done or
// the destination is aborted.
func (d *PostcopyDest) Access(ctx context.Context, r int, p uint64) error {
	d.pmu.Lock()
	if !d.armed || !d.absent[r].Has(p) {
		d.pmu.Unlock()
		d.accesses.Add(1)
		return nil
	}
	k := key{r, p}
	w, ok := d.waiters[k]
	if !ok {
		w = make(chan struct{})
		d.waiters[k] = w
	}
	first := !d.faulted[k]
	d.faulted[k] = true
	d.pmu.Unlock()
	if first {
		d.sendMu.RLock()
		if !d.closed {
			select {
			case d.faults <- migration.Fault{Region: r, Page: p, At: time.Now()}:
				d.nfaults.Add(1)
			case <-d.stop:
			case <-ctx.Done():
			}
		}
		d.sendMu.RUnlock()
	}
	select {
	case <-w:
		d.accesses.Add(1)
		return nil
	case <-d.aborted:
		return ErrAborted
	case <-ctx.Done():
		return ctx.Err()
	}
}

// VCPUConfig describes a simulated vCPU for RunVCPU.
type VCPUConfig struct {
	Region int
	Pages  []uint64      // the pages it loads, in order; it starts over at the end
	Think  time.Duration // time between two loads; default 10µs
	Once   bool          // stop after one pass instead of starting over
	// Store makes every access a store too: the vCPU writes a fresh 8-byte value at the
	// start of the page, once it is present. ApplyStores tells the oracle.
	Store bool
}

// RunVCPU starts a goroutine that waits for Start, then loads pages as cfg says until ctx is
// done (or one pass is over, with Once). The returned function waits for it to stop.
func (d *PostcopyDest) RunVCPU(ctx context.Context, cfg VCPUConfig) (wait func()) {
	if cfg.Think <= 0 {
		cfg.Think = 10 * time.Microsecond
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		select {
		case <-d.started:
		case <-d.aborted:
			return
		case <-ctx.Done():
			return
		}
		for {
			for _, p := range cfg.Pages {
				if err := d.Access(ctx, cfg.Region, p); err != nil {
					return
				}
				if cfg.Store {
					d.store(cfg.Region, p)
				}
				t := time.NewTimer(cfg.Think)
				select {
				case <-t.C:
				case <-ctx.Done():
					t.Stop()
					return
				}
			}
			if cfg.Once {
				return
			}
		}
	}()
	return func() { <-done }
}

// store writes a fresh value at the start of page p of region r, which is present.
func (d *PostcopyDest) store(r int, p uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.stores == nil {
		d.stores = map[key]uint64{}
	}
	v := uint64(len(d.stores))<<32 | d.accesses.Load() | 1
	ps := d.desc.Layout.PageSize
	binary.LittleEndian.PutUint64(d.mem[r][p*ps:], v)
	d.stores[key{r, p}] = v
}

// ApplyStores makes the source's memory what the destination's should be after its vCPU's
// stores (VCPUConfig.Store), for Compare. Call it once the migration is over; it returns the
// pages stored to.
func (d *PostcopyDest) ApplyStores(g *Guest) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	g.mu.Lock()
	defer g.mu.Unlock()
	for k, v := range d.stores {
		binary.LittleEndian.PutUint64(g.mem[k.r][k.p*uint64(g.ps):], v)
	}
	return len(d.stores)
}

// ReadPages reads back pages (migration.PageReader) in any state of a post-copy; an absent page
// reads as zero.
func (d *PostcopyDest) ReadPages(r int, first uint64, dst []byte) error {
	if err := d.hook("ReadPages"); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	ps := d.desc.Layout.PageSize
	n := uint64(len(dst)) / ps
	if uint64(len(dst))%ps != 0 || r < 0 || r >= len(d.mem) || (first+n)*ps > uint64(len(d.mem[r])) || first+n < first {
		return fmt.Errorf("migrationtest: ReadPages of %d bytes at page %d of region %d: out of range or not whole pages", len(dst), first, r)
	}
	copy(dst, d.mem[r][first*ps:])
	return nil
}

// LocalityPattern returns n page loads with locality: runs of window consecutive pages from
// random starting points among pages [first, first+span).
func LocalityPattern(seed uint64, first, span uint64, n, window int) []uint64 {
	rng := rand.New(rand.NewPCG(seed, 3))
	out := make([]uint64, 0, n)
	for len(out) < n {
		start := first + rng.Uint64N(span)
		for i := 0; i < window && len(out) < n; i++ {
			out = append(out, first+(start-first+uint64(i))%span)
		}
	}
	return out
}
