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

	"github.com/godwit-vm/godwit/migration/dedup"
	"github.com/godwit-vm/godwit/migration/pages"
	"github.com/godwit-vm/godwit/migration/wire"
)

// Several page streams (SendOptions.Streams, CapStreams).
//
// A pre-copy migration may carry its pages over several connections: the main one, which also
// carries everything else, and Streams-1 extra ones that carry page batches only. The source
// announces them on the main connection (Streams, with a random migration id) and opens each
// with Join, naming the id and its index; the destination takes them from its AcceptStream
// and refuses a connection that names another id. Each connection has a lane on the source
// (a buffer, a batch, a writer: the pages are classified, checksummed and written by their own
// goroutine) and a reader goroutine on the destination, which places what it reads.
//
// Pages of one round may go on any connection and arrive in any order, because no page is in
// a round twice and a round never starts before the destination acknowledged the previous one
// (RoundAck), that is, before every page of it was placed: an older copy of a page can never
// overtake a newer one. The destination counts the pages placed on all connections and
// acknowledges a round when the count reaches its RoundEnd's; it restores the state only after
// the final round's count (its Round's) is complete. So the round barrier the single
// connection already had is all the ordering the streams need.
//
// Post-copy and hybrid announce the fault channel first (index 1), then the page streams. The
// push goes on any idle stream, and on the main connection whenever its turn comes or no
// stream is idle: after the switch every page's copy is final, so no order is needed at all.
// The destination places what any connection carries with the same atomic placement, which
// keeps the first copy of a page. A stream that breaks breaks the link; the rejoin goes on
// over the main connection alone, and the destination's Lacking set covers the pages that
// were in flight.

// AutoStreams chooses how many connections a pre-copy's pages take when the caller leaves it
// to the engine, from the cores (one worker per stream on each side: past the cores a stream
// adds no worker that can run, measured on 2 cores: 4 streams within 5% of 2, 8 no better)
// and the bandwidth cap (a cap one connection reaches needs no second). It returns the count
// and why, for the report.
func AutoStreams(cpus int, maxBandwidth int64) (int, string) {
	if maxBandwidth > 0 && maxBandwidth <= OneStreamBandwidth {
		return 1, fmt.Sprintf("1 (auto: the bandwidth cap of %d MB/s is within one connection's reach)", maxBandwidth/1e6)
	}
	n := min(max(cpus, 2), MaxAutoStreams)
	return n, fmt.Sprintf("%d (auto: %d CPUs)", n, cpus)
}

// OneStreamBandwidth is what one connection's worker moves with room to spare (measured on
// direct KVM: about 0.9 GB/s of pre-copy on one stream); AutoStreams takes one stream for a
// bandwidth cap up to it.
const OneStreamBandwidth = 256 << 20

// MaxAutoStreams bounds AutoStreams' choice: more connections than this only divide the link
// further.
const MaxAutoStreams = 8

// DefaultStreamWait bounds the destination's wait for the extra connections the source
// announced, and for the pages they carry once the main connection says how many to expect.
const DefaultStreamWait = 10 * time.Second

// StreamReport is one connection's share of the page traffic.
type StreamReport struct {
	Index  int     `json:"index"` // 0: the main connection
	Bytes  int64   `json:"bytes"` // page batch bytes written (source) or read (destination)
	Pages  uint64  `json:"pages"`
	BusyMS float64 `json:"busy_ms"` // time spent classifying and writing (source) or placing (destination)
}

// lane is one connection's share of the source's page traffic. The sender's goroutine reads
// pages into an idle lane, and a goroutine of the lane's own classifies and writes them; a lane
// comes back to the sender's free queue when its batch is out.
type lane struct {
	index int
	conn  io.ReadWriter // extra connections only: the main one belongs to the caller
	w     *wire.Writer
	intr  *interrupter
	pageBuf
	cls   pages.Classifier
	pages uint64 // in all batches written
	bytes int64
	busy  time.Duration
	err   error

	roundPages uint64 // pages written since sendLanes started
}

// openStreams announces the extra connections, dials them and opens each with Join: in
// post-copy and hybrid the fault channel first (if asked for), then Streams-1 page streams.
func (s *sender) openStreams() error {
	s.phase = "opening streams"
	fault := s.post != nil && s.opts.FaultChannel
	count := max(s.opts.Streams, 1) - 1
	if fault {
		count++
	}
	extra, err := s.openExtra(count)
	if fault && len(extra) > 0 {
		s.post.fault, extra = extra[0], extra[1:]
	}
	if s.opts.Streams <= 1 {
		return err
	}
	s.lanes = append(s.lanes, s.newLane(0, nil, s.link.w))
	s.lanes = append(s.lanes, extra...)
	// Idle from the start, also when a dial failed: closeStreams waits for every lane.
	s.free = make(chan *lane, len(s.lanes))
	for _, ln := range s.lanes {
		ln.buf = make([]byte, s.bufPages*s.ps)
		s.free <- ln
	}
	return err
}

// openExtra announces count extra connections with a fresh id, dials them and opens each with
// Join. The lanes it returns (also on failure: those dialled) belong to the caller.
func (s *sender) openExtra(count int) ([]*lane, error) {
	var id wire.MigrationID
	if _, err := rand.Read(id[:]); err != nil {
		return nil, fmt.Errorf("migration: choosing a migration id: %w", err)
	}
	if err := s.link.w.WriteStreams(&wire.Streams{ID: id, Count: uint16(count)}); err != nil {
		return nil, err
	}
	var lanes []*lane
	for i := 1; i <= count; i++ {
		conn, err := s.opts.DialStream(s.ctx)
		if err != nil {
			return lanes, fmt.Errorf("migration: opening stream %d of %d: %w", i, count+1, err)
		}
		ln := s.newLane(i, conn, wire.NewWriter(conn))
		lanes = append(lanes, ln)
		ln.intr = interruptOnDone(s.link.ctx, conn)
		if err := ln.w.WritePreamble(); err != nil {
			return lanes, fmt.Errorf("migration: stream %d: %w", i, err)
		}
		if _, err := wire.NewReader(conn, wire.AtSource).ReadPreamble(); err != nil {
			return lanes, fmt.Errorf("migration: stream %d: %w", i, err)
		}
		if err := ln.w.WriteJoin(&wire.Join{ID: id, Index: uint16(i)}); err != nil {
			return lanes, fmt.Errorf("migration: stream %d: %w", i, err)
		}
	}
	return lanes, nil
}

// newLane makes a lane without its buffer: the fault channel writes from the sender's.
func (s *sender) newLane(i int, conn io.ReadWriter, w *wire.Writer) *lane {
	encoders := slices.Clone(s.cls.Encoders)
	for k, e := range encoders {
		if _, ok := e.(*dedup.Encoder); ok {
			encoders[k] = s.dedup.Lane(i) // references follow the connection's order
		}
	}
	return &lane{index: i, conn: conn, w: w, cls: pages.Classifier{Encoders: encoders}}
}

// closeStreams closes the extra connections once no lane uses them and adds the lanes'
// figures to the report.
func (s *sender) closeStreams() {
	if d := s.post; d != nil && (d.fault != nil || d.faultBytes > 0) {
		d.closeFault()
		if d.pcr != nil {
			d.pcr.FaultChannelBytes = d.faultBytes
		}
	}
	if s.lanes == nil {
		return
	}
	for _, ln := range s.lanes {
		if ln.conn != nil {
			setDeadline(ln.conn, longAgo) // a lane still writing stops now
		}
	}
	s.idleLanes()
	for _, ln := range s.lanes {
		if ln.conn != nil {
			ln.intr.hold()
			closeConn(ln.conn)
			s.bytesW += ln.w.Written()
		}
		s.rep.Streams = append(s.rep.Streams, StreamReport{Index: ln.index, Bytes: ln.bytes, Pages: ln.pages, BusyMS: ms(ln.busy)})
		// The post-copy push's pages (sendLanes took the rounds').
		s.sent += ln.roundPages
		s.cls.Merge(&ln.cls)
	}
	s.lanes = nil // counted in bytesW now
}

// written is what this side has written to all its connections so far.
func (s *sender) written() int64 {
	n := s.bytesW + s.link.w.Written()
	if s.post != nil && s.post.fault != nil {
		n += s.post.fault.w.Written()
	}
	for _, ln := range s.lanes {
		if ln.conn != nil {
			n += ln.w.Written()
		}
	}
	return n
}

// idleLanes waits until every lane is back in the free queue (and leaves them there). It
// returns the first lane error, if any.
func (s *sender) idleLanes() error {
	var err error
	for range s.lanes {
		ln := <-s.free
		if ln.err != nil && err == nil {
			err = ln.err
		}
		defer func() { s.free <- ln }()
	}
	return err
}

// sendLanes sends the plan's pages over the lanes: the sender's goroutine reads the next pages
// into an idle lane and hands it to a goroutine that classifies and writes them. It returns
// once every lane is idle again, so that the caller may write on the main connection.
func (s *sender) sendLanes(p *roundPlan) error {
	// Pages read ahead while the last acknowledgement was awaited go first, on the main
	// connection, before any lane writes on it.
	sent0, b0 := s.sent, s.link.w.Written()
	if err := s.flush(); err != nil {
		return err
	}
	s.lanes[0].pages += s.sent - sent0
	s.lanes[0].bytes += s.link.w.Written() - b0
	var err error
	for err == nil {
		var ln *lane
		select {
		case ln = <-s.free:
		case <-s.link.ctx.Done():
			err = context.Cause(s.link.ctx)
			continue
		}
		if err = ln.err; err != nil {
			s.free <- ln
			break
		}
		if err = s.fillLane(p, ln); err != nil || ln.used == 0 {
			s.free <- ln
			break
		}
		go s.flushLane(ln)
		s.report(false)
	}
	if err != nil {
		// A write that failed without a known cause may be the destination aborting: its
		// Error frame, on the main connection, says why; give the reader a moment to deliver
		// it before the write's error becomes the reason (as fail does for the main
		// connection alone).
		var we *wire.WriteError
		if errors.As(err, &we) && s.ctx.Err() == nil {
			t := time.NewTimer(peerErrorGrace)
			select {
			case <-s.ctx.Done():
			case <-t.C:
			}
			t.Stop()
		}
		// Stop every lane still writing before the caller writes an Error frame on the main
		// connection: cancelling interrupts every connection's blocked I/O, and the first
		// cause stays the reason.
		s.cancel(err)
		s.idleLanes()
		if s.ctx.Err() != nil {
			err = context.Cause(s.ctx)
		}
		return err
	}
	if err := s.idleLanes(); err != nil {
		return err
	}
	for _, ln := range s.lanes {
		s.sent += ln.roundPages
		ln.roundPages = 0
		s.cls.Merge(&ln.cls)
	}
	return nil
}

// fillLane reads the plan's next pages into the idle lane ln.
func (s *sender) fillLane(p *roundPlan, ln *lane) error {
	ln.reset()
	return s.readInto(p, &ln.pageBuf)
}

// flushLane classifies and writes the lane's pages as one batch, paced by the shared
// bandwidth cap, and puts the lane back in the free queue.
func (s *sender) flushLane(ln *lane) {
	t0 := time.Now()
	defer func() {
		ln.busy += time.Since(t0)
		s.free <- ln
	}()
	ln.encode(&ln.cls, s.ps, s.opts.Compress == CompressAuto)
	n := ln.batch.PayloadLen() + wire.HeaderSize
	s.limitMu.Lock()
	hold := s.limit.reserve(n)
	s.limitMu.Unlock()
	ln.capHeld = hold > 0
	var err error
	if ln.capHeld {
		err = s.clock.Sleep(s.link.ctx, hold)
	}
	if err == nil {
		err = ln.w.WritePages(&ln.batch)
	}
	if err != nil {
		if ln.index > 0 {
			err = fmt.Errorf("stream %d: %w", ln.index, err)
		}
		ln.err = err
		return
	}
	ln.pages += uint64(ln.batch.Pages())
	ln.roundPages += uint64(ln.batch.Pages())
	ln.bytes += int64(n)
	ln.batch.Reset(ln.region, s.ps)
}

// recvStreams is the destination's side of the extra connections.
type recvStreams struct {
	placed  atomic.Uint64 // pages placed by the stream readers and not yet accounted to a round
	signal  chan struct{} // a page batch was placed (buffered, coalescing)
	wg      sync.WaitGroup
	streams []*recvStream
	done    atomic.Bool // the main connection needs nothing more from them
}

type recvStream struct {
	index int
	conn  io.ReadWriter
	r     *wire.Reader
	pl    placing
	pages uint64
	busy  time.Duration
}

// acceptStreams takes the extra connections the source announced from AcceptStream and
// starts a reader on each. A connection that names another migration, or an index taken
// already, is answered with an Error frame and closed; the wait for the right ones goes on,
// bounded by StreamWait.
func (rc *receiver) acceptStreams(m *wire.Streams) error {
	rc.phase = "accepting streams"
	if rc.opts.AcceptStream == nil {
		return fmt.Errorf("%w: the source announced %d extra streams, which were not negotiated", ErrProtocol, m.Count)
	}
	rs := &recvStreams{signal: make(chan struct{}, 1)}
	rc.streams = rs
	ctx, cancel := context.WithTimeout(rc.ctx, rc.opts.StreamWait)
	defer cancel()
	taken := make([]bool, m.Count+1)
	for len(rs.streams) < int(m.Count) {
		conn, err := rc.opts.AcceptStream(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("%w: %d of the source's %d extra streams did not connect within %v", ErrTimeout, int(m.Count)-len(rs.streams), m.Count, rc.opts.StreamWait)
			}
			return fmt.Errorf("migration: accepting stream: %w", err)
		}
		st, err := rc.joinStream(ctx, conn, m, taken)
		if err != nil {
			rc.rep.Warnings = append(rc.rep.Warnings, fmt.Sprintf("migration: refused a connection: %v", err))
			closeConn(conn)
			continue
		}
		rs.streams = append(rs.streams, st)
	}
	for _, st := range rs.streams {
		rs.wg.Add(1)
		go rc.readStream(st)
	}
	return nil
}

// joinStream does the handshake of one extra connection: preambles, then Join.
func (rc *receiver) joinStream(ctx context.Context, conn io.ReadWriter, m *wire.Streams, taken []bool) (*recvStream, error) {
	stop := context.AfterFunc(ctx, func() { setDeadline(conn, longAgo) })
	defer stop()
	defer setDeadline(conn, time.Time{})
	setDeadline(conn, time.Now().Add(rc.opts.StreamWait))
	r := wire.NewReader(conn, wire.AtDestination)
	w := wire.NewWriter(conn)
	_, err := r.ReadPreamble()
	if werr := w.WritePreamble(); err == nil {
		err = werr
	}
	if err != nil {
		return nil, err
	}
	r.SetDescription(rc.wdesc)
	r.SetCaps(rc.caps)
	r.PageStream()
	msg, err := r.Next()
	if err != nil {
		return nil, err
	}
	j, ok := msg.(*wire.Join)
	if !ok {
		return nil, unexpected(msg, "join")
	}
	refuse := func(format string, args ...any) (*recvStream, error) {
		err := fmt.Errorf(format, args...)
		w.WriteError(wire.ErrCodeProtocol, err.Error())
		return nil, err
	}
	if j.ID != m.ID {
		return refuse("stream of migration %s, this one is %s", j.ID, m.ID)
	}
	if int(j.Index) > int(m.Count) || taken[j.Index] {
		return refuse("stream index %d: taken or beyond the %d announced", j.Index, m.Count)
	}
	taken[j.Index] = true
	return &recvStream{index: int(j.Index), conn: conn, r: r}, nil
}

// readStream places the page batches of one extra connection until it ends.
func (rc *receiver) readStream(st *recvStream) {
	rs := rc.streams
	defer rs.wg.Done()
	for {
		msg, err := st.r.Next()
		if err != nil {
			if p := rc.pcPlace.Load(); p != nil {
				// Post-copy: a broken fault channel is a broken link. The source rejoins
				// (or the migration strands) on the main connection; requested pages take
				// it from then on.
				if !p.isComplete() {
					p.breakLink(fmt.Errorf("migration: the fault channel broke: %w", err))
				}
				return
			}
			if !rs.done.Load() {
				rc.cancel(fmt.Errorf("migration: stream %d: %w", st.index, err))
			}
			return
		}
		b := msg.(*wire.PageBatch) // the Reader accepts nothing else after Join
		t0 := time.Now()
		if p := rc.pcPlace.Load(); p != nil {
			// The fault channel of a post-copy: demanded pages.
			if err := p.place(b, &st.pl); err != nil {
				rc.cancel(fmt.Errorf("migration: stream %d: %w", st.index, err))
				return
			}
		} else if err := rc.place(b, &st.pl); err != nil {
			rc.cancel(fmt.Errorf("migration: stream %d: %w", st.index, err))
			return
		}
		st.busy += time.Since(t0)
		st.pages += b.Pages
		rs.placed.Add(b.Pages)
		select {
		case rs.signal <- struct{}{}:
		default:
		}
	}
}

// awaitStreams waits until the stream readers have placed want pages beyond those the main
// connection carried in this round (have), and accounts them to it.
func (rc *receiver) awaitStreams(want, have uint64) error {
	rs := rc.streams
	if want < have {
		return fmt.Errorf("%w: the main connection carried %d pages of a round of %d", ErrProtocol, have, want)
	}
	need := want - have
	t := time.NewTimer(rc.opts.StreamWait)
	defer t.Stop()
	for {
		got := rs.placed.Load()
		if got > need {
			return fmt.Errorf("%w: the streams carried %d pages, the round has %d beyond the main connection's", ErrProtocol, got, need)
		}
		if got == need {
			rs.placed.Add(-need)
			return nil
		}
		select {
		case <-rs.signal:
		case <-t.C:
			return fmt.Errorf("%w: the streams placed %d of %d pages within %v", ErrTimeout, got, need, rc.opts.StreamWait)
		case <-rc.ctx.Done():
			return context.Cause(rc.ctx)
		}
	}
}

// closeStreams stops the readers, closes the extra connections and adds their figures.
func (rc *receiver) closeStreams() (bytesRead int64) {
	rs := rc.streams
	if rs == nil {
		return 0
	}
	rs.done.Store(true)
	for _, st := range rs.streams {
		setDeadline(st.conn, longAgo)
	}
	rs.wg.Wait()
	for _, st := range rs.streams {
		closeConn(st.conn)
		rc.pl.counts.Merge(&st.pl.counts)
		bytesRead += st.r.BytesRead()
		rc.rep.Streams = append(rc.rep.Streams, StreamReport{Index: st.index, Bytes: st.r.BytesRead(), Pages: st.pages, BusyMS: ms(st.busy)})
	}
	return bytesRead
}
