package migration_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/godwit-vm/godwit/migration"
	mt "github.com/godwit-vm/godwit/migration/migrationtest"
	"github.com/godwit-vm/godwit/migration/wire"
)

// poolGuest is a guest whose data pages are copies of 64 distinct pages.
func poolGuest(size, seed uint64) *mt.Guest {
	g := mt.NewGuest(mt.SimpleDescription(size))
	g.FillPool(seed, 64, 0.2, 0.1)
	g.SetState("vcpu0", 7, bytes.Repeat([]byte("regs"), 100))
	return g
}

// checkDedup asserts that both sides counted the same dedup pages (but those the destination
// fetched again, after a post-copy switch), and that references saved nearly their pages.
func checkDedup(t *testing.T, s, r outcome, atLeast uint64) {
	t.Helper()
	sp, rp := s.rep.Pages, r.rep.Pages
	var again uint64
	if p := r.rep.Postcopy; p != nil {
		again = p.DedupFetchedAgain
	}
	// After a switch a page may come twice (pushed, and demanded); the destination counts
	// the copy it placed.
	counted := sp.Dedup == rp.Dedup+again || r.rep.Postcopy != nil && sp.Dedup > rp.Dedup+again
	if sp.Dedup < atLeast || !counted || !strings.HasPrefix(s.rep.Dedup, "on") {
		t.Fatalf("pages: source %+v, destination %+v (%d fetched again), dedup %q; want %d dedup pages at least, counted alike", sp, rp, again, s.rep.Dedup, atLeast)
	}
	if s.rep.Saved.Dedup != sp.Dedup*(4096-wire.DedupSize) {
		t.Fatalf("saved %+v for %d dedup pages", s.rep.Saved, sp.Dedup)
	}
}

// TestDedupPrecopy: a guest whose pages are copies of a few distinct ones, with a writer that
// copies those pages over others (content moves between pages, in and out of each round's
// set), migrated with dedup over one connection and over three, and with delta and zstd
// beside it: the destination matches the source, and almost every data page went as a
// reference.
func TestDedupPrecopy(t *testing.T) {
	for _, c := range []struct {
		name      string
		streams   int
		delta     bool
		compress  string
		writerSet uint64
	}{
		{"one-stream", 1, false, "", 0},
		{"three-streams", 3, false, "", 0},
		{"with-delta-and-zstd", 3, true, migration.CompressZstd, 512},
	} {
		t.Run(c.name, func(t *testing.T) {
			n := newStreamNet(t)
			g := poolGuest(16*MiB, 60)
			ctx, stop := context.WithCancel(t.Context())
			wait := g.RunWriter(ctx, mt.WriterConfig{Rate: 20000, WorkingSet: c.writerSet, Seed: 61, Pool: true})
			d := mt.NewDest()
			so, ro := streamOptions(n, c.streams)
			so.Dedup, so.Delta, so.Compress, so.Force = true, c.delta, c.compress, true
			so.MaxBandwidth = 64 * MiB
			so.DowntimeLimit, so.MaxRounds = time.Microsecond, 5
			sc, dc := n.pair(t)
			s, r := migrate(t.Context(), g, d, sc, dc, so, ro)
			stop()
			wait()
			checkOK(t, g, d, s, r)
			// 16 MiB: 4096 pages, 70% of them data drawn from 64 contents.
			checkDedup(t, s, r, 2000)
			if s.rep.Rounds < 3 {
				t.Fatalf("%d rounds", s.rep.Rounds)
			}
			t.Logf("%d rounds, %d bytes, pages %+v, saved %+v, %s", s.rep.Rounds, s.rep.BytesWire, s.rep.Pages, s.rep.Saved, s.rep.Dedup)
		})
	}
}

// TestDedupHybrid: in hybrid the rounds and the post-copy part carry references.
func TestDedupHybrid(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := mt.NewGuest(mt.SimpleDescription(8 * MiB))
		g.FillPool(62, 32, 0.2, 0.1)
		c := &pcCase{
			g:      g,
			link:   mt.LinkConfig{Bandwidth: 50 * MiB, Latency: 500 * time.Microsecond, Buffer: 256 << 10},
			writer: &mt.WriterConfig{Rate: 100000, Seed: 63, Pool: true},
			vcpu:   &mt.VCPUConfig{Pages: mt.LocalityPattern(7, 0, 2048, 600, 16), Think: 200 * time.Microsecond},
		}
		c.so = migration.SendOptions{Mode: migration.ModeHybrid, Dedup: true, MaxBandwidth: 2500 * 4096, BatchBytes: 64 << 10, DowntimeLimit: time.Microsecond}
		s, r := c.run(t)
		checkPostcopyOK(t, c, s, r)
		checkDedup(t, s, r, 500)
		if p := s.rep.Postcopy; p.SwitchedAfter == 0 || p.DemandFaults == 0 {
			t.Fatalf("no rounds before the switch, or no demand faults: %+v", p)
		}
		var before uint64
		for _, rr := range s.rep.RoundDetails {
			before += rr.Pages
		}
		if s.rep.Pages.Dedup <= before/2 {
			t.Fatalf("%d dedup pages, %d pages in the rounds: the post-copy part sent none", s.rep.Pages.Dedup, before)
		}
	})
}

// TestDedupPostcopy: pure post-copy pushes references, over one connection and over three
// (with a fault channel), while the destination's vCPU stores into the pages it touches: a
// reference to a page it changed does not check there, and the page is fetched again
// (Request with Again: without a fault channel the source would otherwise drop the request
// as in flight). The destination matches the source plus the vCPU's stores.
func TestDedupPostcopy(t *testing.T) {
	for _, streams := range []int{1, 3} {
		t.Run(fmt.Sprintf("streams-%d", streams), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				g := mt.NewGuest(mt.SimpleDescription(8 * MiB))
				g.FillPool(64, 16, 0.1, 0.1)
				c := &pcCase{
					g:    g,
					link: mt.LinkConfig{Bandwidth: 50 * MiB, Latency: 500 * time.Microsecond, Buffer: 256 << 10},
					// Among the first pages: those that hold each content first, which the
					// references name.
					vcpu: &mt.VCPUConfig{Pages: mt.LocalityPattern(9, 0, 128, 2000, 4), Think: 20 * time.Microsecond, Store: true},
				}
				c.so = migration.SendOptions{Mode: migration.ModePostcopy, Dedup: true, BatchBytes: 64 << 10}
				if streams > 1 {
					c.so.Streams, c.so.FaultChannel = streams, true
					c.so.DialStream, c.ro.AcceptStream = streamLinks(c.link, nil)
				}
				s, r := c.run(t)
				if r.err != nil {
					t.Fatalf("destination: %v", r.err)
				}
				if c.d.ApplyStores(g) == 0 {
					t.Fatal("the vCPU stored nothing")
				}
				checkPostcopyOK(t, c, s, r)
				checkDedup(t, s, r, 1000)
				if again := r.rep.Postcopy.DedupFetchedAgain; again == 0 {
					t.Fatalf("no reference failed: the vCPU's stores did not meet one (pages %+v)", s.rep.Pages)
				}
				t.Logf("pages %+v, %d fetched again, %d demand faults", s.rep.Pages, r.rep.Postcopy.DedupFetchedAgain, s.rep.Postcopy.DemandFaults)
			})
		})
	}
}

// TestCorruptDedupPage: a reference whose frame is intact but that names a page holding other
// content, or a page that does not exist, is refused: the destination aborts with a protocol
// error naming the page and tells the source.
func TestCorruptDedupPage(t *testing.T) {
	ref := func(region uint32, page uint64) []byte {
		b := binary.LittleEndian.AppendUint32(nil, region)
		b = binary.LittleEndian.AppendUint64(b, page)
		return append(b, bytes.Repeat([]byte{0xab}, 16)...)
	}
	t.Run("other-content", func(t *testing.T) {
		refuseCorruptPage(t, wire.CapDedup, wire.EncDedup, ref(0, 3), "refers to page 3 in region 0, which holds other content", "dedup")
	})
	t.Run("no-such-page", func(t *testing.T) {
		refuseCorruptPage(t, wire.CapDedup, wire.EncDedup, ref(0, 256), "refers to page 256 in region 0, which does not exist", "dedup")
	})
	t.Run("no-such-region", func(t *testing.T) {
		refuseCorruptPage(t, wire.CapDedup, wire.EncDedup, ref(1, 0), "region 1, which does not exist", "dedup")
	})
}
