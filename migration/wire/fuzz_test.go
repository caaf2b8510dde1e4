package wire

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// Every decoder is fuzzed for two properties: it never panics or allocates beyond the caps, and
// whatever it accepts it re-encodes to the same bytes (so the encoder and decoder agree on one
// canonical layout). A decoding error must match one of the package's sentinels.

func checkSentinel(t *testing.T, err error) {
	t.Helper()
	for _, s := range []error{ErrMagic, ErrVersion, ErrTruncated, ErrClosed, ErrTooLarge, ErrChecksum, ErrSequence, ErrUnknownType, ErrOrder, ErrMalformed, ErrPeer} {
		if errors.Is(err, s) {
			return
		}
	}
	t.Fatalf("error %v matches no sentinel", err)
}

// drain reads a stream as a Reader would and checks each message's invariants.
func drain(t *testing.T, data []byte, side Side) { drainFrom(t, data, side, false) }

// drainFrom is drain, on a rejoining connection when rejoin is set.
func drainFrom(t *testing.T, data []byte, side Side, rejoin bool) {
	drainConn(t, data, side, rejoin, false, streamCaps)
}

// streamCaps are the capabilities the stream fuzzers negotiate: all but CapHandover, which
// allows no pages at all (FuzzReaderHandover has it).
const streamCaps = KnownCaps &^ (CapHandover | CapShared)

// drainConn is drain on any kind of connection: a rejoining one (rejoin) or an extra page
// stream (pageStream, at the destination).
func drainConn(t *testing.T, data []byte, side Side, rejoin, pageStream bool, caps Caps) {
	r := NewReader(bytes.NewReader(data), side)
	r.SetOffered(caps)
	r.SetCaps(caps)
	if side == AtSource || rejoin || pageStream {
		d := testDesc()
		r.SetDescription(&d)
	}
	if _, err := r.ReadPreamble(); err != nil {
		checkSentinel(t, err)
		return
	}
	if rejoin {
		r.Rejoining()
	}
	if pageStream {
		r.PageStream()
	}
	joined, streams, handedOver := false, false, false
	// What the Reader promises about rounds, recomputed from the messages it returned.
	var round *Round
	var roundPages uint64
	var acked uint32
	post := rejoin
	var setSum, setTotal uint64
	setOpen := false
	layout := testDesc()
	checkSet := func(ps *PageSet) {
		if !setOpen {
			setSum = 0 // a new set
		}
		if setOpen && ps.Total != setTotal {
			t.Fatalf("set total %d accepted after %d", ps.Total, setTotal)
		}
		setTotal = ps.Total
		setSum += ps.Pages()
		if setSum > setTotal {
			t.Fatalf("set of %d pages accepted with %d so far", setTotal, setSum)
		}
		for i, run := range ps.Runs {
			if run.Count == 0 || run.First+uint64(run.Count) > layout.Pages(int(ps.Region)) || (i > 0 && run.First < ps.Runs[i-1].First+uint64(ps.Runs[i-1].Count)) {
				t.Fatalf("bad run %d accepted: %+v", i, ps.Runs)
			}
		}
	}
	for i := 0; ; i++ {
		m, err := r.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			checkSentinel(t, err)
			if _, again := r.Next(); again != err {
				t.Fatalf("Next after error returned %v, want the same %v", again, err)
			}
			return
		}
		switch m := m.(type) {
		case *Memory:
			d := r.Description()
			if handedOver || round != nil || caps&(CapHandover|CapShared) == 0 || len(m.Sizes) != len(d.Regions) {
				t.Fatalf("memory %+v accepted (handed over before: %v, round %+v, caps %#x)", m, handedOver, round, uint64(caps))
			}
			for i, n := range m.Sizes {
				if n != d.Regions[i].Size {
					t.Fatalf("memory %+v accepted for regions %+v", m, d.Regions)
				}
			}
			handedOver = true
		case *PageBatch:
			if caps&(CapHandover|CapShared) != 0 {
				t.Fatalf("page batch accepted in a handover")
			}
			checkBatch(t, m, r.Description())
			if round == nil && !post && !joined {
				t.Fatalf("page batch outside a round")
			}
			roundPages += m.Pages
		case *Join:
			if !pageStream || joined {
				t.Fatalf("join accepted on a connection that is not a fresh page stream")
			}
			joined = true
		case *Streams:
			if pageStream || streams || round != nil {
				t.Fatalf("streams accepted after round %+v (streams before: %v)", round, streams)
			}
			streams = true
		case *Switch:
			post = true
			checkSet(&m.PageSet)
			setOpen = r.set.open
			if !setOpen && setSum != setTotal {
				t.Fatalf("switch set ended with %d of %d pages", setSum, setTotal)
			}
		case *Ahead:
			if post || round != nil {
				t.Fatalf("ahead accepted after round %+v (post-copy: %v)", round, post)
			}
			checkSet(&m.PageSet)
			setOpen = r.set.open
			if !setOpen && setSum != setTotal {
				t.Fatalf("ahead set ended with %d of %d pages", setSum, setTotal)
			}
		case *Lacking:
			checkSet(&m.PageSet)
			setOpen = r.set.open
			if !setOpen && setSum != setTotal {
				t.Fatalf("lacking set ended with %d of %d pages", setSum, setTotal)
			}
		case *Stats:
			if len(m.Latencies) > MaxLatencySample {
				t.Fatalf("%d latencies accepted", len(m.Latencies))
			}
		case *Round:
			if (round == nil && m.N != 1) || (round != nil && m.N != round.N+1) {
				t.Fatalf("round %d accepted after %+v", m.N, round)
			}
			round, roundPages = m, 0
		case *RoundEnd:
			if round == nil || round.Final || m.N != round.N || (!streams && m.Pages != roundPages) {
				t.Fatalf("round end %+v accepted in round %+v after %d pages", m, round, roundPages)
			}
		case *RoundAck:
			if m.N != acked+1 {
				t.Fatalf("acknowledgement of round %d accepted after %d", m.N, acked)
			}
			acked = m.N
		}
	}
}

// checkBatch verifies that the spans of an accepted batch cover exactly its pages and data.
func checkBatch(t *testing.T, b *PageBatch, d *Description) {
	var pages uint64
	var data int
	for sp := range b.Spans {
		pages += sp.Count
		data += len(sp.Data)
		if sp.First+sp.Count > d.Pages(int(b.Region)) {
			t.Fatalf("span %d+%d outside region %d", sp.First, sp.Count, b.Region)
		}
		if sp.Enc == EncRaw && uint64(len(sp.Data)) != sp.Count*d.PageSize {
			t.Fatalf("raw span of %d pages has %d bytes", sp.Count, len(sp.Data))
		}
	}
	if pages != b.Pages || data != len(b.Data) {
		t.Fatalf("spans cover %d pages and %d bytes, batch has %d and %d", pages, data, b.Pages, len(b.Data))
	}
}

func FuzzReaderDestination(f *testing.F) {
	s := sourceStream(f)
	f.Add(s)
	f.Add(s[:PreambleSize+40])
	f.Add([]byte(Magic))
	f.Add(postSourceStream(f))
	f.Add(aheadSourceStream(f))
	f.Fuzz(func(t *testing.T, data []byte) { drain(t, data, AtDestination) })
}

func FuzzReaderSource(f *testing.F) {
	f.Add(destStream(f))
	f.Add(postDestStream(f))
	f.Fuzz(func(t *testing.T, data []byte) { drain(t, data, AtSource) })
}

// FuzzReaderRejoin reads a rejoining connection, at either side.
func FuzzReaderRejoin(f *testing.F) {
	f.Add(false, rejoinSourceStream(f))
	f.Add(true, rejoinDestStream(f))
	f.Fuzz(func(t *testing.T, atSource bool, data []byte) {
		side := AtDestination
		if atSource {
			side = AtSource
		}
		drainFrom(t, data, side, true)
	})
}

// FuzzReaderPageStream reads an extra page connection at the destination.
func FuzzReaderPageStream(f *testing.F) {
	f.Add(pageStream(f))
	f.Fuzz(func(t *testing.T, data []byte) { drainConn(t, data, AtDestination, false, true, streamCaps) })
}

// FuzzReaderHandover reads a memory handover (CapHandover) or a migration on shared memory
// (CapShared), at either side.
func FuzzReaderHandover(f *testing.F) {
	f.Add(false, false, handoverSourceStream(f))
	f.Add(true, false, handoverDestStream(f))
	f.Add(false, false, sourceStream(f))
	f.Add(false, true, handoverSourceStream(f))
	f.Fuzz(func(t *testing.T, atSource, shared bool, data []byte) {
		side := AtDestination
		if atSource {
			side = AtSource
		}
		caps := KnownCaps &^ CapShared
		if shared {
			caps = KnownCaps &^ CapHandover
		}
		drainConn(t, data, side, false, false, caps)
	})
}

// pageStream is an extra page connection: preamble, Join, two batches.
func pageStream(t testing.TB) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	w.WritePreamble()
	w.WriteJoin(&Join{ID: testID, Index: 2})
	var b OutBatch
	b.Reset(0, testPS)
	b.Add(3, EncRaw, page(3))
	b.Add(4, EncZero, nil)
	if err := w.WritePages(&b); err != nil {
		t.Fatal(err)
	}
	b.Reset(1, testPS)
	b.Add(0, EncRaw, page(5))
	if err := w.WritePages(&b); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// FuzzFrames gets past the checksum: the input is a list of (type, flags, u16 length, payload)
// entries that the target frames with correct sequence numbers and CRCs, so the fuzzer explores
// the receiver state machine and the payload decoders in context.
func FuzzFrames(f *testing.F) {
	toEntries := func(s []byte) []byte {
		var out []byte
		_, fs := splitFrames(s)
		for _, fr := range fs {
			p := fr[HeaderSize:]
			if len(p) > 0xffff {
				continue
			}
			out = append(out, fr[0], fr[1])
			out = le.AppendUint16(out, uint16(len(p)))
			out = append(out, p...)
		}
		return out
	}
	f.Add(false, toEntries(sourceStream(f)))
	f.Add(true, toEntries(destStream(f)))
	f.Add(false, toEntries(postSourceStream(f)))
	f.Add(true, toEntries(postDestStream(f)))
	f.Fuzz(func(t *testing.T, atSource bool, entries []byte) {
		var buf bytes.Buffer
		w := NewWriter(&buf)
		w.WritePreamble()
		for len(entries) >= 4 {
			n := int(le.Uint16(entries[2:]))
			if n > len(entries)-4 {
				n = len(entries) - 4
			}
			w.WriteRawFrame(Type(entries[0]), entries[1], entries[4:4+n])
			entries = entries[4+n:]
		}
		side := AtDestination
		if atSource {
			side = AtSource
		}
		drain(t, buf.Bytes(), side)
	})
}

func splitFrames(s []byte) (pre []byte, fs [][]byte) {
	pre, s = s[:PreambleSize], s[PreambleSize:]
	for len(s) >= HeaderSize {
		n := HeaderSize + int(le.Uint32(s[4:]))
		if n > len(s) {
			break
		}
		fs = append(fs, s[:n])
		s = s[n:]
	}
	return pre, fs
}

func FuzzDecodeHello(f *testing.F) {
	f.Add(AppendHello(nil, &Hello{Caps: CapBlackout, Desc: testDesc()}))
	based := testDesc()
	based.Base[0], based.Base[31] = 0xb5, 0x5e
	f.Add(AppendHello(nil, &Hello{Caps: CapBlackout | CapBase, Desc: based}))
	f.Fuzz(func(t *testing.T, p []byte) {
		h, err := DecodeHello(p)
		if err != nil {
			checkSentinel(t, err)
			return
		}
		if err := h.Desc.Validate(); err != nil {
			t.Fatalf("accepted a hello that does not validate: %v", err)
		}
		if again := AppendHello(nil, h); !bytes.Equal(again, p) {
			t.Fatalf("re-encoded hello differs:\n%x\n%x", again, p)
		}
	})
}

func FuzzDecodePageBatch(f *testing.F) {
	_, fs := splitFrames(sourceStream(f))
	for _, fr := range fs {
		if Type(fr[0]) == TypePageBatch {
			f.Add(fr[HeaderSize:])
		}
	}
	// Variable-length pages (what compressed pages look like on the wire) among the others.
	var vb OutBatch
	vb.Reset(0, testPS)
	vb.Add(2, EncCompressed, []byte("zstd frame"))
	vb.Add(3, EncRaw, page(4))
	vb.Add(4, EncCompressed, []byte{1})
	vb.Add(9, EncZero, nil)
	vb.Add(10, EncDedup, make([]byte, DedupSize))
	vb.Add(11, EncDelta, []byte{0, 1, 1, 2, 3, 4, 5, 6, 7, 8})
	vb.Add(12, EncS2, []byte{0x80, 0x20, 0x00})
	vp := vb.appendHead(nil)
	for _, x := range vb.data {
		vp = append(vp, x...)
	}
	f.Add(vp)
	d := testDesc()
	f.Fuzz(func(t *testing.T, p []byte) {
		var b PageBatch
		if err := decodePageBatch(p, &d, KnownCaps, &b); err != nil {
			checkSentinel(t, err)
			return
		}
		checkBatch(t, &b, &d)
		// Re-encode through OutBatch, page by page, and compare.
		var ob OutBatch
		ob.Reset(b.Region, int(d.PageSize))
		for sp := range b.Spans {
			per := len(sp.Data) / int(sp.Count)
			for i := uint64(0); i < sp.Count; i++ {
				ob.Add(sp.First+i, sp.Enc, sp.Data[int(i)*per:int(i+1)*per])
			}
		}
		again := ob.appendHead(nil)
		for _, x := range ob.data {
			again = append(again, x...)
		}
		// Runs that the sender split but that touch are merged by OutBatch, so compare
		// decoded content rather than bytes when the run counts differ.
		if len(ob.runs) == len(b.Runs) && !bytes.Equal(again, p) {
			t.Fatalf("re-encoded batch differs")
		}
	})
}

// FuzzDecodePayload covers the small decoders, selected by the frame type.
func FuzzDecodePayload(f *testing.F) {
	f.Add(uint8(TypeWelcome), AppendWelcome(nil, &Welcome{Caps: 3}))
	f.Add(uint8(TypeRound), AppendRound(nil, &Round{N: 2, Pages: 9}))
	f.Add(uint8(TypeRoundEnd), AppendRoundEnd(nil, &RoundEnd{N: 2, Pages: 9}))
	f.Add(uint8(TypeRoundAck), AppendRoundAck(nil, &RoundAck{N: 3, Pages: 1 << 40}))
	f.Add(uint8(TypeState), append(appendStateHead(nil, "vcpu0", 2), "data"...))
	f.Add(uint8(TypeComplete), AppendComplete(nil, &Complete{PauseUnixNano: 5, Pages: 3, Sections: 1}))
	f.Add(uint8(TypeResumed), AppendResumed(nil, &Resumed{ResumeUnixNano: 1, RestoreNanos: 2, StartNanos: 3, ArmNanos: 4}))
	f.Add(uint8(TypeDone), AppendDone(nil, &Done{FirstProgressUnixNano: 7}))
	f.Add(uint8(TypeDoneAck), []byte{})
	f.Add(uint8(TypeRequest), AppendRequest(nil, &Request{Region: 1, Runs: []Run{{First: 0, Count: 3}, {First: 5, Count: 1}}}))
	f.Add(uint8(TypeError), AppendError(nil, ErrCodeDestination, "disk full"))
	d := testDesc()
	f.Fuzz(func(t *testing.T, typ uint8, p []byte) {
		var again []byte
		var err error
		switch Type(typ) {
		case TypeWelcome:
			var m *Welcome
			if m, err = DecodeWelcome(p); err == nil {
				again = AppendWelcome(nil, m)
			}
		case TypeRound:
			var m *Round
			if m, err = DecodeRound(p, false); err == nil {
				again = AppendRound(nil, m)
			}
		case TypeRoundEnd:
			var m *RoundEnd
			if m, err = DecodeRoundEnd(p); err == nil {
				again = AppendRoundEnd(nil, m)
			}
		case TypeRoundAck:
			var m *RoundAck
			if m, err = DecodeRoundAck(p); err == nil {
				again = AppendRoundAck(nil, m)
			}
		case TypeState:
			var id string
			var v uint32
			var data []byte
			if id, v, data, err = DecodeState(p); err == nil {
				again = append(appendStateHead(nil, id, v), data...)
			}
		case TypeComplete:
			var m *Complete
			if m, err = DecodeComplete(p); err == nil {
				again = AppendComplete(nil, m)
			}
		case TypeResumed:
			var m *Resumed
			if m, err = DecodeResumed(p); err == nil {
				again = AppendResumed(nil, m)
			}
		case TypeDone:
			var m *Done
			if m, err = DecodeDone(p); err == nil {
				again = AppendDone(nil, m)
			}
		case TypeDoneAck:
			if _, err = DecodeDoneAck(p); err == nil {
				again = []byte{}
			}
		case TypeRequest:
			var m *Request
			if m, err = DecodeRequest(p, &d); err == nil {
				again = AppendRequest(nil, m)
			}
		case TypeError:
			var m *PeerError
			if m, err = DecodeError(p); err == nil {
				again = AppendError(nil, m.Code, m.Message)
			}
		default:
			return
		}
		if err != nil {
			checkSentinel(t, err)
			return
		}
		if !bytes.Equal(again, p) {
			t.Fatalf("%s: re-encoded payload differs:\n%x\n%x", Type(typ), again, p)
		}
	})
}

// The post-copy decoders, one target each: every accepted payload re-encodes to itself.

// fuzzDecoder runs the common property over one decoder.
func fuzzDecoder[M any](f *testing.F, seeds [][]byte, decode func([]byte) (M, error), encode func(M) []byte) {
	for _, s := range seeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		m, err := decode(p)
		if err != nil {
			checkSentinel(t, err)
			return
		}
		if again := encode(m); !bytes.Equal(again, p) {
			t.Fatalf("re-encoded payload differs:\n%x\n%x", again, p)
		}
	})
}

func FuzzDecodeSwitch(f *testing.F) {
	d := testDesc()
	fuzzDecoder(f, [][]byte{
		AppendSwitch(nil, sw(3, 0, Run{First: 1, Count: 2}, Run{First: 9, Count: 1})),
		AppendSwitch(nil, sw(0, 1)),
		AppendSwitch(nil, sw(25, 0, scattered(3, 50)...)), // the bitmap form
	}, func(p []byte) (*Switch, error) { return DecodeSwitch(p, &d) }, func(m *Switch) []byte { return AppendSwitch(nil, m) })
}

func FuzzDecodeAhead(f *testing.F) {
	d := testDesc()
	fuzzDecoder(f, [][]byte{
		AppendAhead(nil, &Ahead{PageSet: PageSet{Total: 9, Region: 1, Runs: []Run{{First: 0, Count: 1}, {First: 15, Count: 1}}}}),
	}, func(p []byte) (*Ahead, error) { return DecodeAhead(p, &d) }, func(m *Ahead) []byte { return AppendAhead(nil, m) })
}

func FuzzDecodeLacking(f *testing.F) {
	d := testDesc()
	fuzzDecoder(f, [][]byte{
		AppendLacking(nil, &Lacking{PageSet: PageSet{Total: 9, Region: 1, Runs: []Run{{First: 0, Count: 1}, {First: 15, Count: 1}}}}),
	}, func(p []byte) (*Lacking, error) { return DecodeLacking(p, &d) }, func(m *Lacking) []byte { return AppendLacking(nil, m) })
}

func FuzzDecodePushEnd(f *testing.F) {
	fuzzDecoder(f, [][]byte{AppendPushEnd(nil, &PushEnd{Pushed: 5, Demanded: 7})}, DecodePushEnd,
		func(m *PushEnd) []byte { return AppendPushEnd(nil, m) })
}

func FuzzDecodeKeepalive(f *testing.F) {
	fuzzDecoder(f, [][]byte{{}}, DecodeKeepalive, func(*Keepalive) []byte { return []byte{} })
}

func FuzzDecodeFilled(f *testing.F) {
	fuzzDecoder(f, [][]byte{AppendFilled(nil, &Filled{Pages: 5, UnixNano: -7})}, DecodeFilled,
		func(m *Filled) []byte { return AppendFilled(nil, m) })
}

func FuzzDecodeStats(f *testing.F) {
	fuzzDecoder(f, [][]byte{
		AppendStats(nil, &Stats{DemandFaults: 3, P50Nanos: 1, P99Nanos: 2, MaxNanos: 3, ProgressDuring: 1.5, Latencies: []uint64{1, 2, 3}}),
		AppendStats(nil, &Stats{}),
	}, DecodeStats, func(m *Stats) []byte { return AppendStats(nil, m) })
}

func FuzzDecodeRejoin(f *testing.F) {
	fuzzDecoder(f, [][]byte{AppendRejoin(nil, &Rejoin{ID: testID, Attempt: 3})}, DecodeRejoin,
		func(m *Rejoin) []byte { return AppendRejoin(nil, m) })
}

func FuzzDecodeStreams(f *testing.F) {
	fuzzDecoder(f, [][]byte{AppendStreams(nil, &Streams{ID: testID, Count: 3})}, DecodeStreams,
		func(m *Streams) []byte { return AppendStreams(nil, m) })
}

func FuzzDecodeMemory(f *testing.F) {
	fuzzDecoder(f, [][]byte{AppendMemory(nil, &Memory{Sizes: []uint64{1 << 30, 4096}})}, DecodeMemory,
		func(m *Memory) []byte { return AppendMemory(nil, m) })
}

func FuzzDecodeJoin(f *testing.F) {
	fuzzDecoder(f, [][]byte{AppendJoin(nil, &Join{ID: testID, Index: 2})}, DecodeJoin,
		func(m *Join) []byte { return AppendJoin(nil, m) })
}
