package migration_test

import (
	"context"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/godwit-vm/godwit/migration"
	mt "github.com/godwit-vm/godwit/migration/migrationtest"
	"github.com/godwit-vm/godwit/migration/wire"
)

// checkDelta asserts that both sides counted the same delta pages, and that they carried the
// rounds after the first (the writer changes 8 bytes of a page per write).
func checkDelta(t *testing.T, s, r outcome) {
	t.Helper()
	sp, rp := s.rep.Pages, r.rep.Pages
	if sp.Delta == 0 || sp.Delta != rp.Delta || sp.Raw != rp.Raw || !strings.HasPrefix(s.rep.Delta, "on") {
		t.Fatalf("pages: source %+v, destination %+v, delta %q; want deltas, counted alike", sp, rp, s.rep.Delta)
	}
	if s.rep.Saved.Delta < sp.Delta*4096*3/4 {
		t.Fatalf("saved %+v for %d delta pages", s.rep.Saved, sp.Delta)
	}
}

// TestDeltaPrecopy: a random guest whose writer changes a few bytes of its pages, migrated with
// delta over one connection and over three (a page may take another connection in each
// round), alone and with zstd: the destination matches the source, and the rounds after the
// first go mostly as deltas.
func TestDeltaPrecopy(t *testing.T) {
	for _, c := range []struct {
		name     string
		streams  int
		compress string
	}{{"one-stream", 1, ""}, {"three-streams", 3, ""}, {"with-zstd", 1, migration.CompressZstd}} {
		t.Run(c.name, func(t *testing.T) {
			n := newStreamNet(t)
			g := newGuest(16*MiB, 50)
			ctx, stop := context.WithCancel(t.Context())
			wait := g.RunWriter(ctx, mt.WriterConfig{Rate: 20000, WorkingSet: 1024, Seed: 51})
			d := mt.NewDest()
			so, ro := streamOptions(n, c.streams)
			so.Delta, so.Compress, so.Force = true, c.compress, true
			so.MaxBandwidth = 128 * MiB
			// Rounds until MaxRounds: a page the writer keeps changing goes as a delta again
			// and again, each against the copy the one before left.
			so.DowntimeLimit, so.MaxRounds = time.Microsecond, 6
			sc, dc := n.pair(t)
			s, r := migrate(t.Context(), g, d, sc, dc, so, ro)
			stop()
			wait()
			checkOK(t, g, d, s, r)
			checkDelta(t, s, r)
			var later, laterDelta uint64
			for _, rr := range s.rep.RoundDetails[1:] {
				later += rr.Pages
			}
			laterDelta = s.rep.Pages.Delta
			if s.rep.Rounds < 4 || later == 0 || laterDelta < later/2 {
				t.Fatalf("%d pages in the rounds after the first, %d of them deltas", later, laterDelta)
			}
			t.Logf("%d rounds, %d bytes, pages %+v, saved %+v, %s", s.rep.Rounds, s.rep.BytesWire, s.rep.Pages, s.rep.Saved, s.rep.Delta)
		})
	}
}

// TestDeltaHybrid: in hybrid the rounds go as deltas and the post-copy part never does (the
// destination discards its older copies at the switch).
func TestDeltaHybrid(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := &pcCase{
			g:      newGuest(8*MiB, 52),
			link:   mt.LinkConfig{Bandwidth: 50 * MiB, Latency: 500 * time.Microsecond, Buffer: 256 << 10},
			writer: &mt.WriterConfig{Rate: 100000, Seed: 53},
			vcpu:   &mt.VCPUConfig{Pages: mt.LocalityPattern(7, 0, 2048, 600, 16), Think: 200 * time.Microsecond},
		}
		c.so = migration.SendOptions{Mode: migration.ModeHybrid, Delta: true, MaxBandwidth: 2500 * 4096, BatchBytes: 64 << 10}
		s, r := c.run(t)
		checkPostcopyOK(t, c, s, r)
		checkDelta(t, s, r)
		if p := s.rep.Postcopy; p.SwitchedAfter == 0 || p.DemandFaults == 0 {
			t.Fatalf("no rounds before the switch, or no demand faults: %+v", p)
		}
	})
}

// readBackless is a destination that cannot read back its pages: it must decline delta.
type readBackless struct{ migration.Destination }

// TestRefsDeclined: a destination that cannot read back its pages gets no deltas and no dedup
// references, and the report says why.
func TestRefsDeclined(t *testing.T) {
	for _, c := range []struct {
		name  string
		so    migration.SendOptions
		count func(*migration.Report) (uint64, string)
	}{
		{"delta", migration.SendOptions{Delta: true}, func(r *migration.Report) (uint64, string) { return r.Pages.Delta, r.Delta }},
		{"dedup", migration.SendOptions{Dedup: true}, func(r *migration.Report) (uint64, string) { return r.Pages.Dedup, r.Dedup }},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := poolGuest(4*MiB, 54)
			d := mt.NewDest()
			sc, dc := tcpPair(t)
			s, r := migrate(t.Context(), g, readBackless{d}, sc, dc, c.so, migration.ReceiveOptions{})
			checkOK(t, g, d, s, r)
			if n, says := c.count(s.rep); n != 0 || says != "off (the destination declined it)" {
				t.Fatalf("%d %s pages, report says %q", n, c.name, says)
			}
		})
	}
}

// TestCorruptDeltaPage: a delta page whose frame is intact but whose runs run past the page is
// refused: the destination aborts with a protocol error naming the page and tells the source.
func TestCorruptDeltaPage(t *testing.T) {
	// Word 512: past the page.
	refuseCorruptPage(t, wire.CapDelta, wire.EncDelta, []byte{0x80, 0x04, 1, 1, 2, 3, 4, 5, 6, 7, 8}, "page 5 in region 0", "delta")
}
