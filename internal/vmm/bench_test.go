package vmm

import (
	"context"
	"fmt"
	"io"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/migration"
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

// BenchmarkPrecopyLoopback migrates a 1 GiB idle VM with half of its memory written (random
// content, so nothing is zero and nothing compresses) over loopback TCP on 1, 2 and 4
// connections, to a fresh destination each time, and reports the first round's rate against
// a bulk transfer over as many loopback TCP connections measured in the same run: the share
// of the link the page paths reach. Every destination verifies its memory.
func BenchmarkPrecopyLoopback(b *testing.B) {
	src := halfTouched(b, "random")
	defer src.Close()
	paused := false
	for _, streams := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("streams=%d", streams), func(b *testing.B) {
			var pageBps, rawBps float64
			for i := 0; i < b.N; i++ {
				rawBps += rawTCPLoopback(b, 1<<30, streams)
				if paused { // the previous migration left it paused
					if err := src.Resume(); err != nil {
						b.Fatal(err)
					}
				}
				dst, srep, _ := migrateLocal(b, src, migration.SendOptions{DowntimeLimit: 300 * time.Millisecond, Streams: streams})
				paused = true
				r1 := srep.RoundDetails[0]
				pageBps += float64(r1.Bytes) / (r1.DurationMS / 1000)
				b.StopTimer()
				verifyClean(b, dst)
				dst.Close()
				b.StartTimer()
			}
			n := float64(b.N)
			b.ReportMetric(pageBps*8/n/1e9, "round1-Gbit/s")
			b.ReportMetric(rawBps*8/n/1e9, "rawtcp-Gbit/s")
			b.ReportMetric(pageBps/rawBps, "link-share")
		})
	}
}

// halfTouched starts an idle 1 GiB VM whose guest writes half of its memory with content
// once, and waits until it has.
func halfTouched(b *testing.B, content string) *Machine {
	const memMiB = 1024
	src := newMachine(b, memMiB, 1, workload{kind: "idle", content: content, touch: 0.5})
	if err := src.Start(); err != nil {
		b.Fatal(err)
	}
	for src.Stats().PagesWritten < memMiB<<20/guest.PageSize*49/100 {
		time.Sleep(20 * time.Millisecond)
	}
	return src
}

// rawTCPLoopback sends size bytes over conns loopback TCP connections at once and returns
// bytes/s.
func rawTCPLoopback(b *testing.B, size, conns int) float64 {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	got := make(chan error, conns)
	go func() {
		for range conns {
			c, err := ln.Accept()
			if err != nil {
				got <- err
				return
			}
			go func() {
				defer c.Close()
				_, err := io.Copy(io.Discard, c)
				got <- err
			}()
		}
	}()
	start := time.Now()
	sent := make(chan error, conns)
	for range conns {
		go func() {
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				sent <- err
				return
			}
			defer c.Close()
			buf := make([]byte, 1<<20)
			for n := 0; n < size/conns; n += len(buf) {
				if _, err := c.Write(buf); err != nil {
					sent <- err
					return
				}
			}
			sent <- nil
		}()
	}
	for range conns {
		if err := <-sent; err != nil {
			b.Fatal(err)
		}
	}
	for range conns {
		if err := <-got; err != nil {
			b.Fatal(err)
		}
	}
	return float64(size) / time.Since(start).Seconds()
}

// BenchmarkPostcopyLoopback post-copies a 1 GiB VM whose guest rewrites a 512 MiB working set
// at random (random content) over loopback TCP: without the fault channel, with it, and with
// it and 2 and 4 page streams for the push; and with the fault channel and one stream once more
// with every page copied out of guest memory (views=false: the paused source's pages are
// otherwise written from guest memory itself); and under a 100 MiB/s bandwidth cap (cap=100M),
// where demanded pages must not wait for the push's pacing. It reports the demand faults' service latency (as
// the destination's VMM saw them), the total time, the push's rate and its share of a bulk
// transfer over as many loopback TCP connections measured in the same run. Every destination
// verifies its memory.
func BenchmarkPostcopyLoopback(b *testing.B) {
	const memMiB, wssMiB = 1024, 512
	for _, c := range []struct {
		channel bool
		streams int
		views   bool
		capMiB  int64
	}{{false, 1, true, 0}, {true, 1, false, 0}, {true, 1, true, 0}, {true, 2, true, 0}, {true, 4, true, 0}, {true, 1, true, 100}} {
		name := fmt.Sprintf("fault-channel=%v/streams=%d/views=%v", c.channel, c.streams, c.views)
		if c.capMiB > 0 {
			name += fmt.Sprintf("/cap=%dM", c.capMiB)
		}
		b.Run(name, func(b *testing.B) {
			var p50, p99, total, faults, pushBps, rawBps float64
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				rawBps += rawTCPLoopback(b, 1<<30, c.streams)
				src := newMachine(b, memMiB, 1, workload{kind: "dirty", content: "random", pattern: "random", wssMiB: wssMiB})
				if err := src.Start(); err != nil {
					b.Fatal(err)
				}
				for src.Stats().PagesWritten < 2*wssMiB<<20/guest.PageSize {
					time.Sleep(20 * time.Millisecond)
				}
				b.StartTimer()
				var from migration.Source = MigrationSource{M: src}
				if !c.views {
					from = copyingSource{MigrationSource{M: src}}
				}
				dst, srep, _ := migrateFrom(b, from, migration.SendOptions{Mode: migration.ModePostcopy, FaultChannel: c.channel, Streams: c.streams, MaxBandwidth: c.capMiB << 20})
				b.StopTimer()
				p := srep.Postcopy
				if c.channel != (p.FaultChannelBytes > 0) {
					b.Fatalf("fault channel %v, %d bytes on it", c.channel, p.FaultChannelBytes)
				}
				if c.streams > 1 && len(srep.Streams) != c.streams {
					b.Fatalf("%d streams reported, want %d", len(srep.Streams), c.streams)
				}
				p50 += p.FaultLatencyP50US
				p99 += p.FaultLatencyP99US
				faults += float64(p.DemandFaults)
				total += srep.TotalMS
				pushBps += float64(srep.BytesWire) / (srep.TotalMS / 1000)
				verifyClean(b, dst)
				dst.Close()
				src.Close()
				b.StartTimer()
			}
			n := float64(b.N)
			b.ReportMetric(p50/n, "fault-p50-us")
			b.ReportMetric(p99/n, "fault-p99-us")
			b.ReportMetric(faults/n, "faults")
			b.ReportMetric(total/n, "total-ms")
			b.ReportMetric(pushBps*8/n/1e9, "Gbit/s")
			b.ReportMetric(rawBps*8/n/1e9, "rawtcp-Gbit/s")
			b.ReportMetric(pushBps/rawBps, "link-share")
		})
	}
}

// BenchmarkStopAndCopy migrates a 512 MiB VM whose guest rewrites a 128 MiB working set at
// full speed (random content) by pre-copy over loopback TCP, with a downtime limit that lets
// the final round carry tens of MiB, and reports the final round's rate and the downtime with
// the paused source's pages written from guest memory itself (views) and copied out first
// (copy): each iteration migrates one fresh VM each way, in alternating order, so that both
// see the same machine; medians. Every destination verifies its memory.
//
//	go test -run - -bench BenchmarkStopAndCopy -benchtime 9x ./internal/vmm
func BenchmarkStopAndCopy(b *testing.B) {
	const memMiB, wssMiB = 512, 128
	var rate, downtime [2][]float64 // [copy, views]
	for i := 0; i < b.N; i++ {
		for k := range 2 {
			views := (i+k)%2 == 1
			b.StopTimer()
			src := newMachine(b, memMiB, 1, workload{kind: "dirty", content: "random", pattern: "random", wssMiB: wssMiB})
			if err := src.Start(); err != nil {
				b.Fatal(err)
			}
			for src.Stats().PagesWritten < 2*wssMiB<<20/guest.PageSize {
				time.Sleep(20 * time.Millisecond)
			}
			var from migration.Source = copyingSource{MigrationSource{M: src}}
			if views {
				from = MigrationSource{M: src}
			}
			b.StartTimer()
			dst, rep, _ := migrateFrom(b, from, migration.SendOptions{DowntimeLimit: 100 * time.Millisecond, Streams: 1, Force: true})
			b.StopTimer()
			final := rep.RoundDetails[len(rep.RoundDetails)-1]
			if !final.Final || final.DurationMS <= 0 {
				b.Fatalf("last round %+v: want the final round", final)
			}
			v := 0
			if views {
				v = 1
			}
			rate[v] = append(rate[v], float64(final.Bytes)/(final.DurationMS/1000))
			downtime[v] = append(downtime[v], rep.DowntimeMS)
			verifyClean(b, dst)
			dst.Close()
			src.Close()
			b.StartTimer()
		}
	}
	b.ReportMetric(median(rate[0])*8/1e9, "copy-final-Gbit/s")
	b.ReportMetric(median(rate[1])*8/1e9, "views-final-Gbit/s")
	b.ReportMetric(median(downtime[0]), "copy-downtime-ms")
	b.ReportMetric(median(downtime[1]), "views-downtime-ms")
	b.ReportMetric(median(rate[1])/median(rate[0]), "views/copy")
}

// BenchmarkStopWindow measures the VMM's work in a migration's stop window, for an idle VM
// (a thousandth of memory touched, a few pages dirtied per round) at several sizes and with
// each kind of dirty tracking: FetchDirty while paused (the final harvest), StopDirtyLog,
// and Populated (what a pure post-copy switch asks for). What grows with the size is work
// that follows memory, not what changed.
//
//	go test -run - -bench BenchmarkStopWindow -benchtime 5x ./internal/vmm
func BenchmarkStopWindow(b *testing.B) {
	requireKVM(b)
	for _, tracking := range []string{DirtyRing, DirtyBitmap} {
		for _, gib := range []uint64{1, 4, 16, 64} {
			b.Run(fmt.Sprintf("%s/%dGiB", tracking, gib), func(b *testing.B) {
				m := newMachine(b, gib<<10, 1, workload{kind: "idle", content: "text", touch: 0.001, tracking: tracking})
				if err := m.Start(); err != nil {
					b.Fatal(err)
				}
				waitHeartbeats(b, m, 20)
				src := MigrationSource{M: m}
				var fetch, stop, populated time.Duration
				for i := 0; i < b.N; i++ {
					if err := src.StartDirtyLog(); err != nil {
						b.Fatal(err)
					}
					time.Sleep(20 * time.Millisecond) // the guest heartbeats meanwhile
					if _, err := src.FetchDirty(); err != nil {
						b.Fatal(err)
					}
					time.Sleep(5 * time.Millisecond)
					if err := m.Pause(); err != nil {
						b.Fatal(err)
					}
					t0 := time.Now()
					if _, err := src.FetchDirty(); err != nil {
						b.Fatal(err)
					}
					t1 := time.Now()
					if err := src.StopDirtyLog(); err != nil {
						b.Fatal(err)
					}
					t2 := time.Now()
					if _, err := src.Populated(); err != nil {
						b.Fatal(err)
					}
					t3 := time.Now()
					fetch, stop, populated = fetch+t1.Sub(t0), stop+t2.Sub(t1), populated+t3.Sub(t2)
					if err := m.Resume(); err != nil {
						b.Fatal(err)
					}
				}
				per := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(b.N) }
				b.ReportMetric(per(fetch), "ms/final-fetch")
				b.ReportMetric(per(stop), "ms/stop-log")
				b.ReportMetric(per(populated), "ms/populated")
				b.ReportMetric(0, "ns/op")
			})
		}
	}
}

// BenchmarkIdleDowntime migrates idle VMs (a thousandth of memory touched, and a 4 GiB one
// half touched) of 1 to 16 GiB
// over loopback, by pre-copy and by post-copy, with each kind of dirty tracking, and reports
// the downtime and its final part (pre-copy: the last dirty set; post-copy: the switch set).
// An idle VM has almost nothing to send in the stop window: what grows with the size there is
// work that follows memory. Each destination verifies its memory, which reads (and so
// allocates) all of it: the source is released first, and 16 GiB is the most this benchmark
// asks of a 24 GiB host (BenchmarkStopWindow measures the stop window's parts up to 64 GiB).
//
//	go test -run - -bench BenchmarkIdleDowntime -benchtime 3x ./internal/vmm
func BenchmarkIdleDowntime(b *testing.B) {
	requireKVM(b)
	for _, mode := range []string{migration.ModePrecopy, migration.ModePostcopy} {
		for _, tracking := range []string{DirtyRing, DirtyBitmap} {
			for _, c := range []struct {
				gib   uint64
				touch float64
				name  string
			}{{1, 0.001, "1GiB"}, {4, 0.001, "4GiB"}, {16, 0.001, "16GiB"}, {4, 0.5, "4GiB-half-touched"}} {
				gib := c.gib
				b.Run(fmt.Sprintf("%s/%s/%s", mode, tracking, c.name), func(b *testing.B) {
					var downtime, final []float64
					for i := 0; i < b.N; i++ {
						src := newMachine(b, gib<<10, 1, workload{kind: "idle", content: "random", touch: c.touch, tracking: tracking})
						if err := src.Start(); err != nil {
							b.Fatal(err)
						}
						waitHeartbeats(b, src, 50)
						dst, rep, _ := migrateLocal(b, src, migration.SendOptions{Mode: mode, Streams: 1})
						src.Close()
						verifyClean(b, dst)
						downtime = append(downtime, rep.DowntimeMS)
						final = append(final, rep.Downtime.FinalRoundMS)
						b.Logf("downtime %.2f ms: %+v", rep.DowntimeMS, rep.Downtime)
						dst.Close()
						if gib >= 16 {
							// The host frees the verified 16 GiB meanwhile: let it finish before
							// the next migration, which would otherwise share the host with it.
							time.Sleep(10 * time.Second)
						}
					}
					b.ReportMetric(median(downtime), "ms/downtime")
					b.ReportMetric(median(final), "ms/final")
					b.ReportMetric(0, "ns/op")
				})
			}
		}
	}
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

// BenchmarkHeavyWriterDowntime migrates VMs of 1, 4 and 16 GiB whose guest rewrites a 64 MiB
// working set at random (capped at 40000 pages/s, so that pre-copy converges under a 20 ms
// limit) and compares each downtime with what it should cost if nothing in the stop window
// followed memory's size: the pages of the final round at the paused source's page time,
// plus the state (saved, sent, restored, vCPUs started), plus a loopback round trip measured
// in the same run. The page time is measured on the same VM just before: it first migrates
// with one live round and then a forced stop-and-copy of everything the guest wrote
// meanwhile, several times the pages of a converged final round (that final round's time per
// page), and the VM that arrives is the one then measured. The ratio (downtime / model) is
// the figure; 1 is the model exact. The last destination verifies its memory, and with it
// every page that went through the first.
//
//	go test -run - -bench BenchmarkHeavyWriterDowntime -benchtime 3x ./internal/vmm
func BenchmarkHeavyWriterDowntime(b *testing.B) {
	requireKVM(b)
	for _, gib := range []uint64{1, 4, 16} {
		b.Run(fmt.Sprintf("%dGiB", gib), func(b *testing.B) {
			var ratio, downtime, finalPages, pageUS []float64
			for i := 0; i < b.N; i++ {
				src := newMachine(b, gib<<10, 1, workload{kind: "dirty", content: "random", pattern: "random", wssMiB: 64, rate: 40000})
				if err := src.Start(); err != nil {
					b.Fatal(err)
				}
				for src.Stats().PagesWritten < 64<<20/guest.PageSize {
					time.Sleep(20 * time.Millisecond)
				}
				rtt := loopbackRTT(b)
				mid, pageMS, calPages := stopAndCopyPageTime(b, src)
				src.Close()
				// Let the host take back the source's memory first: here that competes with
				// the measured migration for the CPU.
				time.Sleep(3 * time.Second)
				dst, rep, _ := migrateLocal(b, mid, migration.SendOptions{Mode: migration.ModePrecopy, DowntimeLimit: 20 * time.Millisecond, Streams: 1})
				mid.Close()
				verifyClean(b, dst)
				dst.Close()
				var final *migration.RoundReport
				for k := range rep.RoundDetails {
					if r := &rep.RoundDetails[k]; r.Final {
						final = r
					}
				}
				if final == nil {
					b.Fatalf("rounds %+v: want a final one", rep.RoundDetails)
				}
				d := rep.Downtime
				// The model has the final round and the stream's tail after it in the page time.
				want := float64(final.Pages)*pageMS + d.StateMS + d.ArmMS + d.RestoreMS + d.StartMS + float64(rtt.Microseconds())/1000
				ratio = append(ratio, rep.DowntimeMS/want)
				downtime = append(downtime, rep.DowntimeMS)
				finalPages = append(finalPages, float64(final.Pages))
				pageUS = append(pageUS, pageMS*1000)
				b.Logf("downtime %.2f ms, model %.2f ms (final round %d pages at %.2f µs, from a stop-and-copy of %d; round trip %v): %+v",
					rep.DowntimeMS, want, final.Pages, pageMS*1000, calPages, rtt, d)
			}
			b.ReportMetric(median(downtime), "ms/downtime")
			b.ReportMetric(median(finalPages), "final-pages")
			b.ReportMetric(median(pageUS), "µs/page")
			b.ReportMetric(median(ratio), "downtime/model")
			b.ReportMetric(0, "ns/op")
		})
	}
}

// stopAndCopyPageTime measures a page's time from the paused source into the destination's
// memory: src is migrated with one live round, then stopped and copied whatever its guest
// wrote meanwhile. It returns the machine that arrived, running, the milliseconds per page of
// that final round and of the stream's tail after it (downtime parts final_round_ms and
// delivery_ms), and its pages.
func stopAndCopyPageTime(b *testing.B, src *Machine) (*Machine, float64, uint64) {
	b.Helper()
	dst, rep, _ := migrateLocal(b, src, migration.SendOptions{Mode: migration.ModePrecopy, MaxRounds: 1, Force: true, DowntimeLimit: time.Microsecond, Streams: 1})
	for k := range rep.RoundDetails {
		if r := rep.RoundDetails[k]; r.Final && r.Pages > 0 {
			return dst, (rep.Downtime.FinalRoundMS + rep.Downtime.DeliveryMS) / float64(r.Pages), r.Pages
		}
	}
	b.Fatalf("stop-and-copy rounds %+v: want a final one with pages", rep.RoundDetails)
	return nil, 0, 0
}

// loopbackRTT is the median of 20 round trips of one byte over a loopback TCP connection.
func loopbackRTT(b *testing.B) time.Duration {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 1)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	var rtts []float64
	buf := make([]byte, 1)
	for range 20 {
		t0 := time.Now()
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
		rtts = append(rtts, float64(time.Since(t0)))
	}
	return time.Duration(median(rtts))
}

// BenchmarkCompressLoopback migrates a 1 GiB idle VM with half of its memory written with text
// over loopback TCP on two connections, capped at 1 Gbit/s (where the link is the limit) and
// uncapped (where the CPU is), with raw pages, with zstd and with auto, to a fresh destination
// each time: total times, and the ratios of time and bytes to raw pages' measured in the same
// run. Every destination verifies its memory.
func BenchmarkCompressLoopback(b *testing.B) {
	src := halfTouched(b, "text")
	defer src.Close()
	paused := false
	encodings := []string{migration.CompressNone, migration.CompressZstd, migration.CompressAuto}
	for _, link := range []struct {
		name string
		cap  int64
	}{{"1gbit", 125_000_000}, {"uncapped", 0}} {
		b.Run(link.name, func(b *testing.B) {
			var total, bytes [3]float64
			for i := 0; i < b.N; i++ {
				for k, c := range encodings {
					if paused {
						if err := src.Resume(); err != nil {
							b.Fatal(err)
						}
					}
					dst, srep, _ := migrateLocal(b, src, migration.SendOptions{DowntimeLimit: 300 * time.Millisecond, Streams: 2, MaxBandwidth: link.cap, Compress: c})
					paused = true
					total[k] += srep.TotalMS
					bytes[k] += float64(srep.BytesWire)
					b.StopTimer()
					verifyClean(b, dst)
					dst.Close()
					b.StartTimer()
				}
			}
			n := float64(b.N)
			for k, c := range encodings {
				b.ReportMetric(total[k]/n, c+"-total-ms")
				if k > 0 {
					b.ReportMetric(total[k]/total[0], c+"/none-total")
					b.ReportMetric(bytes[k]/bytes[0], c+"/none-bytes")
				}
			}
		})
	}
}

// BenchmarkBalloon measures self-ballooning on a 1 GiB churn guest (30% of its pages
// allocated, 70% freed with stale content) allocating as fast as it can: the allocation rate
// over 2 s without a balloon, then with the balloon at auto:SHARE once it has filled, and how
// much of the free memory the host got back (resident memory before and after). Metrics:
// rate-ratio (with / without), rss-fall-of-free (the fall over the free memory).
func BenchmarkBalloon(b *testing.B) {
	for _, share := range []float64{0.9, 1} {
		b.Run(fmt.Sprintf("auto-%g", share), func(b *testing.B) {
			var ratios, falls []float64
			for range b.N {
				m := newMachine(b, 1024, 1, workload{kind: "churn", content: "random", touch: 0.3})
				if err := m.Start(); err != nil {
					b.Fatal(err)
				}
				pool := uint64(1024<<20) / guest.PageSize
				for m.Stats().PagesWritten < pool*9/10 { // the start: every page written once
					time.Sleep(20 * time.Millisecond)
				}
				rate := func() float64 {
					s0, t0 := m.Stats().PagesWritten, time.Now()
					time.Sleep(2 * time.Second)
					return float64(m.Stats().PagesWritten-s0) / time.Since(t0).Seconds()
				}
				without := rate()
				rss := m.Stats().ResidentBytes
				if err := m.SetBalloon(Balloon{Auto: true, Share: share}); err != nil {
					b.Fatal(err)
				}
				free := uint64(float64(1024<<20) * 0.7 * share * 0.95)
				for m.Stats().BalloonBytes < free {
					time.Sleep(20 * time.Millisecond)
				}
				with := rate()
				s := m.Stats()
				ratios = append(ratios, with/without)
				falls = append(falls, float64(int64(rss)-int64(s.ResidentBytes))/(float64(1024<<20)*0.7))
				b.Logf("share %g: %.0f allocations/s without the balloon, %.0f with %d MiB in it; resident %d -> %d MiB",
					share, without, with, s.BalloonBytes>>20, rss>>20, s.ResidentBytes>>20)
				verifyClean(b, m)
				m.Close()
			}
			b.ReportMetric(median(ratios), "rate-ratio")
			b.ReportMetric(median(falls), "rss-fall-of-free")
		})
	}
}

// BenchmarkBalloonSwing measures deflate on demand: a 1 GiB churn guest allocating as fast as
// it can, whose allocated share swings between 30% and 80% of its pages, without a balloon and
// then with a balloon of 60% of memory (target) that it must take pages back from when it
// grows, measured from 2 s after the first deflate on demand. Metrics: rate-ratio (page allocations and frees per
// second with / without, over 4 s each), demand-per-s (pages deflated on demand per second),
// rss-ratio (resident memory with / without, averaged over the 4 s).
func BenchmarkBalloonSwing(b *testing.B) {
	var ratios, demand, falls []float64
	for range b.N {
		m := newMachine(b, 1024, 1, workload{kind: "churn", content: "random", touch: 0.3, peak: 0.8})
		if err := m.Start(); err != nil {
			b.Fatal(err)
		}
		pool := uint64(1024<<20) / guest.PageSize
		for m.Stats().PagesWritten < pool*9/10 { // the start: every page written once
			time.Sleep(20 * time.Millisecond)
		}
		measure := func() (rate, onDemand, rss float64) {
			s0, t0 := m.Stats(), time.Now()
			var rssSum float64
			n := 0
			for time.Since(t0) < 4*time.Second {
				time.Sleep(100 * time.Millisecond)
				rssSum += float64(m.Stats().ResidentBytes)
				n++
			}
			s, d := m.Stats(), time.Since(t0).Seconds()
			return float64(s.PagesWritten-s0.PagesWritten) / d, float64(s.BalloonOnDemand-s0.BalloonOnDemand) / d, rssSum / float64(n)
		}
		without, _, rss0 := measure()
		if err := m.SetBalloon(Balloon{Bytes: 1024 << 20 * 6 / 10}); err != nil {
			b.Fatal(err)
		}
		for m.Stats().BalloonOnDemand == 0 {
			time.Sleep(20 * time.Millisecond)
		}
		time.Sleep(2 * time.Second) // past the first growth into the balloon: the steady swing
		with, perSec, rss1 := measure()
		ratios, demand, falls = append(ratios, with/without), append(demand, perSec), append(falls, rss1/rss0)
		b.Logf("%.0f pages/s without the balloon, %.0f with it (%.0f deflated on demand per second); resident %.0f -> %.0f MiB on average",
			without, with, perSec, rss0/(1<<20), rss1/(1<<20))
		verifyClean(b, m)
		m.Close()
	}
	b.ReportMetric(median(ratios), "rate-ratio")
	b.ReportMetric(median(demand), "demand-per-s")
	b.ReportMetric(median(falls), "rss-ratio")
}
