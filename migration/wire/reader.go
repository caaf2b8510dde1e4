package wire

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/zeebo/xxh3"
)

// Side says which direction of the stream a Reader decodes.
type Side uint8

const (
	// AtDestination reads what a source writes: Hello, rounds, state, Complete, DoneAck.
	AtDestination Side = 1
	// AtSource reads what a destination writes: Welcome, round acks, requests, Resumed, Done.
	AtSource Side = 2
)

// Receiver states. Each names what has been seen last; the transitions are in accept.
type state uint8

const (
	stHello    state = iota // destination: nothing yet
	stStream                // destination: after Hello, before the first Round
	stRound                 // destination: inside a live round
	stRoundEnd              // destination: after a live round's RoundEnd
	stFinal                 // destination: inside the final round
	stState                 // destination: after the first State section
	stComplete              // destination: after Complete
	stWelcome               // source: nothing yet
	stRun                   // source: after Welcome
	stResumed               // source: after Resumed (and in post-copy, after the Lacking set of a rejoin)
	stSwitch                // destination: after the switch to post-copy (its page set may continue)
	stPost                  // destination: post-copy, after Complete or Rejoin
	stRejoin                // destination: a rejoining connection, nothing yet
	stLacking               // source: a rejoining connection, before the end of the Lacking set
	stJoin                  // destination: an extra page connection, nothing yet
	stPages                 // destination: an extra page connection after Join
	stAhead                 // destination: after the Ahead set began (pure post-copy, CapAhead)
	stMemory                // destination: after Memory (CapHandover): state or complete next
	stEnd                   // either: the peer's last frame was read; only EOF may follow
)

// expecting describes the legal next frames in a state, for error messages.
func (s state) expecting() string {
	switch s {
	case stHello:
		return "hello"
	case stStream:
		return "round 1"
	case stRound:
		return "page batch or round end"
	case stRoundEnd:
		return "next round"
	case stFinal:
		return "page batch, state or complete"
	case stState:
		return "state or complete"
	case stComplete:
		return "done ack"
	case stWelcome:
		return "welcome"
	case stRun:
		return "round ack, request or resumed"
	case stResumed:
		return "done"
	case stSwitch:
		return "switch, state or complete"
	case stPost:
		return "page batch, keepalive, push end or done ack"
	case stRejoin:
		return "rejoin"
	case stLacking:
		return "lacking"
	case stJoin:
		return "join"
	case stPages:
		return "page batch"
	case stAhead:
		return "switch"
	case stMemory:
		return "state or complete"
	}
	return "end of stream"
}

// expecting describes the legal next frames, for error messages.
func (r *Reader) expecting() string {
	if r.st == stResumed && r.caps&CapPostcopy != 0 {
		return "request, keepalive, filled, stats or done"
	}
	if r.st == stStream && r.caps&memoryCaps != 0 {
		return "memory"
	}
	if r.st == stRun && r.caps&memoryCaps != 0 && !r.memoryAck {
		return "memory ack"
	}
	if r.st == stStream && r.caps&CapStreams != 0 && r.streams == 0 {
		return "streams or round 1"
	}
	return r.st.expecting()
}

// Reader reads and checks one direction of a stream. It is not safe for concurrent use.
//
// Invariants: frames are numbered from 1 in the order read; once Next has returned an error,
// it returns that error forever; a message returned by Next is valid until the next call
// (page batches alias the Reader's buffer).
type Reader struct {
	sum     *xxh3.Hasher
	br      *bufio.Reader
	cr      countingReader
	side    Side
	version uint32
	frame   uint64
	st      state
	err     error
	hdr     [HeaderSize]byte
	payload []byte

	desc    *Description
	offered Caps // source side: what our Hello offered
	caps    Caps // negotiated

	round      uint32
	roundPages uint64 // pages in the batches of the current round
	acked      uint32 // source side: the last round acknowledged
	pages      uint64
	sections   uint32
	seen       map[string]bool // section ids received
	pending    *Section        // a section whose data continues in the next frame
	batch      PageBatch

	// Post-copy.
	post     bool // destination: the stream switched to post-copy
	pushEnd  bool // destination: PushEnd read on this connection
	filled   bool // source: Filled read
	stats    bool // source: Stats read
	set      setState
	switchID MigrationID

	// Extra page connections (CapStreams).
	streams uint16 // main connection at the destination: extra connections announced

	memoryAck bool // source: MemoryAck read (CapHandover)
}

// setState follows a page set (Switch or Lacking) across its frames.
type setState struct {
	t      Type   // the frames' type; 0 when no set has started
	open   bool   // the last frame had FlagMore
	total  uint64 // the Total every frame must repeat
	sum    uint64 // pages in the frames so far
	region uint32 // the last frame's region
	next   uint64 // the end of the last run in region
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// readBufferSize is the bufio size. Payloads larger than it are read straight into the
// payload buffer by bufio, so it only has to absorb headers and small frames.
const readBufferSize = 64 << 10

// NewReader returns a Reader for the given side on r.
func NewReader(r io.Reader, side Side) *Reader {
	rd := &Reader{sum: xxh3.New(), side: side, seen: map[string]bool{}}
	rd.cr.r = r
	rd.br = bufio.NewReaderSize(&rd.cr, readBufferSize)
	if side == AtSource {
		rd.st = stWelcome
	}
	return rd
}

// BytesRead is the number of bytes read from the underlying reader.
func (r *Reader) BytesRead() int64 { return r.cr.n }

// Frames is the number of frames read.
func (r *Reader) Frames() uint64 { return r.frame }

// Version is the negotiated protocol version (0 before ReadPreamble).
func (r *Reader) Version() uint32 { return r.version }

// Description is the layout the Reader checks batches and requests against.
func (r *Reader) Description() *Description { return r.desc }

// SetDescription gives a source-side Reader the layout its Hello announced (for Request
// frames). A destination-side Reader takes it from the Hello it reads.
func (r *Reader) SetDescription(d *Description) { r.desc = d }

// SetOffered tells a source-side Reader the capabilities its Hello offered, so that it can
// refuse a Welcome that accepts more.
func (r *Reader) SetOffered(c Caps) { r.offered = c }

// SetCaps sets the negotiated capabilities on a destination-side Reader (what its Welcome
// accepted). Frames and encodings that need a capability not set are rejected.
func (r *Reader) SetCaps(c Caps) { r.caps = c }

// Caps is the negotiated capability set.
func (r *Reader) Caps() Caps { return r.caps }

// Rejoining prepares a Reader on a new connection of a post-copy migration whose link broke
// (call it after ReadPreamble, with the layout and capabilities set by SetDescription and
// SetCaps). A destination-side Reader then expects Rejoin instead of Hello and continues in
// post-copy; a source-side Reader expects the Lacking set instead of Welcome, then post-copy.
func (r *Reader) Rejoining() {
	r.post = true
	if r.side == AtDestination {
		r.st = stRejoin
	} else {
		r.st = stLacking
	}
}

// PageStream prepares a destination-side Reader on an extra page connection (CapStreams; call
// it after ReadPreamble, with the layout and capabilities of the main connection set by
// SetDescription and SetCaps): it expects Join, then page batches only.
func (r *Reader) PageStream() { r.st = stJoin }

// ReadPreamble reads the peer's preamble and settles the protocol version.
func (r *Reader) ReadPreamble() (uint32, error) {
	var p [PreambleSize]byte
	n, err := io.ReadFull(r.br, p[:])
	if err != nil {
		if n == 0 && errors.Is(err, io.EOF) {
			return 0, r.fail(&FrameError{Kind: ErrClosed, Detail: "the peer closed the stream before its preamble"})
		}
		return 0, r.fail(&FrameError{Kind: ErrTruncated, Detail: fmt.Sprintf("got %d of %d bytes: %v", n, PreambleSize, err)})
	}
	if string(p[:8]) != Magic {
		return 0, r.fail(&FrameError{Kind: ErrMagic, Detail: fmt.Sprintf("got %q, want %q", p[:8], Magic)})
	}
	hi, lo := le.Uint32(p[8:]), le.Uint32(p[12:])
	v, err := Negotiate(hi, lo)
	if err != nil {
		return 0, r.fail(err)
	}
	r.version = v
	return v, nil
}

// Negotiate returns the version spoken with a peer that speaks versions lo..hi.
func Negotiate(hi, lo uint32) (uint32, error) {
	v := min(hi, Version)
	if lo > hi || v < max(lo, MinVersion) {
		return 0, &FrameError{Kind: ErrVersion, Detail: fmt.Sprintf("the peer speaks versions %d..%d, this side %d..%d", lo, hi, MinVersion, Version)}
	}
	return v, nil
}

func (r *Reader) fail(err error) error {
	if r.err == nil {
		r.err = err
	}
	return r.err
}

// Next reads, checks and decodes the next frame. An Error frame from the peer is returned as a
// *PeerError (errors.Is(err, ErrPeer)). After the peer's last frame, a clean end of stream
// returns io.EOF; an end anywhere else is ErrClosed or ErrTruncated.
func (r *Reader) Next() (Msg, error) {
	if r.err != nil {
		return nil, r.err
	}
	if r.version == 0 {
		return nil, r.fail(&FrameError{Kind: ErrOrder, Detail: "Next called before ReadPreamble"})
	}
	for {
		m, more, err := r.next()
		if err != nil {
			return nil, r.fail(err)
		}
		if !more {
			return m, nil
		}
	}
}

// next reads one frame. more is true when it was a partial state section and another frame
// must be read before there is a message to return.
func (r *Reader) next() (m Msg, more bool, err error) {
	idx := r.frame + 1
	n, err := io.ReadFull(r.br, r.hdr[:])
	if err != nil {
		if n == 0 && errors.Is(err, io.EOF) {
			if r.st == stEnd && r.pending == nil {
				return nil, false, io.EOF
			}
			return nil, false, &FrameError{Frame: idx, Kind: ErrClosed, Detail: "the peer closed the stream while this side expected " + r.expecting()}
		}
		return nil, false, &FrameError{Frame: idx, Kind: ErrTruncated, Detail: fmt.Sprintf("header: got %d of %d bytes: %v", n, HeaderSize, err)}
	}
	r.frame = idx
	h := r.hdr[:]
	t, flags := Type(h[0]), h[1]
	length, seq, want := le.Uint32(h[4:]), le.Uint32(h[8:]), le.Uint32(h[12:])
	fe := func(k error, format string, args ...any) error {
		return &FrameError{Frame: idx, Type: t, Kind: k, Detail: fmt.Sprintf(format, args...)}
	}
	if length > MaxFramePayload {
		return nil, false, fe(ErrTooLarge, "payload length %d exceeds %d", length, MaxFramePayload)
	}
	p, err := r.readPayload(int(length))
	if err != nil {
		return nil, false, fe(ErrTruncated, "payload: got %d of %d bytes: %v", len(p), length, err)
	}
	got := frameSum(r.sum, h[:12], p)
	if got != want {
		return nil, false, fe(ErrChecksum, "want 0x%08x, got 0x%08x", want, got)
	}
	if seq != uint32(idx) {
		return nil, false, fe(ErrSequence, "sequence %d, want %d", seq, uint32(idx))
	}
	if h[2] != 0 || h[3] != 0 {
		return nil, false, fe(ErrMalformed, "reserved header bytes 0x%02x%02x, want 0", h[2], h[3])
	}
	if !t.known() {
		return nil, false, fe(ErrUnknownType, "")
	}
	if extra := flags &^ allowedFlags(t); extra != 0 {
		return nil, false, fe(ErrMalformed, "flags 0x%02x not defined for this type", extra)
	}
	if t == TypeError {
		pe, err := DecodeError(p)
		if err != nil {
			return nil, false, at(err, idx)
		}
		pe.Frame = idx
		r.st = stEnd
		return nil, false, pe
	}
	if err := r.accept(t); err != nil {
		return nil, false, fe(ErrOrder, "%s", err)
	}
	m, more, err = r.decode(t, flags, p)
	if err != nil {
		return nil, false, at(err, idx)
	}
	return m, more, nil
}

// at sets the frame index on a decoding error.
func at(err error, idx uint64) error {
	var fe *FrameError
	if errors.As(err, &fe) && fe.Frame == 0 {
		fe.Frame = idx
	}
	return err
}

// readPayload reads n bytes into the reused payload buffer. The buffer grows with the data
// actually received, so a header that announces a large payload and then stops costs nothing.
func (r *Reader) readPayload(n int) ([]byte, error) {
	if n <= cap(r.payload) {
		p := r.payload[:n]
		k, err := io.ReadFull(r.br, p)
		return p[:k], err
	}
	p := r.payload[:0]
	for len(p) < n {
		step := min(n-len(p), max(len(p), 64<<10))
		p = slices.Grow(p, step)
		k, err := io.ReadFull(r.br, p[len(p):len(p)+step])
		p = p[:len(p)+k]
		if err != nil {
			return p, err
		}
	}
	r.payload = p
	return p, nil
}

// accept checks that a frame of type t may come now. It does not change the state: the
// transition happens in decode, once the payload is known to be valid.
func (r *Reader) accept(t Type) error {
	if r.pending != nil && t != TypeState {
		return fmt.Errorf("%s while state section %q continues", t, r.pending.ID)
	}
	if r.set.open && t != r.set.t {
		return fmt.Errorf("%s while the %s set continues", t, r.set.t)
	}
	post := r.caps&CapPostcopy != 0
	if !post {
		switch t {
		case TypeSwitch, TypePushEnd, TypeKeepalive, TypeFilled, TypeStats, TypeRejoin, TypeLacking, TypeAhead:
			return fmt.Errorf("%s, but post-copy was not negotiated", t)
		}
	}
	if r.caps&CapAhead == 0 && t == TypeAhead {
		return fmt.Errorf("%s, but sending the set ahead was not negotiated", t)
	}
	if r.caps&CapStreams == 0 && (t == TypeStreams || t == TypeJoin) {
		return fmt.Errorf("%s, but extra streams were not negotiated", t)
	}
	handover := r.caps&memoryCaps != 0
	if !handover && (t == TypeMemory || t == TypeMemoryAck) {
		return fmt.Errorf("%s, but neither a memory handover nor shared memory was negotiated", t)
	}
	// A handover carries memory as files and nothing but state after them: no pages.
	if handover && r.side == AtDestination && t != TypeHello && t != TypeMemory && t != TypeState && t != TypeComplete && t != TypeDoneAck {
		return fmt.Errorf("%s in a memory handover", t)
	}
	if handover && r.side == AtSource && !r.memoryAck && t != TypeWelcome && t != TypeMemoryAck {
		return fmt.Errorf("%s before the memory ack of a handover", t)
	}
	ok := false
	switch r.side {
	case AtDestination:
		switch t {
		case TypeHello:
			ok = r.st == stHello
		case TypeRound:
			ok = r.st == stStream || r.st == stRoundEnd
		case TypePageBatch:
			// With CapDedup, pages asked for again (Request.Again) may follow PushEnd.
			ok = r.st == stRound || r.st == stFinal || (r.st == stPost && (!r.pushEnd || r.caps&CapDedup != 0)) || r.st == stPages
		case TypeStreams:
			ok = r.st == stStream && r.streams == 0
		case TypeJoin:
			ok = r.st == stJoin
		case TypeRoundEnd:
			ok = r.st == stRound
		case TypeAhead:
			ok = r.st == stStream
		case TypeMemory:
			ok = r.st == stStream
		case TypeSwitch:
			ok = r.st == stStream || r.st == stRoundEnd || r.st == stAhead || (r.st == stSwitch && r.set.open)
		case TypeState:
			ok = r.st == stFinal || r.st == stState || r.st == stSwitch || r.st == stMemory
		case TypeComplete:
			ok = r.st == stFinal || r.st == stState || r.st == stSwitch || r.st == stMemory
		case TypeKeepalive:
			ok = r.st == stPost
		case TypePushEnd:
			ok = r.st == stPost && !r.pushEnd
		case TypeRejoin:
			ok = r.st == stRejoin
		case TypeDoneAck:
			ok = r.st == stComplete || r.st == stPost
		}
	case AtSource:
		switch t {
		case TypeWelcome:
			ok = r.st == stWelcome
		case TypeRoundAck:
			ok = r.st == stRun
		case TypeMemoryAck:
			ok = r.st == stRun && !r.memoryAck
		case TypeRequest:
			if !post {
				return fmt.Errorf("request, but post-copy was not negotiated")
			}
			ok = r.st == stRun || r.st == stResumed
		case TypeResumed:
			ok = r.st == stRun
		case TypeDone:
			// In post-copy, Filled comes with Stats: both precede Done.
			ok = r.st == stResumed && r.filled == r.stats
		case TypeKeepalive:
			ok = r.st == stResumed
		case TypeFilled:
			ok = r.st == stResumed && !r.filled
		case TypeStats:
			ok = r.st == stResumed && r.filled && !r.stats
		case TypeLacking:
			ok = r.st == stLacking
		}
	}
	if !ok {
		return fmt.Errorf("expected %s", r.expecting())
	}
	return nil
}

func (r *Reader) decode(t Type, flags uint8, p []byte) (Msg, bool, error) {
	bad := func(k error, format string, args ...any) error {
		return &FrameError{Type: t, Kind: k, Detail: fmt.Sprintf(format, args...)}
	}
	switch t {
	case TypeHello:
		h, err := DecodeHello(p)
		if err != nil {
			return nil, false, err
		}
		r.desc = &h.Desc
		r.st = stStream
		return h, false, nil
	case TypeWelcome:
		w, err := DecodeWelcome(p)
		if err != nil {
			return nil, false, err
		}
		if extra := w.Caps &^ r.offered; extra != 0 {
			return nil, false, bad(ErrMalformed, "accepts capabilities %#x that were not offered (%#x)", uint64(extra), uint64(r.offered))
		}
		r.caps = w.Caps
		r.st = stRun
		return w, false, nil
	case TypeRound:
		rd, err := DecodeRound(p, flags&FlagFinal != 0)
		if err != nil {
			return nil, false, err
		}
		if rd.N != r.round+1 {
			return nil, false, bad(ErrOrder, "round %d after round %d", rd.N, r.round)
		}
		r.round = rd.N
		r.roundPages = 0
		r.st = stRound
		if rd.Final {
			r.st = stFinal
		}
		return rd, false, nil
	case TypePageBatch:
		if err := decodePageBatch(p, r.desc, r.caps, &r.batch); err != nil {
			return nil, false, err
		}
		r.pages += r.batch.Pages
		r.roundPages += r.batch.Pages
		return &r.batch, false, nil
	case TypeRoundEnd:
		m, err := DecodeRoundEnd(p)
		if err != nil {
			return nil, false, err
		}
		if m.N != r.round {
			return nil, false, bad(ErrOrder, "end of round %d inside round %d", m.N, r.round)
		}
		// With extra streams the round's pages arrive on several connections: the engine
		// counts them.
		if r.streams == 0 && m.Pages != r.roundPages {
			return nil, false, bad(ErrMalformed, "source sent %d pages in round %d, this side received %d", m.Pages, m.N, r.roundPages)
		}
		r.st = stRoundEnd
		return m, false, nil
	case TypeRoundAck:
		m, err := DecodeRoundAck(p)
		if err != nil {
			return nil, false, err
		}
		if m.N != r.acked+1 {
			return nil, false, bad(ErrOrder, "acknowledgement of round %d after round %d", m.N, r.acked)
		}
		r.acked = m.N
		return m, false, nil
	case TypeState:
		return r.decodeState(flags, p)
	case TypeComplete:
		c, err := DecodeComplete(p)
		if err != nil {
			return nil, false, err
		}
		if (r.streams == 0 && c.Pages != r.pages) || c.Sections != r.sections {
			return nil, false, bad(ErrMalformed, "source sent %d pages and %d state sections, this side received %d and %d", c.Pages, c.Sections, r.pages, r.sections)
		}
		r.st = stComplete
		if r.post {
			r.st = stPost
		}
		return c, false, nil
	case TypeSwitch:
		m, err := DecodeSwitch(p, r.desc)
		if err != nil {
			return nil, false, err
		}
		if r.set.t == TypeSwitch && m.ID != r.switchID {
			return nil, false, bad(ErrMalformed, "migration id %s, the set began with %s", m.ID, r.switchID)
		}
		if err := r.setFrame(TypeSwitch, &m.PageSet, flags&FlagMore != 0); err != nil {
			return nil, false, err
		}
		r.switchID = m.ID
		m.More = flags&FlagMore != 0
		r.post = true
		r.st = stSwitch
		return m, false, nil
	case TypeAhead:
		m, err := DecodeAhead(p, r.desc)
		if err != nil {
			return nil, false, err
		}
		if err := r.setFrame(TypeAhead, &m.PageSet, flags&FlagMore != 0); err != nil {
			return nil, false, err
		}
		m.More = flags&FlagMore != 0
		r.st = stStream
		if !m.More {
			r.st = stAhead
		}
		return m, false, nil
	case TypeLacking:
		m, err := DecodeLacking(p, r.desc)
		if err != nil {
			return nil, false, err
		}
		if err := r.setFrame(TypeLacking, &m.PageSet, flags&FlagMore != 0); err != nil {
			return nil, false, err
		}
		m.More = flags&FlagMore != 0
		if !r.set.open {
			r.st = stResumed
		}
		return m, false, nil
	case TypePushEnd:
		m, err := DecodePushEnd(p)
		if err != nil {
			return nil, false, err
		}
		r.pushEnd = true
		return m, false, nil
	case TypeKeepalive:
		m, err := DecodeKeepalive(p)
		return m, false, err
	case TypeFilled:
		m, err := DecodeFilled(p)
		if err != nil {
			return nil, false, err
		}
		r.filled = true
		return m, false, nil
	case TypeStats:
		m, err := DecodeStats(p)
		if err != nil {
			return nil, false, err
		}
		r.stats = true
		return m, false, nil
	case TypeStreams:
		m, err := DecodeStreams(p)
		if err != nil {
			return nil, false, err
		}
		r.streams = m.Count
		return m, false, nil
	case TypeMemory:
		m, err := DecodeMemory(p)
		if err != nil {
			return nil, false, err
		}
		if r.desc == nil || len(m.Sizes) != len(r.desc.Regions) {
			return nil, false, bad(ErrMalformed, "%d regions handed over, the hello described %d", len(m.Sizes), r.regions())
		}
		for i, n := range m.Sizes {
			if n != r.desc.Regions[i].Size {
				return nil, false, bad(ErrMalformed, "region %d handed over with %d bytes, the hello described %d", i, n, r.desc.Regions[i].Size)
			}
		}
		var zero [16]byte
		if shared := r.caps&CapShared != 0; shared == (m.ID == zero) {
			return nil, false, bad(ErrMalformed, "memory id %x with shared memory %v", m.ID, shared)
		}
		r.st = stMemory
		return m, false, nil
	case TypeMemoryAck:
		m, err := DecodeMemoryAck(p)
		if err != nil {
			return nil, false, err
		}
		r.memoryAck = true
		return m, false, nil
	case TypeJoin:
		m, err := DecodeJoin(p)
		if err != nil {
			return nil, false, err
		}
		r.st = stPages
		return m, false, nil
	case TypeRejoin:
		m, err := DecodeRejoin(p)
		if err != nil {
			return nil, false, err
		}
		r.st = stPost
		return m, false, nil
	case TypeDoneAck:
		a, err := DecodeDoneAck(p)
		if err != nil {
			return nil, false, err
		}
		r.st = stEnd
		return a, false, nil
	case TypeResumed:
		m, err := DecodeResumed(p)
		if err != nil {
			return nil, false, err
		}
		r.st = stResumed
		return m, false, nil
	case TypeDone:
		m, err := DecodeDone(p)
		if err != nil {
			return nil, false, err
		}
		r.st = stEnd
		return m, false, nil
	case TypeRequest:
		if r.desc == nil {
			return nil, false, bad(ErrOrder, "request before the layout is known")
		}
		q, err := DecodeRequest(p, r.desc)
		if err == nil {
			q.Again = flags&FlagAgain != 0
		}
		return q, false, err
	}
	return nil, false, bad(ErrUnknownType, "")
}

// setFrame checks one frame of a page set against the frames before it: the same total,
// regions and pages ascending across frames, and, at the last frame, exactly total pages.
func (r *Reader) setFrame(t Type, ps *PageSet, more bool) error {
	bad := func(format string, args ...any) error {
		return &FrameError{Type: t, Kind: ErrMalformed, Detail: fmt.Sprintf(format, args...)}
	}
	s := &r.set
	if !s.open {
		if s.t == t {
			return &FrameError{Type: t, Kind: ErrOrder, Detail: "a second " + t.String() + " set"}
		}
		*s = setState{t: t, total: ps.Total, region: ps.Region}
	} else {
		if ps.Total != s.total {
			return bad("set of %d pages continues as a set of %d", s.total, ps.Total)
		}
		if ps.Region < s.region {
			return bad("region %d after region %d", ps.Region, s.region)
		}
		if ps.Region != s.region {
			s.region, s.next = ps.Region, 0
		}
	}
	if len(ps.Runs) > 0 && ps.Runs[0].First < s.next {
		return bad("run at page %d of region %d starts before the previous frame's end %d", ps.Runs[0].First, ps.Region, s.next)
	}
	n := ps.Pages()
	if s.sum+n > s.total {
		return bad("%d pages so far, the set holds %d", s.sum+n, s.total)
	}
	s.sum += n
	if k := len(ps.Runs); k > 0 {
		s.next = ps.Runs[k-1].First + uint64(ps.Runs[k-1].Count)
	}
	s.open = more
	if !more && s.sum != s.total {
		return bad("the set ends with %d pages, it announced %d", s.sum, s.total)
	}
	return nil
}

// decodeState handles one State frame, reassembling sections split with FlagMore.
func (r *Reader) decodeState(flags uint8, p []byte) (Msg, bool, error) {
	bad := func(k error, format string, args ...any) error {
		return &FrameError{Type: TypeState, Kind: k, Detail: fmt.Sprintf(format, args...)}
	}
	id, version, data, err := DecodeState(p)
	if err != nil {
		return nil, false, err
	}
	s := r.pending
	if s != nil {
		if id != s.ID || version != s.Version {
			return nil, false, bad(ErrOrder, "section %q version %d continues as %q version %d", s.ID, s.Version, id, version)
		}
		if len(s.Data)+len(data) > MaxSectionSize {
			return nil, false, bad(ErrTooLarge, "section %q exceeds %d bytes", id, MaxSectionSize)
		}
		s.Data = append(s.Data, data...)
	} else {
		if !slices.Contains(r.desc.Devices, id) {
			return nil, false, bad(ErrMalformed, "section %q is not in the hello's device list", id)
		}
		if r.seen[id] {
			return nil, false, bad(ErrMalformed, "section %q sent twice", id)
		}
		if r.sections >= MaxSections {
			return nil, false, bad(ErrTooLarge, "more than %d sections", MaxSections)
		}
		s = &Section{ID: id, Version: version, Data: slices.Clone(data)}
	}
	if flags&FlagMore != 0 {
		r.pending = s
		return nil, true, nil
	}
	r.pending = nil
	r.seen[id] = true
	r.sections++
	r.st = stState
	if s.Data == nil {
		s.Data = []byte{}
	}
	return s, false, nil
}

// regions is the number of regions of the Hello's description (0 before it).
func (r *Reader) regions() int {
	if r.desc == nil {
		return 0
	}
	return len(r.desc.Regions)
}
