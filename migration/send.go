package migration

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/godwit-vm/godwit/migration/compress"
	"github.com/godwit-vm/godwit/migration/dedup"
	"github.com/godwit-vm/godwit/migration/delta"
	"github.com/godwit-vm/godwit/migration/pages"
	"github.com/godwit-vm/godwit/migration/wire"
)

// Defaults for SendOptions and ReceiveOptions.
const (
	DefaultDowntimeLimit     = 300 * time.Millisecond
	DefaultMaxRounds         = 30
	DefaultBatchBytes        = 1 << 20
	DefaultAckTimeout        = 30 * time.Second
	DefaultDoneWait          = 5 * time.Second
	DefaultFirstProgressWait = 2 * time.Second
	DefaultDoneAckWait       = 5 * time.Second
	DefaultLinkTimeout       = 3 * time.Second
	DefaultHybridRounds      = 2
	progressInterval         = 250 * time.Millisecond
)

// SendOptions configures the source side of a migration. The zero value is usable.
type SendOptions struct {
	DowntimeLimit time.Duration // expected downtime at which to stop and copy; default 300ms
	MaxBandwidth  int64         // bytes/s written to the connection; 0 = unlimited
	AutoConverge  bool          // throttle the guest (needs a Throttler) when it outruns the link
	Force         bool          // when pre-copy does not converge, stop and copy anyway (longer downtime) instead of failing
	Timeout       time.Duration // the whole migration; 0 = none
	MaxRounds     int           // live rounds before non-convergence; default 30
	// AckTimeout bounds each wait for an acknowledgement from the destination: of a live
	// round, counted from the round's end marker (the source still runs; past it the
	// migration fails), and of Complete, by Resumed (the source is paused; past it it
	// resumes). Default 30s.
	AckTimeout time.Duration
	// SwitchCost is the part of the downtime the engine cannot measure before it pauses:
	// saving the state on the source, restoring it and starting the vCPUs on the destination.
	// It is added to the expected downtime. A caller that migrated a similar VM before can
	// take it from that report (downtime_parts: state_ms, less the state's transfer, plus
	// restore_ms and start_ms). Default 0.
	SwitchCost time.Duration
	// DoneWait bounds the wait for the destination's Done (which carries the blackout) after
	// Resumed. Default 5s; the migration has succeeded either way.
	DoneWait   time.Duration
	BatchBytes int // page data per batch frame (rounded to pages); default 1 MiB
	Progress   func(Progress)
	Clock      Clock // default SystemClock

	// Mode is ModePrecopy (the default), ModePostcopy, ModeHybrid, ModeHandover (same host:
	// the Source must be MemoryFiles and conn a Unix socket that passes file descriptors) or
	// ModeSharedMemory (the Source must be SharedMemory, its memory in a memory file).
	Mode string
	// Prepage orders the post-copy push: PrepageSequential (default), PrepageBubble,
	// PrepageHot or PrepageNone.
	Prepage string
	// Hybrid switches to post-copy after HybridRounds live rounds (default 2), or once
	// pre-copy has run for HybridAfter (0 = no time bound), or as soon as pre-copy stops
	// converging, whichever comes first. If pre-copy converges before, it stops and copies.
	HybridRounds int
	HybridAfter  time.Duration
	// LinkTimeout: during post-copy, a connection on which nothing arrives for this long is
	// broken (both sides send keepalives). Default DefaultLinkTimeout.
	LinkTimeout time.Duration
	// Reconnect, when set, recovers a post-copy whose link broke after the switch; see
	// Reconnector. Without it such a migration fails, the source stays paused and keeps its
	// memory, and the report says so.
	Reconnect Reconnector
	// SampleBefore (pure post-copy) is how long the source watches the running guest before
	// it pauses: its dirty log, for PrepageHot, and its progress rate, for the report's
	// progress_rate_before. Default 0: DefaultHotSample with PrepageHot, else no wait (the rate
	// then covers only the handshake).
	SampleBefore time.Duration
	// ResumeID resumes the post-copy migration with that id (PostcopyReport.MigrationID) after
	// an earlier Send failed past the switch (ErrStranded): src is that migration's paused
	// source, and the destination's Receive still waits in its Reconnector. Send then skips
	// the handshake and the copy, rejoins over conn (or, if conn is nil or fails, over
	// Reconnect) and finishes the post-copy.
	ResumeID string

	// Streams is the number of connections pages travel on (see streams.go): the main one
	// and Streams-1 more, opened with DialStream, which the engine closes when Send returns.
	// They carry the pre-copy rounds and the post-copy push; the fault channel is one more.
	// 1: the main connection only. 0: in pre-copy, chosen by AutoStreams when DialStream is
	// set, and the choice reported (Report.StreamsChosen); else 1. A destination that cannot
	// take more (ReceiveOptions.AcceptStream unset) declines, and the pages take the main
	// connection.
	Streams    int
	DialStream func(ctx context.Context) (io.ReadWriter, error)
	// FaultChannel (post-copy and hybrid, with DialStream) sends the pages the destination
	// asks for on a connection of their own, so that they never wait behind pushed pages in
	// the main connection's buffers. A destination without AcceptStream declines it.
	FaultChannel bool

	// Compress is how pages that hold data are encoded: CompressNone (the default: raw),
	// CompressZstd (each page that shrinks by an eighth or more goes as a zstd frame; the
	// rest raw), CompressS2 (the same with S2 blocks: a quarter of zstd's CPU, larger pages)
	// or CompressAuto (zstd for the batches that follow one the bandwidth cap held back, raw
	// otherwise). A destination that declines it gets raw pages, and the report says so.
	// CompressLevel is the zstd level, one of compress.Levels; default compress.DefaultLevel.
	Compress      string
	CompressLevel string

	// IgnoreFreePages sends the pages the guest reports free (FreePageReporter) like any
	// other, to compare; by default they are not sent.
	IgnoreFreePages bool

	// Delta sends a page of a pre-copy round that changed little since the copy sent before
	// as its change (package delta), where that copy is still in a cache of DeltaCache bytes
	// (default DefaultDeltaCache); other pages go as they would without it. The destination
	// must read back its pages (PageReader) or it declines. Not in pure post-copy (no
	// rounds); in hybrid until the switch.
	Delta      bool
	DeltaCache uint64

	// Dedup sends a page whose content a page sent before holds at the destination as a
	// reference to that page (package dedup), checked there by SHA-256 before it is copied;
	// after a post-copy switch a reference that does not check (the destination's guest
	// changed the page named) is fetched again, whole. Demanded pages never go as references.
	// The source indexes up to DedupEntries contents (default dedup.DefaultEntries). The
	// destination must read back its pages (PageReader) or it declines. Not on a resume.
	Dedup        bool
	DedupEntries int
	// DedupHash, when set, replaces the index's fast hash: for tests that force collisions,
	// which the destination's SHA-256 check must catch.
	DedupHash dedup.HashFunc
}

// DefaultDeltaCache is the delta cache's size unless SendOptions.DeltaCache says (QEMU's
// XBZRLE cache has the same default).
const DefaultDeltaCache = 64 << 20

// Progress is a snapshot for a progress display, delivered after every round and at most
// every 250ms during one.
type Progress struct {
	Phase            string        `json:"phase"` // for display: what the sender does now
	Stage            Stage         `json:"stage"` // for callers that act on where it stands
	Round            int           `json:"round"`
	BytesWire        int64         `json:"bytes_wire"`
	DirtyRate        float64       `json:"dirty_rate"` // pages/s during the last finished round
	PagesRemaining   uint64        `json:"pages_remaining"`
	ExpectedDowntime time.Duration `json:"expected_downtime"`
	Throttle         int           `json:"throttle"`
	Elapsed          time.Duration `json:"elapsed"`
	// Post-copy (phase "postcopy" and after): pages sent by the background push and on the
	// destination's request so far, pages it requested (demand faults, counted at the source),
	// and reconnections.
	PagesPushed   uint64 `json:"pages_pushed,omitempty"`
	PagesDemanded uint64 `json:"pages_demanded,omitempty"`
	Requested     uint64 `json:"pages_requested,omitempty"`
	Reconnects    int    `json:"reconnects,omitempty"`
}

// Stage is where a migration stands for the source VM, in a Progress: what a caller may still
// do with it (Phase says what the sender is doing, for display).
type Stage int

const (
	// StageLive: the switch to post-copy has not begun (pre-copy, sampling). A failure or a
	// cancellation leaves the VM running here.
	StageLive Stage = iota
	// StageSwitched: the Switch is on its way or sent; the VM runs at the destination, which
	// needs this host's memory: it must never run here again, and Send does not give up while
	// it has a Reconnector.
	StageSwitched
	// StageRecovering: switched, and the link broke; Send is reconnecting and rejoining.
	StageRecovering
)

func (st Stage) String() string {
	switch st {
	case StageLive:
		return "live"
	case StageSwitched:
		return "switched"
	case StageRecovering:
		return "recovering"
	}
	return fmt.Sprintf("stage(%d)", int(st))
}

// MarshalText names the stage in JSON progress.
func (st Stage) MarshalText() ([]byte, error) { return []byte(st.String()), nil }

// UnmarshalText reads a stage's name.
func (st *Stage) UnmarshalText(b []byte) error {
	for s := StageLive; s <= StageRecovering; s++ {
		if string(b) == s.String() {
			*st = s
			return nil
		}
	}
	return fmt.Errorf("migration: unknown stage %q", b)
}

// Send migrates src over conn with pre-copy and returns a report, also on failure (then with
// a non-nil error, result "failed" or "cancelled", and the source running as before).
//
// conn should be a net.Conn: ctx cancellation, Timeout and the peer's Error frame interrupt
// blocked I/O through its deadline (which Send resets to none before returning). Send reads and
// writes conn but never closes it, unless conn has Close and no SetDeadline and must be
// interrupted.
//
// Once the destination acknowledges Complete with Resumed, the migration has succeeded: the
// source VM must not run again, and its memory may be released after Send returns.
func Send(ctx context.Context, src Source, conn io.ReadWriter, opts SendOptions) (*Report, error) {
	if opts.Mode == "" {
		opts.Mode = ModePrecopy
	}
	if opts.HybridRounds <= 0 {
		opts.HybridRounds = DefaultHybridRounds
	}
	if opts.LinkTimeout <= 0 {
		opts.LinkTimeout = DefaultLinkTimeout
	}
	rep := &Report{Side: "source", Mode: opts.Mode}
	var resumeID *wire.MigrationID
	bad := func(err error) (*Report, error) {
		rep.Result, rep.Error = ResultFailed, err.Error()
		return rep, err
	}
	switch opts.Mode {
	case ModePrecopy, ModePostcopy, ModeHybrid:
	case ModeHandover:
		if _, ok := src.(MemoryFiles); !ok {
			return bad(fmt.Errorf("%w: the source VM cannot hand its memory over (%T has no memory files)", ErrNoHandover, src))
		}
		if !wire.PassesFDs(conn) {
			return bad(fmt.Errorf("%w: the connection (%T) cannot pass file descriptors; a handover needs a Unix socket to a process on this host", ErrNoHandover, conn))
		}
		if opts.ResumeID != "" || opts.Streams > 1 {
			return bad(fmt.Errorf("migration: a handover sends no pages: it takes no resume or extra streams"))
		}
	case ModeSharedMemory:
		sm, ok := src.(SharedMemory)
		if !ok {
			return bad(fmt.Errorf("%w: the source VM has no memory on shared memory (%T)", ErrNoHandover, src))
		}
		if _, ok := sm.SharedMemoryID(); !ok {
			return bad(fmt.Errorf("%w: the source VM's memory is not in a memory file on shared memory (godwit run --memory-file)", ErrNoHandover))
		}
		if opts.ResumeID != "" || opts.Streams > 1 {
			return bad(fmt.Errorf("migration: a migration on shared memory sends no pages: it takes no resume or extra streams"))
		}
	default:
		return bad(fmt.Errorf("migration: unknown mode %q (want %s, %s, %s, %s or %s)", opts.Mode, ModePrecopy, ModePostcopy, ModeHybrid, ModeHandover, ModeSharedMemory))
	}
	if _, err := NewPrepager(opts.Prepage, nil, nil, nil); err != nil {
		return bad(err)
	}
	if base := src.Describe().Base; base != ([32]byte{}) && opts.Mode != ModePrecopy {
		return bad(fmt.Errorf("%w: the VM is a clone of template %x, which migrates by pre-copy only (its memory is the template's file mapped copy-on-write: no file to hand over or share, and post-copy cannot place pages into it); use mode %s", ErrNoBase, base[:6], ModePrecopy))
	}
	if opts.ResumeID != "" {
		id, err := wire.ParseMigrationID(opts.ResumeID)
		if err != nil {
			return bad(fmt.Errorf("migration: resume: %w", err))
		}
		if conn == nil && opts.Reconnect == nil {
			return bad(errors.New("migration: resume needs a connection or a Reconnect"))
		}
		resumeID = &id
	}
	switch {
	case opts.Streams < 0 || opts.Streams > wire.MaxStreams:
		return bad(fmt.Errorf("migration: %d streams: want 1..%d", opts.Streams, wire.MaxStreams))
	case opts.Streams >= wire.MaxStreams && opts.Mode != ModePrecopy && opts.FaultChannel:
		return bad(fmt.Errorf("migration: %d streams and a fault channel: want 1..%d streams", opts.Streams, wire.MaxStreams-1))
	case opts.Streams > 1 && opts.DialStream == nil:
		return bad(fmt.Errorf("migration: %d streams need DialStream", opts.Streams))
	}
	if opts.Streams == 0 && opts.Mode == ModePrecopy && opts.DialStream != nil && resumeID == nil {
		opts.Streams, rep.StreamsChosen = AutoStreams(runtime.NumCPU(), opts.MaxBandwidth)
	}
	if err := CheckCompress(opts.Compress, opts.CompressLevel); err != nil {
		return bad(fmt.Errorf("migration: %w", err))
	}
	if opts.Compress == "" {
		opts.Compress = CompressNone
	}
	var enc *compress.Encoder
	switch {
	case opts.Compress == CompressNone || resumeID != nil: // a resume sends what the destination still lacks, raw
	case opts.Compress == CompressS2:
		enc = compress.NewS2Encoder(int(src.Describe().Layout.PageSize))
	default:
		e, err := compress.NewEncoder(opts.CompressLevel, int(src.Describe().Layout.PageSize))
		if err != nil {
			return bad(fmt.Errorf("migration: %w", err))
		}
		enc = e
	}
	var dlt *delta.Encoder
	if opts.Delta && opts.Mode == ModePostcopy {
		rep.Delta = "off (pure post-copy has no rounds to send deltas in)"
	}
	if opts.Delta && opts.Mode != ModePostcopy && resumeID == nil {
		if opts.DeltaCache == 0 {
			opts.DeltaCache = DefaultDeltaCache
		}
		dlt = delta.NewEncoder(opts.DeltaCache, int(src.Describe().Layout.PageSize))
	}
	if opts.DowntimeLimit <= 0 {
		opts.DowntimeLimit = DefaultDowntimeLimit
	}
	if opts.MaxRounds <= 0 {
		opts.MaxRounds = DefaultMaxRounds
	}
	if opts.AckTimeout <= 0 {
		opts.AckTimeout = DefaultAckTimeout
	}
	if opts.DoneWait <= 0 {
		opts.DoneWait = DefaultDoneWait
	}
	if opts.BatchBytes <= 0 {
		opts.BatchBytes = DefaultBatchBytes
	}
	if opts.Clock == nil {
		opts.Clock = SystemClock{}
	}
	s := &sender{
		src:   src,
		link:  newLink(conn, false, wire.AtSource),
		conn0: conn,
		opts:  opts,
		clock: opts.Clock,
		rep:   rep,
		enc:   enc,
		delta: dlt,
	}
	if (opts.Mode != ModePrecopy && !memoryMode(opts.Mode)) || resumeID != nil {
		s.post = newPostcopyDriver(s, resumeID)
	}
	if dt, ok := src.(DirtyTracker); ok {
		rep.DirtyTracking = dt.DirtyTracking()
	}
	if sc, ok := src.(StopWindowScaler); ok {
		if rep.DowntimeScaling = sc.StopWindowScaling(); len(rep.DowntimeScaling) == 0 {
			rep.DowntimeScaling = []string{"none"}
		}
	}
	s.viewer, _ = src.(PageViewer)
	return s.run(ctx)
}

type inbound struct {
	msg wire.Msg
	err error
	at  time.Time // when the reader goroutine had it
}

// stateBytesPerComponent is the state size the expected downtime assumes for each component
// of the description, since the state cannot be saved (and measured) before the pause. A KVM
// vCPU's registers, FPU area, MSRs and local APIC come to a few KiB and most devices to far
// less, so this errs on the large side; at any useful bandwidth it is well under a millisecond
// per component.
const stateBytesPerComponent = 16 << 10

// sender is the source's side of one migration: the session that both drivers run on. It
// owns the connection (link) and the extra streams, the page batch and its classifier, the
// bandwidth cap, the report, and what must be undone if the migration fails before the
// destination runs the VM (pause, throttle, dirty log). The pre-copy driver (pre) runs the
// live rounds and the stop-and-copy; the post-copy driver (post) runs the switch, the push
// and demand service, reconnection and resume. A hybrid uses both, one after the other.
type sender struct {
	src   Source
	opts  SendOptions
	clock Clock
	link  *link         // the current connection
	conn0 io.ReadWriter // the caller's connection: the link may be replaced (post-copy)
	rep   *Report

	ctx    context.Context
	cancel context.CancelCauseFunc
	phase  string
	start  time.Time

	desc     Description
	wdesc    *wire.Description
	caps     wire.Caps // agreed in the handshake
	sizes    []uint64  // pages per region
	ps       int
	bufPages int
	pageBuf  // the next batch of the main connection
	cls      pages.Classifier
	enc      *compress.Encoder // SendOptions.Compress; installed in cls once the destination accepts
	delta    *delta.Encoder    // SendOptions.Delta; the same
	dedup    *dedup.Index      // SendOptions.Dedup, made once the layout is known; the same (each connection has its Lane)
	limit    limiter
	// urgentLimit paces requested pages to urgentShare of the cap: they never wait for the push,
	// but they may not take the whole cap either, so the push always moves.
	urgentLimit limiter
	limitMu     sync.Mutex // lanes share the limiters
	lanes       []*lane    // with extra streams: one per connection, the main one first
	free        chan *lane // idle lanes
	sent        uint64     // pages in all batches
	lastProg    time.Time
	rtt         time.Duration // shortest round trip seen: handshake, round acknowledgements

	// What a failure before the destination runs the VM undoes.
	logging  bool
	paused   bool
	throttle int

	viewer  PageViewer // the source's, if it offers views of its memory
	stopped bool       // the vCPUs are stopped (Pause returned), for good once acknowledged

	acked        bool // the destination runs the VM (Resumed)
	completeSent atomic.Bool
	bytesW       int64 // written on connections closed or replaced
	bytesR       int64 // read on connections replaced

	// Free page reporting (freepages.go): the Source's reporter if the guest reports, and
	// the pages reported free and not written since, as of the last fetch.
	reporter FreePageReporter
	freeSet  []Bitmap

	pre  *precopyDriver  // nil for pure post-copy and for a resume
	post *postcopyDriver // nil for pre-copy
}

func (s *sender) run(parent context.Context) (*Report, error) {
	s.start = s.clock.Now()
	ctx := parent
	if s.opts.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(parent, s.opts.Timeout, fmt.Errorf("%w after %v", ErrTimeout, s.opts.Timeout))
		defer cancel()
	}
	s.ctx, s.cancel = context.WithCancelCause(ctx)
	s.link.start(s.ctx)

	err := s.migrate()
	if err != nil && (s.lanes != nil || s.post != nil && s.post.fault != nil) {
		// No lane may write on the main connection while an Error frame goes out.
		s.closeStreams()
	}
	switch {
	case err != nil && !s.acked:
		err = s.fail(parent, err)
	case err != nil && s.afterSwitch() && !s.post.filled:
		// After the switch, before the destination has every page: the VM is split between
		// the hosts. Never resume; say how to finish.
		err = s.post.strand(parent, err)
	case err != nil:
		s.rep.Warnings = append(s.rep.Warnings, err.Error())
		err = nil
	}
	if err == nil {
		s.rep.Result = ResultOK
	}

	// Leave conn as we found it: no interruption pending, reader goroutine gone, no deadline.
	s.link.release()
	setDeadline(s.conn0, time.Time{})
	if s.post != nil {
		s.post.restoreLowat()
	}
	s.cancel(nil)
	if err == nil {
		s.closeStreams()
	}
	if s.enc != nil { // every lane is idle by now
		s.enc.Close()
	}
	if s.dedup != nil && s.rep.Dedup == "on" {
		s.rep.Dedup = fmt.Sprintf("on (%d distinct pages indexed)", s.dedup.Entries())
	}

	s.rep.TotalMS = ms(s.clock.Now().Sub(s.start))
	if s.post != nil && s.post.filled {
		s.rep.TotalMS = ms(s.post.filledAt.Sub(s.start))
	}
	s.rep.BytesWire = s.written()
	s.rep.BytesRead = s.bytesR + s.link.r.BytesRead()
	if s.post != nil {
		s.cls.Merge(&s.post.plain)
	}
	s.rep.Pages = pageCounts(&s.cls.Counters)
	s.rep.Saved = savedBytes(&s.cls, s.ps)
	s.rep.ThrottleMax = max(s.rep.ThrottleMax, s.throttle)
	return s.rep, err
}

// peerErrorGrace is how long a source whose write failed waits for the destination's Error
// frame, which says why, before it takes the write's error for the reason.
const peerErrorGrace = 200 * time.Millisecond

// fail turns err into the report's outcome and leaves the source running.
func (s *sender) fail(parent context.Context, err error) error {
	interrupted := s.ctx.Err() != nil
	var we *wire.WriteError
	if !interrupted && s.link.readerDone != nil && errors.As(err, &we) {
		// A write failed without a known cause. If the destination aborted, its Error frame
		// may be arriving right now: give the reader goroutine a moment to deliver the reason.
		t := time.NewTimer(peerErrorGrace)
		select {
		case <-s.link.readerDone:
		case <-t.C:
		}
		t.Stop()
		interrupted = s.ctx.Err() != nil
	}
	// A cancelled context makes blocked I/O fail with a timeout; its cause is the real reason.
	if interrupted {
		if cause := context.Cause(s.ctx); cause != nil {
			err = cause
		}
	}
	result := ResultFailed
	if parent.Err() != nil {
		result = ResultCancelled
		err = context.Cause(parent)
	}
	err = &phaseError{phase: s.phase, err: err}
	s.cancel(err)

	// A handover whose state went out, without the destination's word that it failed before
	// it ran the VM: it may have run it on the very memory this side would resume on. Stay
	// paused.
	var pe *wire.PeerError
	if memoryMode(s.opts.Mode) && s.completeSent.Load() && !errors.As(err, &pe) {
		err = fmt.Errorf("%w: %w; the destination may have run the VM on the memory handed over, so it stays paused here and must not run here again: see whether the destination runs it", ErrHandoverUndecided, err)
		s.paused = false // not to be resumed
	}
	// Restore the VM first: every millisecond here is downtime.
	var restore []error
	if s.paused {
		s.stopped = false // no view of its memory is in use any more: every lane is idle
		if e := s.src.Resume(); e != nil {
			restore = append(restore, fmt.Errorf("migration: resuming the source after failure: %w", e))
		} else {
			s.paused = false
		}
	}
	if s.throttle != 0 {
		if e := s.src.(Throttler).SetThrottle(0); e != nil {
			restore = append(restore, fmt.Errorf("migration: removing the throttle after failure: %w", e))
		}
		s.rep.ThrottleMax = max(s.rep.ThrottleMax, s.throttle)
		s.throttle = 0
	}
	if s.logging {
		if e := s.src.StopDirtyLog(); e != nil {
			restore = append(restore, fmt.Errorf("migration: stopping the dirty log after failure: %w", e))
		}
		s.logging = false
	}

	// Tell the destination why, unless it told us. Interruption set the deadline in the past;
	// give the Error frame a moment. A conn without deadlines is written to only if it was
	// not interrupted (it might block forever otherwise).
	s.link.intr.hold()
	// After a version or magic mismatch the peer cannot parse our frames: say nothing.
	if !errors.Is(err, wire.ErrPeer) && !errors.Is(err, wire.ErrVersion) && !errors.Is(err, wire.ErrMagic) && s.link.w.Err() == nil {
		if setDeadline(s.link.conn, time.Now().Add(time.Second)) || !interrupted {
			stop := s.drain()
			s.link.w.WriteError(errorCode(err, "source"), err.Error())
			stop()
		}
	}
	setDeadline(s.link.conn, longAgo) // unblock the reader goroutine

	if len(restore) > 0 {
		err = errors.Join(append([]error{err}, restore...)...)
	}
	s.rep.Result = result
	s.rep.Error = err.Error()
	return err
}

// drain reads and discards what the destination sends while the source writes its Error
// frame, if nothing else reads: the destination may be blocked writing a round
// acknowledgement, and on a transport without buffering (net.Pipe) it would never get to read
// the Error frame, nor the source to write it. It runs only when the reader goroutine has
// stopped (an interruption's deadline stops it) and conn has deadlines, by which the
// returned function stops it again.
func (s *sender) drain() (stop func()) {
	if s.link.readerDone != nil {
		select {
		case <-s.link.readerDone:
		default:
			return func() {} // the reader goroutine still reads
		}
	}
	if _, ok := s.link.conn.(deadliner); !ok {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			if _, err := s.link.conn.Read(buf); err != nil {
				return
			}
		}
	}()
	return func() {
		setDeadline(s.link.conn, longAgo)
		<-done
	}
}

func (s *sender) vmm(op string, err error) error {
	if err == nil {
		return nil
	}
	return &vmmError{side: "source", op: op, err: err}
}

// fetchDirty is the Source's FetchDirty, its bitmaps checked against the layout.
func (s *sender) fetchDirty() ([]Bitmap, error) {
	set, err := s.src.FetchDirty()
	if err := s.vmm("FetchDirty", err); err != nil {
		return nil, err
	}
	if err := checkBitmaps("FetchDirty", set, &s.desc.Layout); err != nil {
		return nil, err
	}
	return set, s.takeFree(set)
}

// populated is the Source's Populated, its bitmaps checked against the layout: the pages to
// send first. The others are counted as holes, and the pages the guest reported free are left
// out (dropFree).
func (s *sender) populated() ([]Bitmap, error) {
	set, err := s.src.Populated()
	if err := s.vmm("Populated", err); err != nil {
		return nil, err
	}
	if err := checkBitmaps("Populated", set, &s.desc.Layout); err != nil {
		return nil, err
	}
	skipped := pages.Hole
	if s.desc.Base != ([32]byte{}) {
		skipped = pages.Base
	}
	for r, bm := range set {
		s.cls.Counters.Add(skipped, s.sizes[r]-bm.Count(s.sizes[r]))
	}
	return s.dropFree(set), nil
}

// live returns the reason to stop if the migration was cancelled or the peer failed.
func (s *sender) live() error {
	if s.ctx.Err() != nil {
		return context.Cause(s.ctx)
	}
	return nil
}

func (s *sender) migrate() error {
	s.phase = "handshake"
	s.desc = s.src.Describe()
	wd := toWire(s.desc)
	if err := wd.Validate(); err != nil {
		return fmt.Errorf("migration: the source's description is invalid: %w", err)
	}
	s.ps = int(s.desc.Layout.PageSize)
	s.bufPages = max(1, min(s.opts.BatchBytes, wire.MaxFramePayload/2)/s.ps)
	s.buf = make([]byte, s.bufPages*s.ps)
	s.limit = limiter{rate: float64(s.opts.MaxBandwidth), burst: 10 * time.Millisecond, clock: s.clock}
	s.urgentLimit = limiter{rate: float64(s.opts.MaxBandwidth) * urgentShare, burst: 10 * time.Millisecond, clock: s.clock}
	s.sizes = make([]uint64, len(s.desc.Layout.Regions))
	for r := range s.sizes {
		s.sizes[r] = s.regionPages(r)
	}
	if s.post != nil && s.opts.Prepage == PrepageHot {
		s.post.heat = make([][]uint32, len(s.sizes))
	}
	if s.post != nil && s.post.resumeID != nil {
		return s.post.resume()
	}
	if s.opts.Dedup {
		s.dedup = dedup.NewIndex(s.sizes, s.opts.DedupEntries)
		if s.opts.DedupHash != nil {
			s.dedup.SetHash(s.opts.DedupHash)
		}
	}
	if s.opts.Mode != ModePostcopy {
		s.pre = newPrecopyDriver(s) // before the reader goroutine, which checks its rounds
	}
	var offered wire.Caps
	if s.desc.Base != ([32]byte{}) {
		offered |= wire.CapBase
	}
	switch s.opts.Mode {
	case ModeHandover:
		offered |= wire.CapHandover
	case ModeSharedMemory:
		offered |= wire.CapShared
	}
	pc, heartbeats := s.src.(ProgressClock)
	if heartbeats {
		offered |= wire.CapBlackout
	}
	if s.post != nil {
		offered |= wire.CapPostcopy
		if s.opts.Mode == ModePostcopy {
			offered |= wire.CapAhead
		}
	}
	if s.opts.Streams > 1 || (s.post != nil && s.opts.FaultChannel && s.opts.DialStream != nil) {
		offered |= wire.CapStreams
	}
	switch {
	case s.enc != nil && s.enc.Kind() == pages.S2:
		offered |= wire.CapS2
	case s.enc != nil:
		offered |= wire.CapCompressed
	}
	if s.delta != nil {
		offered |= wire.CapDelta
	}
	if s.dedup != nil {
		offered |= wire.CapDedup
	}
	if s.post != nil {
		s.post.sampleProgress(true)
	}

	// The handshake strictly alternates (preamble, preamble, Hello, Welcome), so it works on
	// unbuffered transports too, and a version mismatch stops both sides before the Hello.
	t0 := s.clock.Now()
	if err := s.link.w.WritePreamble(); err != nil {
		return err
	}
	v, err := s.link.r.ReadPreamble()
	if err != nil {
		return err
	}
	// The destination answers our preamble as soon as it has read it: one round trip, plus
	// whatever delayed its start. An upper bound that the round acknowledgements refine.
	s.rtt = s.clock.Now().Sub(t0)
	s.rep.ProtocolVersion = v
	if err := s.link.w.WriteHello(&wire.Hello{Caps: offered, Desc: wd}); err != nil {
		return err
	}
	s.link.r.SetOffered(offered)
	s.link.r.SetDescription(&wd)
	s.wdesc = &wd
	m, err := s.link.r.Next()
	if err != nil {
		return err
	}
	welcome, ok := m.(*wire.Welcome)
	if !ok {
		return unexpected(m, "welcome")
	}
	s.caps = welcome.Caps
	switch {
	case s.enc != nil && s.enc.Kind() == pages.S2 && welcome.Caps&wire.CapS2 != 0:
		s.cls.Encoders = []pages.Encoder{s.enc} // before the lanes copy them
		s.rep.Compression = CompressS2
	case s.enc != nil && s.enc.Kind() == pages.Compressed && welcome.Caps&wire.CapCompressed != 0:
		s.cls.Encoders = []pages.Encoder{s.enc}
		s.rep.Compression = fmt.Sprintf("%s (%s)", CompressZstd, s.enc.Level())
		if s.opts.Compress == CompressAuto {
			s.rep.Compression = fmt.Sprintf("%s: %s (%s) while the bandwidth cap holds pages back", CompressAuto, CompressZstd, s.enc.Level())
		}
	case s.enc != nil:
		declined := CompressZstd
		if s.enc.Kind() == pages.S2 {
			declined = CompressS2
		}
		s.rep.Compression = fmt.Sprintf("%s (the destination declined %s)", CompressNone, declined)
	}
	switch {
	case s.delta != nil && welcome.Caps&wire.CapDelta != 0:
		// First: a page that changed little goes smaller as a delta than compressed.
		s.cls.Encoders = append([]pages.Encoder{s.delta}, s.cls.Encoders...)
		s.rep.Delta = fmt.Sprintf("on (a cache of %d pages)", s.delta.Cache().Pages())
	case s.delta != nil:
		s.rep.Delta = "off (the destination declined it)"
		s.delta = nil
	}
	switch {
	case s.dedup != nil && welcome.Caps&wire.CapDedup != 0:
		// First of all: a reference is the smallest form of a page. The main connection is
		// lane 0; newLane gives each connection its own.
		s.cls.Encoders = append([]pages.Encoder{s.dedup.Lane(0)}, s.cls.Encoders...)
		s.rep.Dedup = "on"
	case s.dedup != nil:
		s.rep.Dedup = "off (the destination declined it)"
		s.dedup = nil
	}
	if s.post != nil && welcome.Caps&wire.CapPostcopy == 0 {
		return fmt.Errorf("%w: mode %s needs post-copy, and the destination does not support it (it declined the capability: its VMM cannot demand-page); migrate with mode %s", ErrNoPostcopy, s.opts.Mode, ModePrecopy)
	}
	if s.opts.Mode == ModeHandover && welcome.Caps&wire.CapHandover == 0 {
		return fmt.Errorf("%w: the destination declined it (it is another host, or its VMM cannot map memory it is given); migrate with mode %s", ErrNoHandover, ModePrecopy)
	}
	if s.desc.Base != ([32]byte{}) && welcome.Caps&wire.CapBase == 0 {
		return fmt.Errorf("%w: the VM is a clone of template %x, which the destination does not hold; push it there first (godwit template push)", ErrNoBase, s.desc.Base)
	}
	if s.opts.Mode == ModeSharedMemory && welcome.Caps&wire.CapShared == 0 {
		return fmt.Errorf("%w: the destination maps no shared memory file (start it with godwit run --incoming ... --memory-file PATH, the same memory); migrate with mode %s to copy the memory", ErrNoHandover, ModePrecopy)
	}
	s.startReader()
	if memoryMode(s.opts.Mode) {
		return s.handover(&switchCtx{heartbeats: heartbeats && welcome.Caps&wire.CapBlackout != 0, pc: pc})
	}
	switch {
	case welcome.Caps&wire.CapStreams != 0:
		if err := s.openStreams(); err != nil {
			return err
		}
	case s.opts.Streams > 1 && s.rep.StreamsChosen != "":
		s.rep.StreamsChosen += "; the destination takes one connection only"
	case s.opts.Streams > 1:
		s.rep.Warnings = append(s.rep.Warnings, fmt.Sprintf("migration: the destination takes one connection only; %d streams asked for", s.opts.Streams))
	}
	ctx := &switchCtx{heartbeats: heartbeats && welcome.Caps&wire.CapBlackout != 0, pc: pc}

	if s.opts.Mode == ModePostcopy {
		return s.post.switchover(ctx, nil, "")
	}
	return s.pre.run(ctx)
}

// switchCtx carries what the end of a migration needs from its beginning.
type switchCtx struct {
	heartbeats bool // the blackout can be measured
	pc         ProgressClock
	pauseAt    time.Time
	lastBeat   time.Time
	finalAt    time.Time // the last page before the state was written
}

// union adds the pages of b to a, which it returns. Both are the engine's (the Source's
// bitmaps are, once returned): a copy would cost an allocation the size of memory's bitmap
// in the stop window.
func union(a, b []Bitmap) []Bitmap {
	for r := range a {
		a[r].Or(b[r])
	}
	return a
}

// complete saves and sends the state (the source is paused), ends the stream with Complete
// and waits for the destination's Resumed (the point of no return) and Done.
func (s *sender) complete(ctx *switchCtx) error {
	s.phase = "state"
	secs, err := s.src.SaveState()
	if err := s.vmm("SaveState", err); err != nil {
		return err
	}
	if err := checkSections(secs, s.desc.Devices); err != nil {
		return err
	}
	for i := range secs {
		ws := wire.Section{ID: secs[i].ID, Version: secs[i].Version, Data: secs[i].Data}
		if err := s.link.w.WriteSection(&ws, 0); err != nil {
			return err
		}
	}
	if err := s.live(); err != nil {
		return err
	}
	// Mark before writing: the destination may answer before WriteComplete returns.
	s.completeSent.Store(true)
	if err := s.link.w.WriteComplete(&wire.Complete{PauseUnixNano: ctx.pauseAt.UnixNano(), Pages: s.sent, Sections: uint32(len(secs))}); err != nil {
		return err
	}
	completeAt := s.clock.Now()

	s.phase = "waiting for resumed"
	s.report(false)
	m, err := s.await(s.opts.AckTimeout, "resumed")
	if err != nil {
		return err
	}
	res, ok := m.(*wire.Resumed)
	if !ok {
		return unexpected(m, "resumed")
	}
	// The point of no return: the destination runs. From here on nothing makes the source
	// resume, and failures are only warnings (in post-copy, until the destination has every page,
	// they are failures that leave the source paused).
	s.acked = true
	s.paused = false
	ackAt := s.clock.Now()
	downtime, parts := splitDowntime(ctx.pauseAt, ctx.finalAt, completeAt, ackAt, res)
	s.rep.DowntimeMS, s.rep.Downtime = ms(downtime), parts
	s.rep.PauseToAckMS = ms(ackAt.Sub(ctx.pauseAt))
	s.stopLogging()

	if s.afterSwitch() {
		return s.post.run(ctx)
	}
	s.phase = "waiting for done"
	m, err = s.await(s.opts.DoneWait, "done")
	if err == nil {
		if done, ok := m.(*wire.Done); !ok {
			err = unexpected(m, "done")
		} else {
			s.blackout(ctx, done)
		}
	}
	// Acknowledge even without Done: the destination keeps running either way, and DoneAck
	// tells it that the source will not run again.
	s.phase = "done ack"
	return errors.Join(err, s.link.w.WriteDoneAck())
}

// stopLogging ends dirty logging once the VM runs at the destination, outside the stop
// window; a failure is only a warning then.
func (s *sender) stopLogging() {
	if !s.logging {
		return
	}
	if err := s.vmm("StopDirtyLog", s.src.StopDirtyLog()); err != nil {
		s.rep.Warnings = append(s.rep.Warnings, fmt.Sprintf("migration: after the switch: %v", err))
	}
	s.logging = false
}

// blackout computes the blackout from the destination's Done.
func (s *sender) blackout(ctx *switchCtx, done *wire.Done) {
	if done.FirstProgressUnixNano != 0 && ctx.heartbeats && !ctx.lastBeat.IsZero() {
		b := ms(time.Duration(done.FirstProgressUnixNano - ctx.lastBeat.UnixNano()))
		s.rep.BlackoutMS = &b
	}
}

// startReader reads the destination's frames in the background, so that an Error frame stops
// the sender at once instead of after its next failed write.
func (s *sender) startReader() {
	inbox := make(chan inbound, 4)
	done := make(chan struct{})
	s.link.inbox, s.link.readerDone = inbox, done
	r, lcancel := s.link.r, s.link.cancel // this link's, not its successor's
	go func() {
		defer close(done)
		// After the switch, the connection may fail without failing the migration.
		post := s.post != nil && s.post.postLink.Load()
		for {
			m, err := r.Next()
			if err == nil {
				switch m := m.(type) {
				case *wire.Resumed:
					if !s.completeSent.Load() {
						err = fmt.Errorf("%w: the destination sent resumed before complete", ErrProtocol)
					} else if s.afterSwitch() {
						post = true
						s.post.postLink.Store(true)
					}
				case *wire.RoundAck:
					// Also what bounds the acknowledgements waiting in the inbox: the sender
					// takes each before it ends the next round.
					if ended := s.pre.endedRound(); m.N > ended {
						err = fmt.Errorf("%w: the destination acknowledged round %d, but the source has ended only %d", ErrProtocol, m.N, ended)
					}
				case *wire.Request:
					if post {
						s.post.dq.push(m)
						continue
					}
				case *wire.Keepalive:
					continue
				}
			}
			if err != nil {
				if post {
					lcancel(err)
				} else {
					s.cancel(err)
				}
				// Never block here: whoever waits also watches the context just cancelled.
				select {
				case inbox <- inbound{err: err}:
				default:
				}
				return
			}
			inbox <- inbound{msg: m, at: s.clock.Now()}
			if _, ok := m.(*wire.Done); ok {
				return // the destination's last frame
			}
		}
	}()
}

// await waits for the next message from the destination.
func (s *sender) await(timeout time.Duration, what string) (wire.Msg, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case in := <-s.link.inbox:
		return in.msg, in.err
	case <-t.C:
		return nil, fmt.Errorf("%w: no %s from the destination within %v", ErrTimeout, what, timeout)
	case <-s.ctx.Done():
		return nil, context.Cause(s.ctx)
	}
}

func (s *sender) regionPages(r int) uint64 {
	return s.desc.Layout.Regions[r].Size / s.desc.Layout.PageSize
}

func (s *sender) count(set []Bitmap) uint64 {
	var n uint64
	for r, bm := range set {
		n += bm.Count(s.regionPages(r))
	}
	return n
}

// roundPlan walks the pages of a round region by region, in runs, and remembers where it
// stopped, so that a round's first batch can be read before the round starts.
type roundPlan struct {
	set   []Bitmap
	pages uint64 // pages in set
	r     int    // the region being walked
	next  uint64 // its first page not taken yet
}

func (s *sender) plan(set []Bitmap) *roundPlan { return &roundPlan{set: set, pages: s.count(set)} }

// pageBuf holds the pages of one batch and the batch they are encoded into: copies read into
// buf, or views of guest memory while the source is stopped (viewPages).
type pageBuf struct {
	buf     []byte
	used    int    // pages in the next batch
	copied  int    // pages of buf holding copies for it
	spans   []span // the runs of pages in the batch, all of region, in order
	region  uint32
	batch   wire.OutBatch
	scratch []byte
	// capHeld: the bandwidth cap held the last batch back, so the link, not the CPU, is the
	// limit; CompressAuto compresses the next one.
	capHeld bool
}

// span is a run of pages of the batch and their data.
type span struct {
	first, count uint64
	data         []byte
}

// reset empties b.
func (b *pageBuf) reset() {
	b.used, b.copied, b.spans = 0, 0, b.spans[:0]
}

// take adds k pages of region r from first to b: a view of guest memory where the source's
// memory no longer changes and the VMM offers one (no copy: classified, checksummed and
// written from guest memory itself), else a copy read into b's buffer.
func (s *sender) take(b *pageBuf, r int, first uint64, k int) error {
	var data []byte
	if s.stopped && s.viewer != nil {
		data = s.viewer.ViewPages(r, first, uint64(k))
	}
	if data == nil {
		data = b.buf[b.copied*s.ps : (b.copied+k)*s.ps]
		if err := s.src.ReadPages(r, first, data); err != nil {
			return s.vmm(fmt.Sprintf("ReadPages(region %d, page %d, %d pages)", r, first, k), err)
		}
		b.copied += k
	}
	b.spans = append(b.spans, span{first: first, count: uint64(k), data: data})
	b.used += k
	return nil
}

// readInto reads the plan's next pages into the empty b: up to a buffer's worth, all of one
// region, since a batch names one region. It leaves b empty at the plan's end.
func (s *sender) readInto(p *roundPlan, b *pageBuf) error {
	for ; p.r < len(p.set); p.r, p.next = p.r+1, 0 {
		n, bm := s.regionPages(p.r), p.set[p.r]
		for b.used < s.bufPages {
			first, ok := bm.next(p.next, n, true)
			if !ok {
				break
			}
			end, _ := bm.next(first, n, false)
			k := min(end-first, uint64(s.bufPages-b.used))
			if err := s.take(b, p.r, first, int(k)); err != nil {
				return err
			}
			p.next = first + k
		}
		if b.used > 0 {
			b.region = uint32(p.r)
			return nil
		}
	}
	return nil
}

// encode classifies b's pages (ps bytes each) with cls into b.batch; with auto, cls's
// encoders are tried only when the cap held the last batch back.
func (b *pageBuf) encode(cls *pages.Classifier, ps int, auto bool) {
	cls.Raw = auto && !b.capHeld
	b.batch.Reset(b.region, ps)
	b.scratch = b.scratch[:0]
	for _, sp := range b.spans {
		for i := range sp.count {
			pg := sp.data[int(i)*ps : int(i+1)*ps]
			kind, data := cls.Classify(pages.Ref{Region: int(b.region), Index: sp.first + i}, pg, &b.scratch)
			b.batch.Add(sp.first+i, wire.Encoding(kind), data)
		}
	}
}

// discard forgets the pages in the batch buffer.
func (s *sender) discard() { s.pageBuf.reset() }

// flush classifies the pages in the batch buffer and writes them as one batch, paced by the
// bandwidth cap. Classification waits until here so that pages read ahead and then discarded
// are never counted (and never seen by an encoder that keeps history).
func (s *sender) flush() error { return s.flushOn(s.link.w, &s.cls, false) }

// flushOn is flush on the writer w (the main connection's, or the fault channel's), with the
// classifier cls. Urgent pages (demanded in post-copy: a vCPU waits for them) are counted
// against the cap but not held back by the push's use of it: the push that follows pays for
// them. They wait only when they alone exceed urgentShare of the cap.
func (s *sender) flushOn(w *wire.Writer, cls *pages.Classifier, urgent bool) error {
	if s.used == 0 {
		return nil
	}
	if err := s.link.err(); err != nil {
		return err
	}
	s.encode(cls, s.ps, s.opts.Compress == CompressAuto)
	n := s.batch.PayloadLen() + wire.HeaderSize
	s.limitMu.Lock() // post-copy's push lanes share it meanwhile
	hold := s.limit.reserve(n)
	if urgent {
		hold = s.urgentLimit.reserve(n)
	}
	s.limitMu.Unlock()
	s.capHeld = hold > 0
	if s.capHeld {
		if err := s.clock.Sleep(s.link.ctx, hold); err != nil {
			return err
		}
	}
	if err := w.WritePages(&s.batch); err != nil {
		if w != s.link.w {
			return fmt.Errorf("the fault channel: %w", err)
		}
		return err
	}
	s.sent += uint64(s.batch.Pages())
	s.batch.Reset(s.region, s.ps)
	s.discard()
	s.scratch = s.scratch[:0]
	s.report(false)
	return nil
}

// report calls the progress callback: always when forced, else at most every progressInterval.
func (s *sender) report(force bool) {
	if s.post != nil {
		s.post.sampleProgress(false)
	}
	if s.opts.Progress == nil {
		return
	}
	now := s.clock.Now()
	if !force && now.Sub(s.lastProg) < progressInterval {
		return
	}
	s.lastProg = now
	p := Progress{Phase: s.phase, BytesWire: s.written(), Throttle: s.throttle, Elapsed: now.Sub(s.start)}
	if s.pre != nil {
		s.pre.progress(&p)
	}
	if s.post != nil {
		s.post.progress(&p)
	}
	s.opts.Progress(p)
}

// afterSwitch says whether the Switch was sent: the VM may run at the destination.
func (s *sender) afterSwitch() bool { return s.post != nil && s.post.switched }

// checkSections verifies that SaveState returned each listed component at most once.
func checkSections(secs []Section, devices []string) error {
	seen := make(map[string]bool, len(secs))
	for i, s := range secs {
		if !slices.Contains(devices, s.ID) {
			return fmt.Errorf("migration: SaveState: section %d %q is not in the description's devices %q", i, s.ID, devices)
		}
		if seen[s.ID] {
			return fmt.Errorf("migration: SaveState: section %q returned twice", s.ID)
		}
		seen[s.ID] = true
		if len(s.Data) > wire.MaxSectionSize {
			return fmt.Errorf("migration: SaveState: section %q has %d bytes, at most %d", s.ID, len(s.Data), wire.MaxSectionSize)
		}
	}
	return nil
}

// handover moves the VM without its memory (ModeHandover, ModeSharedMemory): the memory's files
// go to the destination (or the id of the memory file both hosts map), which maps them while
// the guest still runs here; once it says so, the source
// pauses and sends only the state. From the pause on, neither side touches memory until the
// destination runs.
func (s *sender) handover(ctx *switchCtx) error {
	s.phase = "handover"
	m := &wire.Memory{}
	for _, r := range s.desc.Layout.Regions {
		m.Sizes = append(m.Sizes, r.Size)
	}
	var fds []int
	if s.opts.Mode == ModeHandover {
		var err error
		fds, err = s.src.(MemoryFiles).MemoryFDs()
		if err := s.vmm("MemoryFDs", err); err != nil {
			return err
		}
	} else {
		m.ID, _ = s.src.(SharedMemory).SharedMemoryID()
	}
	if err := s.link.w.WriteMemory(m, fds); err != nil {
		return err
	}
	s.rep.Handover = &HandoverReport{Files: len(fds), Bytes: s.memoryBytes()}
	if s.opts.Mode == ModeSharedMemory {
		s.rep.Handover.SharedMemory = hex.EncodeToString(m.ID[:])
	}
	s.rep.DowntimeScaling = []string{"none"} // no page moves in the stop window
	s.phase = "waiting for memory ack"
	ack, err := s.await(s.opts.AckTimeout, "memory ack")
	if err != nil {
		return err
	}
	if _, ok := ack.(*wire.MemoryAck); !ok {
		return unexpected(ack, "memory ack")
	}
	s.rep.Handover.MappedMS = ms(s.clock.Now().Sub(s.start))
	s.phase = "pause"
	if err := s.live(); err != nil {
		return err
	}
	s.paused = true // before the call: see precopyDriver.run
	if err := s.vmm("Pause", s.src.Pause()); err != nil {
		return err
	}
	s.stopped = true
	ctx.pauseAt = s.clock.Now()
	if ctx.heartbeats {
		ctx.lastBeat = ctx.pc.LastProgress()
	}
	ctx.finalAt = ctx.pauseAt
	return s.complete(ctx)
}

// memoryBytes is the size of guest memory.
func (s *sender) memoryBytes() uint64 {
	var n uint64
	for _, r := range s.desc.Layout.Regions {
		n += r.Size
	}
	return n
}
