package migration

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
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
	n      uint64 // pages requested, over all connections
	signal chan struct{}
}

func (q *demandQueue) push(m *wire.Request) {
	q.mu.Lock()
	for _, run := range m.Runs {
		for i := range uint64(run.Count) {
			q.refs = append(q.refs, PageRef{int(m.Region), run.First + i})
		}
		q.n += uint64(run.Count)
	}
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

func (q *demandQueue) take(dst []PageRef) []PageRef {
	q.mu.Lock()
	defer q.mu.Unlock()
	dst = append(dst, q.refs...)
	q.refs = q.refs[:0]
	return dst
}

func (q *demandQueue) reset() {
	q.mu.Lock()
	q.refs = q.refs[:0]
	q.mu.Unlock()
}

// progressSample is one reading of the guest's ProgressCounter.
type progressSample struct {
	at    time.Time
	count uint64
}

// sampleProgress records the guest's progress count, at most every sampleInterval unless forced.
func (s *sender) sampleProgress(force bool) {
	if s.prog == nil {
		return
	}
	now := s.clock.Now()
	if n := len(s.samples); !force && n > 0 && now.Sub(s.samples[n-1].at) < sampleInterval {
		return
	}
	s.samples = append(s.samples, progressSample{now, s.prog.ProgressCount()})
	// Keep one sample older than the window and those inside it.
	for len(s.samples) > 2 && now.Sub(s.samples[1].at) > progressWindow {
		s.samples = s.samples[1:]
	}
}

// rateBefore is the guest's progress rate over (at most) the last progressWindow before at.
func (s *sender) rateBefore(at time.Time) float64 {
	if s.prog == nil || len(s.samples) == 0 {
		return 0
	}
	now := s.prog.ProgressCount()
	first := s.samples[0]
	for _, x := range s.samples {
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
func (s *sender) switchover(ctx *switchCtx, unsent []Bitmap, reason string) error {
	prepage := s.opts.Prepage
	if prepage == "" {
		prepage = PrepageSequential
	}
	s.pcr = &PostcopyReport{Prepage: prepage, SwitchedAfter: len(s.rep.RoundDetails), SwitchReason: reason}
	if s.opts.Mode == ModePostcopy {
		s.pcr.SwitchReason = "mode postcopy"
	}
	s.rep.Postcopy = s.pcr
	if _, err := rand.Read(s.id[:]); err != nil {
		return fmt.Errorf("migration: choosing a migration id: %w", err)
	}
	s.pcr.MigrationID = s.id.String()

	if s.opts.Mode == ModePostcopy {
		sample := s.opts.SampleBefore
		if sample == 0 && s.heat != nil {
			sample = DefaultHotSample
		}
		if sample > 0 {
			if err := s.sample(sample); err != nil {
				return err
			}
		}
	}

	var populated []Bitmap
	if unsent == nil {
		// Pure post-copy: the destination lacks every page with data (holes stay holes: its
		// fresh memory reads as zero there). Finding them walks the memory, so it happens
		// before the pause, with logging on from before the walk: what the guest writes
		// meanwhile comes with the final fetch.
		if !s.logging {
			if err := s.vmm("StartDirtyLog", s.src.StartDirtyLog()); err != nil {
				return err
			}
			s.logging = true
		}
		set, err := s.src.Populated()
		if err := s.vmm("Populated", err); err != nil {
			return err
		}
		if err := checkBitmaps("Populated", set, &s.desc.Layout); err != nil {
			return err
		}
		populated = set
	}

	s.phase = "switch"
	if err := s.live(); err != nil {
		return err
	}
	s.sampleProgress(true)
	s.paused = true
	if err := s.vmm("Pause", s.src.Pause()); err != nil {
		return err
	}
	ctx.pauseAt = s.clock.Now()
	s.pcr.ProgressBefore = s.rateBefore(ctx.pauseAt)
	if ctx.heartbeats {
		ctx.lastBeat = ctx.pc.LastProgress()
	}
	var missing []Bitmap
	if s.logging {
		last, err := s.src.FetchDirty()
		if err := s.vmm("FetchDirty", err); err != nil {
			return err
		}
		if err := checkBitmaps("FetchDirty", last, &s.desc.Layout); err != nil {
			return err
		}
		if s.heat != nil {
			addHeat(s.heat, last, s.sizes)
		}
		if unsent != nil {
			missing = union(unsent, last)
		} else {
			missing = union(populated, last)
		}
		// Logging stays on until the destination runs the VM (stopLogging): ending it is
		// work that follows the memory's size, and a paused VM dirties nothing.
	}
	if unsent == nil {
		for r, bm := range missing {
			s.cls.Counters.Add(pages.Hole, s.sizes[r]-bm.Count(s.sizes[r]))
		}
	}
	s.pending = missing
	s.remaining = s.count(missing)
	s.pcr.MissingAtStart = s.remaining
	s.switched = true
	// The caller learns of the switch before the destination can run the VM.
	s.report(true)
	err := writeSet(missing, s.sizes, func(ps *wire.PageSet, more bool) error {
		return s.link.w.WriteSwitch(&wire.Switch{ID: s.id, PageSet: *ps}, more)
	})
	if err != nil {
		return err
	}
	ctx.finalAt = s.clock.Now()
	return s.complete(ctx)
}

// sample watches the running guest for d before a pure post-copy switch: its dirty log (for
// PrepageHot) and its progress rate.
func (s *sender) sample(d time.Duration) error {
	s.phase = "sampling"
	if s.heat != nil {
		if err := s.vmm("StartDirtyLog", s.src.StartDirtyLog()); err != nil {
			return err
		}
		s.logging = true
	}
	end := s.clock.Now().Add(d)
	for {
		left := end.Sub(s.clock.Now())
		if left <= 0 {
			return nil
		}
		if err := s.clock.Sleep(s.ctx, min(left, sampleInterval)); err != nil {
			return err
		}
		s.sampleProgress(false)
		if s.heat == nil {
			continue
		}
		dirty, err := s.src.FetchDirty()
		if err := s.vmm("FetchDirty", err); err != nil {
			return err
		}
		if err := checkBitmaps("FetchDirty", dirty, &s.desc.Layout); err != nil {
			return err
		}
		addHeat(s.heat, dirty, s.sizes)
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
		for _, run := range ps.Runs {
			set[ps.Region].SetRange(run.First, uint64(run.Count))
			n += uint64(run.Count)
		}
		if !more {
			return set, n, nil
		}
	}
}

// postcopy runs the sender's side after Resumed: it pushes the missing pages in prepaging
// order, serves the destination's requests first, and recovers a broken link with Reconnect,
// until the destination has every page (Filled), then takes its figures (Stats) and Done.
func (s *sender) postcopy(ctx *switchCtx) error {
	s.phase = "postcopy"
	if err := s.newPrepager(); err != nil {
		return err
	}
	if ctx != nil { // a resume's connection is watched (and set up) since its rejoin
		s.link.watchdog(s.opts.LinkTimeout)
		s.lowLatency(s.link.conn, true)
	}
	s.report(true)
	for {
		done, err := s.serve()
		if err == nil {
			if ctx != nil {
				s.blackout(ctx, done)
			}
			s.phase = "done ack"
			return s.link.w.WriteDoneAck()
		}
		if s.filled {
			return err // the destination has everything: a warning
		}
		var ve *vmmError
		if s.ctx.Err() != nil || s.opts.Reconnect == nil || errors.As(err, &ve) || errors.Is(err, wire.ErrPeer) || errors.Is(err, ErrProtocol) {
			return err
		}
		s.breaks++
		s.lastBreak = err
		if err := s.reconnect(); err != nil {
			return err
		}
	}
}

// lowLatency keeps the send buffer of a post-copy connection nearly empty, so that a requested
// page queues behind little push data. The caller's own connection (caller) gets its earlier
// setting back when Send returns.
func (s *sender) lowLatency(conn io.ReadWriter, caller bool) {
	old, ok := setNotSentLowat(conn, pushNotSent)
	if ok && caller && !s.lowat0 {
		s.lowat0, s.lowat0Old = true, old
	}
}

// newPrepager builds the prepaging policy over the pending set.
func (s *sender) newPrepager() error {
	p, err := NewPrepager(s.pcr.Prepage, s.pending, s.sizes, s.heat)
	if err != nil {
		return err
	}
	s.prepager, s.carry = p, nil
	s.demanded = s.demanded[:0]
	s.pushEnded = false
	return nil
}

// linkErr is why the current connection (or the migration) ended, if it has.
func (s *sender) linkErr() error {
	if s.link.ctx.Err() != nil {
		return context.Cause(s.link.ctx)
	}
	return nil
}

// serve pushes and answers on the current connection until the destination's Done, or an error.
func (s *sender) serve() (*wire.Done, error) {
	keep := time.NewTicker(max(s.opts.LinkTimeout/4, time.Millisecond))
	defer keep.Stop()
	lastWritten := s.link.w.Written()
	var doneWait <-chan time.Time
	// PrepageNone: the push starts once no request has come for NoneIdle.
	idle := time.NewTimer(NoneIdle)
	defer idle.Stop()
	idler, _ := s.prepager.(Idler)
	for {
		if err := s.linkErr(); err != nil {
			return nil, err
		}
		s.demanded = s.dq.take(s.demanded)
		if len(s.demanded) > 0 {
			if idler != nil {
				idle.Reset(NoneIdle)
			}
			if err := s.pushDemanded(); err != nil {
				return nil, err
			}
			continue
		}
		if s.remaining > 0 {
			ok, err := s.pushNext()
			if err != nil {
				return nil, err
			}
			if ok {
				continue
			}
		}
		if s.remaining == 0 && !s.pushEnded {
			s.pushEnded = true
			if err := s.link.w.WritePushEnd(&wire.PushEnd{Pushed: s.pcr.PagesPushed, Demanded: s.pcr.PagesDemanded}); err != nil {
				return nil, err
			}
			s.report(true)
		}
		select {
		case <-s.dq.signal:
		case in := <-s.link.inbox:
			if in.err != nil {
				return nil, in.err
			}
			switch m := in.msg.(type) {
			case *wire.Filled:
				if !s.pushEnded {
					return nil, fmt.Errorf("%w: the destination reports every page present, but the source has %d left to send", ErrProtocol, s.remaining)
				}
				if s.resumeID == nil && m.Pages != s.pcr.MissingAtStart {
					return nil, fmt.Errorf("%w: the destination placed %d pages after the switch, it lacked %d", ErrProtocol, m.Pages, s.pcr.MissingAtStart)
				}
				// The source may release its memory now: the total time ends here.
				s.filled, s.filledAt = true, in.at
				s.phase = "waiting for post-copy stats"
				t := time.NewTimer(s.opts.DoneWait)
				defer t.Stop()
				doneWait = t.C
			case *wire.Stats:
				s.takeStats(m)
			case *wire.Done:
				return m, nil
			default:
				return nil, unexpected(m, "filled, stats or done")
			}
		case <-keep.C:
			if s.link.w.Written() == lastWritten {
				if err := s.link.w.WriteKeepalive(); err != nil {
					return nil, err
				}
			}
			lastWritten = s.link.w.Written()
			s.report(false)
		case <-idle.C:
			if idler != nil {
				idler.Idle()
			}
		case <-doneWait:
			return nil, fmt.Errorf("%w: no post-copy stats and done from the destination within %v of filled", ErrTimeout, s.opts.DoneWait)
		case <-s.link.ctx.Done():
			return nil, context.Cause(s.link.ctx)
		}
	}
}

// takeStats copies the destination's figures into the report.
func (s *sender) takeStats(m *wire.Stats) {
	p := s.pcr
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
// one it is dropped.
func (s *sender) pushDemanded() error {
	r := -1
	var batch []uint64
	var again uint64
	rest := s.demanded[:0]
	for _, p := range s.demanded {
		valid := p.Region >= 0 && p.Region < len(s.pending) && p.Page < s.sizes[p.Region]
		pending := valid && s.pending[p.Region].Has(p.Page)
		switch {
		case !valid || (!pending && s.fault == nil) || (p.Region == r && slices.Contains(batch, p.Page)):
			// sent already, or asked twice and in this batch already: drop
		case (r == -1 || p.Region == r) && len(batch) < s.bufPages:
			r = p.Region
			if pending {
				s.pending[r].Clear(p.Page)
				s.prepager.Demanded(p)
			} else {
				again++
			}
			batch = append(batch, p.Page)
		default:
			rest = append(rest, p)
		}
	}
	s.demanded = rest
	if len(batch) == 0 {
		return nil
	}
	s.remaining -= uint64(len(batch)) - again
	s.pcr.PagesDemanded += uint64(len(batch)) - again
	s.pcr.PagesResent += again
	w := s.link.w
	if s.fault != nil {
		w = s.fault.w
	}
	return s.sendPages(r, batch, w)
}

// pushNext sends the next batch the prepaging policy offers; false when it offers none.
func (s *sender) pushNext() (bool, error) {
	limit := max(1, min(s.bufPages, pushBytes/s.ps))
	r := -1
	var batch []uint64
	for len(batch) < limit {
		var p PageRef
		if s.carry != nil {
			p, s.carry = *s.carry, nil
		} else {
			var ok bool
			if p, ok = s.prepager.Next(); !ok {
				break
			}
		}
		if !s.pending[p.Region].Has(p.Page) {
			continue
		}
		if r != -1 && p.Region != r {
			s.carry = &p
			break
		}
		r = p.Region
		s.pending[r].Clear(p.Page)
		batch = append(batch, p.Page)
	}
	if len(batch) == 0 {
		return false, nil
	}
	s.remaining -= uint64(len(batch))
	s.pcr.PagesPushed += uint64(len(batch))
	return true, s.sendPages(r, batch, s.link.w)
}

// sendPages reads the given pages of region r and writes them as one batch on w.
func (s *sender) sendPages(r int, batch []uint64, w *wire.Writer) error {
	slices.Sort(batch)
	s.discard()
	for i := 0; i < len(batch); {
		j := i + 1
		for j < len(batch) && batch[j] == batch[j-1]+1 {
			j++
		}
		first, k := batch[i], j-i
		dst := s.buf[s.used*s.ps : (s.used+k)*s.ps]
		if err := s.src.ReadPages(r, first, dst); err != nil {
			return s.vmm(fmt.Sprintf("ReadPages(region %d, page %d, %d pages)", r, first, k), err)
		}
		s.spans = append(s.spans, span{first: first, count: uint64(k)})
		s.used += k
		i = j
	}
	s.region = uint32(r)
	s.linkSent += uint64(len(batch))
	return s.flushOn(w)
}

// reconnect replaces the broken connection: it calls Reconnect until a new connection
// rejoins the migration or the context ends.
func (s *sender) reconnect() error {
	s.phase = "reconnecting"
	s.recovering = true
	s.report(true)
	s.dropLink()
	backoff := 50 * time.Millisecond
	var last error
	for {
		if s.ctx.Err() != nil {
			s.neverBack = true
			if last != nil {
				return fmt.Errorf("%w (the link broke: %v; last reconnection attempt: %v)", context.Cause(s.ctx), s.lastBreak, last)
			}
			return fmt.Errorf("%w (the link broke: %v)", context.Cause(s.ctx), s.lastBreak)
		}
		conn, err := s.opts.Reconnect(s.ctx)
		if err == nil && conn == nil {
			err = errors.New("the reconnector returned no connection")
		}
		if err == nil {
			if err = s.rejoin(conn, true); err == nil {
				s.pcr.Reconnects++
				s.phase = "postcopy"
				s.recovering = false
				s.report(true)
				return nil
			}
			closeConn(conn)
		}
		last = err
		if err := s.clock.Sleep(s.ctx, backoff); err != nil {
			continue
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// dropLink stops everything that uses the current connection and closes it if the engine owns it.
func (s *sender) dropLink() {
	l := s.link
	l.cancel(errLinkDropped)
	l.intr.hold()
	l.stopReader()
	s.bytesW += l.w.Written()
	s.bytesR += l.r.BytesRead()
	if l.owned {
		closeConn(l.conn)
	} else {
		setDeadline(l.conn, time.Time{})
	}
	s.link = l.dropped()
	s.closeFault() // requested pages take the new connection
}

// rejoin runs the reconnection handshake on conn (preamble both ways, Rejoin, the
// destination's Lacking set) and makes conn the current connection.
func (s *sender) rejoin(conn io.ReadWriter, owned bool) error {
	s.attempts++
	l := newLink(conn, owned, wire.AtSource)
	w, r := l.w, l.r
	r.SetDescription(s.wdesc)
	r.SetOffered(s.caps)
	r.SetCaps(s.caps)
	intr := interruptOnDone(s.ctx, conn)
	// The handshake must not hang on a peer that accepted and went silent.
	setDeadline(conn, time.Now().Add(s.opts.LinkTimeout))
	lacking, n, err := func() ([]Bitmap, uint64, error) {
		if err := w.WritePreamble(); err != nil {
			return nil, 0, err
		}
		if _, err := r.ReadPreamble(); err != nil {
			return nil, 0, err
		}
		r.Rejoining()
		if err := w.WriteRejoin(&wire.Rejoin{ID: s.id, Attempt: uint32(s.attempts)}); err != nil {
			return nil, 0, err
		}
		return readSet(s.sizes, func() (*wire.PageSet, bool, error) {
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
		if s.ctx.Err() != nil {
			return context.Cause(s.ctx)
		}
		s.bytesW += w.Written()
		s.bytesR += r.BytesRead()
		return err
	}
	l.start(s.ctx)
	s.link = l
	s.rep.ProtocolVersion = r.Version()
	s.postLink.Store(true)
	s.startReader()
	s.link.watchdog(s.opts.LinkTimeout)
	s.lowLatency(conn, !owned)
	// The destination's word is what counts: pages sent on the broken connection that it does
	// not have go again, whatever the source thought.
	s.pending, s.remaining, s.linkSent = lacking, n, 0
	if s.pcr.MissingAtStart == 0 && s.resumeID != nil {
		s.pcr.MissingAtStart = n
	}
	s.dq.reset()
	if s.prepager != nil || s.resumeID != nil {
		return s.newPrepager()
	}
	return nil
}

// resumePostcopy finishes a post-copy migration whose Send gave up after the switch: src is
// that migration's source, still paused. It connects (over the given connection, or by
// Reconnect), rejoins and carries on as after a reconnection.
func (s *sender) resumePostcopy() error {
	s.phase = "rejoin"
	s.rep.Mode = s.opts.Mode
	prepage := s.opts.Prepage
	if prepage == "" {
		prepage = PrepageSequential
	}
	s.id = *s.resumeID
	s.pcr = &PostcopyReport{Prepage: prepage, MigrationID: s.id.String(), SwitchReason: "resumed"}
	s.rep.Postcopy = s.pcr
	s.switched, s.acked = true, true
	s.caps = wire.CapPostcopy
	wd := toWire(s.desc)
	s.wdesc = &wd
	s.link.intr.hold() // rejoin sets up the connection's own
	err := errors.New("no connection")
	if s.link.conn != nil {
		err = s.rejoin(s.link.conn, false)
	}
	if err != nil {
		if s.opts.Reconnect == nil || s.ctx.Err() != nil {
			return err
		}
		s.lastBreak = err
		if err := s.reconnect(); err != nil {
			return err
		}
	}
	return s.postcopy(nil)
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
func (s *sender) strand(parent context.Context, err error) error {
	if s.ctx.Err() != nil {
		if cause := context.Cause(s.ctx); cause != nil && !errors.Is(err, cause) {
			err = fmt.Errorf("%w (%v)", cause, err)
		}
	}
	result := ResultFailed
	if parent.Err() != nil {
		result = ResultCancelled
	}
	err = &phaseError{phase: s.phase, err: &strandedError{err: err, lacking: s.remaining + s.linkSent, id: s.id, neverBack: s.neverBack}}
	s.rep.Result = result
	s.rep.Error = err.Error()
	return err
}
