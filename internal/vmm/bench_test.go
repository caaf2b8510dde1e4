package vmm

import (
	"context"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
)

// BenchmarkBootToFirstHeartbeat measures a 1 GiB VM from vmm.New to the guest's first
// heartbeat: KVM set-up, memory, boot pages, vCPU threads and the guest's own start. The idle
// guest touches no memory first, so the figure is the VMM's and the guest's start-up alone.
func BenchmarkBootToFirstHeartbeat(b *testing.B) {
	requireKVM(b)
	params, err := testParams(1<<30, 1, workload{kind: "idle", content: "text", touch: 0.0001})
	if err != nil {
		b.Fatal(err)
	}
	var total time.Duration
	for i := 0; i < b.N; i++ {
		start := time.Now()
		m, err := New(Config{Name: "boot", MemBytes: 1 << 30, VCPUs: 1, Image: guest.Image, Params: params})
		if err != nil {
			b.Fatal(err)
		}
		if err := m.Start(); err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		first, err := m.WaitFirstHeartbeat(ctx)
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		total += first.Sub(start)
		b.StopTimer()
		m.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms/first-heartbeat")
}

// BenchmarkWriteThroughputVsNative runs the dirty workload's page writer (random pages of
// random content, 64 MiB working set, one vCPU) in a KVM guest and, in the same run, the very
// same C function natively, and reports both and their ratio. Both are measured after every
// page of the working set has been touched once, so first-touch faults are not counted.
func BenchmarkWriteThroughputVsNative(b *testing.B) {
	requireKVM(b)
	const memBytes, wss = 256 << 20, 64 << 20
	w := workload{kind: "dirty", content: "random", pattern: "random", wssMiB: wss >> 20}
	ctx := context.Background()

	h, err := guest.BuildNativeHarness(ctx, b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	cfg := guest.DefaultConfig()
	cfg.Content, cfg.Pattern, cfg.WSSPages = guest.ContentRandom, guest.PatternRandom, wss/guest.PageSize
	p, err := guest.NewParams(cfg, memBytes, 1, 0)
	if err != nil {
		b.Fatal(err)
	}
	// Enough units for about a second of writing at native speed on these machines.
	units := uint64(4*wss/guest.PageSize) / cfg.BatchPages
	var nativeBps, guestBps float64
	for i := 0; i < b.N; i++ {
		res, err := h.Run(ctx, guest.NativeRun{Params: p, MemBytes: memBytes, Units: units, Prefault: true})
		if err != nil {
			b.Fatal(err)
		}
		nativeBps += res.WriteThroughput()

		m := newMachine(b, memBytes>>20, 1, w)
		if err := m.Start(); err != nil {
			b.Fatal(err)
		}
		// Warm up: every page of the working set written at least about once.
		for m.Stats().PagesWritten < 2*wss/guest.PageSize {
			if st, err := m.State(); st != StateRunning {
				b.Fatalf("guest %s: %v", st, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
		s0, t0 := m.Stats().PagesWritten, time.Now()
		time.Sleep(time.Second)
		s1, t1 := m.Stats().PagesWritten, time.Now()
		guestBps += float64((s1-s0)*guest.PageSize) / t1.Sub(t0).Seconds()
		verifyClean(b, m)
		m.Close()
	}
	n := float64(b.N)
	b.ReportMetric(guestBps/n/1e6, "guest-MB/s")
	b.ReportMetric(nativeBps/n/1e6, "native-MB/s")
	b.ReportMetric(guestBps/nativeBps, "guest/native")
}
