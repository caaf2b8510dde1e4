package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/godwit-vm/godwit/internal/demand"
	"github.com/godwit-vm/godwit/internal/guestmem"
	"github.com/godwit-vm/godwit/migration"
)

// uffdDest is a post-copy destination without KVM but with everything else real: its memory
// is a memfd region demand-paged by internal/demand (the VMM's own post-copy code) over a real
// userfaultfd. Simulated vCPUs load pages through a system call (pwrite from the mapping into
// a sink memfd), so a missing page blocks them in the kernel on a userfaultfd fault, as KVM_RUN
// blocks a vCPU; the fault then takes the VMM's path: the reader, the engine, UFFDIO_COPY and
// the wake. Only the vCPU and device state are not there (RestoreState keeps the sections).
type uffdDest struct {
	mu      sync.Mutex
	mem     *guestmem.Region
	pager   *demand.Pager
	faults  chan migration.Fault
	discard bool // DiscardStale ran
	secs    []migration.Section

	started  chan struct{}
	aborted  chan struct{}
	abortOne sync.Once
	sink     int
	loads    atomic.Uint64
}

var (
	_ migration.PostcopyDestination = (*uffdDest)(nil)
	_ migration.StaleDiscarder      = (*uffdDest)(nil)
	_ migration.ProgressCounter     = (*uffdDest)(nil)
)

func newUffdDest() (*uffdDest, error) {
	sink, err := unix.MemfdCreate("bench-sink", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("sink memfd: %w", err)
	}
	if err := unix.Ftruncate(sink, guestmem.PageSize); err != nil {
		unix.Close(sink)
		return nil, fmt.Errorf("sink memfd: %w", err)
	}
	return &uffdDest{
		faults:  make(chan migration.Fault, 4096),
		started: make(chan struct{}),
		aborted: make(chan struct{}),
		sink:    sink,
	}, nil
}

func (d *uffdDest) Prepare(desc migration.Description) error {
	if len(desc.Layout.Regions) != 1 || desc.Layout.PageSize != guestmem.PageSize {
		return fmt.Errorf("uffd destination: want one region of %d-byte pages, got %+v", guestmem.PageSize, desc.Layout)
	}
	r := desc.Layout.Regions[0]
	mem, err := guestmem.NewRegion(r.Name, r.GPA, r.Size)
	if err != nil {
		return err
	}
	d.mu.Lock()
	d.mem = mem
	d.mu.Unlock()
	return nil
}

func (d *uffdDest) armed() *demand.Pager {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.pager
}

func (d *uffdDest) WritePages(r int, first uint64, src []byte) error {
	if d.armed() != nil {
		return d.PlacePages(r, first, src)
	}
	_, err := d.mem.WriteAt(src, int64(first*guestmem.PageSize))
	return err
}

func (d *uffdDest) ZeroPages(r int, first, n uint64) error {
	if d.armed() != nil {
		return d.PlaceZero(r, first, n)
	}
	return d.mem.PunchPages(first, n)
}

func (d *uffdDest) DiscardStale(missing []migration.Bitmap) error {
	bm, err := d.ramBitmap(missing)
	if err != nil {
		return err
	}
	if err := demand.DiscardStale(d.mem, bm); err != nil {
		return err
	}
	d.mu.Lock()
	d.discard = true
	d.mu.Unlock()
	return nil
}

func (d *uffdDest) ramBitmap(missing []migration.Bitmap) (migration.Bitmap, error) {
	if len(missing) != 1 || missing[0].Pages() < d.mem.Pages() {
		return migration.Bitmap{}, fmt.Errorf("uffd destination: page set of %d bitmaps does not fit %d pages", len(missing), d.mem.Pages())
	}
	return demand.SetFor(d.mem, missing[0])
}

func (d *uffdDest) ArmPostcopy(missing []migration.Bitmap) error {
	bm, err := d.ramBitmap(missing)
	if err != nil {
		return err
	}
	d.mu.Lock()
	discarded := d.discard
	d.mu.Unlock()
	if !discarded {
		if err := demand.DiscardStale(d.mem, bm); err != nil {
			return err
		}
	}
	p, err := demand.Arm(d.mem, bm, demand.Config{Faults: d.faults})
	if err != nil {
		return err
	}
	d.mu.Lock()
	d.pager = p
	d.mu.Unlock()
	return nil
}

func (d *uffdDest) Faults() <-chan migration.Fault { return d.faults }

func (d *uffdDest) PlacePages(r int, first uint64, src []byte) error {
	p := d.armed()
	if p == nil {
		return errors.New("uffd destination: place before arm")
	}
	return p.Place(first, uint64(len(src))/guestmem.PageSize, src)
}

func (d *uffdDest) PlaceZero(r int, first, n uint64) error {
	p := d.armed()
	if p == nil {
		return errors.New("uffd destination: place before arm")
	}
	return p.Place(first, n, nil)
}

func (d *uffdDest) DisarmPostcopy() error {
	p := d.armed()
	if p == nil {
		return errors.New("uffd destination: disarm before arm")
	}
	if err := p.Complete(); err != nil {
		return err
	}
	return p.Shutdown()
}

func (d *uffdDest) RestoreState(s []migration.Section) error {
	d.secs = s
	return nil
}

func (d *uffdDest) Start() error {
	close(d.started)
	return nil
}

// Abort releases every waiting vCPU and the memory. The vCPUs must have stopped before the
// region is closed; close calls Abort after waiting for them.
func (d *uffdDest) Abort() {
	d.abortOne.Do(func() {
		close(d.aborted)
		if p := d.armed(); p != nil {
			p.Shutdown()
		}
	})
}

// close aborts and frees the memory and the sink; the vCPUs must have stopped.
func (d *uffdDest) close() {
	d.Abort()
	if d.mem != nil {
		d.mem.Close()
	}
	unix.Close(d.sink)
}

func (d *uffdDest) ProgressCount() uint64 { return d.loads.Load() }

// load reads 64 bytes of page p the way the kernel does, through the mapping: it blocks in the
// kernel while the page is missing. A signal can cut a faulting copy short (EFAULT, EINTR);
// it is retried.
func (d *uffdDest) load(p uint64) error {
	off := p * guestmem.PageSize
	for {
		_, err := unix.Pwrite(d.sink, d.mem.Mem[off:off+64], 0)
		if err == nil {
			d.loads.Add(1)
			return nil
		}
		if err != unix.EFAULT && err != unix.EINTR {
			return fmt.Errorf("load page %d: %w", p, err)
		}
	}
}

// runVCPU starts a simulated vCPU: after Start it loads pages in order, with think time
// between loads, until ctx is done, the destination aborts, or (if runFor > 0) runFor after
// Start. The returned function waits for it to stop.
func (d *uffdDest) runVCPU(ctx context.Context, pages []uint64, think, runFor time.Duration) (wait func() error) {
	done := make(chan error, 1)
	go func() {
		select {
		case <-d.started:
			if runFor > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, runFor)
				defer cancel()
			}
		case <-d.aborted:
			done <- nil
			return
		case <-ctx.Done():
			done <- nil
			return
		}
		for {
			for _, p := range pages {
				if ctx.Err() != nil {
					done <- nil
					return
				}
				if err := d.load(p); err != nil {
					done <- err
					return
				}
				ts := unix.NsecToTimespec(think.Nanoseconds())
				unix.Nanosleep(&ts, nil)
			}
		}
	}()
	return func() error { return <-done }
}

// compare reads every page of src and of the destination's memfd (pread: never a fault) and
// reports the first that differs.
func (d *uffdDest) compare(src migration.Source) error {
	const batch = 256
	a := make([]byte, batch*guestmem.PageSize)
	b := make([]byte, len(a))
	pages := d.mem.Pages()
	for first := uint64(0); first < pages; first += batch {
		n := min(batch, pages-first)
		a, b := a[:n*guestmem.PageSize], b[:n*guestmem.PageSize]
		if err := src.ReadPages(0, first, a); err != nil {
			return err
		}
		if _, err := d.mem.ReadAt(b, int64(first*guestmem.PageSize)); err != nil {
			return err
		}
		if !bytes.Equal(a, b) {
			for i := uint64(0); i < n; i++ {
				pa, pb := a[i*guestmem.PageSize:(i+1)*guestmem.PageSize], b[i*guestmem.PageSize:(i+1)*guestmem.PageSize]
				if !bytes.Equal(pa, pb) {
					return fmt.Errorf("page %d differs on the destination", first+i)
				}
			}
		}
	}
	return nil
}
