package migration

import (
	"cmp"
	"context"
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

// pcRecv is the destination's side of post-copy, from Start until the source's DoneAck. Its
// goroutines: the caller's (reads the connection and places pages: the only one that calls
// Place), the fault goroutine (turns Faults into Request frames at once), and per connection
// one that sends keepalives, one that sends Filled, Stats and Done, and the link watchdog.
type pcRecv struct {
	rc    *receiver
	pd    PostcopyDestination
	sizes []uint64
	ps    uint64

	mu         sync.Mutex
	missing    []Bitmap // pages absent
	remaining  uint64
	faultAt    map[PageRef]time.Time // faulted, still absent
	requested  map[PageRef]bool      // requested on the current connection
	lat        []time.Duration
	faults     uint64
	requests   uint64 // pages requested
	placed     uint64
	duplicates uint64 // pages received that were present already
	// fetchedAgain counts dedup references that did not check (the guest had changed the
	// page named) and were requested again; askedAgain holds those still absent.
	fetchedAgain uint64
	askedAgain   map[PageRef]bool

	// The current connection: nil between a break and the next rejoin. Guarded by wmu (held
	// while writing); read without it by the goroutine that attaches and detaches it.
	wmu      sync.Mutex
	link     *link
	links    sync.WaitGroup
	bytesW   int64
	bytesR   int64
	doneSent atomic.Bool

	startAt    time.Time
	count0     uint64
	completeAt time.Time
	count1     uint64
	complete   chan struct{} // every page present, demand paging disarmed
	after      chan struct{} // the progress window after completion measured
	first      chan struct{} // the first heartbeat measured (or not measurable)
	firstNanos int64
	stats      wire.Stats
	quit       chan struct{} // closed when Receive ends: stops the fault goroutine
	faultDone  chan struct{}
	reconnects int
	lastBreak  error
	pushEnd    *wire.PushEnd
	faultLink  context.CancelCauseFunc // guarded by wmu: ends the first link, whose fault channel it is
}

// breakLink ends the link the fault channel belonged to (the first one): a fault channel that
// broke takes its link with it, and recovery goes on over the main connection.
func (p *pcRecv) breakLink(err error) {
	p.wmu.Lock()
	c := p.faultLink
	p.wmu.Unlock()
	if c != nil {
		c(err)
	}
}

func newPCRecv(rc *receiver, pd PostcopyDestination) *pcRecv {
	p := &pcRecv{
		rc: rc, pd: pd, ps: rc.wdesc.PageSize,
		missing:   rc.missing,
		faultAt:   map[PageRef]time.Time{},
		requested: map[PageRef]bool{},
		complete:  make(chan struct{}),
		after:     make(chan struct{}),
		first:     make(chan struct{}),
		quit:      make(chan struct{}),
		faultDone: make(chan struct{}),
	}
	for r := range rc.wdesc.Regions {
		p.sizes = append(p.sizes, rc.wdesc.Pages(r))
		p.remaining += p.missing[r].Count(p.sizes[r])
	}
	rc.rep.Postcopy = &PostcopyReport{MissingAtStart: p.remaining, SwitchedAfter: rc.rep.Rounds, MigrationID: rc.switchID.String()}
	if pc, ok := rc.dst.(ProgressCounter); ok {
		p.count0 = pc.ProgressCount()
	}
	return p
}

// started records the start time and starts the fault goroutine: faults may come at once.
func (p *pcRecv) started(at time.Time) {
	p.startAt = at
	go p.faultLoop()
}

func (p *pcRecv) isComplete() bool {
	select {
	case <-p.complete:
		return true
	default:
		return false
	}
}

// run serves post-copy until the source's DoneAck, recovering broken links with Reconnect.
func (p *pcRecv) run(blackout bool, fp FirstProgress) error {
	rc := p.rc
	rc.phase = "postcopy"
	go func() {
		defer close(p.first)
		if !blackout {
			return
		}
		// A guest that faults on page after page may take longer than FirstProgressWait to
		// report its first unit of work, and that is the blackout to measure: the wait runs
		// until FirstProgressWait after the last page arrived (Done waits for it anyway).
		ctx, cancel := context.WithCancel(rc.ctx)
		defer cancel()
		go func() {
			select {
			case <-p.complete:
				if rc.clock.Sleep(ctx, rc.opts.FirstProgressWait) == nil {
					cancel()
				}
			case <-ctx.Done():
			}
		}()
		t, err := fp.WaitFirstProgress(ctx)
		p.mu.Lock()
		defer p.mu.Unlock()
		if err != nil {
			rc.rep.Warnings = append(rc.rep.Warnings, fmt.Sprintf("migration: no guest heartbeat within %v of the last page's arrival: %v", rc.opts.FirstProgressWait, err))
			return
		}
		p.firstNanos = t.UnixNano()
	}()
	if p.remaining == 0 {
		if err := p.completed(); err != nil {
			return err
		}
	}
	rc.link.intr.hold() // from now on on the link's own context
	p.attach(rc.link)
	for {
		err := p.serve()
		p.detach()
		if err == nil {
			return nil
		}
		var pe *wire.PeerError
		var ve *vmmError
		if errors.As(err, &pe) || errors.As(err, &ve) || rc.ctx.Err() != nil || rc.opts.Reconnect == nil {
			return err
		}
		p.lastBreak = err
		if err := p.reconnect(); err != nil {
			return err
		}
	}
}

// attach makes l the current connection and starts its goroutines.
func (p *pcRecv) attach(l *link) {
	rc := p.rc
	p.wmu.Lock()
	l.start(rc.ctx)
	if p.faultLink == nil {
		p.faultLink = l.cancel // the link the fault channel belongs to
	}
	p.link = l
	ctx := l.ctx
	p.wmu.Unlock()
	p.doneSent.Store(false)
	l.watchdog(rc.opts.LinkTimeout)
	p.links.Add(3)
	go p.keepalive(ctx)
	go p.finish(ctx)
	go p.window(ctx, l.conn, l.watch)
	// Everything faulted (before, or on an old connection) and still missing is asked for
	// again; the fault goroutine asks for new faults on this connection from now on.
	p.mu.Lock()
	clear(p.requested)
	var want []PageRef
	for k := range p.faultAt {
		p.requested[k] = true
		want = append(want, k)
	}
	p.mu.Unlock()
	p.request(want)
}

var errNoLink = errors.New("migration: no connection")

// detach ends the current connection's goroutines and closes it if the engine owns it.
func (p *pcRecv) detach() {
	p.wmu.Lock()
	l := p.link
	l.cancel(errLinkDropped)
	p.wmu.Unlock()
	p.links.Wait()
	l.intr.hold()
	p.wmu.Lock()
	if l.owned { // the first connection's counts are the receiver's own
		p.bytesW += l.w.Written()
		p.bytesR += l.r.BytesRead()
		closeConn(l.conn)
	} else {
		setDeadline(l.conn, time.Time{})
	}
	p.link = nil
	p.wmu.Unlock()
}

// close stops the fault goroutine at the end of Receive and returns the bytes written and read
// on connections other than the first (whose Writer and Reader the receiver reports itself).
func (p *pcRecv) close() (w, r int64) {
	close(p.quit)
	<-p.faultDone
	p.wmu.Lock()
	defer p.wmu.Unlock()
	return p.bytesW, p.bytesR
}

// write writes one frame on the current connection; a failure breaks the link.
func (p *pcRecv) write(f func(w *wire.Writer) error) error {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	if p.link == nil {
		return errNoLink // before the first connection is attached: attach asks again
	}
	err := f(p.link.w)
	if err != nil {
		p.link.cancel(err)
	}
	return err
}

// keepalive writes a Keepalive whenever nothing was written for a quarter of LinkTimeout.
func (p *pcRecv) keepalive(ctx context.Context) {
	defer p.links.Done()
	t := time.NewTicker(max(p.rc.opts.LinkTimeout/4, time.Millisecond))
	defer t.Stop()
	var last int64 = -1
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if p.write(func(w *wire.Writer) error {
				var err error
				if w.Written() == last {
					err = w.WriteKeepalive()
				}
				last = w.Written()
				return err
			}) != nil {
				return
			}
		}
	}
}

// Post-copy receive window: see the package documentation, "Requests overtake the push".
const (
	minRecvWindow = 64 << 10              // the smallest TCP receive window during post-copy
	windowTick    = 10 * time.Millisecond // how often the window is sized
	windowBDPs    = 4                     // the window in bandwidth-delay products
)

// window keeps the receive window of a TCP connection small while pages are missing, so
// that little push data is in flight or unread ahead of a requested page: windowBDPs
// bandwidth-delay products (the rate read over the last tick times the connection's
// minimum round trip), at least minRecvWindow. It grows fourfold per tick at most while the
// window is what limits the rate, and halves per tick at most when the rate drops. The window
// is the socket's receive buffer (setRecvWindow). Once every page is present, or the
// connection ends, the buffer goes back to its old size (no longer autotuned: only small
// messages follow).
func (p *pcRecv) window(ctx context.Context, conn io.ReadWriter, watch *readWatch) {
	defer p.links.Done()
	if p.isComplete() {
		return
	}
	old, ok := setRecvWindow(conn, minRecvWindow)
	if !ok {
		return // not TCP
	}
	defer setRecvWindow(conn, old)
	win := minRecvWindow
	t := time.NewTicker(windowTick)
	defer t.Stop()
	last, lastAt := watch.n.Load(), time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.complete:
			return
		case now := <-t.C:
			n := watch.n.Load()
			rate := float64(n-last) / now.Sub(lastAt).Seconds()
			last, lastAt = n, now
			rtt, ok := tcpMinRTT(conn)
			if !ok {
				continue
			}
			bdp := rate * rtt.Seconds()
			next := max(minRecvWindow, win/2, int(min(windowBDPs*bdp, float64(4*win))))
			if next != win {
				win = next
				setRecvWindow(conn, win)
			}
		}
	}
}

// finish tells the source, on this connection, that every page is present (Filled), then
// sends the figures (Stats) and Done.
func (p *pcRecv) finish(ctx context.Context) {
	defer p.links.Done()
	select {
	case <-p.complete:
	case <-ctx.Done():
		return
	}
	p.mu.Lock()
	f := wire.Filled{Pages: p.placed, UnixNano: p.completeAt.UnixNano()}
	p.mu.Unlock()
	if p.write(func(w *wire.Writer) error { return w.WriteFilled(&f) }) != nil {
		return
	}
	for _, ch := range []chan struct{}{p.after, p.first} {
		select {
		case <-ch:
		case <-ctx.Done():
			return
		}
	}
	p.mu.Lock()
	st, first := p.stats, p.firstNanos
	p.mu.Unlock()
	st.Reconnects = uint32(p.reconnects)
	p.write(func(w *wire.Writer) error {
		if err := w.WriteStats(&st); err != nil {
			return err
		}
		p.doneSent.Store(true)
		return w.WriteDone(&wire.Done{FirstProgressUnixNano: first})
	})
}

// serve reads the current connection: it places pages until the source's DoneAck.
func (p *pcRecv) serve() error {
	l := p.link
	for {
		m, err := l.r.Next()
		if err != nil {
			if l.ctx.Err() != nil && !errors.Is(err, wire.ErrPeer) {
				if cause := context.Cause(l.ctx); cause != errLinkDropped {
					return cause
				}
			}
			return err
		}
		switch m := m.(type) {
		case *wire.PageBatch:
			if err := p.place(m, &p.rc.pl); err != nil {
				return err
			}
		case *wire.Keepalive:
		case *wire.PushEnd:
			p.pushEnd = m
			// Pages asked for again (their dedup reference failed) come after the push.
			if n, again := p.missingAfterPush(); n != again && p.rc.streams == nil {
				return fmt.Errorf("%w: the source ended its push, and %d pages are still missing", ErrProtocol, n)
			}
			// With a fault channel, requested pages may still be on their way on it.
		case *wire.DoneAck:
			if !p.doneSent.Load() {
				return fmt.Errorf("%w: done ack before done", ErrProtocol)
			}
			return nil
		default:
			return unexpected(m, "page batch, keepalive, push end or done ack")
		}
	}
}

// missingAfterPush is the count of missing pages, and of those asked for again.
func (p *pcRecv) missingAfterPush() (missing, again uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.remaining, uint64(len(p.askedAgain))
}

func (p *pcRecv) missingCount() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.remaining
}

// place installs a batch's pages that are still missing (a page present already, or never
// missing, is never overwritten: the running guest may have changed it) and completes the
// migration when the last one is in.
func (p *pcRecv) place(b *wire.PageBatch, pl *placing) error {
	pl.again = pl.again[:0]
	err := p.placeSpans(b, pl)
	if len(pl.again) > 0 && err == nil {
		// References to pages the guest has changed since: fetch these pages again.
		p.mu.Lock()
		p.fetchedAgain += uint64(len(pl.again))
		if p.askedAgain == nil {
			p.askedAgain = map[PageRef]bool{}
		}
		for _, ref := range pl.again {
			p.askedAgain[ref] = true
		}
		p.mu.Unlock()
		p.requestPages(slices.Clone(pl.again), true)
	}
	return err
}

func (p *pcRecv) placeSpans(b *wire.PageBatch, pl *placing) error {
	r := int(b.Region)
	ps := int(p.ps)
	return p.rc.codec.spans(b, pl, func(sp wire.Span, k pages.Kind) error {
		// The main connection's reader and the fault channel's may both place a page: the
		// Destination keeps the first copy (both are the source's final one), and only the
		// pages this call cleared below count.
		var runs [][2]uint64
		p.mu.Lock()
		bm := p.missing[r]
		for i := sp.First; i < sp.First+sp.Count; {
			first, ok := bm.next(i, sp.First+sp.Count, true)
			if !ok {
				break
			}
			end, _ := bm.next(first, sp.First+sp.Count, false)
			runs = append(runs, [2]uint64{first, end - first})
			i = end
		}
		p.mu.Unlock()
		var got uint64
		for _, run := range runs {
			first, n := run[0], run[1]
			var err error
			if sp.Enc == wire.EncRaw {
				off := int(first-sp.First) * ps
				err = p.rc.vmm(fmt.Sprintf("PlacePages(region %d, page %d, %d pages)", r, first, n), p.pd.PlacePages(r, first, sp.Data[off:off+int(n)*ps]))
			} else {
				err = p.rc.vmm(fmt.Sprintf("PlaceZero(region %d, page %d, %d pages)", r, first, n), p.pd.PlaceZero(r, first, n))
			}
			if err != nil {
				return err
			}
		}
		now := time.Now()
		p.mu.Lock()
		for _, run := range runs {
			for pg := run[0]; pg < run[0]+run[1]; pg++ {
				if !bm.Has(pg) {
					continue // the other reader placed it meanwhile
				}
				got++
				bm.Clear(pg)
				ref := PageRef{r, pg}
				delete(p.askedAgain, ref)
				if at, ok := p.faultAt[ref]; ok {
					p.lat = append(p.lat, now.Sub(at))
					delete(p.faultAt, ref)
				}
			}
		}
		pl.counts.Add(k, got)
		p.remaining -= got
		p.placed += got
		p.duplicates += sp.Count - got
		done := p.remaining == 0 && got > 0
		p.mu.Unlock()
		if done {
			return p.completed()
		}
		return nil
	})
}

// completed runs once every page is present: demand paging ends, the source may release its
// memory, and the guest's progress is measured for a window more.
func (p *pcRecv) completed() error {
	rc := p.rc
	if err := p.pd.DisarmPostcopy(); err != nil {
		rc.rep.Warnings = append(rc.rep.Warnings, (&vmmError{side: "destination", op: "DisarmPostcopy", err: err}).Error())
	}
	now := time.Now()
	pc, hasProgress := rc.dst.(ProgressCounter)
	p.mu.Lock()
	p.completeAt = now
	if hasProgress {
		p.count1 = pc.ProgressCount()
	}
	p.mu.Unlock()
	rc.phase = "postcopy complete"
	close(p.complete)
	go func() {
		defer close(p.after)
		var after float64
		if hasProgress {
			t := time.NewTimer(progressWindow)
			select {
			case <-t.C:
			case <-rc.ctx.Done():
			}
			t.Stop()
			after = rate(p.count1, pc.ProgressCount(), time.Since(now))
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		p.stats = p.statsLocked(after)
	}()
	return nil
}

// statsLocked computes the figures for the Stats frame and the destination's report.
func (p *pcRecv) statsLocked(after float64) wire.Stats {
	lat := slices.Clone(p.lat)
	slices.Sort(lat)
	st := wire.Stats{
		DemandFaults:   p.faults,
		PagesRequested: p.requests,
		PostcopyNanos:  uint64(max(0, p.completeAt.Sub(p.startAt))),
		ProgressAfter:  after,
	}
	if _, ok := p.rc.dst.(ProgressCounter); ok {
		st.ProgressDuring = rate(p.count0, p.count1, p.completeAt.Sub(p.startAt))
	}
	if n := len(lat); n > 0 {
		st.P50Nanos = uint64(max(0, lat[n*50/100]))
		st.P99Nanos = uint64(max(0, lat[min(n-1, n*99/100)]))
		st.MaxNanos = uint64(max(0, lat[n-1]))
		k := min(n, wire.MaxLatencySample)
		for i := range k {
			st.Latencies = append(st.Latencies, uint64(max(0, lat[i*n/k])))
		}
	}
	rep := p.rc.rep.Postcopy
	rep.DemandFaults = st.DemandFaults
	rep.DedupFetchedAgain = p.fetchedAgain
	rep.FaultLatencyP50US = float64(st.P50Nanos) / 1e3
	rep.FaultLatencyP99US = float64(st.P99Nanos) / 1e3
	rep.FaultLatencyMaxUS = float64(st.MaxNanos) / 1e3
	rep.FaultLatencyUS = nil
	for _, v := range st.Latencies {
		rep.FaultLatencyUS = append(rep.FaultLatencyUS, float64(v)/1e3)
	}
	rep.PostcopyMS = ms(time.Duration(st.PostcopyNanos))
	rep.ProgressDuring, rep.ProgressAfter = st.ProgressDuring, st.ProgressAfter
	return st
}

// faultLoop turns faults into Request frames: a page not yet requested on this connection is
// requested at once, together with whatever other faults are already waiting (no delay).
func (p *pcRecv) faultLoop() {
	defer close(p.faultDone)
	faults := p.pd.Faults()
	var batch []Fault
	for {
		select {
		case f, ok := <-faults:
			if !ok {
				return
			}
			batch = append(batch[:0], f)
		case <-p.quit:
			return
		}
		closed := false
	more:
		for len(batch) < wire.MaxBatchPages {
			select {
			case f, ok := <-faults:
				if !ok {
					closed = true
					break more
				}
				batch = append(batch, f)
			default:
				break more
			}
		}
		now := time.Now()
		var want []PageRef
		p.mu.Lock()
		for _, f := range batch {
			if f.Region < 0 || f.Region >= len(p.missing) || f.Page >= p.sizes[f.Region] {
				continue // not a page of the layout: a VMM bug, nothing to ask for
			}
			k := PageRef{f.Region, f.Page}
			if !p.missing[f.Region].Has(f.Page) {
				// Placed while the fault was on its way: it waited all the same.
				p.faults++
				p.lat = append(p.lat, now.Sub(f.At))
				continue
			}
			if _, ok := p.faultAt[k]; !ok {
				p.faultAt[k] = f.At
				p.faults++
			}
			if !p.requested[k] {
				p.requested[k] = true
				p.requests++
				want = append(want, k)
			}
		}
		p.mu.Unlock()
		p.request(want)
		if closed {
			return
		}
	}
}

// request writes Request frames for the pages, grouped by region.
func (p *pcRecv) request(want []PageRef) { p.requestPages(want, false) }

// requestPages is request; again asks for pages sent already (Request.Again).
func (p *pcRecv) requestPages(want []PageRef, again bool) {
	if len(want) == 0 {
		return
	}
	slices.SortFunc(want, func(a, b PageRef) int {
		if c := cmp.Compare(a.Region, b.Region); c != 0 {
			return c
		}
		return cmp.Compare(a.Page, b.Page)
	})
	for len(want) > 0 {
		r := want[0].Region
		q := wire.Request{Region: uint32(r), Again: again}
		n := 0
		for len(want) > 0 && want[0].Region == r && n < wire.MaxBatchPages {
			pg := want[0].Page
			if k := len(q.Runs); k > 0 && q.Runs[k-1].First+uint64(q.Runs[k-1].Count) == pg {
				q.Runs[k-1].Count++
			} else if k == 0 || q.Runs[k-1].First+uint64(q.Runs[k-1].Count) < pg {
				q.Runs = append(q.Runs, wire.Run{First: pg, Count: 1})
			}
			n++
			want = want[1:]
		}
		if p.write(func(w *wire.Writer) error { return w.WriteRequest(&q) }) != nil {
			return // the link broke; a rejoin requests every faulted page again
		}
	}
}

// reconnect waits for the source to rejoin over the Reconnector. Once every page is present
// it waits at most DoneAckWait (the source may have everything it needs already).
func (p *pcRecv) reconnect() error {
	rc := p.rc
	rc.phase = "waiting for the source to reconnect"
	ctx := rc.ctx
	if p.isComplete() {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(rc.ctx, rc.opts.DoneAckWait,
			fmt.Errorf("%w: the source did not reconnect within %v after every page was present", ErrTimeout, rc.opts.DoneAckWait))
		defer cancel()
	}
	backoff := 10 * time.Millisecond
	for {
		if ctx.Err() != nil {
			return fmt.Errorf("%w (the link broke: %v)", context.Cause(ctx), p.lastBreak)
		}
		conn, err := rc.opts.Reconnect(ctx)
		if err == nil && conn == nil {
			err = errors.New("the reconnector returned no connection")
		}
		if err == nil {
			if err = p.accept(ctx, conn); err == nil {
				p.reconnects++
				p.rc.rep.Postcopy.Reconnects = p.reconnects
				rc.phase = "postcopy"
				if p.isComplete() {
					rc.phase = "postcopy complete"
				}
				return nil
			}
			closeConn(conn)
			rc.rep.Warnings = append(rc.rep.Warnings, fmt.Sprintf("migration: a reconnection was refused: %v", err))
			backoff = 10 * time.Millisecond
			continue
		}
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
		backoff = min(2*backoff, maxBackoff)
	}
}

// accept runs the destination's side of a rejoin on conn: preambles, the source's Rejoin
// (which must name this migration), this side's Lacking set; then conn is the current
// connection and every page faulted and still missing is requested again.
func (p *pcRecv) accept(ctx context.Context, conn io.ReadWriter) error {
	rc := p.rc
	l := newLink(conn, true, wire.AtDestination)
	w, r := l.w, l.r
	r.SetDescription(rc.wdesc)
	r.SetCaps(rc.caps)
	intr := interruptOnDone(ctx, conn)
	setDeadline(conn, time.Now().Add(rc.opts.LinkTimeout))
	err := func() error {
		_, err := r.ReadPreamble()
		if werr := w.WritePreamble(); err == nil && werr != nil {
			return werr
		}
		if err != nil {
			return err
		}
		r.Rejoining()
		m, err := r.Next()
		if err != nil {
			w.WriteError(wire.ErrCodeProtocol, err.Error())
			return err
		}
		j := m.(*wire.Rejoin)
		if j.ID != rc.switchID {
			err := fmt.Errorf("%w: a rejoin for migration %s, this destination runs migration %s", ErrProtocol, j.ID, rc.switchID)
			w.WriteError(wire.ErrCodeProtocol, err.Error())
			return err
		}
		p.mu.Lock()
		lacking := cloneBitmaps(p.missing)
		p.mu.Unlock()
		return writeSet(lacking, p.sizes, func(ps *wire.PageSet, more bool) error {
			return w.WriteLacking(&wire.Lacking{PageSet: *ps}, more)
		})
	}()
	intr.hold()
	setDeadline(conn, time.Time{})
	if err != nil {
		p.bytesW += w.Written()
		p.bytesR += r.BytesRead()
		return err
	}
	p.attach(l)
	return nil
}

// strand turns a failure of post-copy, with pages still missing, into the report's outcome:
// the VM stays here (never aborted), blocked on the pages the paused source holds.
func (p *pcRecv) strand(parent context.Context, err error) error {
	rc := p.rc
	if rc.ctx.Err() != nil {
		if cause := context.Cause(rc.ctx); cause != nil && !errors.Is(err, cause) {
			err = fmt.Errorf("%w (%v)", cause, err)
		}
	}
	result := ResultFailed
	if parent.Err() != nil {
		result = ResultCancelled
	}
	err = &phaseError{phase: rc.phase, err: &destStrandedError{err: err, lacking: p.missingCount(), id: rc.switchID}}
	rc.rep.Result = result
	rc.rep.Error = err.Error()
	return err
}

// destStrandedError is strandedError as the destination sees it.
type destStrandedError struct {
	err     error
	lacking uint64
	id      wire.MigrationID
}

func (e *destStrandedError) Error() string {
	return fmt.Sprintf("%v: this destination runs the VM, which still lacks %d of its pages: they are only on the paused source; keep this VM (do not abort it) and resume the migration from the source to finish it (godwit migrate --resume, migration id %s)", e.err, e.lacking, e.id)
}

func (e *destStrandedError) Unwrap() []error { return []error{ErrStranded, e.err} }
