package migration

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/godwit-vm/godwit/migration/pages"
	"github.com/godwit-vm/godwit/migration/wire"
)

// ReceiveOptions configures the destination side. The zero value is usable.
type ReceiveOptions struct {
	Timeout time.Duration // the whole migration; 0 = none
	// FirstProgressWait bounds the wait for the guest's first heartbeat after Start (for the
	// blackout); in post-copy, after the last page arrived. Default 2s.
	FirstProgressWait time.Duration
	// DoneAckWait bounds the wait for the source's DoneAck after Done. Default 5s.
	DoneAckWait time.Duration
	Clock       Clock // default SystemClock
	// LinkTimeout and Reconnect are the destination's side of post-copy recovery (see
	// SendOptions). Without Reconnect, a link that breaks after the switch leaves the
	// destination's vCPUs blocked on missing pages and Receive fails.
	LinkTimeout time.Duration
	Reconnect   Reconnector
	// AcceptStream returns the next connection that arrives for this migration's extra page
	// streams (SendOptions.Streams); the engine checks that it belongs to this migration and
	// closes it when Receive returns. Unset: the destination takes one connection only.
	// StreamWait bounds the wait for them and for the pages they carry; default
	// DefaultStreamWait.
	AcceptStream func(ctx context.Context) (io.ReadWriter, error)
	StreamWait   time.Duration
}

// Receive fills dst from a pre-copy stream on conn and starts it. It returns a report, also on
// failure; then dst has been aborted, unless it was already running and acknowledged (see
// below), and the source was told why with an Error frame where possible (on a TCP
// connection, Receive then shuts down its sending side and drains the source's data for up to a
// second, so that the Error frame is not lost to a reset).
//
// After Start, Receive acknowledges with Resumed. If that write fails, the source cannot know
// the destination runs and will resume itself, so dst is aborted. If the source answers the
// acknowledgement with an Error frame instead of DoneAck, it has resumed: dst is aborted too.
// If the connection just ends, dst keeps running and the report carries a warning: which side
// owns the VM then is for the layer above to settle (see the package documentation).
func Receive(ctx context.Context, dst Destination, conn io.ReadWriter, opts ReceiveOptions) (*Report, error) {
	if opts.FirstProgressWait <= 0 {
		opts.FirstProgressWait = DefaultFirstProgressWait
	}
	if opts.DoneAckWait <= 0 {
		opts.DoneAckWait = DefaultDoneAckWait
	}
	if opts.Clock == nil {
		opts.Clock = SystemClock{}
	}
	if opts.LinkTimeout <= 0 {
		opts.LinkTimeout = DefaultLinkTimeout
	}
	if opts.StreamWait <= 0 {
		opts.StreamWait = DefaultStreamWait
	}
	rc := &receiver{
		dst:   dst,
		link:  newLink(conn, false, wire.AtDestination),
		opts:  opts,
		clock: opts.Clock,
		rep:   &Report{Side: "destination", Mode: "precopy"},
	}
	return rc.run(ctx)
}

type receiver struct {
	// discarded delivers the result of StaleDiscarder.DiscardStale while it runs (nil when
	// not started or already collected).
	discarded chan error
	dst       Destination
	link      *link // the caller's connection; after a post-copy's first break, pcRecv has its own
	opts      ReceiveOptions
	clock     Clock
	rep       *Report

	ctx      context.Context
	cancel   context.CancelCauseFunc
	phase    string
	prepared bool
	resumed  bool // Resumed was written: the source may consider the migration done
	started  bool // Start was called: the VM may have run here
	codec    *pageCodec
	pl       placing // the main connection's (and, after a rejoin, post-copy's current one's)
	round    *RoundReport
	roundAt  time.Time
	roundB0  int64

	// Post-copy.
	switchID wire.MigrationID
	missing  []Bitmap // the Switch set (with the Ahead set), once one arrived
	switched bool     // a Switch arrived
	wdesc    *wire.Description
	caps     wire.Caps
	pc       *pcRecv // after Resumed in post-copy

	streams    *recvStreams           // extra page connections, once announced
	pcPlace    atomic.Pointer[pcRecv] // post-copy, from before Start: where the fault channel's pages go
	finalPages uint64                 // pages of the final round, as its Round announced them
}

func (rc *receiver) run(parent context.Context) (*Report, error) {
	start := rc.clock.Now()
	ctx := parent
	if rc.opts.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(parent, rc.opts.Timeout, fmt.Errorf("%w after %v", ErrTimeout, rc.opts.Timeout))
		defer cancel()
	}
	rc.ctx, rc.cancel = context.WithCancelCause(ctx)
	rc.link.start(rc.ctx)

	err := rc.migrate()
	var pe *wire.PeerError
	switch {
	case err == nil:
		rc.rep.Result = ResultOK
	case rc.pc != nil && !errors.As(err, &pe) && !rc.pc.isComplete():
		// Post-copy, pages missing: the VM runs here and waits for them. Keep it.
		err = rc.pc.strand(parent, err)
	case rc.resumed && !errors.As(err, &pe):
		// Running and acknowledged; the source may have released its copy.
		rc.rep.Result = ResultOK
		rc.rep.Warnings = append(rc.rep.Warnings, err.Error())
		err = nil
	default:
		err = rc.fail(parent, err)
	}
	rc.link.release()
	var bw, br int64
	br += rc.closeStreams()
	if rc.pc != nil {
		bw, br = rc.pc.close()
	}
	rc.codec.close()
	rc.cancel(nil)

	rc.rep.TotalMS = ms(rc.clock.Now().Sub(start))
	rc.rep.BytesWire = bw + rc.link.w.Written()
	rc.rep.BytesRead = br + rc.link.r.BytesRead()
	rc.rep.Pages = pageCounts(&rc.pl.counts)
	return rc.rep, err
}

func (rc *receiver) fail(parent context.Context, err error) error {
	interrupted := rc.ctx.Err() != nil
	if interrupted {
		if cause := context.Cause(rc.ctx); cause != nil {
			err = cause
		}
	}
	result := ResultFailed
	if parent.Err() != nil {
		result = ResultCancelled
		err = context.Cause(parent)
	}
	err = &phaseError{phase: rc.phase, err: err}
	rc.cancel(err)
	if rc.prepared {
		rc.dst.Abort()
	}
	rc.link.intr.hold()
	// A handover's source resumes on the memory handed over when this side says it failed:
	// once the VM may have run here, say nothing (the source then stays paused).
	ran := rc.caps&(wire.CapHandover|wire.CapShared) != 0 && rc.started
	// After a version or magic mismatch the peer cannot parse our frames: say nothing.
	if !ran && !errors.Is(err, wire.ErrPeer) && !errors.Is(err, wire.ErrVersion) && !errors.Is(err, wire.ErrMagic) && rc.link.w.Err() == nil {
		if setDeadline(rc.link.conn, time.Now().Add(time.Second)) || !interrupted {
			if rc.link.w.WriteError(errorCode(err, "destination"), err.Error()) == nil {
				rc.linger()
			}
		}
	}
	rc.rep.Result = result
	rc.rep.Error = err.Error()
	return err
}

// linger makes sure the source can read the Error frame just written. The source is probably
// still sending; if the caller closed conn now with unread data in it, TCP would answer with a
// reset, and a reset discards the Error frame at the source before it is read. So: send FIN,
// then read and discard until the source closes or a second passes.
func (rc *receiver) linger() {
	cw, ok := rc.link.conn.(interface{ CloseWrite() error })
	if !ok || !setDeadline(rc.link.conn, time.Now().Add(time.Second)) {
		return
	}
	cw.CloseWrite()
	io.Copy(io.Discard, rc.link.conn)
}

func (rc *receiver) vmm(op string, err error) error {
	if err == nil {
		return nil
	}
	return &vmmError{side: "destination", op: op, err: err}
}

func (rc *receiver) migrate() error {
	rc.phase = "handshake"
	// Read the source's preamble first, then answer with ours even if the versions do not
	// match, so that the source reports the mismatch as well.
	v, err := rc.link.r.ReadPreamble()
	if werr := rc.link.w.WritePreamble(); err == nil && werr != nil {
		return werr
	}
	if err != nil {
		return err
	}
	rc.rep.ProtocolVersion = v
	m, err := rc.link.r.Next()
	if err != nil {
		return err
	}
	hello, ok := m.(*wire.Hello)
	if !ok {
		return unexpected(m, "hello")
	}
	desc := fromWire(&hello.Desc)
	var supported wire.Caps
	fp, heartbeats := rc.dst.(FirstProgress)
	if heartbeats {
		supported |= wire.CapBlackout
	}
	pd, demandPaging := rc.dst.(PostcopyDestination)
	if demandPaging {
		supported |= wire.CapPostcopy | wire.CapAhead
	}
	if rc.opts.AcceptStream != nil {
		supported |= wire.CapStreams
	}
	supported |= wire.CapCompressed | wire.CapS2
	old, readsBack := rc.dst.(PageReader)
	if readsBack {
		supported |= wire.CapDelta | wire.CapDedup
	}
	ad, adopts := rc.dst.(MemoryAdopter)
	ft, takesFiles := rc.link.conn.(fdTaker)
	if adopts && takesFiles {
		supported |= wire.CapHandover
	}
	if _, ok := rc.dst.(SharedMemoryAdopter); ok {
		supported |= wire.CapShared
	}
	var noBase error
	if hello.Caps&wire.CapBase != 0 {
		bh, ok := rc.dst.(BaseHolder)
		switch {
		case !ok:
			noBase = fmt.Errorf("%w: the source's VM is a clone of template %x, and this VMM cannot start from a template", ErrNoBase, desc.Base)
		default:
			if err := bh.HasBase(desc.Base); err != nil {
				noBase = fmt.Errorf("%w: the source's VM is a clone of template %x: %v", ErrNoBase, desc.Base, err)
			} else {
				supported |= wire.CapBase
			}
		}
	}
	accepted := hello.Caps & supported
	memory := accepted & (wire.CapHandover | wire.CapShared)
	if memory == wire.CapHandover|wire.CapShared {
		return fmt.Errorf("%w: the source offered a handover and shared memory at once", ErrProtocol)
	}
	if memory != 0 {
		accepted &= memory | wire.CapBlackout // no pages travel: nothing else applies
	}
	if noBase != nil {
		// Declining the base tells the source why nothing can follow; no VM is built here.
		rc.link.w.WriteWelcome(&wire.Welcome{Caps: accepted})
		return noBase
	}
	rc.caps = accepted
	rc.wdesc = &hello.Desc
	codec, err := newPageCodec(accepted, rc.wdesc, old)
	if err != nil {
		return err
	}
	rc.codec = codec

	if memory == 0 {
		rc.phase = "prepare"
		rc.prepared = true
		if err := rc.vmm("Prepare", rc.dst.Prepare(desc)); err != nil {
			return err
		}
	}
	rc.link.r.SetCaps(accepted)
	if err := rc.link.w.WriteWelcome(&wire.Welcome{Caps: accepted}); err != nil {
		return err
	}
	if memory != 0 {
		if err := rc.adopt(desc, ad, ft); err != nil {
			return err
		}
	}

	rc.phase = "rounds"
	var secs []Section
	var complete *wire.Complete
	for complete == nil {
		m, err := rc.link.r.Next()
		if err != nil {
			return err
		}
		switch m := m.(type) {
		case *wire.Streams:
			if err := rc.acceptStreams(m); err != nil {
				return err
			}
		case *wire.Round:
			if m.Final {
				rc.finalPages = m.Pages
			}
			rc.endRound()
			rc.phase = fmt.Sprintf("round %d", m.N)
			if m.Final {
				rc.phase = "stop-and-copy"
			}
			rc.rep.RoundDetails = append(rc.rep.RoundDetails, RoundReport{Round: int(m.N), Final: m.Final})
			rc.rep.Rounds = int(m.N)
			rc.round = &rc.rep.RoundDetails[len(rc.rep.RoundDetails)-1]
			rc.roundAt, rc.roundB0 = rc.clock.Now(), rc.link.r.BytesRead()
		case *wire.PageBatch:
			if err := rc.place(m, &rc.pl); err != nil {
				return err
			}
			rc.round.Pages += m.Pages
		case *wire.RoundEnd:
			// Placing is synchronous, so every page of the round is in the VM now (with
			// extra streams, once their readers have placed the rest). The source waits for
			// this before it pauses: answer at once.
			if rc.streams != nil {
				if err := rc.awaitStreams(m.Pages, rc.round.Pages); err != nil {
					return err
				}
				rc.round.Pages = m.Pages
			}
			placed := rc.round.Pages
			rc.endRound()
			if err := rc.link.w.WriteRoundAck(&wire.RoundAck{N: m.N, Pages: placed}); err != nil {
				return err
			}
		case *wire.Ahead:
			// Pure post-copy, the guest still running at the source: most of the set the
			// Switch will complete.
			rc.phase = "switch ahead"
			rc.newMissing()
			addPageSet(rc.missing, &m.PageSet)
		case *wire.Switch:
			rc.endRound()
			rc.phase = "switch"
			if !rc.switched {
				rc.switched = true
				rc.codec.switched.Store(true)
				rc.newMissing()
				rc.switchID = m.ID
				rc.rep.Mode = ModePostcopy
				if rc.rep.Rounds > 0 {
					rc.rep.Mode = ModeHybrid
				}
			}
			addPageSet(rc.missing, &m.PageSet)
			if sd, ok := pd.(StaleDiscarder); ok && !m.More && rc.discarded == nil {
				// The set is complete and every pre-copy page placed (placing is
				// synchronous): discard stale copies while the state arrives.
				done := make(chan error, 1)
				rc.discarded = done
				missing := rc.missing
				go func() { done <- sd.DiscardStale(missing) }()
				defer func() {
					if rc.discarded != nil {
						<-rc.discarded // never leave it running on a destination being torn down
					}
				}()
			}
		case *wire.Section:
			if err := rc.finishFinal(); err != nil {
				return err
			}
			rc.endRound()
			rc.phase = "state"
			secs = append(secs, Section{ID: m.ID, Version: m.Version, Data: m.Data})
		case *wire.Complete:
			if err := rc.finishFinal(); err != nil {
				return err
			}
			rc.endRound()
			complete = m
		default:
			return unexpected(m, "round, page batch, round end, state or complete")
		}
	}

	t0 := rc.clock.Now()
	if rc.switched {
		// Post-copy: the pages of the set are demand-paged from now on (older copies from
		// pre-copy rounds discarded).
		rc.phase = "arm post-copy"
		if rc.discarded != nil {
			err := <-rc.discarded
			rc.discarded = nil
			if err := rc.vmm("DiscardStale", err); err != nil {
				return err
			}
		}
		if err := rc.vmm("ArmPostcopy", pd.ArmPostcopy(rc.missing)); err != nil {
			return err
		}
	}
	tArm := rc.clock.Now()
	rc.phase = "restore"
	if err := rc.vmm("RestoreState", rc.dst.RestoreState(secs)); err != nil {
		return err
	}
	rc.phase = "start"
	rc.started = true
	t1 := rc.clock.Now()
	var p *pcRecv
	if rc.switched {
		p = newPCRecv(rc, pd)
		rc.pcPlace.Store(p)
	}
	if err := rc.vmm("Start", rc.dst.Start()); err != nil {
		return err
	}
	resumeAt := rc.clock.Now()
	if p != nil {
		p.started(resumeAt)
	}
	// By the wall clocks as on the source, and no shorter than this side's own share of it.
	rc.rep.DowntimeMS = ms(max(time.Duration(resumeAt.UnixNano()-complete.PauseUnixNano), resumeAt.Sub(t0)))
	rc.rep.Downtime.ArmMS = ms(tArm.Sub(t0))
	rc.rep.Downtime.RestoreMS = ms(t1.Sub(tArm))
	rc.rep.Downtime.StartMS = ms(resumeAt.Sub(t1))
	rc.phase = "resumed"
	err = rc.link.w.WriteResumed(&wire.Resumed{
		ResumeUnixNano: resumeAt.UnixNano(),
		ArmNanos:       uint64(tArm.Sub(t0)),
		RestoreNanos:   uint64(t1.Sub(tArm)),
		StartNanos:     uint64(resumeAt.Sub(t1)),
	})
	if err != nil {
		return err
	}
	rc.resumed = true
	if p != nil {
		rc.pc = p
		return p.run(accepted&wire.CapBlackout != 0, fp)
	}

	rc.phase = "first progress"
	var first int64
	if accepted&wire.CapBlackout != 0 {
		ctx, cancel := context.WithTimeout(rc.ctx, rc.opts.FirstProgressWait)
		t, err := fp.WaitFirstProgress(ctx)
		cancel()
		if err != nil {
			rc.rep.Warnings = append(rc.rep.Warnings, fmt.Sprintf("migration: no guest heartbeat within %v of start: %v", rc.opts.FirstProgressWait, err))
		} else {
			first = t.UnixNano()
		}
	}
	rc.phase = "done"
	if err := rc.link.w.WriteDone(&wire.Done{FirstProgressUnixNano: first}); err != nil {
		return err
	}

	rc.phase = "waiting for done ack"
	ctx, cancel := context.WithTimeoutCause(rc.ctx, rc.opts.DoneAckWait,
		fmt.Errorf("%w: no done ack from the source within %v", ErrTimeout, rc.opts.DoneAckWait))
	defer cancel()
	stop := context.AfterFunc(ctx, func() { setDeadline(rc.link.conn, longAgo) })
	m, err = rc.link.r.Next()
	stop()
	if err != nil {
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		return err
	}
	if _, ok := m.(*wire.DoneAck); !ok {
		return unexpected(m, "done ack")
	}
	return nil
}

// finishFinal waits, with extra streams, until the final round's pages are all placed: the
// state may not be restored before.
func (rc *receiver) finishFinal() error {
	if rc.streams == nil || rc.round == nil || !rc.round.Final {
		return nil
	}
	if err := rc.awaitStreams(rc.finalPages, rc.round.Pages); err != nil {
		return err
	}
	rc.round.Pages = rc.finalPages
	rc.streams.done.Store(true)
	return nil
}

// endRound closes the statistics of the current round.
func (rc *receiver) endRound() {
	if rc.round != nil {
		rc.round.Bytes = uint64(rc.link.r.BytesRead() - rc.roundB0)
		rc.round.DurationMS = ms(rc.clock.Now().Sub(rc.roundAt))
		rc.round = nil
	}
}

// place writes a batch's pages into the destination.
func (rc *receiver) place(b *wire.PageBatch, pl *placing) error {
	r := int(b.Region)
	pl.again = pl.again[:0]
	err := rc.codec.spans(b, pl, func(sp wire.Span, k pages.Kind) error {
		var err error
		if sp.Enc == wire.EncZero {
			err = rc.vmm(fmt.Sprintf("ZeroPages(region %d, page %d, %d pages)", r, sp.First, sp.Count), rc.dst.ZeroPages(r, sp.First, sp.Count))
		} else {
			err = rc.vmm(fmt.Sprintf("WritePages(region %d, page %d, %d pages)", r, sp.First, sp.Count), rc.dst.WritePages(r, sp.First, sp.Data))
		}
		if err == nil {
			pl.counts.Add(k, sp.Count)
		}
		return err
	})
	if err == nil && len(pl.again) > 0 {
		// Only post-copy's placing fetches a page again; here it would be lost.
		err = fmt.Errorf("%w: dedup page %d in region %d did not check, outside post-copy's placing", ErrProtocol, pl.again[0].Page, r)
	}
	return err
}

// newMissing makes the bitmaps of the post-copy set, unless the Ahead set made them already.
// They cost a pointer per chunk of pages (Bitmap), nothing per page.
func (rc *receiver) newMissing() {
	if rc.missing != nil {
		return
	}
	rc.missing = make([]Bitmap, len(rc.wdesc.Regions))
	for r := range rc.missing {
		rc.missing[r] = NewBitmap(rc.wdesc.Pages(r))
	}
}

// adopt takes memory that does not travel as pages: the Memory frame, then the VM built on the
// files that came with it (CapHandover) or on this host's mapping of the memory file it names
// (CapShared); then it tells the source, which pauses only then.
func (rc *receiver) adopt(desc Description, ad MemoryAdopter, ft fdTaker) error {
	rc.phase = "handover"
	m, err := rc.link.r.Next()
	if err != nil {
		return err
	}
	mem, ok := m.(*wire.Memory)
	if !ok {
		return unexpected(m, "memory")
	}
	rc.rep.Handover = &HandoverReport{}
	for _, n := range mem.Sizes {
		rc.rep.Handover.Bytes += n
	}
	if rc.caps&wire.CapShared != 0 {
		rc.prepared = true
		if err := rc.vmm("AdoptSharedMemory", rc.dst.(SharedMemoryAdopter).AdoptSharedMemory(desc, mem.ID)); err != nil {
			return err
		}
		rc.rep.Mode = ModeSharedMemory
		rc.rep.Handover.SharedMemory = hex.EncodeToString(mem.ID[:])
		return rc.link.w.WriteMemoryAck()
	}
	// The files arrived with the frame's first byte, so they have been read by now.
	fds := ft.TakeFDs()
	if len(fds) != len(mem.Sizes) {
		for _, fd := range fds {
			syscall.Close(fd)
		}
		return fmt.Errorf("%w: memory of %d regions came with %d files", ErrProtocol, len(mem.Sizes), len(fds))
	}
	rc.prepared = true
	if err := rc.vmm("AdoptMemory", ad.AdoptMemory(desc, fds)); err != nil {
		return err
	}
	rc.rep.Mode = ModeHandover
	rc.rep.Handover.Files = len(fds)
	return rc.link.w.WriteMemoryAck()
}
