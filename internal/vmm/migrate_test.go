package vmm

import (
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/kvm"
	"github.com/godwit-vm/godwit/internal/transport"
	"github.com/godwit-vm/godwit/migration"
)

// migrateLocal migrates src to a new machine over loopback TCP and returns the destination
// and both reports.
func migrateLocal(t testing.TB, src *Machine, opts migration.SendOptions) (*Machine, *migration.Report, *migration.Report) {
	t.Helper()
	return migrateFrom(t, MigrationSource{M: src}, opts)
}

// copyingSource is a source that offers no views of its memory: every page is copied out
// (ReadPages), as before views existed; the baseline that shows what they save.
type copyingSource struct{ MigrationSource }

func (copyingSource) ViewPages(int, uint64, uint64) []byte { return nil }

// migrateFrom is migrateLocal from any source built on a machine.
func migrateFrom(t testing.TB, src migration.Source, opts migration.SendOptions) (*Machine, *migration.Report, *migration.Report) {
	t.Helper()
	addr, _ := transport.Parse("tcp:127.0.0.1:0")
	dst := &MigrationDestination{Template: Config{Name: "dst"}}
	srep, drep, serr, derr := migrateVia(t, addr, src, dst, opts, 3*time.Minute)
	if serr != nil || derr != nil {
		t.Fatalf("migration failed: send %v, receive %v", serr, derr)
	}
	t.Cleanup(func() { dst.M.Close() })
	return dst.M, srep, drep
}

// migrateVia runs one migration of src into dst over a listener on addr (made by package
// transport, as 'godwit run --incoming' makes it; extra page streams come to it too) and
// returns both sides' reports and errors.
func migrateVia(t testing.TB, addr transport.Address, src migration.Source, dst migration.Destination, opts migration.SendOptions, timeout time.Duration) (srep, drep *migration.Report, serr, derr error) {
	t.Helper()
	ln, err := addr.Listen()
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr, _ = transport.Parse(ln.Addr().Network() + ":" + ln.Addr().String()) // the port it got
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	type result struct {
		rep *migration.Report
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer c.Close()
		rep, err := migration.Receive(ctx, dst, c, migration.ReceiveOptions{AcceptStream: func(context.Context) (io.ReadWriter, error) { return ln.Accept() }})
		done <- result{rep, err}
	}()
	c, err := addr.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	opts.DialStream = func(ctx context.Context) (io.ReadWriter, error) { return addr.Dial(ctx) }
	srep, serr = migration.Send(ctx, src, c, opts)
	c.Close()
	r := <-done
	return srep, r.rep, serr, r.err
}

// TestPrecopyMigrationOnRealKVM migrates idle and writing guests with each kind of dirty
// tracking: the dirty ring (KVM's default here), bitmaps, and a ring so small that the
// writer fills it between harvests, so that the vCPUs exit with KVM_EXIT_DIRTY_RING_FULL
// again and again; every destination verifies its memory.
func TestPrecopyMigrationOnRealKVM(t *testing.T) {
	ringMax := 0
	if sys, err := kvm.Open(""); err == nil {
		if vm, err := sys.CreateVM(); err == nil {
			ringMax, _ = vm.DirtyRingMax()
			vm.Close()
		}
		sys.Close()
	}
	for _, w := range []workload{
		{kind: "idle", content: "text", touch: 0.3},
		{kind: "dirty", content: "random", pattern: "random", wssMiB: 16, rate: 20000},
		{kind: "dirty", content: "random", pattern: "random", wssMiB: 16, rate: 20000, tracking: DirtyBitmap},
		{kind: "dirty", content: "random", pattern: "random", wssMiB: 32, tracking: DirtyRing, ringBytes: MinDirtyRingBytes},
		{kind: "dirty", content: "random", pattern: "random", wssMiB: 32, streams: 4},
	} {
		name := w.kind
		if w.streams > 1 {
			name = fmt.Sprintf("%s-%d-streams", w.kind, w.streams)
		}
		if w.tracking != "" {
			name += "-" + w.tracking
		}
		if w.ringBytes > 0 {
			name += fmt.Sprintf("-%d", w.ringBytes)
		}
		t.Run(name, func(t *testing.T) {
			if w.tracking == DirtyRing && ringMax < MinDirtyRingBytes {
				// A KVM without the ring (the nested host's may lack it): asking for it is a
				// clear error, and the other cases migrate with bitmaps.
				params, err := testParams(128<<20, 1, w)
				if err != nil {
					t.Fatal(err)
				}
				_, err = New(Config{Name: "ring", MemBytes: 128 << 20, VCPUs: 1, Image: guest.Image, Params: params, DirtyTracking: DirtyRing})
				if err == nil || !strings.Contains(err.Error(), "no dirty ring") {
					t.Fatalf("a machine asking for the dirty ring on a KVM without one: %v, want a clear error", err)
				}
				t.Logf("this KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING %d bytes): %v", ringMax, err)
				return
			}
			src := newMachine(t, 128, 2, w)
			if err := src.Start(); err != nil {
				t.Fatal(err)
			}
			waitHeartbeats(t, src, 50)
			before := src.Stats()
			opts := migration.SendOptions{DowntimeLimit: 300 * time.Millisecond, AutoConverge: true, Streams: w.streams}
			if w.ringBytes > 0 {
				// Rounds long enough for the writer (slowed by a fault per page it dirties)
				// to fill the small ring several times, whatever the link.
				opts.MaxBandwidth = 100 << 20
			}
			dst, srep, _ := migrateLocal(t, src, opts)
			if st, _ := src.State(); st != StatePaused {
				t.Fatalf("source after a migration: %s, want paused (the destination owns the guest)", st)
			}
			waitHeartbeats(t, dst, before.Heartbeats+20)
			r := verifyClean(t, dst)
			if srep.BlackoutMS == nil {
				t.Fatal("no blackout measured although both sides report heartbeats")
			}
			t.Logf("%s: %d rounds, %d bytes, downtime %.1f ms, blackout %.1f ms, pages %+v; destination verified %d pages",
				w.kind, srep.Rounds, srep.BytesWire, srep.DowntimeMS, *srep.BlackoutMS, srep.Pages, r.PagesChecked)
			t.Logf("downtime parts %+v; rounds %+v", srep.Downtime, srep.RoundDetails)
			if len(srep.Streams) != w.streams && w.streams > 1 {
				t.Fatalf("%d streams reported, want %d", len(srep.Streams), w.streams)
			}
			for _, st := range srep.Streams {
				if st.Pages == 0 {
					t.Errorf("stream %d carried no page: %+v", st.Index, srep.Streams)
				}
			}
			ss := src.Stats()
			t.Logf("dirty tracking %s: %d entries harvested, %d ring-full exits", ss.DirtyTracking, ss.DirtyRingHarvested, ss.DirtyRingFullExits)
			wantRing := w.tracking == DirtyRing || (w.tracking == "" && ringMax >= MinDirtyRingBytes)
			if strings.HasPrefix(srep.DirtyTracking, DirtyRing) != wantRing || srep.DirtyTracking != ss.DirtyTracking {
				t.Errorf("report says dirty tracking %q, stats %q; want the ring: %v", srep.DirtyTracking, ss.DirtyTracking, wantRing)
			}
			// With bitmaps the last fetch is the one part of the downtime that grows with
			// memory, and the report says so; with the ring nothing does.
			if scales := srep.DowntimeScaling; len(scales) != 1 || (wantRing != (scales[0] == "none")) || (!wantRing && !strings.HasPrefix(scales[0], "final_round_ms: ")) {
				t.Errorf("report says %q of the downtime grows with memory; dirty ring: %v", scales, wantRing)
			}
			if wantRing && w.kind == "dirty" && ss.DirtyRingHarvested == 0 {
				t.Errorf("a writer migrated with the dirty ring, and no entry was harvested")
			}
			if w.ringBytes > 0 && ss.DirtyRingFullExits == 0 {
				t.Errorf("a ring of %d bytes never filled under a writer at full speed", w.ringBytes)
			}
			// A source released after migrating away still answers stats, as its process
			// does when it reports the migration.
			src.Close()
			if after := src.Stats(); after.DirtyTracking != ss.DirtyTracking || after.State != StateReleased {
				t.Errorf("stats of the released source: tracking %q, state %s; want %q, %s", after.DirtyTracking, after.State, ss.DirtyTracking, StateReleased)
			}
		})
	}
}

// TestPostcopyStreamsOnRealKVM post-copies, and migrates by hybrid, a guest that rewrites a
// 32 MiB working set with three page streams and the fault channel: the push (and hybrid's
// rounds) go over every stream, and the destination verifies its memory.
func TestPostcopyStreamsOnRealKVM(t *testing.T) {
	for _, mode := range []string{migration.ModePostcopy, migration.ModeHybrid} {
		t.Run(mode, func(t *testing.T) {
			src := newMachine(t, 128, 2, workload{kind: "dirty", content: "random", pattern: "random", wssMiB: 32})
			if err := src.Start(); err != nil {
				t.Fatal(err)
			}
			waitHeartbeats(t, src, 50)
			before := src.Stats()
			dst, srep, drep := migrateLocal(t, src, migration.SendOptions{Mode: mode, Streams: 3, FaultChannel: true, HybridRounds: 2, DowntimeLimit: time.Millisecond})
			p := srep.Postcopy
			if p == nil {
				t.Fatalf("%s did not switch to post-copy: %+v", mode, srep)
			}
			waitHeartbeats(t, dst, before.Heartbeats+20)
			r := verifyClean(t, dst)
			if len(srep.Streams) != 3 || len(drep.Streams) != 3 {
				t.Fatalf("streams: source %+v, destination %+v; want 3 each", srep.Streams, drep.Streams)
			}
			for _, st := range srep.Streams {
				if st.Pages == 0 {
					t.Errorf("stream %d carried no page: %+v", st.Index, srep.Streams)
				}
			}
			t.Logf("%s: %d rounds, pushed %d, demanded %d, faults %d (p50 %.0f µs), total %.0f ms, streams %+v; destination verified %d pages",
				mode, srep.Rounds, p.PagesPushed, p.PagesDemanded, p.DemandFaults, p.FaultLatencyP50US, srep.TotalMS, srep.Streams, r.PagesChecked)
		})
	}
}

// TestCompressOnRealKVM migrates a guest that writes text at full speed over a 64 MiB
// working set with zstd and with s2, in pre-copy (forced, if it must) and in post-copy: most
// pages travel compressed, both sides count them alike, and the destination verifies its
// memory.
func TestCompressOnRealKVM(t *testing.T) {
	for _, c := range []struct{ mode, compress, report string }{
		{migration.ModePrecopy, migration.CompressZstd, "zstd (fastest)"},
		{migration.ModePostcopy, migration.CompressZstd, "zstd (fastest)"},
		{migration.ModePrecopy, migration.CompressS2, "s2"},
		{migration.ModePostcopy, migration.CompressS2, "s2"},
	} {
		mode := c.mode
		t.Run(mode+"/"+c.compress, func(t *testing.T) {
			src := newMachine(t, 128, 1, workload{kind: "dirty", content: "text", pattern: "random", wssMiB: 64})
			if err := src.Start(); err != nil {
				t.Fatal(err)
			}
			waitHeartbeats(t, src, 50)
			before := src.Stats()
			dst, srep, drep := migrateLocal(t, src, migration.SendOptions{Mode: mode, Compress: c.compress, Force: true, Streams: 2})
			waitHeartbeats(t, dst, before.Heartbeats+20)
			r := verifyClean(t, dst)
			sp, dp := srep.Pages, drep.Pages
			if sp.Compressed == 0 || sp.Compressed < 4*sp.Raw || sp.Compressed != dp.Compressed || sp.Raw != dp.Raw {
				t.Fatalf("pages: source %+v, destination %+v; want mostly compressed, counted alike", sp, dp)
			}
			if srep.Saved.Compressed < sp.Compressed*guest.PageSize/2 || srep.Compression != c.report {
				t.Fatalf("saved %+v with %q for %d compressed pages", srep.Saved, srep.Compression, sp.Compressed)
			}
			t.Logf("%s: %d rounds, total %.0f ms, downtime %.2f ms, %d bytes on the wire, pages %+v, saved %d bytes; destination verified %d pages",
				mode, srep.Rounds, srep.TotalMS, srep.DowntimeMS, srep.BytesWire, sp, srep.Saved.Compressed, r.PagesChecked)
		})
	}
}

// TestDedupOnRealKVM migrates a writer whose pages are drawn from a pool of 256 distinct pages
// (content image) with dedup, by pre-copy over two connections, by post-copy and by hybrid:
// most data pages go as references to a page sent before (after the switch the guest rewrites
// pages the references name: those are fetched again), and the destination guest verifies
// every page.
func TestDedupOnRealKVM(t *testing.T) {
	for _, mode := range []string{migration.ModePrecopy, migration.ModePostcopy, migration.ModeHybrid} {
		t.Run(mode, func(t *testing.T) {
			src := newMachine(t, 256, 1, workload{kind: "dirty", content: "image", pattern: "random", wssMiB: 64, rate: 50000})
			if err := src.Start(); err != nil {
				t.Fatal(err)
			}
			waitHeartbeats(t, src, 300) // the working set written about once
			before := src.Stats()
			// A downtime limit no round meets: hybrid switches after its rounds.
			dst, srep, drep := migrateLocal(t, src, migration.SendOptions{Mode: mode, Dedup: true, Force: true, Streams: 2, HybridRounds: 2,
				MaxBandwidth: 100 << 20, DowntimeLimit: time.Microsecond})
			waitHeartbeats(t, dst, before.Heartbeats+20)
			r := verifyClean(t, dst)
			sp, dp := srep.Pages, drep.Pages
			var again uint64
			if drep.Postcopy != nil {
				again = drep.Postcopy.DedupFetchedAgain
			}
			// After a switch a page may come twice (pushed and demanded); one is placed.
			counted := sp.Dedup == dp.Dedup+again || drep.Postcopy != nil && sp.Dedup > dp.Dedup+again
			if sp.Dedup < 8192 || !counted || sp.Raw > sp.Dedup/4 {
				t.Fatalf("pages: source %+v, destination %+v, %d fetched again (%s); want most data pages as references, counted alike", sp, dp, again, srep.Dedup)
			}
			if mode == migration.ModeHybrid && srep.Postcopy == nil {
				t.Fatalf("hybrid did not switch to post-copy: %d rounds, %s", srep.Rounds, srep.Reason)
			}
			t.Logf("%s: %d rounds, total %.0f ms, downtime %.2f ms, %d bytes on the wire, pages %+v, saved %d bytes (%s), %d fetched again; destination verified %d pages",
				mode, srep.Rounds, srep.TotalMS, srep.DowntimeMS, srep.BytesWire, sp, srep.Saved.Dedup, srep.Dedup, again, r.PagesChecked)
		})
	}
}

// TestDeltaOnRealKVM migrates a writer whose every write changes one 64-byte slot of a page
// (content patch) with delta, by pre-copy over two connections and by hybrid: the rounds
// after the first go mostly as deltas, and the destination guest verifies every page.
func TestDeltaOnRealKVM(t *testing.T) {
	for _, mode := range []string{migration.ModePrecopy, migration.ModeHybrid} {
		t.Run(mode, func(t *testing.T) {
			// Hybrid: a writer faster than the cap, so that it switches after its rounds.
			rate := map[string]uint64{migration.ModePrecopy: 50000, migration.ModeHybrid: 0}[mode]
			src := newMachine(t, 256, 1, workload{kind: "dirty", content: "patch", pattern: "random", wssMiB: 64, rate: rate})
			if err := src.Start(); err != nil {
				t.Fatal(err)
			}
			waitHeartbeats(t, src, 300) // the working set written about once
			before := src.Stats()
			so := migration.SendOptions{Mode: mode, Delta: true, Force: true, Streams: 2, HybridRounds: 2, MaxBandwidth: 100 << 20}
			if mode == migration.ModeHybrid {
				// Deltas are small: where the guest writes slowly (emulated, in a nested host),
				// the rounds would converge before the switch.
				so.DowntimeLimit = time.Microsecond
			}
			dst, srep, drep := migrateLocal(t, src, so)
			waitHeartbeats(t, dst, before.Heartbeats+20)
			r := verifyClean(t, dst)
			sp, dp := srep.Pages, drep.Pages
			if sp.Delta == 0 || sp.Delta != dp.Delta || srep.Saved.Delta < sp.Delta*guest.PageSize/2 {
				t.Fatalf("pages: source %+v, destination %+v, saved %+v (%s); want deltas, counted alike", sp, dp, srep.Saved, srep.Delta)
			}
			if mode == migration.ModeHybrid && srep.Postcopy == nil {
				t.Fatalf("hybrid did not switch to post-copy: %d rounds, %s", srep.Rounds, srep.Reason)
			}
			t.Logf("%s: %d rounds, total %.0f ms, downtime %.2f ms, %d bytes on the wire, pages %+v, saved %d bytes (%s); destination verified %d pages",
				mode, srep.Rounds, srep.TotalMS, srep.DowntimeMS, srep.BytesWire, sp, srep.Saved.Delta, srep.Delta, r.PagesChecked)
		})
	}
}
