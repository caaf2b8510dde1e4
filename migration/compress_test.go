package migration_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/godwit-vm/godwit/migration"
	mt "github.com/godwit-vm/godwit/migration/migrationtest"
	"github.com/godwit-vm/godwit/migration/wire"
)

// textGuest is newGuest with text in place of random data.
func textGuest(size uint64, seed uint64) *mt.Guest {
	g := newGuest(size, seed)
	g.FillText(seed, 0.3, 0.2)
	return g
}

// compressions are the page compressions and what the report calls them.
var compressions = []struct{ kind, report string }{{migration.CompressZstd, "zstd (fastest)"}, {migration.CompressS2, "s2"}}

// checkCompressed asserts that both sides counted the same compressed pages, that they are
// most of the data pages, and that the bytes on the wire show it.
func checkCompressed(t *testing.T, s, r outcome, report string) {
	t.Helper()
	sp, rp := s.rep.Pages, r.rep.Pages
	if sp.Compressed == 0 || sp.Compressed < sp.Raw || sp.Compressed != rp.Compressed || sp.Raw != rp.Raw {
		t.Fatalf("pages: source %+v, destination %+v; want mostly compressed, counted alike", sp, rp)
	}
	if s.rep.Saved.Compressed < sp.Compressed*4096/2 || s.rep.Compression != report {
		t.Fatalf("saved %+v by %q for %d compressed pages", s.rep.Saved, s.rep.Compression, sp.Compressed)
	}
	if data := int64(sp.Raw+sp.Compressed) * 4096; s.rep.BytesWire > data/2 {
		t.Fatalf("%d bytes on the wire for %d bytes of page data", s.rep.BytesWire, data)
	}
}

// TestCompressPrecopy: a text guest with a writer, over one connection and over three, with
// zstd and with s2: the destination matches the source, most pages travel compressed, and the
// wire carries less than half the data. A random guest's pages are all declined and go raw.
func TestCompressPrecopy(t *testing.T) {
	for _, streams := range []int{1, 3} {
		for _, c := range compressions {
			t.Run(map[int]string{1: "one-stream", 3: "three-streams"}[streams]+"/"+c.kind, func(t *testing.T) {
				n := newStreamNet(t)
				g := textGuest(16*MiB, 40)
				ctx, stop := context.WithCancel(t.Context())
				wait := g.RunWriter(ctx, mt.WriterConfig{Rate: 20000, WorkingSet: 512, Seed: 41})
				d := mt.NewDest()
				so, ro := streamOptions(n, streams)
				so.Compress = c.kind
				so.MaxBandwidth = 128 * MiB
				so.Force = true // under the race detector zstd is slower than the writer
				sc, dc := n.pair(t)
				s, r := migrate(t.Context(), g, d, sc, dc, so, ro)
				stop()
				wait()
				checkOK(t, g, d, s, r)
				checkCompressed(t, s, r, c.report)
				t.Logf("%d rounds, %d bytes, pages %+v, saved %+v", s.rep.Rounds, s.rep.BytesWire, s.rep.Pages, s.rep.Saved)
			})
		}
	}
	t.Run("random", func(t *testing.T) {
		g := newGuest(8*MiB, 42)
		d := mt.NewDest()
		sc, dc := tcpPair(t)
		s, r := migrate(t.Context(), g, d, sc, dc, migration.SendOptions{Compress: migration.CompressZstd}, migration.ReceiveOptions{})
		checkOK(t, g, d, s, r)
		if s.rep.Pages.Compressed != 0 || s.rep.Pages.Raw == 0 || s.rep.Saved.Compressed != 0 {
			t.Fatalf("random pages: %+v, saved %+v", s.rep.Pages, s.rep.Saved)
		}
	})
}

// TestCompressPostcopy: post-copy and hybrid with zstd and with s2, a writer before the switch
// and a vCPU faulting after it: pushed and demanded pages decode alike.
func TestCompressPostcopy(t *testing.T) {
	for _, mode := range []string{migration.ModePostcopy, migration.ModeHybrid} {
		for _, comp := range compressions {
			t.Run(mode+"/"+comp.kind, func(t *testing.T) {
				synctest.Test(t, func(t *testing.T) {
					c := &pcCase{
						g:      textGuest(8*MiB, 43),
						link:   mt.LinkConfig{Bandwidth: 50 * MiB, Latency: 500 * time.Microsecond, Buffer: 256 << 10},
						writer: &mt.WriterConfig{Rate: 20000, Seed: 44},
						vcpu:   &mt.VCPUConfig{Pages: mt.LocalityPattern(7, 0, 2048, 600, 16), Think: 200 * time.Microsecond},
					}
					c.so = migration.SendOptions{Mode: mode, Compress: comp.kind}
					if mode == migration.ModeHybrid { // a writer that outruns the link: it switches
						c.writer.Rate, c.so.MaxBandwidth, c.so.BatchBytes = 100000, 2500*4096, 64<<10
					}
					s, r := c.run(t)
					checkPostcopyOK(t, c, s, r)
					checkCompressed(t, s, r, comp.report)
					if p := s.rep.Postcopy; p.DemandFaults == 0 || (mode == migration.ModeHybrid && p.SwitchedAfter == 0) {
						t.Fatalf("no demand faults, or no pre-copy rounds in hybrid: %+v", p)
					}
				})
			})
		}
	}
}

// TestCompressBadOptions: an unknown encoding or level fails before the source is touched.
func TestCompressBadOptions(t *testing.T) {
	for _, so := range []migration.SendOptions{{Compress: "lz4"}, {Compress: migration.CompressZstd, CompressLevel: "max"}, {Compress: migration.CompressS2, CompressLevel: "best"}} {
		g := newGuest(MiB, 45)
		sc, _ := tcpPair(t)
		rep, err := migration.Send(t.Context(), g, sc, so)
		if err == nil || rep.Result != migration.ResultFailed || g.Calls("StartDirtyLog") != 0 || !g.Running() {
			t.Fatalf("%+v: error %v, result %q", so, err, rep.Result)
		}
		t.Log(err)
	}
}

// TestCorruptCompressedPage: a compressed page whose frame is intact but whose zstd data is
// not is refused: the destination aborts and tells the source why.
func TestCorruptCompressedPage(t *testing.T) {
	refuseCorruptPage(t, wire.CapCompressed, wire.EncCompressed, []byte("not a zstd frame"), "page 5 of region 0", "zstd")
	refuseCorruptPage(t, wire.CapS2, wire.EncS2, []byte("not an s2 block"), "page 5 of region 0", "s2")
}

// refuseCorruptPage plays a source that negotiates caps and sends page 5 encoded as enc with
// data that does not decode: the destination must abort with a protocol error whose text has
// wantDst, and tell the source in an Error frame whose text has wantSrc.
func refuseCorruptPage(t *testing.T, caps wire.Caps, enc wire.Encoding, data []byte, wantDst, wantSrc string) {
	t.Helper()
	d := mt.NewDest()
	sc, dc := tcpPair(t)
	got := make(chan error, 1)
	go func() {
		rep, err := migration.Receive(t.Context(), d, dc, migration.ReceiveOptions{})
		if err == nil || rep.Result != migration.ResultFailed {
			err = errors.New("the destination accepted it")
		}
		got <- err
	}()
	w, rd := wire.NewWriter(sc), wire.NewReader(sc, wire.AtSource)
	desc := wire.Description{PageSize: 4096, VCPUs: 1, Regions: []wire.Region{{Name: "ram", Size: MiB}}}
	if err := w.WritePreamble(); err != nil {
		t.Fatal(err)
	}
	if _, err := rd.ReadPreamble(); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteHello(&wire.Hello{Caps: caps, Desc: desc}); err != nil {
		t.Fatal(err)
	}
	rd.SetOffered(caps)
	rd.SetDescription(&desc)
	if m, err := rd.Next(); err != nil || m.(*wire.Welcome).Caps&caps == 0 {
		t.Fatalf("welcome %v, %v: %v not accepted", m, err, enc)
	}
	var b wire.OutBatch
	b.Reset(0, 4096)
	b.Add(5, enc, data)
	if err := w.WriteRound(&wire.Round{N: 1, Pages: 1}); err != nil {
		t.Fatal(err)
	}
	if err := w.WritePages(&b); err != nil {
		t.Fatal(err)
	}
	_, perr := rd.Next()
	err := <-got
	if !errors.Is(err, migration.ErrProtocol) || !strings.Contains(err.Error(), wantDst) {
		t.Fatalf("destination: %v", err)
	}
	if !errors.Is(perr, wire.ErrPeer) || !strings.Contains(perr.Error(), wantSrc) {
		t.Fatalf("source read %v, want the destination's Error frame", perr)
	}
	if d.State() != "aborted" {
		t.Fatalf("destination state %q", d.State())
	}
	t.Logf("destination: %v", err)
}

// TestCompressAuto: under a bandwidth cap the batches after one the cap held back go
// compressed, and the first goes raw; without a cap every page goes raw. Both destinations
// match. It runs on fake time, where compressing costs none, so that the cap holds back every
// batch whatever the machine's speed (on real time a slow CPU mixes in raw batches: that is
// the point of auto).
func TestCompressAuto(t *testing.T) {
	for _, capped := range []bool{true, false} {
		synctest.Test(t, func(t *testing.T) {
			g := textGuest(8*MiB, 46)
			d := mt.NewDest()
			sc, dc := net.Pipe()
			so := migration.SendOptions{Compress: migration.CompressAuto, BatchBytes: 64 << 10}
			if capped {
				so.MaxBandwidth = 8 * MiB
			}
			s, r := migrate(t.Context(), g, d, sc, dc, so, migration.ReceiveOptions{})
			checkOK(t, g, d, s, r)
			p := s.rep.Pages
			switch {
			case capped && (p.Compressed < 10*p.Raw || p.Raw == 0 || r.rep.Pages.Compressed != p.Compressed):
				t.Fatalf("capped: pages %+v (destination %+v); want the first batch raw, the rest compressed", p, r.rep.Pages)
			case !capped && (p.Compressed != 0 || p.Raw == 0):
				t.Fatalf("uncapped: pages %+v; want all raw", p)
			case !strings.HasPrefix(s.rep.Compression, "auto: zstd (fastest)"):
				t.Fatalf("compression %q", s.rep.Compression)
			}
			t.Logf("capped %v: pages %+v, %d bytes, total %.0f ms", capped, p, s.rep.BytesWire, s.rep.TotalMS)
		})
	}
}
