package migration_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/godwit-vm/godwit/migration"
	mt "github.com/godwit-vm/godwit/migration/migrationtest"
	"github.com/godwit-vm/godwit/migration/wire"
)

// pcCase is one post-copy migration between a fake guest and a demand-paging destination.
type pcCase struct {
	g    *mt.Guest
	d    *mt.PostcopyDest
	link mt.LinkConfig
	so   migration.SendOptions
	ro   migration.ReceiveOptions
	// vcpu, when set, runs on the destination from its start until the migration ends.
	vcpu *mt.VCPUConfig
	// writer, when set, dirties the source's memory until the pause.
	writer *mt.WriterConfig
	// wrap, when set, wraps the destination's end of the first connection.
	wrap func(net.Conn) net.Conn
}

// run migrates and returns both outcomes; the links are closed afterwards.
func (c *pcCase) run(t *testing.T) (s, r outcome) {
	t.Helper()
	if c.d == nil {
		c.d = mt.NewPostcopyDest()
	}
	ctx, stop := context.WithCancel(t.Context())
	defer stop()
	var waits []func()
	if c.writer != nil {
		waits = append(waits, c.g.RunWriter(ctx, *c.writer))
	}
	if c.vcpu != nil {
		waits = append(waits, c.d.RunVCPU(ctx, *c.vcpu))
	}
	sc, dc := mt.Link(c.link)
	var dconn net.Conn = dc
	if c.wrap != nil {
		dconn = c.wrap(dc)
	}
	s, r = migrate(t.Context(), c.g, c.d, sc, dconn, c.so, c.ro)
	stop()
	for _, w := range waits {
		w()
	}
	return s, r
}

// reconnectors returns a matching pair of Reconnectors over fresh Links.
func reconnectors(cfg mt.LinkConfig) (src, dst migration.Reconnector) {
	accepts := make(chan net.Conn, 1)
	src = func(ctx context.Context) (io.ReadWriter, error) {
		a, b := mt.Link(cfg)
		select {
		case accepts <- b:
			return a, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	dst = func(ctx context.Context) (io.ReadWriter, error) {
		select {
		case c := <-accepts:
			return c, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return src, dst
}

func checkPostcopyOK(t *testing.T, c *pcCase, s, r outcome) {
	t.Helper()
	checkOK(t, c.g, c.d.Dest, s, r)
	if c.g.Calls("Resume") != 0 {
		t.Fatalf("the source was resumed")
	}
	if c.d.Armed() || c.d.Missing() != 0 {
		t.Fatalf("destination still armed (%v) or missing %d pages", c.d.Armed(), c.d.Missing())
	}
	p := s.rep.Postcopy
	if p == nil || r.rep.Postcopy == nil {
		t.Fatalf("no post-copy report: source %+v, destination %+v", p, r.rep.Postcopy)
	}
	if p.PagesPushed+p.PagesDemanded < p.MissingAtStart || p.MissingAtStart != r.rep.Postcopy.MissingAtStart {
		t.Fatalf("pushed %d + demanded %d for %d missing (destination: %d missing)", p.PagesPushed, p.PagesDemanded, p.MissingAtStart, r.rep.Postcopy.MissingAtStart)
	}
	if p.DemandFaults != r.rep.Postcopy.DemandFaults || p.MigrationID != r.rep.Postcopy.MigrationID || len(p.MigrationID) != 32 {
		t.Fatalf("source's copy of the destination's figures differs: %+v vs %+v", p, r.rep.Postcopy)
	}
}

func TestPostcopyIdle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := &pcCase{g: newGuest(16*MiB, 30), link: mt.LinkConfig{Bandwidth: 100 * MiB, Latency: time.Millisecond}}
		c.so.Mode = migration.ModePostcopy
		s, r := c.run(t)
		checkPostcopyOK(t, c, s, r)
		p := s.rep.Postcopy
		if s.rep.Mode != "postcopy" || r.rep.Mode != "postcopy" || s.rep.Rounds != 0 || p.SwitchedAfter != 0 || p.Prepage != "sequential" {
			t.Fatalf("report %+v / %+v", s.rep, p)
		}
		if p.PagesPushed != p.MissingAtStart || p.DemandFaults != 0 || p.PagesDemanded != 0 {
			t.Fatalf("idle guest: %+v", p)
		}
		if p.AheadPages != p.MissingAtStart || p.AheadPages == 0 {
			t.Fatalf("idle guest: %d of %d missing pages sent ahead of the pause, want all", p.AheadPages, p.MissingAtStart)
		}
		if s.rep.Pages.Hole == 0 || s.rep.Pages.Raw+s.rep.Pages.Zero != p.MissingAtStart {
			t.Fatalf("pages %+v for %d missing", s.rep.Pages, p.MissingAtStart)
		}
		t.Logf("total %.1fms, downtime %.2fms, post-copy %.1fms; %+v", s.rep.TotalMS, s.rep.DowntimeMS, p.PostcopyMS, *p)
	})
}

// TestPostcopyAhead: in pure post-copy the populated set goes to the destination before the
// pause (wire.Ahead) and the Switch carries only the last fetch. Pages the guest writes after
// the walk and before the pause, holes and pages with data alike, must still be demand-paged
// and arrive with their new content; the oracle checks every page.
func TestPostcopyAhead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := &pcCase{g: newGuest(8*MiB, 32), link: mt.LinkConfig{Bandwidth: 100 * MiB, Latency: time.Millisecond}}
		c.so.Mode = migration.ModePostcopy
		pop, err := c.g.Populated()
		if err != nil {
			t.Fatal(err)
		}
		var hole, held uint64
		for p := range pop[0].Pages() {
			if pop[0].Has(p) {
				held = p
			} else if hole == 0 {
				hole = p
			}
		}
		c.g.Hook = func(op string, n int) error {
			if op == "Pause" && n == 1 { // after the walk and the Ahead set, before the pause
				for _, p := range []uint64{hole, held} {
					if err := c.g.Write(0, p, 100, []byte("written after the walk")); err != nil {
						return err
					}
				}
			}
			return nil
		}
		s, r := c.run(t)
		checkPostcopyOK(t, c, s, r)
		p := s.rep.Postcopy
		if p.AheadPages == 0 || p.AheadPages+1 != p.MissingAtStart {
			t.Fatalf("%d pages ahead, %d missing: want all but the hole written after the walk ahead", p.AheadPages, p.MissingAtStart)
		}
	})
}

// TestPostcopyWriterAndVCPUs: a guest busy writing until the pause, a destination whose vCPU
// reads pages (blocking on missing ones) from its start: memory must arrive bit for bit.
func TestPostcopyWriterAndVCPUs(t *testing.T) {
	for _, prepage := range []string{migration.PrepageSequential, migration.PrepageBubble, migration.PrepageHot, migration.PrepageNone} {
		t.Run(prepage, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				c := &pcCase{
					g:      newGuest(8*MiB, 31),
					link:   mt.LinkConfig{Bandwidth: 50 * MiB, Latency: 500 * time.Microsecond, Buffer: 256 << 10},
					writer: &mt.WriterConfig{Rate: 20000, Seed: 5},
					vcpu:   &mt.VCPUConfig{Pages: mt.LocalityPattern(7, 0, 2048, 600, 16), Think: 200 * time.Microsecond},
				}
				c.so = migration.SendOptions{Mode: migration.ModePostcopy, Prepage: prepage, SampleBefore: 300 * time.Millisecond}
				var phases []string
				c.so.Progress = func(p migration.Progress) {
					if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
						phases = append(phases, p.Phase)
					}
				}
				s, r := c.run(t)
				checkPostcopyOK(t, c, s, r)
				p := s.rep.Postcopy
				if p.DemandFaults == 0 || p.FaultLatencyP50US <= 0 || p.FaultLatencyP99US < p.FaultLatencyP50US || len(p.FaultLatencyUS) == 0 {
					t.Fatalf("no demand faults measured: %+v", p)
				}
				if p.AheadPages == 0 || p.AheadPages > p.MissingAtStart {
					t.Fatalf("%d of %d missing pages sent ahead of the pause", p.AheadPages, p.MissingAtStart)
				}
				if p.ProgressBefore <= 0 || p.ProgressDuring <= 0 || p.ProgressAfter <= 0 {
					t.Fatalf("progress rates %v, %v, %v", p.ProgressBefore, p.ProgressDuring, p.ProgressAfter)
				}
				if strings.Join(phases, ",") == "" || !strings.Contains(strings.Join(phases, ","), "postcopy") {
					t.Fatalf("progress phases %v", phases)
				}
				t.Logf("%s: faults %d (p50 %.0fµs, p99 %.0fµs), pushed %d, demanded %d of %d; progress %.0f/%.0f/%.0f per s; phases %v",
					prepage, p.DemandFaults, p.FaultLatencyP50US, p.FaultLatencyP99US, p.PagesPushed, p.PagesDemanded, p.MissingAtStart,
					p.ProgressBefore, p.ProgressDuring, p.ProgressAfter, phases)
			})
		})
	}
}

// TestHybridSwitches: a writer faster than the link: hybrid switches after its rounds and
// still delivers memory bit for bit.
func TestHybridSwitches(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := &pcCase{
			g:      newGuest(16*MiB, 3),
			writer: &mt.WriterConfig{Rate: 100000, Seed: 4},
			vcpu:   &mt.VCPUConfig{Pages: mt.LocalityPattern(8, 0, 4096, 500, 8), Think: 200 * time.Microsecond},
		}
		c.so = migration.SendOptions{Mode: migration.ModeHybrid, MaxBandwidth: 10000 * 4096, BatchBytes: 64 << 10}
		s, r := c.run(t)
		checkPostcopyOK(t, c, s, r)
		p := s.rep.Postcopy
		if s.rep.Mode != "hybrid" || r.rep.Mode != "hybrid" || p.SwitchedAfter != 2 || p.SwitchReason != "after 2 live rounds" || s.rep.Rounds != 2 {
			t.Fatalf("mode %q/%q, switched after %d rounds (%q), rounds %d", s.rep.Mode, r.rep.Mode, p.SwitchedAfter, p.SwitchReason, s.rep.Rounds)
		}
		if p.MissingAtStart < 3000 {
			t.Fatalf("only %d pages missing at the switch", p.MissingAtStart)
		}
		t.Logf("hybrid: %d missing at the switch (%s), downtime %.2fms, total %.0fms, faults %d", p.MissingAtStart, p.SwitchReason, s.rep.DowntimeMS, s.rep.TotalMS, p.DemandFaults)
	})
}

// TestPostcopyCapRequestsFirst: under a bandwidth cap a requested page does not wait for the
// push's pacing. The cap (1000 pages/s) would hold each 32 KiB push batch for 8 ms; a vCPU that
// faults now and then must be served in about a round trip.
func TestPostcopyCapRequestsFirst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := &pcCase{
			g:      newGuest(4*MiB, 3),
			link:   mt.LinkConfig{Bandwidth: 1 << 30, Latency: 100 * time.Microsecond},
			writer: &mt.WriterConfig{Rate: 100000, Seed: 4},
			vcpu:   &mt.VCPUConfig{Pages: mt.LocalityPattern(8, 0, 1024, 200, 1), Think: 5 * time.Millisecond, Once: true},
		}
		c.so = migration.SendOptions{Mode: migration.ModeHybrid, MaxBandwidth: 1000 * 4096, BatchBytes: 64 << 10}
		s, r := c.run(t)
		checkPostcopyOK(t, c, s, r)
		p := s.rep.Postcopy
		if p.DemandFaults < 20 || p.FaultLatencyP50US > 1000 {
			t.Fatalf("%d demand faults, p50 %.0fµs p99 %.0fµs under a cap whose push batches take 8 ms: want p50 within 1 ms", p.DemandFaults, p.FaultLatencyP50US, p.FaultLatencyP99US)
		}
		t.Logf("faults %d: p50 %.0fµs, p99 %.0fµs; pushed %d, demanded %d of %d", p.DemandFaults, p.FaultLatencyP50US, p.FaultLatencyP99US, p.PagesPushed, p.PagesDemanded, p.MissingAtStart)
	})
}

// TestPostcopyCapPushMoves: a vCPU that faults faster than the cap must not starve the push:
// requested pages take at most three quarters of the cap, and the push moves with the rest.
func TestPostcopyCapPushMoves(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := &pcCase{
			g:      newGuest(16*MiB, 3),
			writer: &mt.WriterConfig{Rate: 100000, Seed: 4},
			vcpu:   &mt.VCPUConfig{Pages: mt.LocalityPattern(8, 0, 4096, 8192, 1), Think: time.Microsecond},
		}
		c.so = migration.SendOptions{Mode: migration.ModeHybrid, MaxBandwidth: 10000 * 4096, BatchBytes: 64 << 10}
		s, r := c.run(t)
		checkPostcopyOK(t, c, s, r)
		p := s.rep.Postcopy
		if p.MissingAtStart < 3000 || p.PagesPushed < p.MissingAtStart/5 {
			t.Fatalf("pushed %d, demanded %d of %d missing: the requests starved the push", p.PagesPushed, p.PagesDemanded, p.MissingAtStart)
		}
		if min := float64(p.MissingAtStart) / 10000 * 1000 * 0.9; p.PostcopyMS < min {
			t.Fatalf("post-copy of %d pages took %.0fms, under the %.0fms the cap allows", p.MissingAtStart, p.PostcopyMS, min)
		}
		t.Logf("pushed %d, demanded %d of %d missing in %.0fms; faults %d: p50 %.0fµs, p99 %.0fµs", p.PagesPushed, p.PagesDemanded, p.MissingAtStart, p.PostcopyMS, p.DemandFaults, p.FaultLatencyP50US, p.FaultLatencyP99US)
	})
}

// TestHybridNotConverging: the pre-copy policy gives up before the round limit: hybrid switches
// at once and says why.
func TestHybridNotConverging(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := &pcCase{g: newGuest(16*MiB, 3), writer: &mt.WriterConfig{Rate: 100000, Seed: 4}}
		c.so = migration.SendOptions{Mode: migration.ModeHybrid, HybridRounds: 50, MaxBandwidth: 10000 * 4096, BatchBytes: 64 << 10}
		s, r := c.run(t)
		checkPostcopyOK(t, c, s, r)
		if p := s.rep.Postcopy; !strings.HasPrefix(p.SwitchReason, "not converging: dirty rate") || p.SwitchedAfter >= 50 {
			t.Fatalf("switch after %d rounds: %q", p.SwitchedAfter, p.SwitchReason)
		}
		t.Logf("switched after %d rounds: %s", s.rep.Postcopy.SwitchedAfter, s.rep.Postcopy.SwitchReason)
	})
}

// TestHybridConverges: an idle guest converges in pre-copy: hybrid stops and copies.
func TestHybridConverges(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := &pcCase{g: newGuest(4*MiB, 32)}
		c.so.Mode = migration.ModeHybrid
		s, r := c.run(t)
		checkOK(t, c.g, c.d.Dest, s, r)
		if s.rep.Mode != "hybrid" || s.rep.Postcopy != nil || r.rep.Postcopy != nil || !s.rep.Converged || c.d.Calls("ArmPostcopy") != 0 {
			t.Fatalf("mode %q, post-copy %+v, converged %v", s.rep.Mode, s.rep.Postcopy, s.rep.Converged)
		}
	})
}

// TestPrepagingPolicies runs a vCPU with locality against each policy: every prepaging policy
// must take fewer demand faults than none.
func TestPrepagingPolicies(t *testing.T) {
	faults := map[string]uint64{}
	for _, prepage := range []string{migration.PrepageNone, migration.PrepageSequential, migration.PrepageBubble, migration.PrepageHot} {
		synctest.Test(t, func(t *testing.T) {
			g := mt.NewGuest(mt.SimpleDescription(8 * MiB))
			g.Fill(33, 0, 0)
			c := &pcCase{
				g:    g,
				link: mt.LinkConfig{Bandwidth: 8 * MiB, Latency: time.Millisecond, Buffer: 256 << 10},
				// The guest works on pages 1024..1535: it dirties them on the source, and reads
				// them on the destination in runs of 32 from random places.
				writer: &mt.WriterConfig{Rate: 10000, First: 1024, WorkingSet: 512, Seed: 9},
				vcpu:   &mt.VCPUConfig{Pages: mt.LocalityPattern(10, 1024, 512, 1000, 32), Think: 20 * time.Microsecond, Once: true},
			}
			c.so = migration.SendOptions{Mode: migration.ModePostcopy, Prepage: prepage, SampleBefore: 500 * time.Millisecond}
			s, r := c.run(t)
			checkPostcopyOK(t, c, s, r)
			p := s.rep.Postcopy
			faults[prepage] = p.DemandFaults
			t.Logf("%-10s demand faults %4d, p50 %6.0fµs, p99 %6.0fµs, pushed %d, demanded %d, post-copy %.0fms",
				prepage, p.DemandFaults, p.FaultLatencyP50US, p.FaultLatencyP99US, p.PagesPushed, p.PagesDemanded, p.PostcopyMS)
		})
	}
	for _, prepage := range []string{migration.PrepageSequential, migration.PrepageBubble, migration.PrepageHot} {
		if faults[prepage] >= faults[migration.PrepageNone] {
			t.Errorf("%s: %d demand faults, none: %d", prepage, faults[prepage], faults[migration.PrepageNone])
		}
	}
}

// breakAfter returns a destination hook that closes both ends of the first link at the n-th
// PlacePages, in the middle of post-copy.
func breakAfter(n int, conns *[2]net.Conn) mt.Hook {
	return func(op string, k int) error {
		if op == "PlacePages" && k == n {
			conns[0].Close()
			conns[1].Close()
		}
		return nil
	}
}

// TestPostcopyReconnect breaks the link mid-post-copy; both sides reconnect and finish.
func TestPostcopyReconnect(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := mt.LinkConfig{Bandwidth: 50 * MiB, Latency: 500 * time.Microsecond, Buffer: 256 << 10}
		g := newGuest(8*MiB, 34)
		d := mt.NewPostcopyDest()
		var conns [2]net.Conn
		d.Hook = breakAfter(20, &conns)
		srcR, dstR := reconnectors(cfg)
		ctx, stop := context.WithCancel(t.Context())
		wait := d.RunVCPU(ctx, mt.VCPUConfig{Pages: mt.LocalityPattern(11, 0, 2048, 3000, 16), Think: 100 * time.Microsecond})
		sc, dc := mt.Link(cfg)
		conns = [2]net.Conn{sc, dc}
		s, r := migrate(t.Context(), g, d, sc, dc,
			migration.SendOptions{Mode: migration.ModePostcopy, Reconnect: srcR, LinkTimeout: time.Second},
			migration.ReceiveOptions{Reconnect: dstR, LinkTimeout: time.Second})
		stop()
		wait()
		c := &pcCase{g: g, d: d}
		checkPostcopyOK(t, c, s, r)
		if s.rep.Postcopy.Reconnects != 1 || r.rep.Postcopy.Reconnects != 1 || s.rep.Postcopy.DestinationReconnects != 1 {
			t.Fatalf("reconnects: source %d, destination %d", s.rep.Postcopy.Reconnects, r.rep.Postcopy.Reconnects)
		}
		if placed, dupes := d.PlacedPages(); placed != s.rep.Postcopy.MissingAtStart || dupes != 0 {
			t.Fatalf("placed %d pages (%d duplicates) for %d missing", placed, dupes, s.rep.Postcopy.MissingAtStart)
		}
		t.Logf("reconnected once: %+v", *s.rep.Postcopy)
	})
}

// TestPostcopyLinkTimeout: the link silently stops delivering (no error, no close): both
// watchdogs notice within LinkTimeout, and the migration recovers over a new connection.
func TestPostcopyLinkTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := mt.LinkConfig{Bandwidth: 50 * MiB, Latency: 500 * time.Microsecond, Buffer: 256 << 10}
		srcR, dstR := reconnectors(cfg)
		c := &pcCase{g: newGuest(8*MiB, 35), link: cfg, wrap: func(c net.Conn) net.Conn { return &blackhole{Conn: c, after: 3 * MiB} }}
		c.so = migration.SendOptions{Mode: migration.ModePostcopy, Reconnect: srcR, LinkTimeout: 400 * time.Millisecond}
		c.ro = migration.ReceiveOptions{Reconnect: dstR, LinkTimeout: 400 * time.Millisecond}
		start := time.Now()
		s, r := c.run(t)
		checkPostcopyOK(t, c, s, r)
		if s.rep.Postcopy.Reconnects != 1 {
			t.Fatalf("reconnects %d", s.rep.Postcopy.Reconnects)
		}
		if el := time.Since(start); el > 3*time.Second {
			t.Fatalf("took %v to notice a dead link with a 400ms timeout", el)
		}
	})
}

// blackhole passes the first after bytes read, then swallows everything (reads block until
// their deadline): a link that died without telling anyone.
type blackhole struct {
	net.Conn
	after int64
	n     int64
}

func (b *blackhole) Read(p []byte) (int, error) {
	if b.n >= b.after {
		buf := make([]byte, 64<<10)
		for {
			if _, err := b.Conn.Read(buf); err != nil {
				return 0, err
			}
		}
	}
	n, err := b.Conn.Read(p[:min(int64(len(p)), b.after-b.n)])
	b.n += int64(n)
	return n, err
}

// TestPostcopyBrokenNoReconnect: without Reconnect a broken link fails both sides with the
// stranded error; the source stays paused and is never resumed, the destination keeps the VM.
func TestPostcopyBrokenNoReconnect(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGuest(8*MiB, 36)
		d := mt.NewPostcopyDest()
		var conns [2]net.Conn
		d.Hook = breakAfter(10, &conns)
		sc, dc := mt.Link(mt.LinkConfig{Bandwidth: 50 * MiB})
		conns = [2]net.Conn{sc, dc}
		s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{Mode: migration.ModePostcopy}, migration.ReceiveOptions{})
		checkStranded(t, g, d, s, r)
	})
}

// checkStranded asserts a post-copy that failed after the switch: the source paused, never
// resumed, the destination's VM kept (running, still demand-paged).
func checkStranded(t *testing.T, g *mt.Guest, d *mt.PostcopyDest, s, r outcome) {
	t.Helper()
	if !errors.Is(s.err, migration.ErrStranded) || (s.rep.Result != migration.ResultFailed && s.rep.Result != migration.ResultCancelled) || s.rep.Error != s.err.Error() {
		t.Fatalf("source: %q %v", s.rep.Result, s.err)
	}
	for _, want := range []string{"the destination runs the VM but may still lack up to ", "this source is paused and holds them, so it must not be resumed", "godwit migrate --resume, migration id " + s.rep.Postcopy.MigrationID} {
		if !strings.Contains(s.err.Error(), want) {
			t.Fatalf("source error %q lacks %q", s.err, want)
		}
	}
	if g.Running() || g.Calls("Resume") != 0 {
		t.Fatalf("source running %v, resumed %d times", g.Running(), g.Calls("Resume"))
	}
	if !errors.Is(r.err, migration.ErrStranded) || !strings.Contains(r.err.Error(), "this destination runs the VM, which still lacks") {
		t.Fatalf("destination: %v", r.err)
	}
	if d.State() != "running" || !d.Armed() || d.Missing() == 0 || d.Calls("Abort") != 0 {
		t.Fatalf("destination %q, armed %v, missing %d", d.State(), d.Armed(), d.Missing())
	}
	t.Logf("source: %v\n\tdestination: %v", s.err, r.err)
}

// TestPostcopyNotSupported: a destination that cannot demand-page declines post-copy: the source
// fails before it pauses and keeps running.
func TestPostcopyNotSupported(t *testing.T) {
	for _, mode := range []string{migration.ModePostcopy, migration.ModeHybrid} {
		t.Run(mode, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				g := newGuest(4*MiB, 37)
				before := g.Memory(0)
				d := mt.NewDest()
				sc, dc := mt.Link(mt.LinkConfig{})
				s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{Mode: mode}, migration.ReceiveOptions{})
				checkSourceIntact(t, g, s, migration.ResultFailed, before)
				if !errors.Is(s.err, migration.ErrNoPostcopy) || g.Calls("Pause") != 0 || g.Calls("StartDirtyLog") != 0 {
					t.Fatalf("source error %v, paused %d times", s.err, g.Calls("Pause"))
				}
				if !errors.Is(r.err, wire.ErrPeer) || d.State() != "aborted" {
					t.Fatalf("destination %q: %v", d.State(), r.err)
				}
				t.Logf("source: %v", s.err)
			})
		})
	}
}

// corrupting flips one bit of the byte at offset at of what it reads.
type corrupting struct {
	net.Conn
	at, n int64
}

func (c *corrupting) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if c.n <= c.at && c.at < c.n+int64(n) {
		p[c.at-c.n] ^= 0x04
	}
	c.n += int64(n)
	return n, err
}

// truncating ends the stream (EOF) after n bytes.
type truncating struct {
	net.Conn
	left int64
}

func (c *truncating) Read(p []byte) (int, error) {
	if c.left <= 0 {
		c.Conn.Close()
		return 0, io.EOF
	}
	n, err := c.Conn.Read(p[:min(int64(len(p)), c.left)])
	c.left -= int64(n)
	return n, err
}

// TestPostcopyCorruptAfterSwitch: a corrupted or truncated stream after the switch fails both
// sides clearly, and neither gives the VM up.
func TestPostcopyCorruptAfterSwitch(t *testing.T) {
	for _, tc := range []struct {
		name string
		wrap func(net.Conn) net.Conn
		want error
	}{
		{"corrupt", func(c net.Conn) net.Conn { return &corrupting{Conn: c, at: 2 * MiB} }, wire.ErrChecksum},
		{"truncated", func(c net.Conn) net.Conn { return &truncating{Conn: c, left: 2 * MiB} }, wire.ErrTruncated},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				c := &pcCase{g: newGuest(8*MiB, 38), wrap: tc.wrap, link: mt.LinkConfig{Bandwidth: 50 * MiB}}
				c.so.Mode = migration.ModePostcopy
				s, r := c.run(t)
				checkStranded(t, c.g, c.d, s, r)
				if !errors.Is(r.err, tc.want) {
					t.Fatalf("destination error %v, want %v", r.err, tc.want)
				}
			})
		})
	}
}

// TestPostcopyResume: the source gives up after the switch (no Reconnect); the destination
// waits in its Reconnector; a second Send with ResumeID finishes the migration.
func TestPostcopyResume(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGuest(8*MiB, 39)
		d := mt.NewPostcopyDest()
		var conns [2]net.Conn
		d.Hook = breakAfter(10, &conns)
		cfg := mt.LinkConfig{Bandwidth: 50 * MiB}
		sc, dc := mt.Link(cfg)
		conns = [2]net.Conn{sc, dc}
		accepts := make(chan net.Conn, 1)
		done := make(chan outcome, 1)
		go func() {
			rep, err := migration.Receive(t.Context(), d, dc, migration.ReceiveOptions{Reconnect: func(ctx context.Context) (io.ReadWriter, error) {
				select {
				case c := <-accepts:
					return c, nil
				case <-ctx.Done():
					return nil, ctx.Err()
				}
			}})
			done <- outcome{rep, err}
		}()
		srep, serr := migration.Send(t.Context(), g, sc, migration.SendOptions{Mode: migration.ModePostcopy})
		if !errors.Is(serr, migration.ErrStranded) || g.Running() {
			t.Fatalf("first send: %v", serr)
		}
		time.Sleep(5 * time.Second) // the operator takes a while
		a, b := mt.Link(cfg)
		accepts <- b
		rrep, rerr := migration.Send(t.Context(), g, a, migration.SendOptions{ResumeID: srep.Postcopy.MigrationID})
		a.Close()
		r := <-done
		if rerr != nil || rrep.Result != migration.ResultOK || rrep.Postcopy.SwitchReason != "resumed" {
			t.Fatalf("resume: %v %+v", rerr, rrep)
		}
		checkOK(t, g, d.Dest, outcome{rrep, rerr}, r)
		if g.Calls("Resume") != 0 || r.rep.Postcopy.Reconnects != 1 {
			t.Fatalf("resumed %d, reconnects %d", g.Calls("Resume"), r.rep.Postcopy.Reconnects)
		}
		t.Logf("resume: %+v", *rrep.Postcopy)
	})
}

// TestPostcopyWrongMigration: a rejoin naming another migration is refused; the destination
// keeps waiting for the right one.
func TestPostcopyWrongMigration(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGuest(4*MiB, 40)
		d := mt.NewPostcopyDest()
		var conns [2]net.Conn
		d.Hook = breakAfter(5, &conns)
		cfg := mt.LinkConfig{Bandwidth: 50 * MiB}
		sc, dc := mt.Link(cfg)
		conns = [2]net.Conn{sc, dc}
		accepts := make(chan net.Conn, 1)
		done := make(chan outcome, 1)
		go func() {
			rep, err := migration.Receive(t.Context(), d, dc, migration.ReceiveOptions{Reconnect: func(ctx context.Context) (io.ReadWriter, error) {
				select {
				case c := <-accepts:
					return c, nil
				case <-ctx.Done():
					return nil, ctx.Err()
				}
			}})
			done <- outcome{rep, err}
		}()
		srep, _ := migration.Send(t.Context(), g, sc, migration.SendOptions{Mode: migration.ModePostcopy})
		a, b := mt.Link(cfg)
		accepts <- b
		_, err := migration.Send(t.Context(), g, a, migration.SendOptions{ResumeID: strings.Repeat("ab", 16)})
		if !errors.Is(err, migration.ErrStranded) || !strings.Contains(err.Error(), "this destination runs migration "+srep.Postcopy.MigrationID) {
			t.Fatalf("wrong id: %v", err)
		}
		a, b = mt.Link(cfg)
		accepts <- b
		rrep, rerr := migration.Send(t.Context(), g, a, migration.SendOptions{ResumeID: srep.Postcopy.MigrationID})
		r := <-done
		checkOK(t, g, d.Dest, outcome{rrep, rerr}, r)
	})
}

// TestPostcopyContinuation: Switch and Lacking sets spread over many frames.
func TestPostcopyContinuation(t *testing.T) {
	defer migration.SetChunkRuns(3)()
	synctest.Test(t, func(t *testing.T) {
		cfg := mt.LinkConfig{Bandwidth: 50 * MiB}
		srcR, dstR := reconnectors(cfg)
		g := mt.NewGuest(migration.Description{
			Layout:  migration.Layout{PageSize: 4096, Regions: []migration.Region{{Name: "low", Size: 2 * MiB}, {Name: "high", GPA: 1 << 32, Size: 2 * MiB}}},
			VCPUs:   1,
			Devices: []string{"vcpu0"},
		})
		g.Fill(41, 0.5, 0.1) // holes everywhere: many runs
		d := mt.NewPostcopyDest()
		var conns [2]net.Conn
		d.Hook = breakAfter(3, &conns)
		sc, dc := mt.Link(cfg)
		conns = [2]net.Conn{sc, dc}
		so := migration.SendOptions{Mode: migration.ModePostcopy, Reconnect: srcR, BatchBytes: 16 << 10}
		s, r := migrate(t.Context(), g, d, sc, dc, so, migration.ReceiveOptions{Reconnect: dstR})
		checkPostcopyOK(t, &pcCase{g: g, d: d}, s, r)
		if s.rep.Postcopy.Reconnects != 1 {
			t.Fatalf("reconnects %d", s.rep.Postcopy.Reconnects)
		}
	})
}

// TestPostcopyCancelAfterSwitch: cancelling the source after the switch does not resume it:
// the migration is stranded (result cancelled), the destination keeps the VM.
func TestPostcopyCancelAfterSwitch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGuest(8*MiB, 42)
		d := mt.NewPostcopyDest()
		ctx, cancel := context.WithCancel(t.Context())
		d.Hook = func(op string, n int) error {
			if op == "PlacePages" && n == 10 {
				cancel()
			}
			return nil
		}
		sc, dc := mt.Link(mt.LinkConfig{Bandwidth: 50 * MiB})
		done := make(chan outcome, 1)
		go func() {
			rep, err := migration.Receive(t.Context(), d, dc, migration.ReceiveOptions{})
			done <- outcome{rep, err}
		}()
		rep, err := migration.Send(ctx, g, sc, migration.SendOptions{Mode: migration.ModePostcopy})
		sc.Close()
		r := <-done
		if !errors.Is(err, context.Canceled) || rep.Result != migration.ResultCancelled {
			t.Fatalf("source: %q %v", rep.Result, err)
		}
		checkStranded(t, g, d, outcome{rep, err}, r)
	})
}

// TestPostcopyDestinationGone: the destination never comes back after the link broke (its
// host died): the source keeps trying until its timeout, then says the VM is lost if so.
func TestPostcopyDestinationGone(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGuest(8*MiB, 43)
		d := mt.NewPostcopyDest()
		var conns [2]net.Conn
		d.Hook = breakAfter(10, &conns)
		sc, dc := mt.Link(mt.LinkConfig{Bandwidth: 50 * MiB})
		conns = [2]net.Conn{sc, dc}
		attempts := 0
		dial := func(ctx context.Context) (io.ReadWriter, error) {
			attempts++
			return nil, errors.New("connection refused")
		}
		start := time.Now()
		s, r := migrate(t.Context(), g, d, sc, dc,
			migration.SendOptions{Mode: migration.ModePostcopy, Reconnect: dial, Timeout: 30 * time.Second}, migration.ReceiveOptions{})
		checkStranded(t, g, d, s, r)
		if !errors.Is(s.err, migration.ErrTimeout) || !strings.Contains(s.err.Error(), "last reconnection attempt: connection refused") ||
			!strings.Contains(s.err.Error(), "never came back: if its host died, the VM is lost") {
			t.Fatalf("source error %v", s.err)
		}
		if el := time.Since(start); el < 30*time.Second || el > 31*time.Second || attempts < 10 || attempts > 40 {
			t.Fatalf("gave up after %v and %d attempts", el, attempts)
		}
	})
}

func TestPostcopyReportJSON(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := &pcCase{g: newGuest(2*MiB, 44), vcpu: &mt.VCPUConfig{Pages: []uint64{1, 2, 3}, Think: time.Millisecond}}
		c.so.Mode = migration.ModePostcopy
		s, r := c.run(t)
		checkPostcopyOK(t, c, s, r)
		b, _ := json.Marshal(s.rep)
		var m map[string]any
		json.Unmarshal(b, &m)
		pc, _ := m["postcopy"].(map[string]any)
		for _, k := range []string{"migration_id", "prepage", "switched_after_rounds", "switch_reason", "missing_at_switch", "ahead_pages", "pages_pushed",
			"pages_demanded", "demand_faults", "fault_latency_p50_us", "fault_latency_p99_us", "fault_latency_max_us", "postcopy_ms",
			"reconnects", "progress_rate_before", "progress_rate_during", "progress_rate_after"} {
			if _, ok := pc[k]; !ok {
				t.Errorf("postcopy report JSON lacks %q: %s", k, b)
			}
		}
		if m["mode"] != "postcopy" {
			t.Errorf("mode %v", m["mode"])
		}
	})
}

// TestHybridAfter: the time bound switches after the first round that ends past it.
func TestHybridAfter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := &pcCase{g: newGuest(16*MiB, 3), writer: &mt.WriterConfig{Rate: 100000, Seed: 4}}
		c.so = migration.SendOptions{Mode: migration.ModeHybrid, HybridRounds: 50, HybridAfter: 100 * time.Millisecond, MaxBandwidth: 10000 * 4096, BatchBytes: 64 << 10}
		s, r := c.run(t)
		checkPostcopyOK(t, c, s, r)
		if p := s.rep.Postcopy; p.SwitchedAfter != 1 || !strings.HasPrefix(p.SwitchReason, "pre-copy ran for ") || !strings.HasSuffix(p.SwitchReason, "(limit 100ms)") {
			t.Fatalf("switch after %d rounds: %q", p.SwitchedAfter, p.SwitchReason)
		}
	})
}

// TestProgressJSON: a progress line survives the trip through JSON, stage and all, as it does
// between the VM process and 'godwit migrate'.
func TestProgressJSON(t *testing.T) {
	for _, st := range []migration.Stage{migration.StageLive, migration.StageSwitched, migration.StageRecovering} {
		b, err := json.Marshal(migration.Progress{Phase: "x", Stage: st, Round: 3})
		if err != nil {
			t.Fatal(err)
		}
		var p migration.Progress
		if err := json.Unmarshal(b, &p); err != nil || p.Stage != st || p.Round != 3 {
			t.Fatalf("%s: %s decodes to %+v, %v", st, b, p, err)
		}
	}
	var p migration.Progress
	if err := json.Unmarshal([]byte(`{"stage":"sideways"}`), &p); err == nil {
		t.Fatal("an unknown stage decoded")
	}
}
