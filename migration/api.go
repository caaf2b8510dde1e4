package migration

import (
	"context"
	"io"
	"time"
)

// Region is one range of guest physical memory. Pages of a region are numbered from 0.
type Region struct {
	Name string
	GPA  uint64
	Size uint64 // a multiple of Layout.PageSize
}

// Layout is the guest's memory.
type Layout struct {
	PageSize uint64 // a power of two, 512 B .. 2 MiB; dirty tracking granularity
	Regions  []Region
}

// Description is what the destination needs to build an empty VM of the same shape.
type Description struct {
	Layout  Layout
	VCPUs   int
	Devices []string // component ids: exactly the ids SaveState may return
	// Base, when not zero, is the template the VM's memory was cloned from (its content
	// hash): Populated then returns the pages the VM changed since, and the destination
	// starts from the same template (BaseHolder), so that only those pages travel. Such a VM
	// migrates by pre-copy: its memory is no file to hand over or to demand-page into.
	Base [32]byte
}

// Section is one component's saved state. Version belongs to the component: a destination
// restores the versions it knows and refuses others with an error.
type Section struct {
	ID      string
	Version uint32
	Data    []byte
}

// Source is a running VM that can be migrated away. The engine calls it from one goroutine.
// Bitmaps and sections it returns belong to the engine: the VMM must not reuse or change them.
//
// Ordering: StartDirtyLog happens before Populated and before the first ReadPages, so every
// write after the engine first looks at a page is seen in a later FetchDirty. Pause happens
// before the last FetchDirty and before SaveState. If the migration fails before the
// destination acknowledges, the engine calls Resume (when it had paused), SetThrottle(0) (when it
// had throttled) and StopDirtyLog (when logging is still on): the VM keeps running as before.
type Source interface {
	Describe() Description
	// Populated returns, per region, the pages that may hold data. Pages not set (holes:
	// never touched or punched) are not sent; the destination's fresh memory reads as zero there.
	Populated() ([]Bitmap, error)
	StartDirtyLog() error
	// FetchDirty returns, per region, the pages written since StartDirtyLog or the previous
	// FetchDirty, and re-arms tracking for them. The VMM ORs KVM's log with the pages it
	// wrote itself (device DMA, its own stores).
	FetchDirty() ([]Bitmap, error)
	StopDirtyLog() error
	// ReadPages copies len(dst)/PageSize pages of region r starting at page first into dst.
	// The engine reuses dst; it never holds on to guest memory.
	ReadPages(r int, first uint64, dst []byte) error
	Pause() error // vCPUs stopped; memory and state no longer change
	// Resume restarts the vCPUs when the migration fails or is cancelled after Pause. It may
	// also follow a Pause that returned an error.
	Resume() error
	// SaveState returns the state of the components listed in Describe().Devices. Only
	// called while paused. The engine sends the sections without keeping them.
	SaveState() ([]Section, error)
}

// PageViewer is an optional Source capability: read-only views of guest memory, so that the
// pages of a stopped source (the stop-and-copy round, the post-copy push) are classified,
// checksummed and written from guest memory itself instead of being copied out first.
// ViewPages returns n pages of region r from page first, or nil where it cannot (the engine
// then calls ReadPages). The engine asks only between a successful Pause and the end of Send
// or a Resume, and never writes through a view nor keeps one past them.
type PageViewer interface {
	ViewPages(r int, first, n uint64) []byte
}

// Throttler is an optional Source capability for auto-converge: it slows the vCPUs down to
// (100-percent)% of their speed. 0 restores full speed.
type Throttler interface {
	SetThrottle(percent int) error
}

// MemoryFiles is the Source capability a handover (ModeHandover) needs: the file descriptors
// of guest memory, one per region in layout order (memfds, or files on shared memory), which
// the destination maps instead of receiving pages. They stay the Source's. Once the
// destination has resumed, the source must never write, punch or resize them again: they are
// the destination's memory.
type MemoryFiles interface {
	MemoryFDs() ([]int, error)
}

// MemoryAdopter is the Destination capability a handover needs: AdoptMemory replaces Prepare
// and builds the VM on the given files, one per region of d's layout, each exactly the
// region's size (checked here), without writing to them: until the source has paused and the
// destination runs, the source's guest still uses that memory. The descriptors become the
// Destination's, also when it fails; Abort gives up the mapping and leaves the files' contents
// alone.
type MemoryAdopter interface {
	AdoptMemory(d Description, fds []int) error
}

// SharedMemory is the Source capability a migration on shared memory (ModeSharedMemory) needs:
// the id of the memory file that holds guest memory (one region), which the destination's host
// maps too; ok is false for memory that is not in such a file.
type SharedMemory interface {
	SharedMemoryID() (id [16]byte, ok bool)
}

// SharedMemoryAdopter is the Destination capability a migration on shared memory needs:
// AdoptSharedMemory replaces Prepare and builds the VM on this host's mapping of the memory
// file named id, without writing to it (the source's guest still runs on it). It fails when
// this host maps no such file, or one of another size or id.
type SharedMemoryAdopter interface {
	AdoptSharedMemory(d Description, id [16]byte) error
}

// BaseHolder is an optional Destination capability: it can start from a template's memory.
// HasBase reports, before Prepare, whether it holds the template named id (nil) or why not;
// Prepare then builds the VM on that template (Description.Base) and pages not sent keep the
// template's content.
type BaseHolder interface {
	HasBase(id [32]byte) error
}

// fdTaker is a connection that keeps the file descriptors its peer passes (a Unix socket of
// package transport).
type fdTaker interface{ TakeFDs() []int }

// ProgressClock is an optional Source capability: the host wall-clock time of the guest's
// last heartbeat. With the destination's FirstProgress it yields the blackout.
type ProgressClock interface {
	LastProgress() time.Time
}

// Destination is an empty VM being filled. The engine calls it from one goroutine, except
// that with extra page streams (ReceiveOptions.AcceptStream) WritePages and ZeroPages of
// different pages may run on several goroutines at once, one per connection.
type Destination interface {
	Prepare(d Description) error // create memory with the layout (all zero)
	// WritePages copies len(src)/PageSize pages into region r starting at page first.
	WritePages(r int, first uint64, src []byte) error
	// ZeroPages makes n pages from first zero: their newest copy on the source is zero. They
	// may be holes already, in which case this costs nothing.
	ZeroPages(r int, first, n uint64) error
	RestoreState(s []Section) error
	Start() error // vCPUs running
	Abort()       // discard everything; safe to call in any state, also after Prepare failed
}

// FirstProgress is an optional Destination capability: it waits for the guest's first
// heartbeat after Start and returns its host wall-clock time.
type FirstProgress interface {
	WaitFirstProgress(ctx context.Context) (time.Time, error)
}

// Clock is the engine's source of time: timestamps for pause and resume (wall clock: downtime
// is measured across hosts that share a synchronised clock) and pacing sleeps for the
// bandwidth cap. Timeouts use the time package directly, so tests that need fake time run the
// engine inside testing/synctest, where both agree. Now may be called from several
// goroutines at once (the sender stamps the destination's acknowledgements as they arrive).
type Clock interface {
	Now() time.Time
	// Sleep waits for d or until ctx is done, returning ctx's error in that case.
	Sleep(ctx context.Context, d time.Duration) error
}

// SystemClock is the real clock.
type SystemClock struct{}

func (SystemClock) Now() time.Time { return time.Now() }

func (SystemClock) Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// Modes of a migration.
const (
	ModePrecopy  = "precopy"
	ModePostcopy = "postcopy" // switch at once: vCPUs first, memory on demand and by push
	ModeHybrid   = "hybrid"   // pre-copy rounds, then switch to post-copy
	// ModeHandover moves a VM to another process on the same host without copying its memory:
	// the memory's files pass over a Unix socket, and only state travels.
	ModeHandover = "handover"
	// ModeSharedMemory moves a VM whose memory both hosts map from shared memory (a memory
	// file): only state travels, and the destination maps the same memory.
	ModeSharedMemory = "shared-memory"
)

// memoryMode reports whether no page travels in mode: the memory stays where it is.
func memoryMode(mode string) bool { return mode == ModeHandover || mode == ModeSharedMemory }

// Prepaging policies: the order of the source's background push in post-copy. Demand
// requests always go first.
const (
	PrepageNone       = "none"       // no push while the destination keeps faulting (a baseline for the others); the rest after NoneIdle without a request
	PrepageSequential = "sequential" // ascending page order
	PrepageBubble     = "bubble"     // outward from the most recent demand faults
	PrepageHot        = "hot"        // hottest first, by dirty and fault statistics gathered before the switch
)

// Fault is a first access, after the switch to post-copy, to a page the destination does not
// have yet: by a vCPU (inside KVM_RUN) or by the VMM itself.
type Fault struct {
	Region int
	Page   uint64
	At     time.Time // when the VMM saw it (host wall clock), for the service latency
}

// PostcopyDestination is the Destination capability post-copy needs: demand paging.
//
// Order of calls: Prepare; any pre-copy WritePages/ZeroPages; ArmPostcopy; RestoreState;
// Start; then PlacePages/PlaceZero (from one goroutine) while faults arrive; DisarmPostcopy
// once every page is present (or Abort). Faults is read from another goroutine than the
// Place calls.
type PostcopyDestination interface {
	Destination
	// ArmPostcopy makes the pages set in missing (per region) demand-paged: each must read as
	// absent afterwards, so a page that holds an older copy from pre-copy is discarded here.
	// From now on the first access to a missing page, by a vCPU or by the VMM itself, blocks
	// until PlacePages or PlaceZero installs it, and is reported once on Faults. Pages not in
	// missing are complete already (holes among them read as zero).
	ArmPostcopy(missing []Bitmap) error
	// Faults delivers first accesses to missing pages. It is closed by DisarmPostcopy and Abort.
	Faults() <-chan Fault
	// PlacePages installs len(src)/PageSize pages of region r from page first atomically and
	// wakes whoever waits on them. Pages already present (placed before) are left as they are;
	// that is not an error.
	PlacePages(r int, first uint64, src []byte) error
	// PlaceZero installs n zero pages the same way.
	PlaceZero(r int, first, n uint64) error
	// DisarmPostcopy ends demand paging once every page is present and releases its resources.
	DisarmPostcopy() error
}

// StaleDiscarder is an optional capability of a PostcopyDestination: discarding its stale
// copies of the missing pages ahead of ArmPostcopy, while the source's device and vCPU state
// are still arriving, so that the time it takes (one hole punch per run of stale pages, after
// hybrid's pre-copy rounds) overlaps the transfer instead of adding to the downtime. The
// receiver calls DiscardStale at most once, on a goroutine of its own, as soon as the switch's
// page set is complete (every pre-copy page placed by then), and waits for it to return
// before it calls ArmPostcopy with the same set, or before it returns at all. ArmPostcopy must
// still discard whatever DiscardStale did not.
type StaleDiscarder interface {
	DiscardStale(missing []Bitmap) error
}

// ProgressCounter is an optional capability of Source and Destination: the number of units
// of work the guest has reported (heartbeats) so far. The engine samples it to report the
// guest's progress rate before, during and after a post-copy switch.
type ProgressCounter interface {
	ProgressCount() uint64
}

// DirtyTracker is an optional Source capability: how it learns of dirty pages (a KVM dirty
// ring, bitmaps), for the report.
type DirtyTracker interface {
	DirtyTracking() string
}

// StopWindowScaler is an optional Source capability: the work it does in the stop window
// whose cost follows the size of memory rather than what changed, each item naming its
// downtime part (the json name in DowntimeParts) and why, for the report. The engine's own
// work there follows the pages in its sets (Bitmap); nil says the source has none either.
type StopWindowScaler interface {
	StopWindowScaling() []string
}

// Reconnector gives the engine a new connection after the link broke during post-copy, when
// neither side may give up: the source holds the only complete copy of memory, the
// destination runs the vCPUs. The source's implementation dials the destination again (its
// address may change, for a manual resume); the destination's accepts the next connection on
// its listener. It blocks until it has a connection or ctx is done. The engine validates that
// the new connection belongs to the same migration.
type Reconnector func(ctx context.Context) (io.ReadWriter, error)
