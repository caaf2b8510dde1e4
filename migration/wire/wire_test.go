package wire

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
)

const testPS = 512

func testDesc() Description {
	return Description{
		PageSize: testPS,
		Regions:  []Region{{Name: "low", GPA: 0, Size: 64 * testPS}, {Name: "high", GPA: 1 << 32, Size: 16 * testPS}},
		VCPUs:    2,
		Devices:  []string{"vcpu0", "vcpu1", "serial"},
	}
}

// page returns a page filled with b.
func page(b byte) []byte { return bytes.Repeat([]byte{b}, testPS) }

// sourceStream writes a complete, legal source->destination stream and returns it.
func sourceStream(t testing.TB) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(w.WritePreamble())
	d := testDesc()
	must(w.WriteHello(&Hello{Caps: CapBlackout, Desc: d}))
	must(w.WriteRound(&Round{N: 1, Pages: 5}))
	// One buffer holding three consecutive pages: the raw ones must be merged into one iovec.
	mem := append(append(page(1), make([]byte, testPS)...), page(3)...)
	var b OutBatch
	b.Reset(0, testPS)
	b.Add(4, EncRaw, mem[:testPS])
	b.Add(5, EncZero, nil)
	b.Add(6, EncRaw, mem[2*testPS:])
	b.Add(10, EncRaw, page(9))
	must(w.WritePages(&b))
	b.Reset(1, testPS)
	b.Add(15, EncZero, nil)
	must(w.WritePages(&b))
	must(w.WriteRoundEnd(&RoundEnd{N: 1, Pages: 5}))
	must(w.WriteRound(&Round{N: 2, Final: true, Pages: 1}))
	b.Reset(0, testPS)
	b.Add(63, EncRaw, page(7))
	must(w.WritePages(&b))
	must(w.WriteSection(&Section{ID: "vcpu0", Version: 3, Data: []byte("registers")}, 0))
	must(w.WriteSection(&Section{ID: "serial", Version: 1, Data: bytes.Repeat([]byte("x"), 1000)}, 300))
	must(w.WriteSection(&Section{ID: "vcpu1", Version: 3}, 0))
	must(w.WriteComplete(&Complete{PauseUnixNano: 12345, Pages: 6, Sections: 3}))
	must(w.WriteDoneAck())
	if w.Written() != int64(buf.Len()) {
		t.Fatalf("Written %d, buffer has %d", w.Written(), buf.Len())
	}
	return buf.Bytes()
}

// destStream writes a complete, legal destination->source stream.
func destStream(t testing.TB) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	for _, err := range []error{
		w.WritePreamble(),
		w.WriteWelcome(&Welcome{Caps: CapBlackout}),
		w.WriteRoundAck(&RoundAck{N: 1, Pages: 5}),
		w.WriteResumed(&Resumed{ResumeUnixNano: 99, RestoreNanos: 5, StartNanos: 6, ArmNanos: 7}),
		w.WriteDone(&Done{FirstProgressUnixNano: 100}),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}

// readAll reads a stream to its end and returns the messages as strings.
func readAll(data []byte, side Side, caps Caps) ([]string, error) {
	r := NewReader(bytes.NewReader(data), side)
	r.SetOffered(caps)
	r.SetCaps(caps)
	if side == AtSource {
		d := testDesc()
		r.SetDescription(&d)
	}
	if _, err := r.ReadPreamble(); err != nil {
		return nil, err
	}
	var out []string
	for {
		m, err := r.Next()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, describe(m))
	}
}

func describe(m Msg) string {
	switch m := m.(type) {
	case *PageBatch:
		var s []string
		for sp := range m.Spans {
			s = append(s, fmt.Sprintf("%s[%d+%d]%d", sp.Enc, sp.First, sp.Count, checksum(sp.Data)))
		}
		return fmt.Sprintf("batch r%d %s", m.Region, strings.Join(s, " "))
	case *Section:
		return fmt.Sprintf("state %s v%d %d", m.ID, m.Version, len(m.Data))
	case *Hello:
		return fmt.Sprintf("hello %#x %d regions", uint64(m.Caps), len(m.Desc.Regions))
	}
	return fmt.Sprintf("%s %+v", m.Type(), m)
}

func checksum(b []byte) int {
	s := 0
	for i, c := range b {
		s += (i%251 + 1) * int(c)
	}
	return s
}

func TestRoundTrip(t *testing.T) {
	got, err := readAll(sourceStream(t), AtDestination, CapBlackout)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"hello 0x1 2 regions",
		"round &{N:1 Final:false Pages:5}",
		fmt.Sprintf("batch r0 raw[4+1]%d zero[5+1]0 raw[6+2]%d", checksum(page(1)), checksum(append(page(3), page(9)...))),
		"batch r1 zero[15+1]0",
		"round end &{N:1 Pages:5}",
		"round &{N:2 Final:true Pages:1}",
		fmt.Sprintf("batch r0 raw[63+1]%d", checksum(page(7))),
		"state vcpu0 v3 9",
		"state serial v1 1000",
		"state vcpu1 v3 0",
		"complete &{PauseUnixNano:12345 Pages:6 Sections:3}",
		"done ack &{}",
	}
	// raw[6+2] merges pages 6 and 10? No: they are not consecutive, so the spans differ.
	want[2] = fmt.Sprintf("batch r0 raw[4+1]%d zero[5+1]0 raw[6+1]%d raw[10+1]%d", checksum(page(1)), checksum(page(3)), checksum(page(9)))
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	got, err = readAll(destStream(t), AtSource, CapBlackout)
	if err != nil {
		t.Fatal(err)
	}
	want = []string{
		"welcome &{Caps:1}",
		"round ack &{N:1 Pages:5}",
		"resumed &{ResumeUnixNano:99 RestoreNanos:5 StartNanos:6 ArmNanos:7}",
		"done &{FirstProgressUnixNano:100}",
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestOutBatchMergesAdjacentData(t *testing.T) {
	mem := make([]byte, 4*testPS)
	var b OutBatch
	b.Reset(0, testPS)
	for i := 0; i < 4; i++ {
		b.Add(uint64(i), EncRaw, mem[i*testPS:(i+1)*testPS])
	}
	if len(b.data) != 1 || len(b.runs) != 1 || b.runs[0].Count != 4 {
		t.Fatalf("data slices %d, runs %v: want one of each", len(b.data), b.runs)
	}
	// A capacity-limited slice must not be extended past its capacity.
	b.Reset(0, testPS)
	b.Add(0, EncRaw, mem[0:testPS:testPS])
	b.Add(1, EncRaw, mem[testPS:2*testPS])
	if len(b.data) != 2 {
		t.Fatalf("capacity-limited slices merged: %d slices", len(b.data))
	}
}

// frames splits a stream into its preamble and frames (header+payload).
func frames(t *testing.T, s []byte) (pre []byte, fs [][]byte) {
	pre, s = s[:PreambleSize], s[PreambleSize:]
	for len(s) > 0 {
		n := HeaderSize + int(le.Uint32(s[4:]))
		fs = append(fs, s[:n])
		s = s[n:]
	}
	return pre, fs
}

func join(pre []byte, fs ...[]byte) []byte {
	out := append([]byte(nil), pre...)
	for _, f := range fs {
		out = append(out, f...)
	}
	return out
}

func expectErr(t *testing.T, data []byte, side Side, sentinel error, msg string) {
	t.Helper()
	_, err := readAll(data, side, CapBlackout)
	if !errors.Is(err, sentinel) {
		t.Fatalf("error %v, want %v", err, sentinel)
	}
	if !strings.Contains(err.Error(), msg) {
		t.Fatalf("error %q does not contain %q", err, msg)
	}
}

func TestDecoderRejects(t *testing.T) {
	s := sourceStream(t)
	pre, fs := frames(t, s)

	t.Run("checksum", func(t *testing.T) {
		bad := bytes.Clone(s)
		// Flip a bit in frame 3's payload (the first page batch).
		off := len(join(pre, fs[:2]...)) + HeaderSize + 40
		bad[off] ^= 0x10
		expectErr(t, bad, AtDestination, ErrChecksum, "wire: frame 3 (page batch): checksum mismatch (want 0x")
	})
	t.Run("truncated payload", func(t *testing.T) {
		cut := len(join(pre, fs[:2]...)) + HeaderSize + 100
		expectErr(t, s[:cut], AtDestination, ErrTruncated, "wire: frame 3 (page batch): truncated (payload: got 100 of")
	})
	t.Run("truncated header", func(t *testing.T) {
		cut := len(join(pre, fs[:2]...)) + 5
		expectErr(t, s[:cut], AtDestination, ErrTruncated, "wire: frame 3: truncated (header: got 5 of 16 bytes")
	})
	t.Run("closed early", func(t *testing.T) {
		expectErr(t, join(pre, fs[:2]...), AtDestination, ErrClosed, "frame 3: stream closed (the peer closed the stream while this side expected page batch or round end)")
	})
	t.Run("oversized", func(t *testing.T) {
		f := bytes.Clone(fs[2])
		le.PutUint32(f[4:], MaxFramePayload+1)
		expectErr(t, join(pre, fs[0], fs[1], f), AtDestination, ErrTooLarge, "frame 3 (page batch): oversized (payload length 16777217 exceeds 16777216)")
	})
	t.Run("sequence", func(t *testing.T) {
		// Dropping frame 2 makes frame 3 arrive as the second.
		expectErr(t, join(pre, fs[0], fs[2]), AtDestination, ErrSequence, "frame 2 (page batch): bad sequence number (sequence 3, want 2)")
	})
	var buf bytes.Buffer
	w := NewWriter(&buf)
	w.WritePreamble()
	w.WriteHello(&Hello{Desc: testDesc()})
	raw := buf.Bytes()
	t.Run("unknown type", func(t *testing.T) {
		w.WriteRawFrame(0x55, 0, []byte("hi"))
		expectErr(t, buf.Bytes(), AtDestination, ErrUnknownType, "wire: frame 2 (type 0x55): unknown frame type")
	})
	buf.Reset()
	buf.Write(raw)
	w = NewWriter(&buf)
	w.seq = 1
	t.Run("batch before round", func(t *testing.T) {
		var b OutBatch
		b.Reset(0, testPS)
		b.Add(1, EncZero, nil)
		w.WritePages(&b)
		expectErr(t, buf.Bytes(), AtDestination, ErrOrder, "wire: frame 2 (page batch): out of order (expected round 1)")
	})
	t.Run("state during live round", func(t *testing.T) {
		expectErr(t, join(pre, fs[0], fs[1], fs[6]), AtDestination, ErrSequence, "")
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1})
			w.WriteSection(&Section{ID: "vcpu0", Data: []byte{1}}, 0)
		})
		expectErr(t, b, AtDestination, ErrOrder, "frame 3 (state): out of order (expected page batch or round end)")
	})
	t.Run("round skipped", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1})
			w.WriteRoundEnd(&RoundEnd{N: 1})
			w.WriteRound(&Round{N: 3})
		})
		expectErr(t, b, AtDestination, ErrOrder, "frame 4 (round): out of order (round 3 after round 1)")
	})
	t.Run("live round not ended", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1})
			w.WriteRound(&Round{N: 2, Final: true})
		})
		expectErr(t, b, AtDestination, ErrOrder, "frame 3 (round): out of order (expected page batch or round end)")
	})
	t.Run("round end of another round", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1})
			w.WriteRoundEnd(&RoundEnd{N: 2})
		})
		expectErr(t, b, AtDestination, ErrOrder, "frame 3 (round end): out of order (end of round 2 inside round 1)")
	})
	t.Run("round end page count", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1})
			var ob OutBatch
			ob.Reset(0, testPS)
			ob.Add(3, EncZero, nil)
			ob.Add(4, EncRaw, page(4))
			w.WritePages(&ob)
			w.WriteRoundEnd(&RoundEnd{N: 1, Pages: 3})
		})
		expectErr(t, b, AtDestination, ErrMalformed, "frame 4 (round end): malformed payload (source sent 3 pages in round 1, this side received 2)")
	})
	t.Run("round end twice", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1})
			w.WriteRoundEnd(&RoundEnd{N: 1})
			w.WriteRoundEnd(&RoundEnd{N: 1})
		})
		expectErr(t, b, AtDestination, ErrOrder, "frame 4 (round end): out of order (expected next round)")
	})
	t.Run("batch after round end", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1})
			w.WriteRoundEnd(&RoundEnd{N: 1})
			var ob OutBatch
			ob.Reset(0, testPS)
			ob.Add(3, EncZero, nil)
			w.WritePages(&ob)
		})
		expectErr(t, b, AtDestination, ErrOrder, "frame 4 (page batch): out of order (expected next round)")
	})
	t.Run("round end of the final round", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1, Final: true})
			w.WriteRoundEnd(&RoundEnd{N: 1})
		})
		expectErr(t, b, AtDestination, ErrOrder, "frame 3 (round end): out of order (expected page batch, state or complete)")
	})
	t.Run("round end round 0", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1})
			w.WriteRawFrame(TypeRoundEnd, 0, make([]byte, 16))
		})
		expectErr(t, b, AtDestination, ErrMalformed, "frame 3 (round end): malformed payload (round number 0)")
	})
	t.Run("round end reserved", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1})
			p := AppendRoundEnd(nil, &RoundEnd{N: 1})
			p[4] = 1
			w.WriteRawFrame(TypeRoundEnd, 0, p)
		})
		expectErr(t, b, AtDestination, ErrMalformed, "frame 3 (round end): malformed payload (reserved field is 0x1, want 0)")
	})
	t.Run("round end flags", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1})
			w.WriteRawFrame(TypeRoundEnd, FlagFinal, AppendRoundEnd(nil, &RoundEnd{N: 1}))
		})
		expectErr(t, b, AtDestination, ErrMalformed, "frame 3 (round end): malformed payload (flags 0x01 not defined for this type)")
	})
	destWith := func(fn func(w *Writer)) []byte {
		var buf bytes.Buffer
		w := NewWriter(&buf)
		w.WritePreamble()
		w.WriteWelcome(&Welcome{Caps: CapBlackout})
		fn(w)
		return buf.Bytes()
	}
	t.Run("round ack skipped", func(t *testing.T) {
		b := destWith(func(w *Writer) {
			w.WriteRoundAck(&RoundAck{N: 1})
			w.WriteRoundAck(&RoundAck{N: 3})
		})
		expectErr(t, b, AtSource, ErrOrder, "frame 3 (round ack): out of order (acknowledgement of round 3 after round 1)")
	})
	t.Run("round ack repeated", func(t *testing.T) {
		b := destWith(func(w *Writer) {
			w.WriteRoundAck(&RoundAck{N: 1})
			w.WriteRoundAck(&RoundAck{N: 1})
		})
		expectErr(t, b, AtSource, ErrOrder, "frame 3 (round ack): out of order (acknowledgement of round 1 after round 1)")
	})
	t.Run("round ack after resumed", func(t *testing.T) {
		b := destWith(func(w *Writer) {
			w.WriteResumed(&Resumed{})
			w.WriteRoundAck(&RoundAck{N: 1})
		})
		expectErr(t, b, AtSource, ErrOrder, "frame 3 (round ack): out of order (expected done)")
	})
	t.Run("round ack truncated payload", func(t *testing.T) {
		b := destWith(func(w *Writer) { w.WriteRawFrame(TypeRoundAck, 0, make([]byte, 12)) })
		expectErr(t, b, AtSource, ErrMalformed, "frame 2 (round ack): malformed payload (page count: need 8 bytes at offset 8, payload has 12)")
	})
	t.Run("round ack at destination", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) { w.WriteRoundAck(&RoundAck{N: 1}) })
		expectErr(t, b, AtDestination, ErrOrder, "frame 2 (round ack): out of order (expected round 1)")
	})
	t.Run("run outside region", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1})
			var ob OutBatch
			ob.Reset(1, testPS)
			ob.Add(16, EncZero, nil)
			w.WritePages(&ob)
		})
		expectErr(t, b, AtDestination, ErrMalformed, "frame 3 (page batch): malformed payload (run 0 [16, +1) exceeds the region's 16 pages)")
	})
	t.Run("encoding not negotiated", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1})
			var ob OutBatch
			ob.Reset(0, testPS)
			ob.Add(0, EncCompressed, []byte{1, 2, 3})
			w.WritePages(&ob)
		})
		expectErr(t, b, AtDestination, ErrMalformed, "page 0 of the batch: compressed not negotiated")
		if _, err := readAll(b, AtDestination, CapCompressed); !errors.Is(err, ErrClosed) {
			t.Fatalf("with the capability: %v, want the stream to end early", err)
		}
	})
	t.Run("unknown section", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1, Final: true})
			w.WriteSection(&Section{ID: "gpu", Data: []byte{1}}, 0)
		})
		expectErr(t, b, AtDestination, ErrMalformed, `section "gpu" is not in the hello's device list`)
	})
	t.Run("complete count mismatch", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1, Final: true})
			w.WriteComplete(&Complete{Pages: 1})
		})
		expectErr(t, b, AtDestination, ErrMalformed, "source sent 1 pages and 0 state sections, this side received 0 and 0")
	})
	t.Run("peer error", func(t *testing.T) {
		b := rawStream(t, func(w *Writer) {
			w.WriteRound(&Round{N: 1})
			w.WriteError(ErrCodeCancelled, "operator said stop")
		})
		_, err := readAll(b, AtDestination, 0)
		var pe *PeerError
		if !errors.Is(err, ErrPeer) || !errors.As(err, &pe) || pe.Code != ErrCodeCancelled || pe.Message != "operator said stop" {
			t.Fatalf("error %v", err)
		}
		if want := "wire: frame 3 (error): peer aborted (cancelled): operator said stop"; err.Error() != want {
			t.Fatalf("error %q, want %q", err, want)
		}
	})
	t.Run("bad magic", func(t *testing.T) {
		bad := bytes.Clone(s)
		copy(bad, "HTTP/1.1")
		expectErr(t, bad, AtDestination, ErrMagic, `wire: preamble: bad magic (got "HTTP/1.1", want "GODWITMG")`)
	})
	t.Run("welcome over-accepts", func(t *testing.T) {
		var buf bytes.Buffer
		w := NewWriter(&buf)
		w.WritePreamble()
		w.WriteWelcome(&Welcome{Caps: CapPostcopy})
		expectErr(t, buf.Bytes(), AtSource, ErrMalformed, "accepts capabilities 0x10 that were not offered (0x1)")
	})
	t.Run("request without post-copy", func(t *testing.T) {
		var buf bytes.Buffer
		w := NewWriter(&buf)
		w.WritePreamble()
		w.WriteWelcome(&Welcome{Caps: CapBlackout})
		w.WriteRequest(&Request{Region: 0, Runs: []Run{{First: 1, Count: 2}}})
		expectErr(t, buf.Bytes(), AtSource, ErrOrder, "frame 2 (request): out of order (request, but post-copy was not negotiated)")
	})
	t.Run("frame after the end", func(t *testing.T) {
		b := append(destStream(t), destStream(t)[PreambleSize:PreambleSize+HeaderSize+8]...)
		expectErr(t, b, AtSource, ErrSequence, "frame 5 (welcome)")
	})
}

// rawStream writes a preamble and Hello, then whatever fn writes.
func rawStream(t *testing.T, fn func(w *Writer)) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	w.WritePreamble()
	if err := w.WriteHello(&Hello{Desc: testDesc()}); err != nil {
		t.Fatal(err)
	}
	fn(w)
	return buf.Bytes()
}

func TestVersion(t *testing.T) {
	for _, c := range []struct {
		hi, lo uint32
		want   uint32
		err    string
	}{
		{1, 1, 1, ""},
		{3, 1, 1, ""}, // a newer peer that still speaks 1
		{2, 2, 0, "wire: preamble: protocol version mismatch (the peer speaks versions 2..2, this side 1..1)"},
		{0, 0, 0, "the peer speaks versions 0..0"},
		{1, 2, 0, "the peer speaks versions 2..1"},
	} {
		var buf bytes.Buffer
		NewWriter(&buf).WriteRawPreamble(c.hi, c.lo)
		v, err := NewReader(&buf, AtSource).ReadPreamble()
		if c.err == "" {
			if err != nil || v != c.want {
				t.Errorf("peer %d..%d: version %d, %v; want %d", c.lo, c.hi, v, err, c.want)
			}
			continue
		}
		if !errors.Is(err, ErrVersion) || !strings.Contains(err.Error(), c.err) {
			t.Errorf("peer %d..%d: error %v, want %q", c.lo, c.hi, err, c.err)
		}
	}
}

func TestDescriptionValidate(t *testing.T) {
	for _, c := range []struct {
		mod  func(d *Description)
		want string
	}{
		{func(d *Description) { d.PageSize = 3000 }, "page size 3000 is not a power of two"},
		{func(d *Description) { d.VCPUs = 0 }, "vCPU count 0"},
		{func(d *Description) { d.Regions[1].GPA = 4096 }, `region 1 "high" [0x1000, 0x3000) overlaps region 0 "low"`},
		{func(d *Description) { d.Regions[1].Size = 100 }, "not page-aligned"},
		{func(d *Description) { d.Regions[1].Name = "low" }, `duplicate name "low"`},
		{func(d *Description) { d.Devices = append(d.Devices, "vcpu0") }, `duplicate id "vcpu0"`},
		{func(d *Description) { d.Regions[0].Size = MaxMemory + testPS }, "oversized"},
	} {
		d := testDesc()
		d.Regions = append([]Region(nil), d.Regions...)
		c.mod(&d)
		err := d.Validate()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("error %v, want %q", err, c.want)
		}
	}
}

func TestLargeSectionReassembly(t *testing.T) {
	data := make([]byte, MaxFramePayload+12345)
	for i := range data {
		data[i] = byte(i * 7)
	}
	b := rawStream(t, func(w *Writer) {
		w.WriteRound(&Round{N: 1, Final: true})
		if err := w.WriteSection(&Section{ID: "serial", Version: 9, Data: data}, 0); err != nil {
			t.Fatal(err)
		}
	})
	r := NewReader(bytes.NewReader(b), AtDestination)
	r.ReadPreamble()
	for {
		m, err := r.Next()
		if err != nil {
			t.Fatal(err)
		}
		if s, ok := m.(*Section); ok {
			if !bytes.Equal(s.Data, data) || s.Version != 9 {
				t.Fatalf("reassembled section differs")
			}
			if r.Frames() != 4 {
				t.Fatalf("%d frames, want 4 (hello, round, 2 state chunks)", r.Frames())
			}
			return
		}
	}
}
