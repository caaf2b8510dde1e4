package migration_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/godwit-vm/godwit/migration"
	mt "github.com/godwit-vm/godwit/migration/migrationtest"
	"github.com/godwit-vm/godwit/migration/wire"
)

// slowDest runs one migration of a 32 MiB guest of random data, whose writer keeps dirtying a
// working set of 1 MiB, to a destination that places pages at 50 MB/s behind a link of
// 200 MB/s with the given buffer: the destination is the bottleneck, so a backlog of about
// the buffer builds up in front of it. It returns both outcomes and how many pages the
// destination had placed when the source paused.
func slowDest(t *testing.T, buffer int) (s, r outcome, placedAtPause uint64) {
	const writeRate = 50e6
	g := mt.NewGuest(mt.SimpleDescription(32 * MiB))
	g.Fill(21, 0, 0)
	g.SetState("vcpu0", 7, []byte("registers"))
	d := mt.NewDest()
	d.WriteRate = writeRate
	g.Hook = func(op string, n int) error {
		if op == "Pause" {
			placedAtPause = d.Placed()
		}
		return nil
	}
	ctx, stop := context.WithCancel(t.Context())
	wait := g.RunWriter(ctx, mt.WriterConfig{Rate: 2000, WorkingSet: 256, Seed: 22})
	sc, dc := mt.Link(mt.LinkConfig{Buffer: buffer, Latency: 250 * time.Microsecond, Bandwidth: 200e6})
	s, r = migrate(t.Context(), g, d, sc, dc, migration.SendOptions{BatchBytes: 256 << 10}, migration.ReceiveOptions{})
	stop()
	wait()
	checkOK(t, g, d, s, r)
	return s, r, placedAtPause
}

// TestSlowDestinationBacklog shows that the backlog in front of a slow destination is drained
// before the pause, not during it: the downtime is the final round and the state at the rate
// the destination absorbs, whatever the buffer, while the last live round's acknowledgement
// wait grows with the buffer. A source that paused as soon as its last live round was in the
// buffer would add the buffer's drain time (160ms for 8 MiB here) to the downtime.
func TestSlowDestinationBacklog(t *testing.T) {
	const writeRate = 50e6
	var downtimes []float64
	for _, buffer := range []int{1 << 20, 8 << 20} {
		t.Run(fmt.Sprintf("buffer %d MiB", buffer>>20), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				s, _, placed := slowDest(t, buffer)
				rep := s.rep
				var live uint64
				for _, rr := range rep.RoundDetails {
					if !rr.Final {
						live += rr.Pages
					}
				}
				final := rep.RoundDetails[len(rep.RoundDetails)-1]
				last := rep.RoundDetails[len(rep.RoundDetails)-2]
				t.Logf("buffer %d MiB: downtime %.1fms (expected %.1fms; final round %d pages, parts %+v), last live round %d: ack wait %.1fms; rounds %+v",
					buffer>>20, rep.DowntimeMS, rep.ExpectedDowntimeMS, final.Pages, rep.Downtime, last.Round, last.AckWaitMS, rep.RoundDetails)

				// The source paused only once everything of the live rounds was placed.
				if placed != live {
					t.Fatalf("the destination had placed %d pages at the pause, the live rounds had %d", placed, live)
				}
				// The first round's acknowledgement waited for the backlog: about the
				// buffer at the destination's rate.
				if drain := float64(buffer) / writeRate * 1000; rep.RoundDetails[0].AckWaitMS < 0.8*drain {
					t.Fatalf("round 1 ack wait %.1fms, want about the %.1fms the buffer takes to drain", rep.RoundDetails[0].AckWaitMS, drain)
				}
				// The downtime: the final round at the destination's rate, the state, the
				// latency; no backlog.
				bound := float64(final.Pages*4096)/writeRate*1000 + 5
				if rep.DowntimeMS > bound {
					t.Fatalf("downtime %.1fms exceeds %.1fms (final round of %d pages at 50 MB/s + 5ms)", rep.DowntimeMS, bound, final.Pages)
				}
				// The estimate saw what the destination absorbs, not what the socket took.
				if rep.DowntimeMS > 1.2*rep.ExpectedDowntimeMS+1 {
					t.Fatalf("downtime %.1fms, expected %.1fms: the estimate is optimistic", rep.DowntimeMS, rep.ExpectedDowntimeMS)
				}
				downtimes = append(downtimes, rep.DowntimeMS)
			})
		})
	}
	if len(downtimes) == 2 && downtimes[1] > downtimes[0]+5 {
		t.Fatalf("downtime grew with the buffer: %.1fms with 1 MiB, %.1fms with 8 MiB", downtimes[0], downtimes[1])
	}
}

// TestSlowDestinationTCP is the same over loopback TCP, where the backlog is whatever the
// kernel's socket buffers hold: the source must not pause before the destination has placed
// every page of the live rounds, and the downtime of an idle guest stays small however long
// the backlog took to drain.
func TestSlowDestinationTCP(t *testing.T) {
	g := mt.NewGuest(mt.SimpleDescription(32 * MiB))
	g.Fill(23, 0, 0)
	d := mt.NewDest()
	d.WriteRate = 100e6
	var placed uint64
	g.Hook = func(op string, n int) error {
		if op == "Pause" {
			placed = d.Placed()
		}
		return nil
	}
	sc, dc := tcpPair(t)
	s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{}, migration.ReceiveOptions{})
	checkOK(t, g, d, s, r)
	rep := s.rep
	if rep.Rounds != 2 || placed != rep.RoundDetails[0].Pages {
		t.Fatalf("%d rounds; %d pages placed at the pause, round 1 had %d", rep.Rounds, placed, rep.RoundDetails[0].Pages)
	}
	if rep.DowntimeMS > 100 {
		t.Fatalf("downtime %.1fms for an idle guest (round 1 ack wait %.1fms)", rep.DowntimeMS, rep.RoundDetails[0].AckWaitMS)
	}
	t.Logf("downtime %.2fms (parts %+v), round 1: %.1fms sending, %.1fms waiting for its ack",
		rep.DowntimeMS, rep.Downtime, rep.RoundDetails[0].DurationMS, rep.RoundDetails[0].AckWaitMS)
}

// rawDest plays the destination with package wire directly, so that a test can make it
// misbehave: it answers the handshake, reads every frame and hands each RoundEnd to onEnd
// (and a nil one right after its Welcome). It returns the error that ended the stream.
func rawDest(conn net.Conn, onEnd func(w *wire.Writer, m *wire.RoundEnd) error) error {
	r := wire.NewReader(conn, wire.AtDestination)
	w := wire.NewWriter(conn)
	if _, err := r.ReadPreamble(); err != nil {
		return err
	}
	if err := w.WritePreamble(); err != nil {
		return err
	}
	if _, err := r.Next(); err != nil {
		return err
	}
	if err := w.WriteWelcome(&wire.Welcome{}); err != nil {
		return err
	}
	if err := onEnd(w, nil); err != nil {
		return err
	}
	for {
		m, err := r.Next()
		if err != nil {
			return err
		}
		if e, ok := m.(*wire.RoundEnd); ok {
			if err := onEnd(w, e); err != nil {
				return err
			}
		}
	}
}

// misbehave runs Send against rawDest and checks that the source failed while still running.
func misbehave(t *testing.T, so migration.SendOptions, onEnd func(w *wire.Writer, m *wire.RoundEnd) error) (srcErr, destErr error) {
	g := newGuest(4*MiB, 24)
	before := g.Memory(0)
	sc, dc := net.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- rawDest(dc, onEnd)
		dc.Close()
	}()
	rep, err := migration.Send(t.Context(), g, sc, so)
	sc.Close()
	destErr = <-done
	checkSourceIntact(t, g, outcome{rep, err}, migration.ResultFailed, before)
	if g.Calls("Pause") != 0 {
		t.Fatalf("the source paused without the acknowledgement of its last live round")
	}
	return err, destErr
}

func TestRoundAckTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		serr, derr := misbehave(t, migration.SendOptions{AckTimeout: 3 * time.Second}, func(*wire.Writer, *wire.RoundEnd) error { return nil })
		want := "migration: waiting for round 1 ack: timed out: the destination did not acknowledge round 1 ("
		if !errors.Is(serr, migration.ErrTimeout) || !strings.HasPrefix(serr.Error(), want) || !strings.HasSuffix(serr.Error(), " pages) within 3s of its end") {
			t.Fatalf("source error %q, want %q...", serr, want)
		}
		if el := time.Since(start); el < 3*time.Second || el > 4*time.Second {
			t.Fatalf("gave up after %v", el)
		}
		if !errors.Is(derr, wire.ErrPeer) || !strings.Contains(derr.Error(), "peer aborted (timeout)") {
			t.Fatalf("destination got %v, want the source's timeout", derr)
		}
	})
}

func TestRoundAckWrong(t *testing.T) {
	for _, c := range []struct {
		name string
		ack  func(m *wire.RoundEnd) *wire.RoundAck
		want string
	}{
		{"page count", func(m *wire.RoundEnd) *wire.RoundAck { return &wire.RoundAck{N: m.N, Pages: m.Pages - 1} },
			"migration: waiting for round 1 ack: protocol violation: the destination acknowledged round 1 with %d pages placed; the source sent %d in round 1"},
		{"round number", func(m *wire.RoundEnd) *wire.RoundAck { return &wire.RoundAck{N: m.N + 1, Pages: m.Pages} },
			"migration: waiting for round 1 ack: wire: frame 2 (round ack): out of order (acknowledgement of round 2 after round 0)"},
	} {
		t.Run(c.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				var pages uint64
				serr, derr := misbehave(t, migration.SendOptions{}, func(w *wire.Writer, m *wire.RoundEnd) error {
					if m == nil {
						return nil
					}
					pages = m.Pages
					return w.WriteRoundAck(c.ack(m))
				})
				want := c.want
				if strings.Contains(want, "%d") {
					want = fmt.Sprintf(want, pages-1, pages)
				}
				if serr.Error() != want {
					t.Fatalf("source error %q, want %q", serr, want)
				}
				if !errors.Is(derr, wire.ErrPeer) || !strings.Contains(derr.Error(), "peer aborted (protocol)") {
					t.Fatalf("destination got %v", derr)
				}
			})
		})
	}
}

func TestRoundAckEarly(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		serr, derr := misbehave(t, migration.SendOptions{}, func(w *wire.Writer, m *wire.RoundEnd) error {
			if m == nil {
				return w.WriteRoundAck(&wire.RoundAck{N: 1})
			}
			return nil
		})
		// The acknowledgement races with the round: read while the round is being written (the
		// usual case), or after its end marker, when it acknowledges no page of it. Either way
		// the source refuses it.
		early := "migration: round 1: protocol violation: the destination acknowledged round 1, but the source has ended only 0"
		late := "migration: waiting for round 1 ack: protocol violation: the destination acknowledged round 1 with 0 pages placed"
		if serr.Error() != early && !strings.HasPrefix(serr.Error(), late) {
			t.Fatalf("source error %q, want %q (or, had the round ended first, %q...)", serr, early, late)
		}
		// The refusal interrupts the batch the source is writing: if it was cut mid-frame, the
		// destination cannot read the Error frame after it, and sees the truncated frame.
		var fe *wire.FrameError
		if !(errors.Is(derr, wire.ErrPeer) && strings.Contains(derr.Error(), "peer aborted (protocol)")) && !(errors.As(derr, &fe) && errors.Is(derr, wire.ErrTruncated)) {
			t.Fatalf("destination got %v, want the source's protocol error or a frame it cut", derr)
		}
	})
}

// TestCorruptedRoundAck corrupts the acknowledgement of round 1: the source, still running,
// fails and says why; the destination aborts.
func TestCorruptedRoundAck(t *testing.T) {
	g := newGuest(4*MiB, 25)
	before := g.Memory(0)
	d := mt.NewDest()
	// Destination stream: preamble (16), Welcome (16+8), RoundAck 1 header at 40, payload at 56.
	sc, dc := proxy(t, nil, corruptAt(60))
	s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{}, migration.ReceiveOptions{})
	checkSourceIntact(t, g, s, migration.ResultFailed, before)
	if !errors.Is(s.err, wire.ErrChecksum) || !strings.HasPrefix(s.err.Error(), "migration: waiting for round 1 ack: wire: frame 2 (round ack): checksum mismatch") {
		t.Fatalf("source error %v", s.err)
	}
	if g.Calls("Pause") != 0 || d.State() != "aborted" || !errors.Is(r.err, wire.ErrPeer) {
		t.Fatalf("paused %d times; destination %q: %v", g.Calls("Pause"), d.State(), r.err)
	}
}

// TestReadAheadDiscarded stops and copies with the next round's first batch already read: the
// final round must read those pages afresh (the guest wrote one of them after the read-ahead),
// and the page counts must not include the discarded read.
func TestReadAheadDiscarded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGuest(4*MiB, 26)
		d := mt.NewDest()
		readAhead := 0
		g.Hook = func(op string, n int) error {
			switch {
			case op == "Populated":
				g.Write(0, 3, 0, []byte("dirty in round 1"))
			case op == "ReadPages" && g.Calls("FetchDirty") == 1:
				readAhead++
			case op == "Pause":
				// The hook runs before the guest stops: its last write.
				g.Write(0, 3, 0, []byte("changed after the read-ahead"))
			}
			return nil
		}
		sc, dc := net.Pipe()
		s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{}, migration.ReceiveOptions{})
		checkOK(t, g, d, s, r)
		rep := s.rep
		if readAhead != 1 || rep.Rounds != 2 || !rep.RoundDetails[1].Final || rep.RoundDetails[1].Pages != 1 {
			t.Logf("%d reads ahead", readAhead)
			t.Fatalf("rounds %+v", rep.RoundDetails)
		}
		if sent := rep.Pages.Raw + rep.Pages.Zero; sent != rep.RoundDetails[0].Pages+1 || r.rep.Pages.Raw != rep.Pages.Raw || r.rep.Pages.Zero != rep.Pages.Zero {
			t.Fatalf("pages %+v (destination %+v), rounds %+v", rep.Pages, r.rep.Pages, rep.RoundDetails)
		}
	})
}
