package wire

import (
	"fmt"
	"io"
	"net"
	"syscall"

	"github.com/zeebo/xxh3"
)

// frameSum is a frame's checksum: the low 32 bits of XXH3-64 over the header's first 12 bytes
// followed by the payload. It guards against corruption between the two VMMs' memory (a
// broken NIC offload, a bug in a proxy, a torn buffer), which TCP's own checksum misses; XXH3
// runs at several times the speed of CRC32C, and every page of a migration passes through it
// twice, on both hosts.
func frameSum(h *xxh3.Hasher, head []byte, payload ...[]byte) uint32 {
	h.Reset()
	h.Write(head)
	for _, p := range payload {
		h.Write(p)
	}
	return uint32(h.Sum64())
}

// Writer writes one direction of a stream. It is not safe for concurrent use. Small frames go
// out with one Write each; a page batch goes out as one gathered write (writev on a
// *net.TCPConn or *net.UnixConn) of its header and the caller's page buffers, so page data is
// never copied in user space. After a frame was partly written, every later call returns the
// same error; a frame of which nothing went out can be followed by others (an Error frame).
type Writer struct {
	sum *xxh3.Hasher
	w   io.Writer
	n   int64
	seq uint32
	buf []byte   // header and small payloads, reused
	iov [][]byte // backing store for the gathered write, reused
	err error
}

// NewWriter returns a Writer on w.
func NewWriter(w io.Writer) *Writer {
	return &Writer{sum: xxh3.New(), w: w, buf: make([]byte, 0, 4096)}
}

// Written is the number of bytes written to the underlying writer so far.
func (w *Writer) Written() int64 { return w.n }

// Frames is the number of frames written so far.
func (w *Writer) Frames() uint32 { return w.seq }

// Err is the error that broke the stream (a frame was partly written), if any.
func (w *Writer) Err() error { return w.err }

// WritePreamble writes the 16-byte preamble. It must be the first thing written.
func (w *Writer) WritePreamble() error {
	return w.WriteRawPreamble(Version, MinVersion)
}

// WriteRawPreamble writes a preamble with the given versions. Only tests and version
// negotiation experiments need anything but WritePreamble.
func (w *Writer) WriteRawPreamble(version, minVersion uint32) error {
	b := append(w.buf[:0], Magic...)
	b = le.AppendUint32(b, version)
	b = le.AppendUint32(b, minVersion)
	w.buf = b
	return w.write(b)
}

func (w *Writer) write(b []byte) error {
	if w.err != nil {
		return w.err
	}
	n, err := w.w.Write(b)
	w.n += int64(n)
	if err == nil && n < len(b) {
		err = io.ErrShortWrite
	}
	return w.failed(int64(n), err, "")
}

// WriteError is a failure to write a frame to the underlying writer.
type WriteError struct {
	Frame uint32 // sequence number of the frame
	what  string
	Err   error
}

func (e *WriteError) Error() string {
	return fmt.Sprintf("wire: write frame %d%s: %v", e.Frame, e.what, e.Err)
}
func (e *WriteError) Unwrap() error { return e.Err }

// failed records the outcome of writing a frame of which n bytes went out. If none did, the
// stream is still intact: the frame's sequence number is given back and the error is not
// sticky, so the caller may still send an Error frame. A partly written frame corrupts the
// stream for good.
func (w *Writer) failed(n int64, err error, what string) error {
	if err == nil {
		return nil
	}
	err = &WriteError{Frame: w.seq, what: what, Err: err}
	if n == 0 {
		w.seq--
		return err
	}
	w.err = err
	return err
}

// putHeader fills the 16-byte header at h[0:16] for a payload of length n held, in order, by
// the slices of payload.
func (w *Writer) putHeader(h []byte, t Type, flags uint8, n int, payload ...[]byte) {
	w.seq++
	h[0], h[1], h[2], h[3] = byte(t), flags, 0, 0
	le.PutUint32(h[4:], uint32(n))
	le.PutUint32(h[8:], w.seq)
	le.PutUint32(h[12:], frameSum(w.sum, h[:12], payload...))
}

// frame writes a frame whose payload is produced by build appending to a buffer.
func (w *Writer) frame(t Type, flags uint8, build func([]byte) []byte) error {
	if w.err != nil {
		return w.err
	}
	b := append(w.buf[:0], make([]byte, HeaderSize)...)
	b = build(b)
	w.buf = b
	n := len(b) - HeaderSize
	if n > MaxFramePayload {
		return fmt.Errorf("wire: write %s: payload of %d bytes exceeds %d", t, n, MaxFramePayload)
	}
	w.putHeader(b, t, flags, n, b[HeaderSize:])
	return w.write(b)
}

// WriteHello writes the source's Hello, after validating the description.
func (w *Writer) WriteHello(h *Hello) error {
	if err := h.Desc.Validate(); err != nil {
		return err
	}
	return w.frame(TypeHello, 0, func(b []byte) []byte { return AppendHello(b, h) })
}

// WriteWelcome writes the destination's Welcome.
func (w *Writer) WriteWelcome(m *Welcome) error {
	return w.frame(TypeWelcome, 0, func(b []byte) []byte { return AppendWelcome(b, m) })
}

// WriteRound opens a round.
func (w *Writer) WriteRound(r *Round) error {
	var f uint8
	if r.Final {
		f = FlagFinal
	}
	return w.frame(TypeRound, f, func(b []byte) []byte { return AppendRound(b, r) })
}

// WritePages writes a page batch with one gathered write. The batch's data is read, never
// copied; it may be reused as soon as WritePages returns.
func (w *Writer) WritePages(b *OutBatch) error {
	if w.err != nil {
		return w.err
	}
	if len(b.encs) == 0 {
		return nil
	}
	n := b.PayloadLen()
	if n > MaxFramePayload || len(b.encs) > MaxBatchPages {
		return fmt.Errorf("wire: write page batch: %d pages in %d bytes exceed the caps (%d pages, %d bytes)", len(b.encs), n, MaxBatchPages, MaxFramePayload)
	}
	h := append(w.buf[:0], make([]byte, HeaderSize)...)
	h = b.appendHead(h)
	w.buf = h
	w.iov = append(w.iov[:0], h[HeaderSize:])
	w.iov = append(w.iov, b.data...)
	w.putHeader(h, TypePageBatch, 0, n, w.iov...)
	w.iov[0] = h
	bufs := net.Buffers(w.iov)
	total := int64(len(h) + b.dataLen)
	// WriteTo uses writev when the writer is a socket and falls back to one Write per slice.
	// It consumes bufs but not the backing array, which is reused next time.
	m, err := bufs.WriteTo(w.w)
	w.n += m
	clear(w.iov) // drop references to the caller's buffers
	if err == nil && m != total {
		err = io.ErrShortWrite
	}
	return w.failed(m, err, " (page batch)")
}

// WriteRoundEnd closes a live round.
func (w *Writer) WriteRoundEnd(m *RoundEnd) error {
	return w.frame(TypeRoundEnd, 0, func(b []byte) []byte { return AppendRoundEnd(b, m) })
}

// WriteRoundAck acknowledges a RoundEnd once the round's pages are placed.
func (w *Writer) WriteRoundAck(m *RoundAck) error {
	return w.frame(TypeRoundAck, 0, func(b []byte) []byte { return AppendRoundAck(b, m) })
}

// WriteSection writes one state section, split into frames of at most chunk bytes of data
// (0 means as large as a frame allows).
func (w *Writer) WriteSection(s *Section, chunk int) error {
	if s.ID == "" || len(s.ID) > MaxNameLen {
		return fmt.Errorf("wire: write state: component id %q is empty or longer than %d bytes", s.ID, MaxNameLen)
	}
	if len(s.Data) > MaxSectionSize {
		return fmt.Errorf("wire: write state %q: %d bytes exceed %d", s.ID, len(s.Data), MaxSectionSize)
	}
	head := 1 + len(s.ID) + 4
	if limit := MaxFramePayload - head; chunk <= 0 || chunk > limit {
		chunk = limit
	}
	data := s.Data
	for {
		part := data
		var flags uint8
		if len(part) > chunk {
			part, flags = part[:chunk], FlagMore
		}
		err := w.frame(TypeState, flags, func(b []byte) []byte {
			b = appendStateHead(b, s.ID, s.Version)
			return append(b, part...)
		})
		if err != nil || flags == 0 {
			return err
		}
		data = data[chunk:]
	}
}

// WriteComplete ends the source's stream of memory and state.
func (w *Writer) WriteComplete(m *Complete) error {
	return w.frame(TypeComplete, 0, func(b []byte) []byte { return AppendComplete(b, m) })
}

// WriteResumed acknowledges Complete.
func (w *Writer) WriteResumed(m *Resumed) error {
	return w.frame(TypeResumed, 0, func(b []byte) []byte { return AppendResumed(b, m) })
}

// WriteDone writes the destination's last frame.
func (w *Writer) WriteDone(m *Done) error {
	return w.frame(TypeDone, 0, func(b []byte) []byte { return AppendDone(b, m) })
}

// WriteDoneAck acknowledges Done.
func (w *Writer) WriteDoneAck() error {
	return w.frame(TypeDoneAck, 0, func(b []byte) []byte { return b })
}

// WriteRequest asks the source for pages (post-copy).
func (w *Writer) WriteRequest(q *Request) error {
	var flags uint8
	if q.Again {
		flags = FlagAgain
	}
	return w.frame(TypeRequest, flags, func(b []byte) []byte { return AppendRequest(b, q) })
}

// WriteError tells the peer why this side aborts. It is the last frame a side writes.
func (w *Writer) WriteError(code ErrCode, msg string) error {
	return w.frame(TypeError, 0, func(b []byte) []byte { return AppendError(b, code, msg) })
}

// unixWriter is a connection that passes file descriptors beside bytes: *net.UnixConn and
// anything that wraps one with its methods.
type unixWriter interface {
	WriteMsgUnix(b, oob []byte, addr *net.UnixAddr) (n, oobn int, err error)
}

// PassesFDs says whether WriteMemory can pass file descriptors over w (a handover needs that).
func PassesFDs(w io.Writer) bool {
	_, ok := w.(unixWriter)
	return ok
}

// WriteMemory hands guest memory over: under CapHandover the Memory frame with fds (one per
// region, in order) passed beside its bytes as SCM_RIGHTS in the same sendmsg, so that they
// arrive with the frame's first byte (it needs a Unix socket; the fds stay the caller's);
// under CapShared, without fds, the frame alone.
func (w *Writer) WriteMemory(m *Memory, fds []int) error {
	if w.err != nil {
		return w.err
	}
	if len(fds) == 0 { // shared memory: the id names it
		return w.frame(TypeMemory, 0, func(b []byte) []byte { return AppendMemory(b, m) })
	}
	uw, ok := w.w.(unixWriter)
	if !ok {
		return fmt.Errorf("wire: write memory: the connection (%T) cannot pass file descriptors; a handover needs a Unix socket", w.w)
	}
	if len(fds) != len(m.Sizes) || len(fds) > maxPassedFDs {
		return fmt.Errorf("wire: write memory: %d files for %d regions (at most %d)", len(fds), len(m.Sizes), maxPassedFDs)
	}
	b := append(w.buf[:0], make([]byte, HeaderSize)...)
	b = AppendMemory(b, m)
	w.buf = b
	w.putHeader(b, TypeMemory, 0, len(b)-HeaderSize, b[HeaderSize:])
	n, _, err := uw.WriteMsgUnix(b, syscall.UnixRights(fds...), nil)
	w.n += int64(n)
	if err == nil && n < len(b) {
		err = io.ErrShortWrite
	}
	return w.failed(int64(n), err, " (memory)")
}

// maxPassedFDs is the most file descriptors Linux passes in one message (SCM_MAX_FD).
const maxPassedFDs = 253

// WriteMemoryAck says that the memory handed over is mapped.
func (w *Writer) WriteMemoryAck() error {
	return w.frame(TypeMemoryAck, 0, func(b []byte) []byte { return b })
}

// WriteRawFrame writes a frame with an arbitrary type, flags and payload, bypassing every
// check. It exists so that tests can produce illegal streams.
func (w *Writer) WriteRawFrame(t Type, flags uint8, payload []byte) error {
	return w.frame(t, flags, func(b []byte) []byte { return append(b, payload...) })
}

// checkSet refuses a page set part that no frame can hold.
func checkSet(t Type, s *PageSet) error {
	if len(s.Runs) > MaxSetRuns {
		return fmt.Errorf("wire: write %s: %d runs exceed %d per frame", t, len(s.Runs), MaxSetRuns)
	}
	return nil
}

// WriteSwitch writes one frame of the switch to post-copy; more says that the set continues in
// the next frame.
func (w *Writer) WriteSwitch(m *Switch, more bool) error {
	if err := checkSet(TypeSwitch, &m.PageSet); err != nil {
		return err
	}
	return w.frame(TypeSwitch, moreFlag(more), func(b []byte) []byte { return AppendSwitch(b, m) })
}

// WriteAhead writes one frame of the part of a pure post-copy's missing set that is known
// before the pause (CapAhead); more says that the set continues in the next frame.
func (w *Writer) WriteAhead(m *Ahead, more bool) error {
	if err := checkSet(TypeAhead, &m.PageSet); err != nil {
		return err
	}
	return w.frame(TypeAhead, moreFlag(more), func(b []byte) []byte { return AppendAhead(b, m) })
}

// WriteLacking writes one frame of the destination's answer to Rejoin; more says that the set
// continues in the next frame.
func (w *Writer) WriteLacking(m *Lacking, more bool) error {
	if err := checkSet(TypeLacking, &m.PageSet); err != nil {
		return err
	}
	return w.frame(TypeLacking, moreFlag(more), func(b []byte) []byte { return AppendLacking(b, m) })
}

func moreFlag(more bool) uint8 {
	if more {
		return FlagMore
	}
	return 0
}

// WritePushEnd tells the destination that every page it lacked has been sent.
func (w *Writer) WritePushEnd(m *PushEnd) error {
	return w.frame(TypePushEnd, 0, func(b []byte) []byte { return AppendPushEnd(b, m) })
}

// WriteKeepalive writes an empty frame that proves the link alive.
func (w *Writer) WriteKeepalive() error {
	return w.frame(TypeKeepalive, 0, func(b []byte) []byte { return b })
}

// WriteFilled tells the source that every page is present.
func (w *Writer) WriteFilled(m *Filled) error {
	return w.frame(TypeFilled, 0, func(b []byte) []byte { return AppendFilled(b, m) })
}

// WriteStats sends the destination's post-copy figures.
func (w *Writer) WriteStats(m *Stats) error {
	return w.frame(TypeStats, 0, func(b []byte) []byte { return AppendStats(b, m) })
}

// WriteRejoin opens a new connection of a post-copy migration (instead of Hello).
func (w *Writer) WriteRejoin(m *Rejoin) error {
	return w.frame(TypeRejoin, 0, func(b []byte) []byte { return AppendRejoin(b, m) })
}

// WriteStreams announces the extra page connections (CapStreams), after Welcome and before the
// first Round.
func (w *Writer) WriteStreams(m *Streams) error {
	return w.frame(TypeStreams, 0, func(b []byte) []byte { return AppendStreams(b, m) })
}

// WriteJoin opens an extra page connection (instead of Hello).
func (w *Writer) WriteJoin(m *Join) error {
	return w.frame(TypeJoin, 0, func(b []byte) []byte { return AppendJoin(b, m) })
}
