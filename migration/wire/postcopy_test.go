package wire

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
)

var testID = MigrationID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}

// postSourceStream writes a legal source->destination stream that switches to post-copy after
// one live round: a three-frame Switch set over both regions, state, Complete, pushed pages.
func postSourceStream(t testing.TB) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(w.WritePreamble())
	must(w.WriteHello(&Hello{Caps: CapPostcopy, Desc: testDesc()}))
	must(w.WriteRound(&Round{N: 1, Pages: 1}))
	var b OutBatch
	b.Reset(0, testPS)
	b.Add(1, EncRaw, page(1))
	must(w.WritePages(&b))
	must(w.WriteRoundEnd(&RoundEnd{N: 1, Pages: 1}))
	must(w.WriteSwitch(&Switch{ID: testID, PageSet: PageSet{Total: 7, Region: 0, Runs: []Run{{First: 1, Count: 2}}}}, true))
	must(w.WriteSwitch(&Switch{ID: testID, PageSet: PageSet{Total: 7, Region: 0, Runs: []Run{{First: 3, Count: 1}, {First: 60, Count: 1}}}}, true))
	must(w.WriteSwitch(&Switch{ID: testID, PageSet: PageSet{Total: 7, Region: 1, Runs: []Run{{First: 0, Count: 2}, {First: 15, Count: 1}}}}, false))
	must(w.WriteSection(&Section{ID: "vcpu0", Version: 3, Data: []byte("registers")}, 0))
	must(w.WriteComplete(&Complete{PauseUnixNano: 5, Pages: 1, Sections: 1}))
	b.Reset(0, testPS)
	b.Add(60, EncRaw, page(6))
	must(w.WritePages(&b))
	must(w.WriteKeepalive())
	b.Reset(0, testPS)
	b.Add(1, EncZero, nil)
	b.Add(2, EncRaw, page(2))
	b.Add(3, EncRaw, page(3))
	must(w.WritePages(&b))
	b.Reset(1, testPS)
	b.Add(0, EncRaw, page(4))
	b.Add(1, EncRaw, page(5))
	b.Add(15, EncZero, nil)
	must(w.WritePages(&b))
	must(w.WritePushEnd(&PushEnd{Pushed: 6, Demanded: 1}))
	must(w.WriteKeepalive())
	must(w.WriteDoneAck())
	return buf.Bytes()
}

// postDestStream writes the destination's side of a post-copy migration.
func postDestStream(t testing.TB) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	for _, err := range []error{
		w.WritePreamble(),
		w.WriteWelcome(&Welcome{Caps: CapPostcopy}),
		w.WriteRoundAck(&RoundAck{N: 1, Pages: 1}),
		w.WriteResumed(&Resumed{ResumeUnixNano: 99, RestoreNanos: 5, StartNanos: 6, ArmNanos: 8}),
		w.WriteKeepalive(),
		w.WriteRequest(&Request{Region: 0, Runs: []Run{{First: 60, Count: 1}}}),
		w.WriteKeepalive(),
		w.WriteFilled(&Filled{Pages: 7, UnixNano: 1234}),
		w.WriteStats(&Stats{DemandFaults: 1, PagesRequested: 1, PostcopyNanos: 9, P50Nanos: 4, P99Nanos: 5, MaxNanos: 5,
			ProgressDuring: 10.5, ProgressAfter: 20, Reconnects: 1, Latencies: []uint64{4, 5}}),
		w.WriteDone(&Done{}),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}

// rejoinSourceStream is a source's new connection after a broken link.
func rejoinSourceStream(t testing.TB) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	w.WritePreamble()
	w.WriteRejoin(&Rejoin{ID: testID, Attempt: 2})
	var b OutBatch
	b.Reset(1, testPS)
	b.Add(15, EncRaw, page(8))
	if err := w.WritePages(&b); err != nil {
		t.Fatal(err)
	}
	w.WritePushEnd(&PushEnd{Pushed: 7, Demanded: 1})
	w.WriteDoneAck()
	return buf.Bytes()
}

// rejoinDestStream is the destination's answer on such a connection.
func rejoinDestStream(t testing.TB) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	w.WritePreamble()
	w.WriteLacking(&Lacking{PageSet: PageSet{Total: 2, Region: 0, Runs: []Run{{First: 2, Count: 1}}}}, true)
	w.WriteLacking(&Lacking{PageSet: PageSet{Total: 2, Region: 1, Runs: []Run{{First: 15, Count: 1}}}}, false)
	w.WriteRequest(&Request{Region: 1, Runs: []Run{{First: 15, Count: 1}}, Again: true})
	w.WriteFilled(&Filled{Pages: 7, UnixNano: 1})
	w.WriteStats(&Stats{})
	if err := w.WriteDone(&Done{}); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// readRejoin reads a rejoining connection to its end.
func readRejoin(data []byte, side Side) ([]string, error) {
	r := NewReader(bytes.NewReader(data), side)
	d := testDesc()
	r.SetDescription(&d)
	r.SetCaps(CapPostcopy)
	if _, err := r.ReadPreamble(); err != nil {
		return nil, err
	}
	r.Rejoining()
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

func TestPostcopyRoundTrip(t *testing.T) {
	got, err := readAll(postSourceStream(t), AtDestination, CapPostcopy)
	if err != nil {
		t.Fatalf("%v after %q", err, got)
	}
	want := []string{
		"hello 0x10 2 regions",
		"round &{N:1 Final:false Pages:1}",
		"batch r0 raw[1+1]" + strconv.Itoa(checksum(page(1))),
		"round end &{N:1 Pages:1}",
		"switch &{ID:0102030405060708090a0b0c0d0e0f10 PageSet:{Total:7 Region:0 Runs:[{First:1 Count:2}]} More:true}",
		"switch &{ID:0102030405060708090a0b0c0d0e0f10 PageSet:{Total:7 Region:0 Runs:[{First:3 Count:1} {First:60 Count:1}]} More:true}",
		"switch &{ID:0102030405060708090a0b0c0d0e0f10 PageSet:{Total:7 Region:1 Runs:[{First:0 Count:2} {First:15 Count:1}]} More:false}",
		"state vcpu0 v3 9",
		"complete &{PauseUnixNano:5 Pages:1 Sections:1}",
		"batch r0 raw[60+1]" + strconv.Itoa(checksum(page(6))),
		"keepalive &{}",
		"batch r0 zero[1+1]0 raw[2+2]" + strconv.Itoa(checksum(append(page(2), page(3)...))),
		"batch r1 raw[0+2]" + strconv.Itoa(checksum(append(page(4), page(5)...))) + " zero[15+1]0",
		"push end &{Pushed:6 Demanded:1}",
		"keepalive &{}",
		"done ack &{}",
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	got, err = readAll(postDestStream(t), AtSource, CapPostcopy)
	if err != nil {
		t.Fatalf("%v after %q", err, got)
	}
	want = []string{
		"welcome &{Caps:16}",
		"round ack &{N:1 Pages:1}",
		"resumed &{ResumeUnixNano:99 RestoreNanos:5 StartNanos:6 ArmNanos:8}",
		"keepalive &{}",
		"request &{Region:0 Runs:[{First:60 Count:1}] Again:false}",
		"keepalive &{}",
		"filled &{Pages:7 UnixNano:1234}",
		"post-copy stats &{DemandFaults:1 PagesRequested:1 PostcopyNanos:9 P50Nanos:4 P99Nanos:5 MaxNanos:5 ProgressDuring:10.5 ProgressAfter:20 Reconnects:1 Latencies:[4 5]}",
		"done &{FirstProgressUnixNano:0}",
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	got, err = readRejoin(rejoinSourceStream(t), AtDestination)
	if err != nil {
		t.Fatalf("%v after %q", err, got)
	}
	want = []string{
		"rejoin &{ID:0102030405060708090a0b0c0d0e0f10 Attempt:2}",
		"batch r1 raw[15+1]" + strconv.Itoa(checksum(page(8))),
		"push end &{Pushed:7 Demanded:1}",
		"done ack &{}",
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	got, err = readRejoin(rejoinDestStream(t), AtSource)
	if err != nil {
		t.Fatalf("%v after %q", err, got)
	}
	want = []string{
		"lacking &{PageSet:{Total:2 Region:0 Runs:[{First:2 Count:1}]} More:true}",
		"lacking &{PageSet:{Total:2 Region:1 Runs:[{First:15 Count:1}]} More:false}",
		"request &{Region:1 Runs:[{First:15 Count:1}] Again:true}",
		"filled &{Pages:7 UnixNano:1}",
		"post-copy stats &{DemandFaults:0 PagesRequested:0 PostcopyNanos:0 P50Nanos:0 P99Nanos:0 MaxNanos:0 ProgressDuring:0 ProgressAfter:0 Reconnects:0 Latencies:[]}",
		"done &{FirstProgressUnixNano:0}",
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestMigrationID(t *testing.T) {
	s := testID.String()
	if s != "0102030405060708090a0b0c0d0e0f10" {
		t.Fatalf("String %q", s)
	}
	id, err := ParseMigrationID(strings.ToUpper(s))
	if err != nil || id != testID {
		t.Fatalf("parse: %v %v", id, err)
	}
	for _, bad := range []string{"", s[:30], s + "00", "x" + s[1:]} {
		if _, err := ParseMigrationID(bad); err == nil {
			t.Errorf("parsed %q", bad)
		}
	}
}

// postRaw writes a preamble, a post-copy Hello and then whatever fn writes.
func postRaw(fn func(w *Writer)) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	w.WritePreamble()
	w.WriteHello(&Hello{Caps: CapPostcopy, Desc: testDesc()})
	fn(w)
	return buf.Bytes()
}

func sw(total uint64, region uint32, runs ...Run) *Switch {
	return &Switch{ID: testID, PageSet: PageSet{Total: total, Region: region, Runs: runs}}
}

func TestPostcopyRejects(t *testing.T) {
	ok := func(w *Writer) { w.WriteSwitch(sw(1, 0, Run{First: 2, Count: 1}), false) }
	for _, c := range []struct {
		name string
		caps Caps
		fn   func(w *Writer)
		kind error
		msg  string
	}{
		{"not negotiated", CapBlackout, ok, ErrOrder, "frame 2 (switch): out of order (switch, but post-copy was not negotiated)"},
		{"total too small", CapPostcopy, func(w *Writer) { w.WriteSwitch(sw(1, 0, Run{First: 2, Count: 2}), false) }, ErrTooLarge, "runs hold more than 1 pages"},
		{"set ends short", CapPostcopy, func(w *Writer) { w.WriteSwitch(sw(3, 0, Run{First: 2, Count: 2}), false) }, ErrMalformed, "the set ends with 2 pages, it announced 3"},
		{"total changes", CapPostcopy, func(w *Writer) {
			w.WriteSwitch(sw(3, 0, Run{First: 2, Count: 2}), true)
			w.WriteSwitch(sw(4, 0, Run{First: 5, Count: 1}), false)
		}, ErrMalformed, "set of 3 pages continues as a set of 4"},
		{"pages go back", CapPostcopy, func(w *Writer) {
			w.WriteSwitch(sw(3, 0, Run{First: 2, Count: 2}), true)
			w.WriteSwitch(sw(3, 0, Run{First: 3, Count: 1}), false)
		}, ErrMalformed, "starts before the previous frame's end 4"},
		{"regions go back", CapPostcopy, func(w *Writer) {
			w.WriteSwitch(sw(3, 1, Run{First: 2, Count: 2}), true)
			w.WriteSwitch(sw(3, 0, Run{First: 5, Count: 1}), false)
		}, ErrMalformed, "region 0 after region 1"},
		{"id changes", CapPostcopy, func(w *Writer) {
			w.WriteSwitch(sw(3, 0, Run{First: 2, Count: 2}), true)
			m := sw(3, 0, Run{First: 5, Count: 1})
			m.ID[0] = 9
			w.WriteSwitch(m, false)
		}, ErrMalformed, "migration id 09020304"},
		{"state inside set", CapPostcopy, func(w *Writer) {
			w.WriteSwitch(sw(3, 0, Run{First: 2, Count: 2}), true)
			w.WriteSection(&Section{ID: "vcpu0"}, 0)
		}, ErrOrder, "state while the switch set continues"},
		{"second set", CapPostcopy, func(w *Writer) { ok(w); ok(w) }, ErrOrder, "frame 3 (switch): out of order (expected switch, state or complete)"},
		{"region out of layout", CapPostcopy, func(w *Writer) { w.WriteSwitch(sw(0, 2), false) }, ErrMalformed, "region 2, the layout has 2"},
		{"run out of region", CapPostcopy, func(w *Writer) { w.WriteSwitch(sw(1, 1, Run{First: 16, Count: 1}), false) }, ErrMalformed, "exceeds the region's 16 pages"},
		{"switch after final round", CapPostcopy, func(w *Writer) { w.WriteRound(&Round{N: 1, Final: true}); ok(w) }, ErrOrder, "expected page batch, state or complete"},
		{"batch before complete", CapPostcopy, func(w *Writer) {
			ok(w)
			var b OutBatch
			b.Reset(0, testPS)
			b.Add(2, EncZero, nil)
			w.WritePages(&b)
		}, ErrOrder, "frame 3 (page batch): out of order"},
		{"keepalive before complete", CapPostcopy, func(w *Writer) { ok(w); w.WriteKeepalive() }, ErrOrder, "frame 3 (keepalive): out of order"},
		{"batch after push end", CapPostcopy, func(w *Writer) {
			ok(w)
			w.WriteComplete(&Complete{})
			w.WritePushEnd(&PushEnd{})
			var b OutBatch
			b.Reset(0, testPS)
			b.Add(2, EncZero, nil)
			w.WritePages(&b)
		}, ErrOrder, "frame 5 (page batch): out of order"},
		{"rejoin in a new stream", CapPostcopy, func(w *Writer) { w.WriteRejoin(&Rejoin{ID: testID, Attempt: 1}) }, ErrOrder, "frame 2 (rejoin): out of order"},
		{"keepalive payload", CapPostcopy, func(w *Writer) {
			ok(w)
			w.WriteComplete(&Complete{})
			w.WriteRawFrame(TypeKeepalive, 0, []byte{1})
		}, ErrMalformed, "1 trailing bytes"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := readAll(postRaw(c.fn), AtDestination, c.caps)
			if !errors.Is(err, c.kind) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("error %v, want %v with %q", err, c.kind, c.msg)
			}
		})
	}

	dest := func(fn func(w *Writer)) []byte {
		var buf bytes.Buffer
		w := NewWriter(&buf)
		w.WritePreamble()
		w.WriteWelcome(&Welcome{Caps: CapPostcopy})
		w.WriteResumed(&Resumed{})
		fn(w)
		return buf.Bytes()
	}
	for _, c := range []struct {
		name string
		fn   func(w *Writer)
		kind error
		msg  string
	}{
		{"stats before filled", func(w *Writer) { w.WriteStats(&Stats{}) }, ErrOrder, "frame 3 (post-copy stats): out of order"},
		{"done between filled and stats", func(w *Writer) { w.WriteFilled(&Filled{}); w.WriteDone(&Done{}) }, ErrOrder, "frame 4 (done): out of order"},
		{"filled twice", func(w *Writer) { w.WriteFilled(&Filled{}); w.WriteFilled(&Filled{}) }, ErrOrder, "frame 4 (filled): out of order"},
		{"latencies unordered", func(w *Writer) {
			w.WriteFilled(&Filled{})
			w.WriteStats(&Stats{P50Nanos: 5, P99Nanos: 4, MaxNanos: 9})
		}, ErrMalformed, "latency p50 5, p99 4, max 9 out of order"},
		{"progress NaN", func(w *Writer) {
			w.WriteFilled(&Filled{})
			w.WriteRawFrame(TypeStats, 0, append(AppendStats(nil, &Stats{})[:56], 0, 0, 0, 0, 0, 0, 0xf8, 0x7f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
		}, ErrMalformed, "progress rate NaN"},
		{"too many latencies", func(w *Writer) {
			w.WriteFilled(&Filled{})
			p := AppendStats(nil, &Stats{})
			le.PutUint32(p[len(p)-4:], MaxLatencySample+1)
			w.WriteRawFrame(TypeStats, 0, p)
		}, ErrTooLarge, "1001 latencies, at most 1000"},
		{"lacking in a first connection", func(w *Writer) { w.WriteLacking(&Lacking{}, false) }, ErrOrder, "frame 3 (lacking): out of order"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := readAll(dest(c.fn), AtSource, CapPostcopy)
			if !errors.Is(err, c.kind) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("error %v, want %v with %q", err, c.kind, c.msg)
			}
		})
	}

	t.Run("rejoin attempt 0", func(t *testing.T) {
		var buf bytes.Buffer
		w := NewWriter(&buf)
		w.WritePreamble()
		w.WriteRejoin(&Rejoin{ID: testID})
		_, err := readRejoin(buf.Bytes(), AtDestination)
		if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), "attempt 0") {
			t.Fatalf("error %v", err)
		}
	})
	t.Run("hello on a rejoining connection", func(t *testing.T) {
		var buf bytes.Buffer
		w := NewWriter(&buf)
		w.WritePreamble()
		w.WriteHello(&Hello{Desc: testDesc()})
		_, err := readRejoin(buf.Bytes(), AtDestination)
		if !errors.Is(err, ErrOrder) || !strings.Contains(err.Error(), "expected rejoin") {
			t.Fatalf("error %v", err)
		}
	})
	t.Run("too many runs", func(t *testing.T) {
		var w Writer
		err := w.WriteSwitch(&Switch{PageSet: PageSet{Runs: make([]Run, MaxSetRuns+1)}}, false)
		if err == nil || !strings.Contains(err.Error(), "runs exceed") {
			t.Fatalf("error %v", err)
		}
	})
}

// scattered returns every other page of [first, first+n) as runs: the shape a random writer
// leaves, shorter as a bitmap.
func scattered(first, n uint64) []Run {
	var runs []Run
	for p := first; p < first+n; p += 2 {
		runs = append(runs, Run{First: p, Count: 1})
	}
	return runs
}

// TestPageSetForms: a set of scattered pages travels as a bitmap (a bit per page instead of 12
// bytes per run), a set of few runs as runs, both decode to the same runs, and each set has
// exactly one accepted encoding.
func TestPageSetForms(t *testing.T) {
	d := testDesc()
	for _, c := range []struct {
		name   string
		runs   []Run
		bitmap bool
	}{
		{"empty", nil, false},
		{"one run", []Run{{First: 3, Count: 40}}, false},
		{"two runs", []Run{{First: 0, Count: 1}, {First: 63, Count: 1}}, true}, // 24 bytes against 28
		{"scattered", scattered(5, 50), true},
		{"scattered to the end", scattered(1, 63), true},
		{"mixed", append(scattered(0, 20), Run{First: 30, Count: 10}, Run{First: 50, Count: 1}), true},
	} {
		t.Run(c.name, func(t *testing.T) {
			var total uint64
			for _, r := range c.runs {
				total += uint64(r.Count)
			}
			m := sw(total, 0, c.runs...)
			p := AppendSwitch(nil, m)
			if form := p[16+8+4]; (form == setFormBitmap) != c.bitmap {
				t.Fatalf("form %d, want bitmap %v", form, c.bitmap)
			}
			if c.bitmap && len(p) >= 16+8+4+1+4+len(c.runs)*runSize {
				t.Fatalf("bitmap form of %d bytes is not shorter than the runs", len(p))
			}
			got, err := DecodeSwitch(p, &d)
			if err != nil {
				t.Fatal(err)
			}
			if len(got.Runs) != len(c.runs) {
				t.Fatalf("decoded %d runs, want %d: %v", len(got.Runs), len(c.runs), got.Runs)
			}
			for i := range c.runs {
				if got.Runs[i] != c.runs[i] {
					t.Fatalf("run %d: %+v, want %+v", i, got.Runs[i], c.runs[i])
				}
			}
			if again := AppendSwitch(nil, got); !bytes.Equal(again, p) {
				t.Fatalf("re-encoded differently")
			}
		})
	}

	// Encodings a writer never produces.
	head := func(form byte) []byte {
		b := append([]byte{}, testID[:]...)
		b = le.AppendUint64(b, 25)
		b = le.AppendUint32(b, 0)
		return append(b, form)
	}
	bitmap := func(first, span uint64, bits ...byte) []byte {
		b := le.AppendUint64(head(setFormBitmap), first)
		return append(le.AppendUint64(b, span), bits...)
	}
	runsForm := func(runs []Run) []byte {
		b := le.AppendUint32(head(setFormRuns), uint32(len(runs)))
		return appendRuns(b, runs)
	}
	dense := bytes.Repeat([]byte{0x55}, 6) // 24 single-page runs over 48 pages
	dense = append(dense, 0x01)            // and page 48: 25 runs, span 49
	for _, c := range []struct {
		name string
		p    []byte
	}{
		{"unknown form", append(head(2), 0, 0, 0, 0)},
		{"runs shorter as a bitmap", runsForm(scattered(0, 49))},
		{"bitmap shorter as runs", bitmap(0, 8, 0xff)}, // one run: 16 bytes against 17
		{"empty bitmap", bitmap(0, 0)},
		{"bitmap past the region", bitmap(20, 49, dense...)},
		{"bitmap first bit clear", bitmap(0, 50, append([]byte{0x54}, append(dense[1:6:6], 0x01, 0x00)...)...)},
		{"bitmap tail bit set", bitmap(0, 49, append(dense[:6:6], 0x03)...)},
		{"bitmap length", bitmap(0, 49, dense[:6]...)},
	} {
		if _, err := DecodeSwitch(c.p, &d); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want ErrMalformed", c.name, err)
		}
	}
	if m, err := DecodeSwitch(bitmap(0, 49, dense...), &d); err != nil || len(m.Runs) != 25 {
		t.Fatalf("the canonical bitmap: %v, %v", m, err)
	}
}

// TestBitmapRuns checks the word-at-a-time run decoding of the bitmap form against a bit by
// bit walk, on random bitmaps of every tail length.
func TestBitmapRuns(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for iter := range 500 {
		span := 1 + rng.Uint64N(300)
		b := make([]byte, (span+7)/8)
		density := rng.Float64()
		for p := range span {
			if rng.Float64() < density {
				b[p/8] |= 1 << (p % 8)
			}
		}
		var want [][2]uint64
		for p := uint64(0); p < span; {
			if b[p/8]&(1<<(p%8)) == 0 {
				p++
				continue
			}
			q := p
			for q < span && b[q/8]&(1<<(q%8)) != 0 {
				q++
			}
			want = append(want, [2]uint64{p, q - p})
			p = q
		}
		var got [][2]uint64
		if !bitmapRuns(b, span, func(first, n uint64) bool { got = append(got, [2]uint64{first, n}); return true }) {
			t.Fatal("bitmapRuns stopped early")
		}
		if !slices.Equal(got, want) {
			t.Fatalf("iteration %d, span %d: runs %v, want %v", iter, span, got, want)
		}
		if n := bitmapRunCount(b); n != len(want) {
			t.Fatalf("iteration %d: bitmapRunCount %d, want %d", iter, n, len(want))
		}
	}
}

// aheadSourceStream is a pure post-copy source stream with the set sent ahead (CapAhead):
// Hello, Ahead in two frames, a Switch of the pages written since (one repeats an Ahead
// page), state and Complete.
func aheadSourceStream(t testing.TB) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	for _, err := range []error{
		w.WritePreamble(),
		w.WriteHello(&Hello{Caps: CapPostcopy | CapAhead, Desc: testDesc()}),
		w.WriteAhead(&Ahead{PageSet: PageSet{Total: 3, Region: 0, Runs: []Run{{First: 1, Count: 2}}}}, true),
		w.WriteAhead(&Ahead{PageSet: PageSet{Total: 3, Region: 1, Runs: []Run{{First: 15, Count: 1}}}}, false),
		w.WriteSwitch(&Switch{ID: testID, PageSet: PageSet{Total: 2, Region: 0, Runs: []Run{{First: 2, Count: 2}}}}, false),
		w.WriteSection(&Section{ID: "vcpu0", Version: 3, Data: []byte("registers")}, 0),
		w.WriteComplete(&Complete{PauseUnixNano: 5, Sections: 1}),
		w.WriteDoneAck(),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}

func TestAheadRoundTrip(t *testing.T) {
	got, err := readAll(aheadSourceStream(t), AtDestination, CapPostcopy|CapAhead)
	if err != nil {
		t.Fatalf("%v after %q", err, got)
	}
	want := []string{
		"hello 0x50 2 regions",
		"ahead &{PageSet:{Total:3 Region:0 Runs:[{First:1 Count:2}]} More:true}",
		"ahead &{PageSet:{Total:3 Region:1 Runs:[{First:15 Count:1}]} More:false}",
		"switch &{ID:0102030405060708090a0b0c0d0e0f10 PageSet:{Total:2 Region:0 Runs:[{First:2 Count:2}]} More:false}",
		"state vcpu0 v3 9",
		"complete &{PauseUnixNano:5 Pages:0 Sections:1}",
		"done ack &{}",
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestAheadRejects(t *testing.T) {
	ahead := func(total uint64, more bool, runs ...Run) func(w *Writer) {
		return func(w *Writer) { w.WriteAhead(&Ahead{PageSet: PageSet{Total: total, Region: 0, Runs: runs}}, more) }
	}
	for _, c := range []struct {
		name string
		caps Caps
		fn   func(w *Writer)
		kind error
		msg  string
	}{
		{"not negotiated", CapPostcopy, ahead(1, false, Run{First: 2, Count: 1}), ErrOrder, "frame 2 (ahead): out of order (ahead, but sending the set ahead was not negotiated)"},
		{"without post-copy", CapAhead, ahead(1, false, Run{First: 2, Count: 1}), ErrOrder, "ahead, but post-copy was not negotiated"},
		{"after a round", CapPostcopy | CapAhead, func(w *Writer) {
			w.WriteRound(&Round{N: 1})
			w.WriteRoundEnd(&RoundEnd{N: 1})
			ahead(1, false, Run{First: 2, Count: 1})(w)
		}, ErrOrder, "frame 4 (ahead): out of order"},
		{"twice", CapPostcopy | CapAhead, func(w *Writer) {
			ahead(1, false, Run{First: 2, Count: 1})(w)
			ahead(1, false, Run{First: 2, Count: 1})(w)
		}, ErrOrder, "frame 3 (ahead): out of order (expected switch)"},
		{"a round after it", CapPostcopy | CapAhead, func(w *Writer) {
			ahead(1, false, Run{First: 2, Count: 1})(w)
			w.WriteRound(&Round{N: 1})
		}, ErrOrder, "frame 3 (round): out of order (expected switch)"},
		{"switch inside it", CapPostcopy | CapAhead, func(w *Writer) {
			ahead(2, true, Run{First: 2, Count: 1})(w)
			w.WriteSwitch(sw(1, 0, Run{First: 2, Count: 1}), false)
		}, ErrOrder, "switch while the ahead set continues"},
		{"set ends short", CapPostcopy | CapAhead, ahead(3, false, Run{First: 2, Count: 2}), ErrMalformed, "the set ends with 2 pages, it announced 3"},
		{"state after it", CapPostcopy | CapAhead, func(w *Writer) {
			ahead(1, false, Run{First: 2, Count: 1})(w)
			w.WriteSection(&Section{ID: "vcpu0", Version: 1, Data: []byte("x")}, 0)
		}, ErrOrder, "frame 3 (state): out of order (expected switch)"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := readAll(postRaw(c.fn), AtDestination, c.caps)
			if !errors.Is(err, c.kind) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("error %v, want %v with %q", err, c.kind, c.msg)
			}
		})
	}
}
