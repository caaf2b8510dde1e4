package bench

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/testbed"
	"github.com/godwit-vm/godwit/migration"
	mt "github.com/godwit-vm/godwit/migration/migrationtest"
)

// BenchmarkEnginePostcopy migrates a 512 MiB in-memory guest with a quarter of its pages
// written (random, incompressible content) in pure post-copy (sequential push) from host 0 to
// host 1 of a testbed, over a 1 Gbit/s shaped link and over an unshaped one (and on the
// unshaped link once more with no push while the vCPUs fault: demand-only). The destination
// is the VMM's demand paging (internal/demand) on a real memfd and a real userfaultfd; only its
// four vCPUs are simulated: threads that load pages with locality all over memory through
// system calls, so that they block in the kernel on real userfaultfd faults while the push
// runs. It reports the fault service latency (p50, p99, as the destination measured it: fault
// -> page placed), the demand faults, the pages pushed and demanded, the downtime, the total
// time and its ratio to the bytes on the wire over a raw TCP transfer's rate on the same link
// in the same run (time-vs-raw: 1.0 is the link's speed). The destination's memory is compared
// with the source's after every migration.
func BenchmarkEnginePostcopy(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Fatal("network namespaces need root")
	}
	for _, link := range []struct {
		name     string
		bps      int64
		prepage  string
		faultFor time.Duration // how long the vCPUs run after the switch; 0: until the end
	}{
		{"1gbit", gbit, migration.PrepageSequential, 0},
		{"unshaped", 0, migration.PrepageSequential, 0},
		// Demand only: no push while the vCPUs fault (their first 500 ms), so no push data
		// waits ahead of a requested page: the floor of the fault service latency here.
		{"unshaped-demand-only", 0, migration.PrepageNone, 500 * time.Millisecond},
	} {
		b.Run(link.name, func(b *testing.B) {
			tb, err := testbed.New(testbed.Config{Bandwidth: link.bps})
			if err != nil {
				b.Fatal(err)
			}
			defer tb.Close()
			raw, err := tb.MeasureTCP(256 << 20)
			if err != nil {
				b.Fatal(err)
			}
			const size = 512 << 20
			src := mt.NewGuest(mt.SimpleDescription(size))
			src.Fill(2, 0.75, 0)
			var m struct{ p50, p99, max, faults, pushed, demanded, down, total, ratio, pratio float64 }
			for i := 0; i < b.N; i++ {
				if err := src.Resume(); err != nil { // the previous migration left it paused
					b.Fatal(err)
				}
				dst, err := newUffdDest()
				if err != nil {
					b.Fatal(err)
				}
				ctx, stop := context.WithCancel(context.Background())
				var waits []func() error
				const vcpus = 4
				for v := range vcpus {
					pat := mt.LocalityPattern(uint64(100*i+v), 0, size/4096, 1<<20, 16)
					waits = append(waits, dst.runVCPU(ctx, pat, 20*time.Microsecond, link.faultFor))
				}
				rep := migratePostcopy(b, tb, src, dst, link.prepage)
				stop()
				for _, w := range waits {
					if err := w(); err != nil {
						b.Error(err)
					}
				}
				pc := rep.Postcopy
				if pc == nil {
					b.Fatal("no post-copy report")
				}
				m.p50 += pc.FaultLatencyP50US
				m.p99 += pc.FaultLatencyP99US
				m.max += pc.FaultLatencyMaxUS
				m.faults += float64(pc.DemandFaults)
				m.pushed += float64(pc.PagesPushed)
				m.demanded += float64(pc.PagesDemanded)
				m.down += rep.DowntimeMS
				m.total += rep.TotalMS
				m.ratio += rep.TotalMS / 1000 / (float64(rep.BytesWire) / raw)
				m.pratio += pc.PostcopyMS / 1000 / (float64(rep.BytesWire) / raw)
				err = dst.compare(src)
				dst.close()
				if err != nil {
					b.Fatal(err)
				}
			}
			n := float64(b.N)
			b.ReportMetric(m.p50/n, "p50-us")
			b.ReportMetric(m.p99/n, "p99-us")
			b.ReportMetric(m.max/n, "max-us")
			b.ReportMetric(m.faults/n, "faults")
			b.ReportMetric(m.pushed/n, "pushed")
			b.ReportMetric(m.demanded/n, "demanded")
			b.ReportMetric(m.down/n, "downtime-ms")
			b.ReportMetric(m.total/n, "total-ms")
			b.ReportMetric(raw/1e6, "rawtcp-MB/s")
			b.ReportMetric(m.ratio/n, "time-vs-raw")
			b.ReportMetric(m.pratio/n, "postcopy-vs-raw")
		})
	}
}

// migratePostcopy runs one pure post-copy migration from host 0 to host 1 and returns the
// source's report (with the destination's fault figures from its Stats).
func migratePostcopy(b testing.TB, tb *testbed.Testbed, src migration.Source, dst migration.Destination, prepage string) *migration.Report {
	b.Helper()
	rep := migrateOver(b, tb, src, dst, migration.SendOptions{Mode: migration.ModePostcopy, Prepage: prepage})
	if testing.Verbose() {
		b.Logf("downtime %.1f ms %+v, total %.0f ms, postcopy %.0f ms, bytes %d", rep.DowntimeMS, rep.Downtime, rep.TotalMS, rep.Postcopy.PostcopyMS, rep.BytesWire)
	}
	if len(rep.Warnings) > 0 {
		b.Logf("warnings: %v", rep.Warnings)
	}
	return rep
}

// TestEnginePostcopyOverUserfaultfd: a pure post-copy across the testbed's namespaces into the
// VMM's demand paging on a real userfaultfd, with simulated vCPUs faulting while nothing is
// pushed (demand only for their first 300 ms), then the push. Every page must arrive intact,
// and the vCPUs' faults must have been served by demand.
func TestEnginePostcopyOverUserfaultfd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("network namespaces need root")
	}
	tb, err := testbed.New(testbed.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer tb.Close()
	const size = 32 << 20
	src := mt.NewGuest(mt.SimpleDescription(size))
	src.Fill(3, 0.5, 0.1)
	dst, err := newUffdDest()
	if err != nil {
		t.Fatal(err)
	}
	defer dst.close()
	ctx, stop := context.WithCancel(context.Background())
	var waits []func() error
	for v := range 2 {
		pat := mt.LocalityPattern(uint64(v+1), 0, size/4096, 4096, 16)
		waits = append(waits, dst.runVCPU(ctx, pat, 20*time.Microsecond, 300*time.Millisecond))
	}
	rep := migratePostcopy(t, tb, src, dst, migration.PrepageNone)
	stop()
	for _, w := range waits {
		if err := w(); err != nil {
			t.Error(err)
		}
	}
	if err := dst.compare(src); err != nil {
		t.Fatal(err)
	}
	pc := rep.Postcopy
	if pc == nil || pc.DemandFaults == 0 || pc.PagesDemanded == 0 || pc.PagesPushed == 0 {
		t.Fatalf("post-copy report %+v: want demand faults, demanded and pushed pages", pc)
	}
	t.Logf("downtime %.2f ms, %d demand faults (p50 %.0f us), %d pages demanded, %d pushed", rep.DowntimeMS, pc.DemandFaults, pc.FaultLatencyP50US, pc.PagesDemanded, pc.PagesPushed)
}
