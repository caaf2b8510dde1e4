package migration

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/godwit-vm/godwit/migration/pages"
	"github.com/godwit-vm/godwit/migration/wire"
)

// Post-copy constants.
const (
	// DefaultHotSample is how long pure post-copy with PrepageHot samples the dirty log before
	// it pauses, when SendOptions.SampleBefore is 0.
	DefaultHotSample = 500 * time.Millisecond
	// sampleInterval is the period of the dirty-log and progress samples.
	sampleInterval = 100 * time.Millisecond
	// progressWindow is the span of the guest progress rates before and after the switch.
	progressWindow = time.Second
	// pushBytes bounds a background-push batch: small enough that a demanded page does not
	// wait long behind it at the source (the pusher finishes the write it is in first).
	pushBytes = 32 << 10
	// urgentShare is the most of a bandwidth cap that requested pages take without waiting:
	// the rest is the push's, so that a guest that faults faster than the cap cannot starve
	// the push and leave every page to be demanded.
	urgentShare = 0.75
	// maxBackoff bounds the wait between two reconnection attempts.
	maxBackoff = 2 * time.Second
	// pushNotSent is the TCP_NOTSENT_LOWAT of a post-copy connection: at most about this
	// much push data waits in the source's send buffer ahead of a requested page (see the
	// package documentation, "Requests overtake the push").
	pushNotSent = 2 * pushBytes
)

// setChunkRuns is how many runs the engine puts in one Switch or Lacking frame. Tests lower it
// to exercise continuation.
var setChunkRuns = wire.MaxSetRuns

// demandQueue carries the destination's requests from the reader goroutine to the pusher
// without ever blocking the reader (which must keep reading for the link watchdog).
type demandQueue struct {
	mu     sync.Mutex
	refs   []PageRef
	again  []PageRef // of refs, those requested again (Request.Again)
	n      uint64    // pages requested, over all connections
	signal chan struct{}
	// wake, while the pusher sleeps for the bandwidth cap, ends that sleep: a request never
	// waits for the push's pacing.
	wake context.CancelFunc
}

func (q *demandQueue) push(m *wire.Request) {
	q.mu.Lock()
	for _, run := range m.Runs {
		for i := range uint64(run.Count) {
			ref := PageRef{int(m.Region), run.First + i}
			q.refs = append(q.refs, ref)
			if m.Again {
				q.again = append(q.again, ref)
			}
		}
		q.n += uint64(run.Count)
	}
	wake := q.wake
	q.mu.Unlock()
	if wake != nil {
		wake()
	}
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

// take appends the requested pages to dst and notes in again those requested again.
func (q *demandQueue) take(dst []PageRef, again map[PageRef]bool) []PageRef {
	q.mu.Lock()
	defer q.mu.Unlock()
	dst = append(dst, q.refs...)
	for _, ref := range q.again {
		again[ref] = true
	}
	q.refs, q.again = q.refs[:0], q.again[:0]
	return dst
}

func (q *demandQueue) reset() {
	q.mu.Lock()
	q.refs, q.again = q.refs[:0], q.again[:0]
	q.mu.Unlock()
}

// postcopyDriver runs post-copy on the sender's session: the switch (the set of pages the
// destination lacks, the state), then the push in prepaging order with the destination's
// requests first, the fault channel, the recovery of a broken link, and the resume of a
// migration that was left stranded. Its link may be replaced; conn0 stays the caller's.
type postcopyDriver struct {
	*sender
	id       wire.MigrationID  // names the migration to a rejoining connection
	resumeID *wire.MigrationID // a resume: the migration to finish
	pcr      *PostcopyReport

	fault      *lane // the connection for requested pages, if any
	faultBytes int64 // written on fault channels closed so far
	lowat0     bool  // conn0's TCP_NOTSENT_LOWAT was changed from lowat0Old
	lowat0Old  int
	postLink   atomic.Bool // the reader goroutine reports errors as link failures

	switched   bool // the Switch was sent
	recovering bool // switched, and the link broke: reconnecting

	heat    [][]uint32 // PrepageHot: dirty counts before the switch
	prog    ProgressCounter
	samples []progressSample

	pending   []Bitmap // pages the destination lacks that were not sent on this connection
	remaining uint64   // pages in pending
	linkSent  uint64   // pages sent on this connection (not confirmed)
	prepager  Prepager
	carry     *PageRef
	dq        demandQueue
	demanded  []PageRef
	again     map[PageRef]bool // demanded again: their dedup reference failed
	plain     pages.Classifier // demanded pages: the encoders but dedup (counts merged into cls)
	pushEnded bool

	filled   bool // the destination has every page: the source may release its memory
	filledAt time.Time

	breaks    int
	lastBreak error
	neverBack bool // the context ended while reconnecting
	attempts  int  // Rejoin frames sent
}

func newPostcopyDriver(s *sender, resumeID *wire.MigrationID) *postcopyDriver {
	d := &postcopyDriver{sender: s, resumeID: resumeID, again: map[PageRef]bool{}}
	d.dq.signal = make(chan struct{}, 1)
	d.prog, _ = s.src.(ProgressCounter)
	return d
}

// noteDirty counts the pages of a dirty-log fetch before the switch, for PrepageHot.
func (d *postcopyDriver) noteDirty(dirty []Bitmap) {
	if d.heat == nil {
		return
	}
	addHeat(d.heat, dirty, d.sizes)
}

// progress fills in post-copy's part of a progress report.
func (d *postcopyDriver) progress(p *Progress) {
	switch {
	case d.recovering:
		p.Stage = StageRecovering
	case d.switched:
		p.Stage = StageSwitched
	}
	if d.pcr == nil {
		return
	}
	p.PagesRemaining = d.remaining
	p.PagesPushed, p.PagesDemanded, p.Reconnects = d.pcr.PagesPushed, d.pcr.PagesDemanded, d.pcr.Reconnects
	d.dq.mu.Lock()
	p.Requested = d.dq.n
	d.dq.mu.Unlock()
}

// restoreLowat gives the caller's connection its TCP_NOTSENT_LOWAT back.
func (d *postcopyDriver) restoreLowat() {
	if d.lowat0 {
		setNotSentLowat(d.conn0, d.lowat0Old)
	}
}

// progressSample is one reading of the guest's ProgressCounter.
type progressSample struct {
	at    time.Time
	count uint64
}

// sampleProgress records the guest's progress count, at most every sampleInterval unless forced.
func (d *postcopyDriver) sampleProgress(force bool) {
	if d.prog == nil {
		return
	}
	now := d.clock.Now()
	if n := len(d.samples); !force && n > 0 && now.Sub(d.samples[n-1].at) < sampleInterval {
		return
	}
	d.samples = append(d.samples, progressSample{now, d.prog.ProgressCount()})
	// Keep one sample older than the window and those inside it.
	for len(d.samples) > 2 && now.Sub(d.samples[1].at) > progressWindow {
		d.samples = d.samples[1:]
	}
}

// rateBefore is the guest's progress rate over (at most) the last progressWindow before at.
func (d *postcopyDriver) rateBefore(at time.Time) float64 {
	if d.prog == nil || len(d.samples) == 0 {
		return 0
	}
	now := d.prog.ProgressCount()
	first := d.samples[0]
	for _, x := range d.samples {
		if at.Sub(x.at) >= progressWindow {
			first = x
		}
	}
	return rate(first.count, now, at.Sub(first.at))
}

// rate is units per second, 0 when the window is too short to mean anything.
func rate(from, to uint64, d time.Duration) float64 {
	if d < time.Millisecond || to < from {
		return 0
	}
	return float64(to-from) / d.Seconds()
}

// switchover pauses the source and switches to post-copy: the destination gets the set of
// pages it lacks (unsent in hybrid, every populated page in pure post-copy), the state and
// Complete, and runs the VM while the source pushes and serves requests.
func (d *postcopyDriver) switchover(ctx *switchCtx, unsent []Bitmap, reason string) error {
	prepage := d.opts.Prepage
	if prepage == "" {
		prepage = PrepageSequential
	}
	if d.delta != nil {
		// The destination discards its older copies of the missing pages: no delta from here.
		d.delta.Stop()
	}
	d.pcr = &PostcopyReport{Prepage: prepage, SwitchedAfter: len(d.rep.RoundDetails), SwitchReason: reason}
	if d.opts.Mode == ModePostcopy {
		d.pcr.SwitchReason = "mode postcopy"
	}
	d.rep.Postcopy = d.pcr
	if _, err := rand.Read(d.id[:]); err != nil {
		return fmt.Errorf("migration: choosing a migration id: %w", err)
	}
	d.pcr.MigrationID = d.id.String()

	if d.opts.Mode == ModePostcopy {
		sample := d.opts.SampleBefore
		if sample == 0 && d.heat != nil {
			sample = DefaultHotSample
		}
		if sample > 0 {
			if err := d.sample(sample); err != nil {
				return err
			}
		}
	}

	var populated []Bitmap
	ahead := false // the destination has the populated set already (wire.Ahead)
	if unsent == nil {
		// Pure post-copy: the destination lacks every page with data (holes stay holes: its
		// fresh memory reads as zero there). Finding them walks the memory, so it happens
		// before the pause, with logging on from before the walk: what the guest writes
		// meanwhile comes with the final fetch. Where the destination takes it, the set goes
		// ahead too, and the Switch in the stop window carries only that last fetch.
		if !d.logging {
			if err := d.startLogging(); err != nil {
				return err
			}
		}
		// Free pages are left out of it, so the destination never fetches them: they read
		// as zero there.
		set, err := d.populated()
		if err != nil {
			return err
		}
		populated = set
		if d.caps&wire.CapAhead != 0 {
			if err := writeSet(populated, d.sizes, func(ps *wire.PageSet, more bool) error {
				return d.link.w.WriteAhead(&wire.Ahead{PageSet: *ps}, more)
			}); err != nil {
				return err
			}
			ahead = true
			d.pcr.AheadPages = d.count(populated)
		}
	}

	d.phase = "switch"
	if err := d.live(); err != nil {
		return err
	}
	d.sampleProgress(true)
	d.paused = true
	if err := d.vmm("Pause", d.src.Pause()); err != nil {
		return err
	}
	d.stopped = true
	ctx.pauseAt = d.clock.Now()
	d.pcr.ProgressBefore = d.rateBefore(ctx.pauseAt)
	if ctx.heartbeats {
		ctx.lastBeat = ctx.pc.LastProgress()
	}
	var missing, last []Bitmap
	if d.logging {
		var err error
		last, err = d.fetchDirty()
		if err != nil {
			return err
		}
		if d.heat != nil {
			addHeat(d.heat, last, d.sizes)
		}
		if unsent != nil {
			missing = union(unsent, last)
		} else {
			missing = union(populated, last)
		}
		// The destination learns the set from the Switch, unless most of it went ahead:
		// then it must stay as the destination knows it (pages reported free since the walk
		// are fetched or pushed like the others).
		if !ahead {
			missing = d.dropFree(missing)
		}
		// Logging stays on until the destination runs the VM (stopLogging): ending it is
		// work that follows the memory's size, and a paused VM dirties nothing.
	}
	d.pending = missing
	if d.dedup != nil {
		// From here every page's copy is final and the missing set only shrinks: references
		// follow the rounds' rules with it as the set of one more round (it changes as pages
		// go, so a copy). A page pushed goes on any connection, so it serves references on its
		// own; a page sent before the switch and not missing serves all of them, until the
		// destination's guest changes it: then the reference fails there and the page is
		// fetched again (Request with Again). Demanded pages go without references (plain).
		set := cloneBitmaps(missing)
		d.dedup.StartRound(uint32(d.rep.Rounds+1), func(r int, p uint64) bool { return set[r].Has(p) })
	}
	d.plain.Encoders = slices.DeleteFunc(slices.Clone(d.cls.Encoders), func(e pages.Encoder) bool { return e.Kind() == pages.Dedup })
	d.remaining = 0
	for r, bm := range missing {
		n := bm.Count(d.sizes[r])
		d.remaining += n
	}
	d.pcr.MissingAtStart = d.remaining
	d.switched = true
	// The caller learns of the switch before the destination can run the VM.
	d.report(true)
	switchSet := missing
	if ahead {
		switchSet = last
	}
	err := writeSet(switchSet, d.sizes, func(ps *wire.PageSet, more bool) error {
		return d.link.w.WriteSwitch(&wire.Switch{ID: d.id, PageSet: *ps}, more)
	})
	if err != nil {
		return err
	}
	ctx.finalAt = d.clock.Now()
	return d.complete(ctx)
}

// sample watches the running guest for span before a pure post-copy switch: its dirty log (for
// PrepageHot) and its progress rate.
func (d *postcopyDriver) sample(span time.Duration) error {
	d.phase = "sampling"
	if d.heat != nil {
		if err := d.startLogging(); err != nil {
			return err
		}
	}
	end := d.clock.Now().Add(span)
	for {
		left := end.Sub(d.clock.Now())
		if left <= 0 {
			return nil
		}
		if err := d.clock.Sleep(d.ctx, min(left, sampleInterval)); err != nil {
			return err
		}
		d.sampleProgress(false)
		if d.heat == nil {
			continue
		}
		dirty, err := d.fetchDirty()
		if err != nil {
			return err
		}
		addHeat(d.heat, dirty, d.sizes)
	}
}

// writeSet writes a page set as frames of at most setChunkRuns runs of one region each, in
// ascending order (one empty frame for an empty set).
func writeSet(set []Bitmap, sizes []uint64, write func(ps *wire.PageSet, more bool) error) error {
	var total uint64
	for r, bm := range set {
		total += bm.Count(sizes[r])
	}
	var frames []wire.PageSet
	for r, bm := range set {
		// Sized up front: a set of random pages has tens of thousands of runs, and growing
		// the slice by appending costs more than finding them (this runs in the stop window).
		// A run longer than a uint32 count takes more than one entry: rare, left to append.
		left := bm.runCount(sizes[r])
		chunk := func() wire.PageSet {
			n := min(left, setChunkRuns)
			left -= n
			return wire.PageSet{Total: total, Region: uint32(r), Runs: make([]wire.Run, 0, n)}
		}
		cur := chunk()
		bm.Runs(sizes[r], func(first, count uint64) bool {
			for count > 0 {
				k := min(count, uint64(^uint32(0)))
				if len(cur.Runs) == setChunkRuns {
					frames = append(frames, cur)
					cur = chunk()
				}
				cur.Runs = append(cur.Runs, wire.Run{First: first, Count: uint32(k)})
				first, count = first+k, count-k
			}
			return true
		})
		if len(cur.Runs) > 0 {
			frames = append(frames, cur)
		}
	}
	if len(frames) == 0 {
		frames = append(frames, wire.PageSet{})
	}
	for i := range frames {
		if err := write(&frames[i], i < len(frames)-1); err != nil {
			return err
		}
	}
	return nil
}

// readSet reads the frames of a page set into fresh bitmaps; next returns each frame's part
// and whether the set continues.
func readSet(sizes []uint64, next func() (*wire.PageSet, bool, error)) ([]Bitmap, uint64, error) {
	set := make([]Bitmap, len(sizes))
	for r := range set {
		set[r] = NewBitmap(sizes[r])
	}
	var n uint64
	for {
		ps, more, err := next()
		if err != nil {
			return nil, 0, err
		}
		addPageSet(set, ps)
		n += ps.Pages()
		if !more {
			return set, n, nil
		}
	}
}

// addPageSet adds the pages of one frame of a page set to set.
func addPageSet(set []Bitmap, ps *wire.PageSet) {
	for _, run := range ps.Runs {
		set[ps.Region].SetRange(run.First, uint64(run.Count))
	}
}

// run is the sender's side after Resumed: it pushes the missing pages in prepaging
// order, serves the destination's requests first, and recovers a broken link with Reconnect,
// until the destination has every page (Filled), then takes its figures (Stats) and Done.
func (d *postcopyDriver) run(ctx *switchCtx) error {
	d.phase = "postcopy"
	if err := d.newPrepager(); err != nil {
		return err
	}
	if ctx != nil { // a resume's connection is watched (and set up) since its rejoin
		d.link.watchdog(d.opts.LinkTimeout)
		d.lowLatency(d.link.conn, true)
	}
	d.report(true)
	for {
		done, err := d.serve()
		if err == nil {
			if ctx != nil {
				d.blackout(ctx, done)
			}
			d.phase = "done ack"
			return d.link.w.WriteDoneAck()
		}
		if d.filled {
			return err // the destination has everything: a warning
		}
		var ve *vmmError
		if d.ctx.Err() != nil || d.opts.Reconnect == nil || errors.As(err, &ve) || errors.Is(err, wire.ErrPeer) || errors.Is(err, ErrProtocol) {
			return err
		}
		d.breaks++
		d.lastBreak = err
		if err := d.reconnect(); err != nil {
			return err
		}
	}
}

// lowLatency keeps the send buffer of a post-copy connection nearly empty, so that a requested
// page queues behind little push data. The caller's own connection (caller) gets its earlier
// setting back when Send returns.
func (d *postcopyDriver) lowLatency(conn io.ReadWriter, caller bool) {
	old, ok := setNotSentLowat(conn, pushNotSent)
	if ok && caller && !d.lowat0 {
		d.lowat0, d.lowat0Old = true, old
	}
}

// newPrepager builds the prepaging policy over the pending set.
func (d *postcopyDriver) newPrepager() error {
	p, err := NewPrepager(d.pcr.Prepage, d.pending, d.sizes, d.heat)
	if err != nil {
		return err
	}
	d.prepager, d.carry = p, nil
	d.demanded = d.demanded[:0]
	d.pushEnded = false
	return nil
}

// serve pushes and answers on the current connection until the destination's Done, or an error.
func (d *postcopyDriver) serve() (*wire.Done, error) {
	keep := time.NewTicker(max(d.opts.LinkTimeout/4, time.Millisecond))
	defer keep.Stop()
	lastWritten := d.link.w.Written()
	var doneWait <-chan time.Time
	// PrepageNone: the push starts once no request has come for NoneIdle.
	idle := time.NewTimer(NoneIdle)
	defer idle.Stop()
	idler, _ := d.prepager.(Idler)
	for {
		if err := d.link.err(); err != nil {
			return nil, err
		}
		d.demanded = d.dq.take(d.demanded, d.again)
		if len(d.demanded) > 0 {
			if idler != nil {
				idle.Reset(NoneIdle)
			}
			if err := d.pushDemanded(); err != nil {
				return nil, err
			}
			continue
		}
		if d.remaining > 0 {
			if wait := d.pushPace(); wait > 0 {
				if err := d.pauseFor(wait); err != nil {
					return nil, err
				}
				continue
			}
			ok, err := d.pushNext()
			if err != nil {
				return nil, err
			}
			if ok {
				continue
			}
		}
		if d.remaining == 0 && !d.pushEnded {
			d.pushEnded = true
			if err := d.link.w.WritePushEnd(&wire.PushEnd{Pushed: d.pcr.PagesPushed, Demanded: d.pcr.PagesDemanded}); err != nil {
				return nil, err
			}
			d.report(true)
		}
		select {
		case <-d.dq.signal:
		case in := <-d.link.inbox:
			if in.err != nil {
				return nil, in.err
			}
			switch m := in.msg.(type) {
			case *wire.Filled:
				if !d.pushEnded {
					return nil, fmt.Errorf("%w: the destination reports every page present, but the source has %d left to send", ErrProtocol, d.remaining)
				}
				if d.resumeID == nil && m.Pages != d.pcr.MissingAtStart {
					return nil, fmt.Errorf("%w: the destination placed %d pages after the switch, it lacked %d", ErrProtocol, m.Pages, d.pcr.MissingAtStart)
				}
				// The source may release its memory now: the total time ends here.
				d.filled, d.filledAt = true, in.at
				d.phase = "waiting for post-copy stats"
				t := time.NewTimer(d.opts.DoneWait)
				defer t.Stop()
				doneWait = t.C
			case *wire.Stats:
				d.takeStats(m)
			case *wire.Done:
				return m, nil
			default:
				return nil, unexpected(m, "filled, stats or done")
			}
		case <-keep.C:
			if d.link.w.Written() == lastWritten {
				if err := d.link.w.WriteKeepalive(); err != nil {
					return nil, err
				}
			}
			lastWritten = d.link.w.Written()
			d.report(false)
		case <-idle.C:
			if idler != nil {
				idler.Idle()
			}
		case <-doneWait:
			return nil, fmt.Errorf("%w: no post-copy stats and done from the destination within %v of filled", ErrTimeout, d.opts.DoneWait)
		case <-d.link.ctx.Done():
			return nil, context.Cause(d.link.ctx)
		}
	}
}

// pushPace is how long the next push batch would wait for the bandwidth cap.
func (d *postcopyDriver) pushPace() time.Duration {
	d.limitMu.Lock()
	defer d.limitMu.Unlock()
	return d.limit.ahead(pushBytes + wire.HeaderSize)
}

// pauseFor sleeps for up to wait, the push's pacing, and wakes as soon as a request arrives:
// the push waits for the cap before it takes a batch, never with one in hand, so a demanded
// page never waits for it. It fails only when the link ends.
func (d *postcopyDriver) pauseFor(wait time.Duration) error {
	ctx, cancel := context.WithCancel(d.link.ctx)
	defer cancel()
	d.dq.mu.Lock()
	asked := len(d.dq.refs) > 0
	d.dq.wake = cancel
	d.dq.mu.Unlock()
	if !asked {
		d.clock.Sleep(ctx, wait) // ends early when woken, or with the link
	}
	d.dq.mu.Lock()
	d.dq.wake = nil
	d.dq.mu.Unlock()
	return context.Cause(d.link.ctx)
}

// takeStats copies the destination's figures into the report.
func (d *postcopyDriver) takeStats(m *wire.Stats) {
	p := d.pcr
	p.DemandFaults = m.DemandFaults
	p.FaultLatencyP50US = float64(m.P50Nanos) / 1e3
	p.FaultLatencyP99US = float64(m.P99Nanos) / 1e3
	p.FaultLatencyMaxUS = float64(m.MaxNanos) / 1e3
	p.FaultLatencyUS = nil
	for _, v := range m.Latencies {
		p.FaultLatencyUS = append(p.FaultLatencyUS, float64(v)/1e3)
	}
	p.PostcopyMS = ms(time.Duration(m.PostcopyNanos))
	p.ProgressDuring = m.ProgressDuring
	p.ProgressAfter = m.ProgressAfter
	p.DestinationReconnects = int(m.Reconnects)
}

// pushDemanded sends the requested pages that are still pending, first come first served, one
// batch of one region at a time. A requested page sent already is on its way on the main
// connection, maybe behind a backlog of pushed pages: with a fault channel it goes again
// there (the destination keeps whichever copy comes first; both are the final one), without
// one it is dropped, unless it is requested again (its dedup reference failed): then it goes
// again on any connection.
func (d *postcopyDriver) pushDemanded() error {
	r := -1
	var batch []uint64
	var again uint64
	rest := d.demanded[:0]
	for _, p := range d.demanded {
		valid := p.Region >= 0 && p.Region < len(d.pending) && p.Page < d.sizes[p.Region]
		pending := valid && d.pending[p.Region].Has(p.Page)
		switch {
		case !valid || (!pending && d.fault == nil && !d.again[p]) || (p.Region == r && slices.Contains(batch, p.Page)):
			// sent already, or asked twice and in this batch already: drop
		case (r == -1 || p.Region == r) && len(batch) < d.bufPages:
			r = p.Region
			if pending {
				d.pending[r].Clear(p.Page)
				d.prepager.Demanded(p)
			} else {
				again++
			}
			if d.again[p] {
				if err := d.forget(p); err != nil {
					return err
				}
				delete(d.again, p)
			}
			batch = append(batch, p.Page)
		default:
			rest = append(rest, p)
		}
	}
	d.demanded = rest
	if len(batch) == 0 {
		return nil
	}
	d.remaining -= uint64(len(batch)) - again
	d.pcr.PagesDemanded += uint64(len(batch)) - again
	d.pcr.PagesResent += again
	w := d.link.w
	if d.fault != nil {
		w = d.fault.w
	}
	return d.sendPages(r, batch, w, &d.plain, true)
}

// forget drops from the dedup index the content of page p, whose reference failed at the
// destination: the page the reference named has changed there, and would fail again.
func (d *postcopyDriver) forget(p PageRef) error {
	if d.dedup == nil {
		return nil
	}
	page := make([]byte, d.ps)
	if err := d.src.ReadPages(p.Region, p.Page, page); err != nil {
		return d.vmm(fmt.Sprintf("ReadPages(region %d, page %d)", p.Region, p.Page), err)
	}
	d.dedup.Forget(page)
	return nil
}

// pushNext sends the next batch the prepaging policy offers; false when it offers none.
func (d *postcopyDriver) pushNext() (bool, error) {
	limit := max(1, min(d.bufPages, pushBytes/d.ps))
	r := -1
	var batch []uint64
	for len(batch) < limit {
		var p PageRef
		if d.carry != nil {
			p, d.carry = *d.carry, nil
		} else {
			var ok bool
			if p, ok = d.prepager.Next(); !ok {
				break
			}
		}
		if !d.pending[p.Region].Has(p.Page) {
			continue
		}
		if r != -1 && p.Region != r {
			d.carry = &p
			break
		}
		r = p.Region
		d.pending[r].Clear(p.Page)
		batch = append(batch, p.Page)
	}
	if len(batch) == 0 {
		return false, nil
	}
	d.remaining -= uint64(len(batch))
	d.pcr.PagesPushed += uint64(len(batch))
	ln, err := d.pushLane()
	if err != nil {
		return false, err
	}
	if ln == nil {
		return true, d.pushMain(r, batch)
	}
	d.linkSent += uint64(len(batch))
	ln.reset()
	if err := d.readPages(r, batch, &ln.pageBuf); err != nil {
		d.free <- ln
		return false, err
	}
	go d.flushLane(ln)
	return true, nil
}

// pushLane takes an idle extra page stream for the next push batch, or nil when the main
// connection takes it: with streams, whenever the main connection's lane comes round, or no
// extra one is idle (so the main connection never waits for them). A lane whose last write
// failed ends the connection: its error is returned.
func (d *postcopyDriver) pushLane() (*lane, error) {
	if d.lanes == nil {
		return nil, nil
	}
	select {
	case ln := <-d.free:
		if ln.err != nil {
			d.free <- ln
			return nil, ln.err
		}
		if ln.index == 0 {
			d.free <- ln
			return nil, nil
		}
		return ln, nil
	default:
		return nil, nil
	}
}

// pushMain writes a push batch on the main connection and counts it to its lane, if any.
func (d *postcopyDriver) pushMain(r int, batch []uint64) error {
	sent0, b0 := d.sent, d.link.w.Written()
	err := d.sendPages(r, batch, d.link.w, &d.cls, false)
	if d.lanes != nil {
		d.lanes[0].pages += d.sent - sent0
		d.lanes[0].bytes += d.link.w.Written() - b0
	}
	return err
}

// sendPages reads the given pages of region r and writes them as one batch on w (urgent: see
// flushOn).
func (d *postcopyDriver) sendPages(r int, batch []uint64, w *wire.Writer, cls *pages.Classifier, urgent bool) error {
	d.discard()
	if err := d.readPages(r, batch, &d.pageBuf); err != nil {
		return err
	}
	d.linkSent += uint64(len(batch))
	return d.flushOn(w, cls, urgent)
}

// readPages reads the given pages of region r into the empty b, in runs.
func (d *postcopyDriver) readPages(r int, batch []uint64, b *pageBuf) error {
	slices.Sort(batch)
	for i := 0; i < len(batch); {
		j := i + 1
		for j < len(batch) && batch[j] == batch[j-1]+1 {
			j++
		}
		if err := d.take(b, r, batch[i], j-i); err != nil {
			return err
		}
		i = j
	}
	b.region = uint32(r)
	return nil
}

// openFault opens the post-copy fault channel: one extra connection that carries the pages
// the destination asked for, so that they never queue behind the push on the main one.
func (d *postcopyDriver) openFault() error {
	d.phase = "opening the fault channel"
	extra, err := d.openExtra(1)
	if len(extra) > 0 {
		d.fault = extra[0]
	}
	return err
}

// closeFault closes the fault channel (after a broken link: requested pages take the new
// main connection) and counts what it carried.
func (d *postcopyDriver) closeFault() {
	f := d.fault
	if f == nil {
		return
	}
	d.fault = nil
	f.intr.hold()
	closeConn(f.conn)
	d.bytesW += f.w.Written()
	d.faultBytes += f.w.Written()
}

// reconnect replaces the broken connection: it calls Reconnect until a new connection
// rejoins the migration or the context ends.
func (d *postcopyDriver) reconnect() error {
	d.phase = "reconnecting"
	d.recovering = true
	d.report(true)
	d.dropLink()
	backoff := 50 * time.Millisecond
	var last error
	for {
		if d.ctx.Err() != nil {
			d.neverBack = true
			if last != nil {
				return fmt.Errorf("%w (the link broke: %v; last reconnection attempt: %v)", context.Cause(d.ctx), d.lastBreak, last)
			}
			return fmt.Errorf("%w (the link broke: %v)", context.Cause(d.ctx), d.lastBreak)
		}
		conn, err := d.opts.Reconnect(d.ctx)
		if err == nil && conn == nil {
			err = errors.New("the reconnector returned no connection")
		}
		if err == nil {
			if err = d.rejoin(conn, true); err == nil {
				d.pcr.Reconnects++
				d.phase = "postcopy"
				d.recovering = false
				d.report(true)
				return nil
			}
			closeConn(conn)
		}
		last = err
		if err := d.clock.Sleep(d.ctx, backoff); err != nil {
			continue
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// dropLink stops everything that uses the current connection and closes it if the engine owns it.
func (d *postcopyDriver) dropLink() {
	l := d.link
	l.cancel(errLinkDropped)
	l.intr.hold()
	l.stopReader()
	d.bytesW += l.w.Written()
	d.bytesR += l.r.BytesRead()
	if l.owned {
		closeConn(l.conn)
	} else {
		setDeadline(l.conn, time.Time{})
	}
	d.link = l.dropped()
	// Requested and pushed pages take the new connection alone: the extra ones belonged to
	// the broken link (their pages in flight are in the destination's Lacking set).
	d.closeStreams()
}

// rejoin runs the reconnection handshake on conn (preamble both ways, Rejoin, the
// destination's Lacking set) and makes conn the current connection.
func (d *postcopyDriver) rejoin(conn io.ReadWriter, owned bool) error {
	d.attempts++
	l := newLink(conn, owned, wire.AtSource)
	w, r := l.w, l.r
	r.SetDescription(d.wdesc)
	r.SetOffered(d.caps)
	r.SetCaps(d.caps)
	intr := interruptOnDone(d.ctx, conn)
	// The handshake must not hang on a peer that accepted and went silent.
	setDeadline(conn, time.Now().Add(d.opts.LinkTimeout))
	lacking, n, err := func() ([]Bitmap, uint64, error) {
		if err := w.WritePreamble(); err != nil {
			return nil, 0, err
		}
		if _, err := r.ReadPreamble(); err != nil {
			return nil, 0, err
		}
		r.Rejoining()
		if err := w.WriteRejoin(&wire.Rejoin{ID: d.id, Attempt: uint32(d.attempts)}); err != nil {
			return nil, 0, err
		}
		return readSet(d.sizes, func() (*wire.PageSet, bool, error) {
			m, err := r.Next()
			if err != nil {
				return nil, false, err
			}
			l, ok := m.(*wire.Lacking)
			if !ok {
				return nil, false, unexpected(m, "lacking")
			}
			return &l.PageSet, l.More, nil
		})
	}()
	intr.hold()
	setDeadline(conn, time.Time{})
	if err != nil {
		if d.ctx.Err() != nil {
			return context.Cause(d.ctx)
		}
		d.bytesW += w.Written()
		d.bytesR += r.BytesRead()
		return err
	}
	l.start(d.ctx)
	d.link = l
	d.rep.ProtocolVersion = r.Version()
	d.postLink.Store(true)
	d.startReader()
	d.link.watchdog(d.opts.LinkTimeout)
	d.lowLatency(conn, !owned)
	// The destination's word is what counts: pages sent on the broken connection that it does
	// not have go again, whatever the source thought.
	d.pending, d.remaining, d.linkSent = lacking, n, 0
	if d.pcr.MissingAtStart == 0 && d.resumeID != nil {
		d.pcr.MissingAtStart = n
	}
	d.dq.reset()
	if d.prepager != nil || d.resumeID != nil {
		return d.newPrepager()
	}
	return nil
}

// resume finishes a post-copy migration whose Send gave up after the switch: src is
// that migration's source, still paused. It connects (over the given connection, or by
// Reconnect), rejoins and carries on as after a reconnection.
func (d *postcopyDriver) resume() error {
	d.phase = "rejoin"
	d.rep.Mode = d.opts.Mode
	prepage := d.opts.Prepage
	if prepage == "" {
		prepage = PrepageSequential
	}
	d.id = *d.resumeID
	d.pcr = &PostcopyReport{Prepage: prepage, MigrationID: d.id.String(), SwitchReason: "resumed"}
	d.rep.Postcopy = d.pcr
	d.switched, d.acked, d.stopped = true, true, true
	d.caps = wire.CapPostcopy
	wd := toWire(d.desc)
	d.wdesc = &wd
	d.link.intr.hold() // rejoin sets up the connection's own
	err := errors.New("no connection")
	if d.link.conn != nil {
		err = d.rejoin(d.link.conn, false)
	}
	if err != nil {
		if d.opts.Reconnect == nil || d.ctx.Err() != nil {
			return err
		}
		d.lastBreak = err
		if err := d.reconnect(); err != nil {
			return err
		}
	}
	return d.run(nil)
}

// strandedError is a post-copy migration that failed after the switch: the VM runs on the
// destination, which lacks pages that only the paused source holds.
type strandedError struct {
	err       error
	lacking   uint64
	id        wire.MigrationID
	neverBack bool
}

func (e *strandedError) Error() string {
	msg := fmt.Sprintf("%v: the destination runs the VM but may still lack up to %d of its pages; this source is paused and holds them, so it must not be resumed: resume the migration to finish it (godwit migrate --resume, migration id %s)", e.err, e.lacking, e.id)
	if e.neverBack {
		msg += "; the destination's connection never came back: if its host died, the VM is lost (it needs both this memory and the destination's state)"
	}
	return msg
}

func (e *strandedError) Unwrap() []error { return []error{ErrStranded, e.err} }

// strand turns a failure after the switch into the report's outcome. The source stays
// paused, keeps its memory and is never resumed.
func (d *postcopyDriver) strand(parent context.Context, err error) error {
	if d.ctx.Err() != nil {
		if cause := context.Cause(d.ctx); cause != nil && !errors.Is(err, cause) {
			err = fmt.Errorf("%w (%v)", cause, err)
		}
	}
	result := ResultFailed
	if parent.Err() != nil {
		result = ResultCancelled
	}
	err = &phaseError{phase: d.phase, err: &strandedError{err: err, lacking: d.remaining + d.linkSent, id: d.id, neverBack: d.neverBack}}
	d.rep.Result = result
	d.rep.Error = err.Error()
	return err
}
