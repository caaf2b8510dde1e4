package migration_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/godwit-vm/godwit/migration"
	mt "github.com/godwit-vm/godwit/migration/migrationtest"
	"github.com/godwit-vm/godwit/migration/wire"
)

// streamNet is a loopback listener that serves the main connection and the extra streams of
// one migration, as a destination host's listening port does.
type streamNet struct {
	ln    net.Listener
	conns chan net.Conn
	// dial wraps each extra connection the source opens (nil: as is).
	dial func(c net.Conn) net.Conn
}

func newStreamNet(t *testing.T) *streamNet {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &streamNet{ln: ln, conns: make(chan net.Conn, 16)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(n.conns)
				return
			}
			n.conns <- c
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return n
}

func (n *streamNet) dialStream(ctx context.Context) (io.ReadWriter, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", n.ln.Addr().String())
	if err != nil || n.dial == nil {
		return c, err
	}
	return n.dial(c), nil
}

func (n *streamNet) accept(ctx context.Context) (io.ReadWriter, error) {
	select {
	case c, ok := <-n.conns:
		if !ok {
			return nil, net.ErrClosed
		}
		return c, nil
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

// pair dials the main connection.
func (n *streamNet) pair(t *testing.T) (net.Conn, net.Conn) {
	c, err := net.Dial("tcp", n.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	return c, <-n.conns
}

func streamOptions(n *streamNet, streams int) (migration.SendOptions, migration.ReceiveOptions) {
	return migration.SendOptions{Streams: streams, DialStream: n.dialStream, DowntimeLimit: 50 * time.Millisecond, BatchBytes: 256 << 10},
		migration.ReceiveOptions{AcceptStream: n.accept, StreamWait: 5 * time.Second}
}

// TestStreamsWithWriter migrates a guest with a writer over four TCP connections: every
// connection carries pages, the destination matches the source, and both reports list the
// four streams with the pages each carried.
func TestStreamsWithWriter(t *testing.T) {
	n := newStreamNet(t)
	g := newGuest(32*MiB, 21)
	ctx, stop := context.WithCancel(t.Context())
	wait := g.RunWriter(ctx, mt.WriterConfig{Rate: 20000, WorkingSet: 1024, Seed: 22})
	d := mt.NewDest()
	so, ro := streamOptions(n, 4)
	so.MaxBandwidth = 256 * MiB
	sc, dc := n.pair(t)
	s, r := migrate(t.Context(), g, d, sc, dc, so, ro)
	stop()
	wait()
	checkOK(t, g, d, s, r)
	if len(s.rep.Streams) != 4 || len(r.rep.Streams) != 3 {
		t.Fatalf("streams: source reports %d, destination %d (extra ones); want 4 and 3", len(s.rep.Streams), len(r.rep.Streams))
	}
	var sent uint64
	for _, st := range s.rep.Streams {
		if st.Pages == 0 || st.Bytes == 0 {
			t.Errorf("stream %d carried nothing: %+v", st.Index, st)
		}
		sent += st.Pages
	}
	var rounds uint64
	for _, rr := range s.rep.RoundDetails {
		rounds += rr.Pages
	}
	if sent != rounds {
		t.Errorf("the streams carried %d pages, the rounds %d", sent, rounds)
	}
	t.Logf("%d rounds, downtime %.2f ms, streams %+v", s.rep.Rounds, s.rep.DowntimeMS, s.rep.Streams)
}

// TestStreamsDeclined: a destination without AcceptStream takes everything on the main
// connection, and the source says so.
func TestStreamsDeclined(t *testing.T) {
	n := newStreamNet(t)
	g := newGuest(8*MiB, 23)
	d := mt.NewDest()
	so, _ := streamOptions(n, 3)
	sc, dc := n.pair(t)
	s, r := migrate(t.Context(), g, d, sc, dc, so, migration.ReceiveOptions{})
	checkOK(t, g, d, s, r)
	if len(s.rep.Streams) != 0 || len(s.rep.Warnings) != 1 || !strings.Contains(s.rep.Warnings[0], "one connection") {
		t.Fatalf("streams %+v, warnings %q; want none and a warning", s.rep.Streams, s.rep.Warnings)
	}
}

// TestStreamOfAnotherMigrationRefused: a connection that joins with another migration's id
// is refused and closed, and the migration goes on with its own streams.
func TestStreamOfAnotherMigrationRefused(t *testing.T) {
	n := newStreamNet(t)
	refused := make(chan error, 1)
	go func() {
		c, err := net.Dial("tcp", n.ln.Addr().String())
		if err != nil {
			refused <- err
			return
		}
		defer c.Close()
		w := wire.NewWriter(c)
		w.WritePreamble()
		r := wire.NewReader(c, wire.AtSource)
		if _, err := r.ReadPreamble(); err != nil {
			refused <- err
			return
		}
		w.WriteJoin(&wire.Join{ID: wire.MigrationID{1, 2, 3}, Index: 1})
		_, err = r.Next()
		refused <- err
	}()
	// The stranger connects first.
	deadline := time.Now().Add(5 * time.Second)
	for len(n.conns) == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	g := newGuest(8*MiB, 24)
	d := mt.NewDest()
	so, ro := streamOptions(n, 2)
	sc, dc := tcpDial(t, n)
	s, r := migrate(t.Context(), g, d, sc, dc, so, ro)
	checkOK(t, g, d, s, r)
	err := <-refused
	var pe *wire.PeerError
	if !errors.As(err, &pe) || !strings.Contains(pe.Error(), "stream of migration") {
		t.Fatalf("the stranger got %v, want an Error frame naming the migration", err)
	}
	if len(r.rep.Warnings) != 1 || !strings.Contains(r.rep.Warnings[0], "refused") {
		t.Fatalf("destination warnings %q, want the refusal", r.rep.Warnings)
	}
}

// tcpDial dials the main connection when a stranger's connection may be queued first: the
// destination's main connection is the one the source dialled, found by its address.
func tcpDial(t *testing.T, n *streamNet) (net.Conn, net.Conn) {
	stranger := <-n.conns
	c, d := n.pair(t)
	n.conns <- stranger // the destination accepts it among the streams
	return c, d
}

// TestStreamCutFailsCleanly cuts the extra streams in the middle of their first batch, in the
// first round: both sides fail, and the source runs on with its memory unchanged. (The cut
// comes within the first batch because a lane's later batches are not sure to come: on a
// busy machine the main connection's lane may carry most of a round.)
func TestStreamCutFailsCleanly(t *testing.T) {
	n := newStreamNet(t)
	var cut atomic.Bool
	n.dial = func(c net.Conn) net.Conn { return &cutAfter{Conn: c, left: 64 << 10, cut: &cut} }
	g := newGuest(32*MiB, 25)
	want := append([]byte(nil), g.Memory(0)...)
	d := mt.NewDest()
	so, ro := streamOptions(n, 3)
	sc, dc := n.pair(t)
	s, r := migrate(t.Context(), g, d, sc, dc, so, ro)
	if !cut.Load() {
		t.Fatalf("no stream was cut: source %v (%+v), destination %v", s.err, s.rep.Streams, r.err)
	}
	checkSourceIntact(t, g, s, migration.ResultFailed, want)
	if r.err == nil || r.rep.Result != migration.ResultFailed || d.State() != "aborted" {
		t.Fatalf("destination: %v, result %q, state %q; want a failure and state aborted", r.err, r.rep.Result, d.State())
	}
	t.Logf("source: %v\ndestination: %v", s.err, r.err)
}

// cutAfter closes the connection once left bytes have been written through it.
type cutAfter struct {
	net.Conn
	left int
	cut  *atomic.Bool
}

func (c *cutAfter) Write(p []byte) (int, error) {
	if c.left <= 0 {
		c.cut.Store(true)
		c.Conn.Close()
		return 0, net.ErrClosed
	}
	if len(p) > c.left {
		n, _ := c.Conn.Write(p[:c.left])
		c.left = 0
		c.cut.Store(true)
		c.Conn.Close()
		return n, net.ErrClosed
	}
	n, err := c.Conn.Write(p)
	c.left -= n
	return n, err
}

// TestPostcopyFaultChannel runs the same post-copy twice, with a guest writing until the
// pause and a destination vCPU reading pages from its start, over links whose buffers hold a
// backlog of pushed pages: without and with the fault channel. Memory arrives bit for bit both
// times, and with the channel a demanded page no longer waits behind the push: its service
// latency (fake clock, so the figures are exact) falls.
func TestPostcopyFaultChannel(t *testing.T) {
	var p50 [2]float64
	for i, channel := range []bool{false, true} {
		synctest.Test(t, func(t *testing.T) {
			link := mt.LinkConfig{Bandwidth: 50 * MiB, Latency: 500 * time.Microsecond, Buffer: 1 << 20}
			c := &pcCase{
				g:      newGuest(8*MiB, 41),
				link:   link,
				writer: &mt.WriterConfig{Rate: 20000, Seed: 6},
				vcpu:   &mt.VCPUConfig{Pages: mt.LocalityPattern(9, 0, 2048, 600, 16), Think: 200 * time.Microsecond},
			}
			c.so = migration.SendOptions{Mode: migration.ModePostcopy, SampleBefore: 100 * time.Millisecond, FaultChannel: channel}
			if channel {
				c.so.DialStream, c.ro.AcceptStream = streamLinks(link, nil)
			}
			s, r := c.run(t)
			checkPostcopyOK(t, c, s, r)
			p := s.rep.Postcopy
			if p.DemandFaults == 0 {
				t.Fatalf("no demand faults: %+v", p)
			}
			if channel != (p.FaultChannelBytes > 0) {
				t.Fatalf("fault channel %v, and it carried %d bytes", channel, p.FaultChannelBytes)
			}
			p50[i] = p.FaultLatencyP50US
			t.Logf("fault channel %v: %d faults, p50 %.0f µs, p99 %.0f µs, %d demanded (%d bytes on the channel), total %.1f ms",
				channel, p.DemandFaults, p.FaultLatencyP50US, p.FaultLatencyP99US, p.PagesDemanded, p.FaultChannelBytes, s.rep.TotalMS)
		})
	}
	if p50[1] >= p50[0] {
		t.Fatalf("fault service p50 %.0f µs with the fault channel, %.0f µs without: want less", p50[1], p50[0])
	}
}

// TestPostcopyFaultChannelBreaks cuts the fault channel during the post-copy: that is a
// broken link, the source rejoins over the main connection's Reconnector without a fault
// channel, and memory still arrives bit for bit.
func TestPostcopyFaultChannelBreaks(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		link := mt.LinkConfig{Bandwidth: 50 * MiB, Latency: 500 * time.Microsecond, Buffer: 1 << 20}
		c := &pcCase{
			g:      newGuest(8*MiB, 42),
			link:   link,
			writer: &mt.WriterConfig{Rate: 20000, Seed: 7},
			vcpu:   &mt.VCPUConfig{Pages: mt.LocalityPattern(10, 0, 2048, 600, 16), Think: 200 * time.Microsecond},
		}
		var cut atomic.Bool
		c.so = migration.SendOptions{Mode: migration.ModePostcopy, SampleBefore: 100 * time.Millisecond, FaultChannel: true}
		c.so.DialStream, c.ro.AcceptStream = streamLinks(link, func(a net.Conn) net.Conn { return &cutAfter{Conn: a, left: 6 << 10, cut: &cut} })
		c.so.Reconnect, c.ro.Reconnect = reconnectors(link)
		s, r := c.run(t)
		if !cut.Load() {
			t.Fatalf("the fault channel was never cut: source %v %+v, destination %v", s.err, s.rep.Postcopy, r.err)
		}
		checkPostcopyOK(t, c, s, r)
		if p := s.rep.Postcopy; p.Reconnects != 1 || p.FaultChannelBytes == 0 {
			t.Fatalf("reconnects %d, fault channel bytes %d: want one reconnection after the channel carried pages", p.Reconnects, p.FaultChannelBytes)
		}
		t.Logf("faults %d, p50 %.0f µs, reconnects %d", s.rep.Postcopy.DemandFaults, s.rep.Postcopy.FaultLatencyP50US, s.rep.Postcopy.Reconnects)
	})
}

// TestPostcopyStreams pushes a post-copy, and a hybrid's rounds and push, over three
// connections and the fault channel, with a guest writing until the pause and a vCPU reading
// at the destination: every page stream carries pushed pages, the streams' pages add up to
// what was pushed (and, in hybrid, sent in the rounds), and memory arrives bit for bit.
func TestPostcopyStreams(t *testing.T) {
	for _, mode := range []string{migration.ModePostcopy, migration.ModeHybrid} {
		t.Run(mode, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				link := mt.LinkConfig{Bandwidth: 50 * MiB, Latency: 500 * time.Microsecond, Buffer: 256 << 10}
				c := &pcCase{
					g:      newGuest(8*MiB, 43),
					link:   link,
					writer: &mt.WriterConfig{Rate: 20000, Seed: 8},
					vcpu:   &mt.VCPUConfig{Pages: mt.LocalityPattern(11, 0, 2048, 600, 16), Think: 200 * time.Microsecond},
				}
				c.so = migration.SendOptions{Mode: mode, Streams: 3, FaultChannel: true, HybridRounds: 2, DowntimeLimit: time.Microsecond}
				if mode == migration.ModePostcopy {
					c.so.SampleBefore = 100 * time.Millisecond
				}
				c.so.DialStream, c.ro.AcceptStream = streamLinks(link, nil)
				s, r := c.run(t)
				checkPostcopyOK(t, c, s, r)
				p := s.rep.Postcopy
				if len(s.rep.Streams) != 3 || len(r.rep.Streams) != 3 {
					t.Fatalf("streams: source reports %d, destination %d (extra ones, the fault channel among them); want 3 and 3", len(s.rep.Streams), len(r.rep.Streams))
				}
				var carried uint64
				for _, st := range s.rep.Streams {
					if st.Pages == 0 || st.Bytes == 0 {
						t.Errorf("stream %d carried nothing: %+v", st.Index, st)
					}
					carried += st.Pages
				}
				want := p.PagesPushed
				for _, rr := range s.rep.RoundDetails {
					want += rr.Pages
				}
				if carried != want {
					t.Errorf("the streams carried %d pages; pushed %d, in rounds %d", carried, p.PagesPushed, want-p.PagesPushed)
				}
				if p.FaultChannelBytes == 0 || p.DemandFaults == 0 {
					t.Errorf("fault channel %d bytes, %d demand faults: want both", p.FaultChannelBytes, p.DemandFaults)
				}
				t.Logf("%d rounds, pushed %d, demanded %d, streams %+v, total %.1f ms", s.rep.Rounds, p.PagesPushed, p.PagesDemanded, s.rep.Streams, s.rep.TotalMS)
			})
		})
	}
}

// TestPostcopyPushStreamBreaks cuts a post-copy push stream: that is a broken link like any
// other; the source rejoins over the main connection alone, resends what the destination
// lacks, and memory still arrives bit for bit.
func TestPostcopyPushStreamBreaks(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		link := mt.LinkConfig{Bandwidth: 50 * MiB, Latency: 500 * time.Microsecond, Buffer: 256 << 10}
		c := &pcCase{
			g:    newGuest(8*MiB, 44),
			link: link,
			vcpu: &mt.VCPUConfig{Pages: mt.LocalityPattern(12, 0, 2048, 600, 16), Think: 200 * time.Microsecond},
		}
		var cut atomic.Bool
		dials := 0
		c.so = migration.SendOptions{Mode: migration.ModePostcopy, Streams: 3, FaultChannel: true}
		c.so.DialStream, c.ro.AcceptStream = streamLinks(link, func(a net.Conn) net.Conn {
			dials++
			if dials == 3 { // the second push stream (the fault channel is dialled first)
				return &cutAfter{Conn: a, left: 256 << 10, cut: &cut}
			}
			return a
		})
		c.so.Reconnect, c.ro.Reconnect = reconnectors(link)
		s, r := c.run(t)
		if !cut.Load() {
			t.Fatalf("the push stream was never cut: source %v %+v, destination %v", s.err, s.rep.Postcopy, r.err)
		}
		checkPostcopyOK(t, c, s, r)
		if p := s.rep.Postcopy; p.Reconnects != 1 {
			t.Fatalf("reconnects %d: want one, after the push stream broke", p.Reconnects)
		}
		t.Logf("pushed %d, demanded %d, streams %+v", s.rep.Postcopy.PagesPushed, s.rep.Postcopy.PagesDemanded, s.rep.Streams)
	})
}

// streamLinks returns a DialStream and an AcceptStream that make in-memory links for extra
// connections (the source's end wrapped by wrap, if set).
func streamLinks(link mt.LinkConfig, wrap func(net.Conn) net.Conn) (dial, accept func(context.Context) (io.ReadWriter, error)) {
	extra := make(chan net.Conn, 1)
	dial = func(ctx context.Context) (io.ReadWriter, error) {
		a, b := mt.Link(link)
		extra <- b
		if wrap != nil {
			return wrap(a), nil
		}
		return a, nil
	}
	accept = func(ctx context.Context) (io.ReadWriter, error) {
		select {
		case b := <-extra:
			return b, nil
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
	}
	return dial, accept
}

// TestStreamDialFails: the source cannot open its third connection; both sides fail, and the
// source runs on with its memory unchanged.
func TestStreamDialFails(t *testing.T) {
	n := newStreamNet(t)
	g := newGuest(8*MiB, 26)
	want := append([]byte(nil), g.Memory(0)...)
	d := mt.NewDest()
	so, ro := streamOptions(n, 3)
	dials := 0
	so.DialStream = func(ctx context.Context) (io.ReadWriter, error) {
		if dials++; dials == 2 {
			return nil, errors.New("no route to the destination")
		}
		return n.dialStream(ctx)
	}
	ro.StreamWait = time.Second
	sc, dc := n.pair(t)
	s, r := migrate(t.Context(), g, d, sc, dc, so, ro)
	checkSourceIntact(t, g, s, migration.ResultFailed, want)
	if !strings.Contains(s.err.Error(), "opening stream 2 of 3: no route") {
		t.Fatalf("source error %v, want the failed dial", s.err)
	}
	if r.err == nil || d.State() != "aborted" {
		t.Fatalf("destination: %v, state %q; want a failure and state aborted", r.err, d.State())
	}
}

// TestAutoStreams: with Streams 0 and DialStream set, the engine chooses the streams from the
// CPUs, uses them and says so; a bandwidth cap one connection reaches takes one.
func TestAutoStreams(t *testing.T) {
	for _, c := range []struct {
		cpus int
		bw   int64
		want int
	}{{1, 0, 2}, {2, 0, 2}, {4, 0, 4}, {64, 0, 8}, {8, 100 << 20, 1}, {8, 1 << 30, 8}} {
		if n, why := migration.AutoStreams(c.cpus, c.bw); n != c.want || !strings.Contains(why, "auto") {
			t.Errorf("AutoStreams(%d CPUs, %d B/s) = %d (%s), want %d", c.cpus, c.bw, n, why, c.want)
		}
	}
	n := newStreamNet(t)
	g := newGuest(16*MiB, 26)
	d := mt.NewDest()
	so, ro := streamOptions(n, 0)
	sc, dc := n.pair(t)
	s, r := migrate(t.Context(), g, d, sc, dc, so, ro)
	checkOK(t, g, d, s, r)
	want, _ := migration.AutoStreams(runtime.NumCPU(), 0)
	if len(s.rep.Streams) != want || !strings.HasPrefix(s.rep.StreamsChosen, fmt.Sprint(want)) || len(s.rep.Warnings) != 0 {
		t.Fatalf("streams %d, chosen %q, warnings %q; want %d chosen", len(s.rep.Streams), s.rep.StreamsChosen, s.rep.Warnings, want)
	}
	// Without DialStream, or with a destination that takes one connection: one, no warning.
	d2 := mt.NewDest()
	so.DialStream = nil
	sc, dc = n.pair(t)
	s, r = migrate(t.Context(), newGuest(4*MiB, 27), d2, sc, dc, so, ro)
	if s.err != nil || len(s.rep.Streams) != 0 || s.rep.StreamsChosen != "" {
		t.Fatalf("without DialStream: %v, streams %d, chosen %q", s.err, len(s.rep.Streams), s.rep.StreamsChosen)
	}
	so.DialStream, ro.AcceptStream = n.dialStream, nil
	sc, dc = n.pair(t)
	g3, d3 := newGuest(4*MiB, 28), mt.NewDest()
	s, r = migrate(t.Context(), g3, d3, sc, dc, so, ro)
	checkOK(t, g3, d3, s, r)
	if len(s.rep.Streams) != 0 || !strings.Contains(s.rep.StreamsChosen, "one connection only") || len(s.rep.Warnings) != 0 {
		t.Fatalf("destination without streams: streams %d, chosen %q, warnings %q", len(s.rep.Streams), s.rep.StreamsChosen, s.rep.Warnings)
	}
}
