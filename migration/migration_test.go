package migration_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/godwit-vm/godwit/migration"
	mt "github.com/godwit-vm/godwit/migration/migrationtest"
	"github.com/godwit-vm/godwit/migration/wire"
)

const MiB = 1 << 20

// outcome is one side's result.
type outcome struct {
	rep *migration.Report
	err error
}

// migrate runs Send and Receive against each other over the given connection pair and closes
// both ends afterwards.
func migrate(ctx context.Context, src migration.Source, dst migration.Destination, sc, dc net.Conn, so migration.SendOptions, ro migration.ReceiveOptions) (s, d outcome) {
	done := make(chan outcome, 1)
	go func() {
		rep, err := migration.Receive(ctx, dst, dc, ro)
		dc.Close()
		done <- outcome{rep, err}
	}()
	s.rep, s.err = migration.Send(ctx, src, sc, so)
	sc.Close()
	d = <-done
	return s, d
}

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (net.Conn, net.Conn) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			t.Error(err)
		}
		acc <- c
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	return c, <-acc
}

// newGuest returns a filled guest with distinctive device state.
func newGuest(size uint64, seed uint64) *mt.Guest {
	g := mt.NewGuest(mt.SimpleDescription(size))
	g.Fill(seed, 0.3, 0.2)
	g.SetState("vcpu0", 7, bytes.Repeat([]byte("regs"), 100))
	g.SetState("serial", 2, []byte("uart fifo"))
	return g
}

// checkOK asserts a successful migration on both sides and runs the oracle.
func checkOK(t *testing.T, g *mt.Guest, d *mt.Dest, s, r outcome) {
	t.Helper()
	if s.err != nil || s.rep.Result != migration.ResultOK {
		t.Fatalf("source: %v (%+v)", s.err, s.rep)
	}
	if r.err != nil || r.rep.Result != migration.ResultOK {
		t.Fatalf("destination: %v (%+v)", r.err, r.rep)
	}
	if g.Running() {
		t.Fatalf("source still running after a successful migration")
	}
	if err := mt.Compare(g, d); err != nil {
		t.Fatalf("oracle: %v", err)
	}
}

// checkSourceIntact asserts a failed migration left the source as it was: running, not
// logging, unthrottled, and (when want is given) with the memory it had.
func checkSourceIntact(t *testing.T, g *mt.Guest, s outcome, result string, want []byte) {
	t.Helper()
	if s.err == nil || s.rep.Result != result {
		t.Fatalf("source: result %q, error %v; want %q and an error", s.rep.Result, s.err, result)
	}
	if s.rep.Error != s.err.Error() {
		t.Fatalf("report error %q, returned %q", s.rep.Error, s.err)
	}
	if !g.Running() || g.Logging() || g.CurrentThrottle() != 0 {
		t.Fatalf("source not restored: running %v, logging %v, throttle %d", g.Running(), g.Logging(), g.CurrentThrottle())
	}
	if want != nil && !bytes.Equal(g.Memory(0), want) {
		t.Fatalf("source memory changed")
	}
}

func TestIdleGuestTCP(t *testing.T) {
	g := newGuest(64*MiB, 1)
	g.Heartbeat(time.Now())
	d := mt.NewDest()
	sc, dc := tcpPair(t)
	s, r := migrate(context.Background(), g, d, sc, dc, migration.SendOptions{}, migration.ReceiveOptions{})
	checkOK(t, g, d, s, r)
	rep := s.rep
	if !rep.Converged || rep.Reason != "" || rep.Rounds != 2 || len(rep.RoundDetails) != 2 || !rep.RoundDetails[1].Final {
		t.Fatalf("idle guest: converged %v (%q), %d rounds %+v", rep.Converged, rep.Reason, rep.Rounds, rep.RoundDetails)
	}
	p := rep.Pages
	if total := p.Raw + p.Zero + p.Hole; total != 64*MiB/4096 || p.Hole < 4000 || p.Zero < 2500 || p.Raw < 7500 {
		t.Fatalf("page counts %+v", p)
	}
	if r.rep.Pages.Raw != p.Raw || r.rep.Pages.Zero != p.Zero {
		t.Fatalf("destination counted %+v, source %+v", r.rep.Pages, p)
	}
	if rep.BytesWire < int64(p.Raw*4096) || rep.BytesWire > int64(p.Raw*4096)+int64(p.Zero)+MiB {
		t.Fatalf("bytes on the wire %d for %d raw pages", rep.BytesWire, p.Raw)
	}
	if rep.BytesWire != r.rep.BytesRead {
		t.Fatalf("source wrote %d bytes, destination read %d", rep.BytesWire, r.rep.BytesRead)
	}
	if rep.DowntimeMS <= 0 || rep.PauseToAckMS < rep.DowntimeMS-1 || rep.BlackoutMS == nil || *rep.BlackoutMS < rep.DowntimeMS {
		t.Fatalf("downtime %.3fms, pause->ack %.3fms, blackout %v", rep.DowntimeMS, rep.PauseToAckMS, rep.BlackoutMS)
	}
	if err := migration.CheckDowntimeParts(*rep); err != nil {
		t.Fatal(err)
	}
	t.Logf("64 MiB idle over TCP: total %.1fms, downtime %.2fms, blackout %.2fms, %d bytes, pages %+v",
		rep.TotalMS, rep.DowntimeMS, *rep.BlackoutMS, rep.BytesWire, rep.Pages)
}

func TestReportJSON(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGuest(MiB, 2)
		d := mt.NewDest()
		sc, dc := net.Pipe()
		s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{}, migration.ReceiveOptions{})
		checkOK(t, g, d, s, r)
		b, err := json.Marshal(s.rep)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		json.Unmarshal(b, &m)
		for _, k := range []string{"result", "mode", "total_ms", "downtime_ms", "blackout_ms", "bytes_wire", "pages", "rounds", "round_details", "throttle_max", "converged"} {
			if _, ok := m[k]; !ok {
				t.Errorf("report JSON lacks %q: %s", k, b)
			}
		}
		if m["result"] != "ok" || m["mode"] != "precopy" || m["blackout_ms"] != nil {
			t.Errorf("report JSON %s", b)
		}
		if _, ok := m["expected_downtime_ms"]; !ok {
			t.Errorf("report JSON lacks expected_downtime_ms: %s", b)
		}
		for _, rd := range m["round_details"].([]any) {
			if _, ok := rd.(map[string]any)["ack_wait_ms"]; !ok {
				t.Errorf("round details lack ack_wait_ms: %s", b)
			}
		}
		pages := m["pages"].(map[string]any)
		for _, k := range []string{"raw", "zero", "hole"} {
			if _, ok := pages[k]; !ok {
				t.Errorf("pages lacks %q", k)
			}
		}
	})
}

// heavy sets up the scenario of the convergence tests: a 16 MiB guest whose writer dirties
// 100000 pages/s over all of memory, behind a link of 10000 pages/s. A full copy takes 410ms,
// over the 300ms limit, and the guest redirties everything meanwhile.
func heavy(t *testing.T, so migration.SendOptions, src func(*mt.Guest) migration.Source) (g *mt.Guest, d *mt.Dest, s, r outcome) {
	const linkPages = 10000
	g = newGuest(16*MiB, 3)
	d = mt.NewDest()
	ctx, stop := context.WithCancel(t.Context())
	wait := g.RunWriter(ctx, mt.WriterConfig{Rate: 100000, Seed: 4})
	so.MaxBandwidth = linkPages * 4096
	so.BatchBytes = 64 << 10
	var s0 migration.Source = g
	if src != nil {
		s0 = src(g)
	}
	sc, dc := net.Pipe()
	s, r = migrate(t.Context(), s0, d, sc, dc, so, migration.ReceiveOptions{})
	stop()
	wait()
	return g, d, s, r
}

func TestHeavyWriterDoesNotConverge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g, d, s, r := heavy(t, migration.SendOptions{}, nil)
		checkSourceIntact(t, g, s, migration.ResultFailed, nil)
		if !errors.Is(s.err, migration.ErrNotConverged) || s.rep.Converged {
			t.Fatalf("error %v, want ErrNotConverged", s.err)
		}
		if !strings.Contains(s.rep.Reason, "link 10136 pages/s (dirty set stuck at 4096 pages, expected downtime 405ms > limit 300ms); auto-converge off") {
			t.Fatalf("reason %q", s.rep.Reason)
		}
		if !errors.Is(r.err, wire.ErrPeer) || !strings.Contains(r.err.Error(), "(no-converge)") || d.State() != "aborted" {
			t.Fatalf("destination: %v, state %q", r.err, d.State())
		}
		t.Logf("reason: %s; error: %v", s.rep.Reason, s.err)
	})
}

func TestHeavyWriterForced(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g, d, s, r := heavy(t, migration.SendOptions{Force: true}, nil)
		checkOK(t, g, d, s, r)
		if s.rep.Converged || !strings.Contains(s.rep.Reason, "auto-converge off") || s.rep.DowntimeMS < 300 {
			t.Fatalf("forced: converged %v, reason %q, downtime %.1fms", s.rep.Converged, s.rep.Reason, s.rep.DowntimeMS)
		}
		t.Logf("forced: downtime %.1fms after %d rounds: %s", s.rep.DowntimeMS, s.rep.Rounds, s.rep.Reason)
	})
}

func TestHeavyWriterAutoConverge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g, d, s, r := heavy(t, migration.SendOptions{AutoConverge: true}, nil)
		checkOK(t, g, d, s, r)
		if !s.rep.Converged || s.rep.ThrottleMax < 90 || s.rep.DowntimeMS > 300 {
			t.Fatalf("auto-converge: converged %v (%q), throttle max %d, downtime %.1fms", s.rep.Converged, s.rep.Reason, s.rep.ThrottleMax, s.rep.DowntimeMS)
		}
		var seq []int
		for _, rr := range s.rep.RoundDetails {
			seq = append(seq, rr.Throttle)
		}
		if seq[0] != 0 || seq[1] != 20 || seq[2] != 30 {
			t.Fatalf("throttle by round %v, want 0, 20, 30, ...", seq)
		}
		t.Logf("auto-converge: %d rounds, throttle %v, downtime %.1fms", s.rep.Rounds, seq, s.rep.DowntimeMS)
	})
}

// noThrottle hides the guest's Throttler.
type noThrottle struct{ migration.Source }

func TestAutoConvergeWithoutThrottler(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g, _, s, _ := heavy(t, migration.SendOptions{AutoConverge: true}, func(g *mt.Guest) migration.Source { return noThrottle{g} })
		checkSourceIntact(t, g, s, migration.ResultFailed, nil)
		if g.MaxThrottle() != 0 || !strings.Contains(s.rep.Reason, "auto-converge off") {
			t.Fatalf("throttle %d, reason %q", g.MaxThrottle(), s.rep.Reason)
		}
	})
}

func TestBandwidthCap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := mt.NewGuest(mt.SimpleDescription(8 * MiB))
		g.Fill(5, 0, 0)
		d := mt.NewDest()
		sc, dc := net.Pipe()
		const cap = 4 * MiB
		start := time.Now()
		var progress int
		s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{MaxBandwidth: cap, BatchBytes: 256 << 10, Progress: func(migration.Progress) { progress++ }}, migration.ReceiveOptions{})
		checkOK(t, g, d, s, r)
		elapsed := time.Since(start)
		rate := float64(s.rep.BytesWire) / elapsed.Seconds()
		if rate > cap*1.01 || rate < cap*0.95 {
			t.Fatalf("%d bytes in %v: %.0f bytes/s, cap %d", s.rep.BytesWire, elapsed, rate, cap)
		}
		if progress < 8 {
			t.Fatalf("progress called %d times in %v", progress, elapsed)
		}
	})
}

func TestBandwidthCapTCP(t *testing.T) {
	g := mt.NewGuest(mt.SimpleDescription(2 * MiB))
	g.Fill(6, 0, 0)
	d := mt.NewDest()
	sc, dc := tcpPair(t)
	start := time.Now()
	s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{MaxBandwidth: 8 * MiB, BatchBytes: 128 << 10}, migration.ReceiveOptions{})
	checkOK(t, g, d, s, r)
	// 2 MiB at 8 MiB/s: 250ms, minus one burst of credit.
	if el := time.Since(start); el < 200*time.Millisecond || el > 5*time.Second {
		t.Fatalf("2 MiB at 8 MiB/s took %v", el)
	}
}

// TestCancelAtEveryPhase cancels the source's context at each point of a migration with a
// live round after round 1, and checks that the source runs on with its memory untouched and
// that the destination discarded everything.
func TestCancelAtEveryPhase(t *testing.T) {
	for _, c := range []struct {
		op   string
		n    int
		dest bool // the hook is on the destination
	}{
		{"StartDirtyLog", 1, false},
		{"Populated", 1, false},
		{"ReadPages", 3, false}, // round 1
		{"FetchDirty", 1, false},
		{"ReadPages", 70, false}, // round 1, a later batch
		{"FetchDirty", 2, false},
		{"Pause", 1, false},
		{"FetchDirty", 3, false}, // after the pause
		{"ViewPages", 1, false},  // the final round, from guest memory
		{"SaveState", 1, false},
		{"Prepare", 1, true},
		{"RestoreState", 1, true}, // source waits for resumed
	} {
		t.Run(c.op, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				g := newGuest(4*MiB, 7)
				d := mt.NewDest()
				ctx, cancel := context.WithCancel(t.Context())
				sent := make(chan struct{})
				hook := func(op string, n int) error {
					if op == c.op && n == c.n {
						cancel()
						if c.dest {
							<-sent // let the source finish failing first
						}
					}
					return nil
				}
				// Once logging is on, 64 pages are written; round 2 sends them again, one read
				// per page (they are not adjacent).
				g.Hook = func(op string, n int) error {
					if op == "Populated" && n == 1 {
						for p := uint64(0); p < 64; p++ {
							g.Write(0, p*16, 0, []byte("dirty in round 1"))
						}
					}
					if op == "FetchDirty" && n == 2 { // one page for the final round
						g.Write(0, 1000, 0, []byte("dirty in round 2"))
					}
					if !c.dest {
						return hook(op, n)
					}
					return nil
				}
				if c.dest {
					d.Hook = hook
				}
				before := g.Memory(0)
				sc, dc := net.Pipe()
				done := make(chan outcome, 1)
				go func() {
					rep, err := migration.Receive(t.Context(), d, dc, migration.ReceiveOptions{})
					dc.Close()
					done <- outcome{rep, err}
				}()
				// The limit keeps pre-copy going while anything is dirty: in fake time the fixed
				// part of the expected downtime (the state estimate at the measured bandwidth)
				// is under 50µs, the 64 dirty pages add over 140µs. The cap makes time pass.
				srep, serr := migration.Send(ctx, g, sc, migration.SendOptions{DowntimeLimit: 100 * time.Microsecond, MaxBandwidth: 100 * MiB, BatchBytes: 64 << 10})
				close(sent)
				sc.Close()
				r := <-done
				s := outcome{srep, serr}
				if g.Calls("Populated") > 0 {
					for p := uint64(0); p < 64; p++ {
						copy(before[p*16*4096:], "dirty in round 1")
					}
				}
				if g.Calls("FetchDirty") >= 2 {
					copy(before[1000*4096:], "dirty in round 2")
				}
				checkSourceIntact(t, g, s, migration.ResultCancelled, before)
				if !errors.Is(serr, context.Canceled) {
					t.Fatalf("source error %v, want context.Canceled", serr)
				}
				if st := d.State(); st != "aborted" && st != "" {
					t.Fatalf("destination state %q", st)
				}
				if r.err == nil || r.rep.Result != migration.ResultFailed {
					t.Fatalf("destination: %v, %q", r.err, r.rep.Result)
				}
				if c.op != "StartDirtyLog" && c.op != "Prepare" && c.op != "RestoreState" && !strings.Contains(r.err.Error(), "peer aborted (cancelled)") {
					t.Fatalf("destination error %v, want the source's cancellation", r.err)
				}
				t.Logf("source: %v\n\tdestination: %v", serr, r.err)
			})
		})
	}
}

func TestTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGuest(4*MiB, 8)
		d := mt.NewDest()
		d.Hook = func(op string, n int) error {
			if op == "Start" {
				time.Sleep(time.Hour) // a hung destination
			}
			return nil
		}
		sc, dc := net.Pipe()
		s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{AckTimeout: 2 * time.Second}, migration.ReceiveOptions{})
		checkSourceIntact(t, g, s, migration.ResultFailed, nil)
		if !errors.Is(s.err, migration.ErrTimeout) || !strings.Contains(s.err.Error(), "migration: waiting for resumed: timed out: no resumed from the destination within 2s") {
			t.Fatalf("source error %v", s.err)
		}
		if r.err == nil || d.State() != "aborted" {
			t.Fatalf("destination %v, state %q", r.err, d.State())
		}
	})
}

func TestOverallTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGuest(4*MiB, 20)
		before := g.Memory(0)
		d := mt.NewDest()
		sc, dc := net.Pipe()
		// About 2.4 MiB of populated pages at 1 MiB/s cannot finish in 500ms.
		s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{Timeout: 500 * time.Millisecond, MaxBandwidth: MiB, BatchBytes: 64 << 10}, migration.ReceiveOptions{})
		checkSourceIntact(t, g, s, migration.ResultFailed, before)
		if !errors.Is(s.err, migration.ErrTimeout) || s.err.Error() != "migration: round 1: timed out after 500ms" {
			t.Fatalf("source error %v", s.err)
		}
		if !strings.Contains(r.err.Error(), "peer aborted (timeout)") || d.State() != "aborted" {
			t.Fatalf("destination %q: %v", d.State(), r.err)
		}
	})
}

func TestDestinationFails(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGuest(4*MiB, 9)
		before := g.Memory(0)
		d := mt.NewDest()
		d.Hook = func(op string, n int) error {
			if op == "WritePages" && n == 3 {
				return errors.New("disk on fire")
			}
			return nil
		}
		sc, dc := net.Pipe()
		s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{BatchBytes: 64 << 10}, migration.ReceiveOptions{})
		checkSourceIntact(t, g, s, migration.ResultFailed, before)
		want := "migration: round 1: wire: frame 2 (error): peer aborted (destination): migration: round 1: destination WritePages(region 0, page "
		if !errors.Is(s.err, wire.ErrPeer) || !strings.HasPrefix(s.err.Error(), want) || !strings.HasSuffix(s.err.Error(), "disk on fire") {
			t.Fatalf("source error %q, want %q...", s.err, want)
		}
		if d.State() != "aborted" || r.rep.Result != migration.ResultFailed {
			t.Fatalf("destination %q, %v", d.State(), r.err)
		}
	})
}

func TestDestinationDiesTCP(t *testing.T) {
	g := newGuest(16*MiB, 10)
	before := g.Memory(0)
	d := mt.NewDest()
	sc, dc := tcpPair(t)
	d.Hook = func(op string, n int) error {
		if op == "WritePages" && n == 5 {
			dc.(*net.TCPConn).SetLinger(0)
			dc.Close() // the process dies: RST, no Error frame
		}
		return nil
	}
	s, _ := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{BatchBytes: 64 << 10}, migration.ReceiveOptions{})
	checkSourceIntact(t, g, s, migration.ResultFailed, before)
	if !strings.HasPrefix(s.err.Error(), "migration: round 1: wire: ") {
		t.Fatalf("source error %q", s.err)
	}
	t.Logf("source: %v", s.err)
}

// proxy relays between a and b over loopback TCP, passing each direction through a filter
// that may alter or cut the bytes (by returning false).
func proxy(t *testing.T, toDst, toSrc func(off int64, p []byte) bool) (sc, dc net.Conn) {
	sc, p1 := tcpPair(t)
	p2, dc := tcpPair(t)
	relay := func(from, to net.Conn, f func(int64, []byte) bool) {
		var off int64
		buf := make([]byte, 4096)
		for {
			n, err := from.Read(buf)
			if n > 0 {
				if f != nil && !f(off, buf[:n]) {
					from.Close()
					to.Close()
					return
				}
				off += int64(n)
				if _, err := to.Write(buf[:n]); err != nil {
					from.Close()
					return
				}
			}
			if err != nil {
				// Pass the half-close on: closing outright with unread data would reset
				// the connection and lose what the other side has not read yet.
				to.(*net.TCPConn).CloseWrite()
				return
			}
		}
	}
	go relay(p1, p2, toDst)
	go relay(p2, p1, toSrc)
	return sc, dc
}

func TestCorruptedStream(t *testing.T) {
	g := newGuest(4*MiB, 11)
	before := g.Memory(0)
	d := mt.NewDest()
	const at = 300000
	sc, dc := proxy(t, func(off int64, p []byte) bool {
		if off <= at && at < off+int64(len(p)) {
			p[at-off] ^= 0x01
		}
		return true
	}, nil)
	s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{BatchBytes: 64 << 10}, migration.ReceiveOptions{})
	checkSourceIntact(t, g, s, migration.ResultFailed, before)
	if !errors.Is(r.err, wire.ErrChecksum) || !strings.Contains(r.err.Error(), "(page batch): checksum mismatch (want 0x") {
		t.Fatalf("destination error %v", r.err)
	}
	if !errors.Is(s.err, wire.ErrPeer) || !strings.Contains(s.err.Error(), "peer aborted (protocol)") || !strings.Contains(s.err.Error(), "checksum mismatch") {
		t.Fatalf("source error %v", s.err)
	}
	if d.State() != "aborted" {
		t.Fatalf("destination state %q", d.State())
	}
	t.Logf("destination: %v\n\tsource: %v", r.err, s.err)
}

func TestTruncatedStream(t *testing.T) {
	g := newGuest(4*MiB, 12)
	before := g.Memory(0)
	d := mt.NewDest()
	sc, dc := proxy(t, func(off int64, p []byte) bool { return off+int64(len(p)) < 200000 }, nil)
	s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{BatchBytes: 64 << 10}, migration.ReceiveOptions{})
	checkSourceIntact(t, g, s, migration.ResultFailed, before)
	if !errors.Is(r.err, wire.ErrTruncated) && !errors.Is(r.err, wire.ErrClosed) {
		t.Fatalf("destination error %v", r.err)
	}
	if d.State() != "aborted" {
		t.Fatalf("destination state %q", d.State())
	}
	t.Logf("destination: %v\n\tsource: %v", r.err, s.err)
}

// corruptAt returns a proxy filter that flips a bit of the byte at offset at.
func corruptAt(at int64) func(off int64, p []byte) bool {
	return func(off int64, p []byte) bool {
		if off <= at && at < off+int64(len(p)) {
			p[at-off] ^= 0x80
		}
		return true
	}
}

// TestCorruptedAck corrupts the destination's Resumed frame: the source, paused, must resume,
// and the destination, already started, must abort when the source says it gave up.
func TestCorruptedAck(t *testing.T) {
	g := newGuest(4*MiB, 13)
	before := g.Memory(0)
	d := mt.NewDest()
	// Destination stream of an idle guest: preamble (16), Welcome (16+8), RoundAck 1 (16+16),
	// Resumed header at 72, payload at 88.
	sc, dc := proxy(t, nil, corruptAt(92))
	s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{}, migration.ReceiveOptions{})
	checkSourceIntact(t, g, s, migration.ResultFailed, before)
	if !errors.Is(s.err, wire.ErrChecksum) || !strings.Contains(s.err.Error(), "migration: waiting for resumed: wire: frame 3 (resumed): checksum mismatch") {
		t.Fatalf("source error %v", s.err)
	}
	if d.State() != "aborted" || !errors.Is(r.err, wire.ErrPeer) || r.rep.Result != migration.ResultFailed {
		t.Fatalf("destination %q: %v", d.State(), r.err)
	}
	t.Logf("source: %v\n\tdestination: %v", s.err, r.err)
}

func TestWrongVersion(t *testing.T) {
	t.Run("destination speaks 2", func(t *testing.T) {
		g := newGuest(MiB, 14)
		sc, dc := tcpPair(t)
		go func() {
			io.ReadFull(dc, make([]byte, wire.PreambleSize))
			wire.NewWriter(dc).WriteRawPreamble(2, 2)
		}()
		srep, err := migration.Send(t.Context(), g, sc, migration.SendOptions{})
		checkSourceIntact(t, g, outcome{srep, err}, migration.ResultFailed, nil)
		if !errors.Is(err, wire.ErrVersion) || err.Error() != "migration: handshake: wire: preamble: protocol version mismatch (the peer speaks versions 2..2, this side 1..1)" {
			t.Fatalf("error %v", err)
		}
		if g.Calls("StartDirtyLog") != 0 {
			t.Fatalf("dirty logging started before the handshake")
		}
	})
	t.Run("source speaks 2", func(t *testing.T) {
		d := mt.NewDest()
		sc, dc := tcpPair(t)
		go wire.NewWriter(sc).WriteRawPreamble(2, 2)
		rep, err := migration.Receive(t.Context(), d, dc, migration.ReceiveOptions{})
		if !errors.Is(err, wire.ErrVersion) || rep.Result != migration.ResultFailed || d.Calls("Prepare") != 0 {
			t.Fatalf("error %v, result %q", err, rep.Result)
		}
		// The source still gets our preamble, so it can report the mismatch too.
		r := wire.NewReader(sc, wire.AtSource)
		if v, err := r.ReadPreamble(); v != 1 || err != nil {
			t.Fatalf("version %d, %v", v, err)
		}
	})
}

// dropDirty is a broken source: it loses one page from the dirty set after round 1.
type dropDirty struct {
	*mt.Guest
	page uint64
	once sync.Once
}

func (s *dropDirty) FetchDirty() ([]migration.Bitmap, error) {
	bms, err := s.Guest.FetchDirty()
	if err == nil {
		s.once.Do(func() { bms[0].Clear(s.page) })
	}
	return bms, err
}

// corruptRead is a broken source: it flips a bit of one page when reading it.
type corruptRead struct {
	*mt.Guest
	page uint64
}

func (s *corruptRead) ReadPages(r int, first uint64, dst []byte) error {
	err := s.Guest.ReadPages(r, first, dst)
	if err == nil && s.page >= first && s.page < first+uint64(len(dst)/4096) {
		dst[(s.page-first)*4096+100] ^= 1
	}
	return err
}

// TestOracleCatchesBrokenSender shows that the comparison every test ends with catches a
// sender that skips one dirty page or corrupts one bit.
func TestOracleCatchesBrokenSender(t *testing.T) {
	for _, c := range []struct {
		name string
		wrap func(g *mt.Guest) migration.Source
		want string
	}{
		{"honest", func(g *mt.Guest) migration.Source { return g }, ""},
		{"skips a dirty page", func(g *mt.Guest) migration.Source { return &dropDirty{Guest: g, page: 37} }, "region 0: 1 pages differ, first [37]"},
		{"corrupts a page", func(g *mt.Guest) migration.Source { return &corruptRead{Guest: g, page: 500} }, "region 0: 1 pages differ, first [500]"},
	} {
		t.Run(c.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				g := newGuest(4*MiB, 15)
				g.Write(0, 500, 0, []byte("populated"))
				// Page 37 is sent in round 1 and written after it: round 2 must send it again.
				g.Hook = func(op string, n int) error {
					if op == "FetchDirty" && n == 1 {
						g.Write(0, 37, 8, []byte("late write"))
					}
					return nil
				}
				d := mt.NewDest()
				sc, dc := net.Pipe()
				s, r := migrate(t.Context(), c.wrap(g), d, sc, dc, migration.SendOptions{BatchBytes: 64 << 10}, migration.ReceiveOptions{})
				if s.err != nil || r.err != nil {
					t.Fatalf("source %v, destination %v", s.err, r.err)
				}
				err := mt.Compare(g, d)
				if c.want == "" {
					if err != nil {
						t.Fatalf("oracle on an honest sender: %v", err)
					}
					return
				}
				if err == nil || !strings.Contains(err.Error(), c.want) {
					t.Fatalf("oracle: %v, want %q", err, c.want)
				}
			})
		})
	}
}

func TestStateSectionsLarge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGuest(MiB, 16)
		big := make([]byte, wire.MaxFramePayload+5000)
		for i := range big {
			big[i] = byte(i / 3)
		}
		g.SetState("serial", 3, big)
		d := mt.NewDest()
		sc, dc := net.Pipe()
		s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{}, migration.ReceiveOptions{})
		checkOK(t, g, d, s, r)
	})
}

func TestBadSectionFromVMM(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGuest(MiB, 17)
		g.SetState("gpu", 1, []byte{1})
		d := mt.NewDest()
		sc, dc := net.Pipe()
		s, _ := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{}, migration.ReceiveOptions{})
		checkSourceIntact(t, g, s, migration.ResultFailed, nil)
		if !strings.Contains(s.err.Error(), `migration: state: SaveState: section 2 "gpu" is not in the description's devices`) || d.State() != "aborted" {
			t.Fatalf("error %v, destination %q", s.err, d.State())
		}
	})
}

func TestMultipleRegionsAndWriterTCP(t *testing.T) {
	desc := migration.Description{
		Layout: migration.Layout{PageSize: 4096, Regions: []migration.Region{
			{Name: "low", GPA: 0, Size: 8 * MiB},
			{Name: "high", GPA: 1 << 32, Size: 24 * MiB},
		}},
		VCPUs:   4,
		Devices: []string{"vcpu0", "vcpu1", "vcpu2", "vcpu3", "serial"},
	}
	g := mt.NewGuest(desc)
	g.Fill(18, 0.5, 0.1)
	g.SetState("vcpu2", 5, []byte("rip=0x1000"))
	ctx, stop := context.WithCancel(t.Context())
	wait := g.RunWriter(ctx, mt.WriterConfig{Rate: 20000, Region: 1, WorkingSet: 512, Seed: 19})
	d := mt.NewDest()
	sc, dc := tcpPair(t)
	s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{MaxBandwidth: 64 * MiB, DowntimeLimit: 50 * time.Millisecond}, migration.ReceiveOptions{})
	stop()
	wait()
	checkOK(t, g, d, s, r)
	t.Logf("two regions with a writer: %d rounds, downtime %.2fms, blackout %v, pages %+v", s.rep.Rounds, s.rep.DowntimeMS, deref(s.rep.BlackoutMS), s.rep.Pages)
}

func deref(p *float64) float64 {
	if p == nil {
		return -1
	}
	return *p
}
