package main

import (
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/vmm"
	"github.com/godwit-vm/godwit/migration"
)

// BenchmarkGang migrates four 1 GiB VMs whose memory is all in use, an image's pages they
// share (the same seed) beside 10% of pages of their own and 5% near-duplicates, between the
// namespace hosts over the unshaped link: one by one (each a migration of its own, the next
// when the last is done), one by one with --dedup, four at once, and as one gang with --dedup.
// It reports the bytes on the wire, the time from the first migration's start to the last
// one's end, and the largest downtime; every VM verifies at the destination. The image's pool
// is 256 pages (pool-256: they repeat within each VM, so a migration's own dedup finds most)
// or as many as the VM's pages (pool-262144: each VM holds most of them once, and what they
// share is across VMs).
//
//	go test -run XXX -bench BenchmarkGang -benchtime 1x -count 3 ./cmd/godwit
func BenchmarkGang(b *testing.B) {
	requireKVM(b)
	const vms = 4
	for _, pool := range []string{"256", "262144"} {
		b.Run("pool-"+pool, func(b *testing.B) { benchGang(b, vms, pool) })
	}
}

func benchGang(b *testing.B, vms int, pool string) {
	vmArgs := []string{"--mem", "1G", "--content", "image", "--image-pool", pool, "--seed", "7", "--private", "0.1", "--near", "0.05", "--touch", "1"}
	for _, c := range []struct {
		name      string
		gang, all bool
		args      []string
	}{
		{name: "one-by-one"},
		{name: "one-by-one-dedup", args: []string{"--dedup"}},
		{name: "concurrent", all: true},
		{name: "gang-dedup", gang: true, args: []string{"--dedup"}},
	} {
		b.Run(c.name, func(b *testing.B) {
			tb := newTestbed(b, 0)
			var bytes, total, down float64
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				var srcs []*vmProc
				for k := range vms {
					srcs = append(srcs, startVM(b, tb.Host(0), fmt.Sprintf("v%d-%d", i, k), vmArgs...))
				}
				for _, s := range srcs {
					s.waitHeartbeats(b, 20)
				}
				port := 7900 + 10*i
				to := func(k int) string { return fmt.Sprintf("tcp:%s:%d", tb.Host(1).Addr(), port+k) }
				var dsts []*vmProc
				var recv *gangReceiver
				if c.gang {
					recv = startGangReceiver(b, tb.Host(1), to(0))
				} else {
					for k := range vms {
						dsts = append(dsts, startVM(b, tb.Host(1), fmt.Sprintf("d%d-%d", i, k), "--incoming", to(k)))
					}
				}
				b.StartTimer()
				start := time.Now()
				var reps []migration.Report
				switch {
				case c.gang:
					rep, err := migrateGang(b, tb.Host(0), nil, srcs, to(0), c.args...)
					if err != nil || rep.Result != migration.ResultOK {
						b.Fatalf("gang: %v %+v", err, rep)
					}
					reps = append(reps, rep.Report)
				case c.all:
					reps = make([]migration.Report, vms)
					var wg sync.WaitGroup
					for k := range vms {
						wg.Add(1)
						go func() {
							defer wg.Done()
							reps[k], _ = migrate(b, srcs[k], to(k), c.args...)
						}()
					}
					wg.Wait()
				default:
					for k := range vms {
						rep, _ := migrate(b, srcs[k], to(k), c.args...)
						reps = append(reps, rep)
					}
				}
				total += float64(time.Since(start).Milliseconds())
				b.StopTimer()
				worst := 0.0
				for _, r := range reps {
					if r.Result != migration.ResultOK {
						b.Fatalf("%s: %+v", c.name, r)
					}
					bytes += float64(r.BytesWire)
					worst = max(worst, r.DowntimeMS)
				}
				down += worst
				if c.gang {
					arr, err := recv.arrival(b)
					if err != nil {
						b.Fatal(err)
					}
					for _, v := range arr.VMs {
						dsts = append(dsts, &vmProc{sock: v.Control})
					}
				}
				for _, d := range dsts {
					d.verifyClean(b)
					godwit("quit", "--control", d.sock).Run()
				}
				b.StartTimer()
			}
			n := float64(b.N)
			b.ReportMetric(bytes/n/1e6, "wire-MB")
			b.ReportMetric(total/n, "total-ms")
			b.ReportMetric(down/n, "max-downtime-ms")
		})
	}
}

// BenchmarkTemplate saves a 1 GiB VM whose memory is all in use as a template, clones four VMs
// from it that each rewrite 10% of their pages (and, in template-aware-2pct, 2%), and migrates each between the namespace hosts
// over the unshaped link: template-aware (the destination holds the template: only the pages
// the clone changed travel) and generic (--flatten: the whole memory, as godwit without
// templates). It reports pages and bytes sent and the total time per clone; every clone
// verifies at the destination.
//
//	go test -run XXX -bench BenchmarkTemplate -benchtime 1x -count 3 ./cmd/godwit
func BenchmarkTemplate(b *testing.B) {
	requireKVM(b)
	tb := newTestbed(b, 0)
	dir := b.TempDir()
	storeA, storeB := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	id := saveTemplateOf(b, startVM(b, tb.Host(0), "base", "--mem", "1G", "--content", "image", "--seed", "7", "--private", "0.1", "--touch", "1"), storeA)
	var p pushed
	runJSON(b, &p, "template", "push", "--json", "--templates", storeA, "--to", storeB, id[:12])
	b.Logf("template %s: pushed once, %d bytes in %.0f ms", id[:12], p.Bytes, p.DurationMS)
	for _, c := range []struct {
		name    string
		diverge string
		args    []string
	}{{"template-aware", "0.1", nil}, {"generic", "0.1", []string{"--flatten"}}, {"template-aware-2pct", "0.02", nil}} {
		b.Run(c.name, func(b *testing.B) {
			var pages, bytes, total, down float64
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				name := fmt.Sprintf("%s-%d", c.name, i)
				src := startVM(b, tb.Host(0), name, "--template", id[:12], "--templates", storeA, "--diverge", c.diverge)
				waitDiverged(b, func() vmm.Stats { return src.stats(b) })
				to := fmt.Sprintf("tcp:%s:%d", tb.Host(1).Addr(), 8000+i)
				dst := startVM(b, tb.Host(1), "d-"+name, "--incoming", to, "--templates", storeB)
				b.StartTimer()
				rep, err := migrate(b, src, to, c.args...)
				b.StopTimer()
				if err != nil || rep.Result != migration.ResultOK {
					b.Fatalf("%s: %v %+v", c.name, err, rep)
				}
				dst.verifyClean(b)
				godwit("quit", "--control", dst.sock).Run()
				pages += float64(rep.Pages.Raw + rep.Pages.Zero + rep.Pages.Compressed + rep.Pages.Dedup + rep.Pages.Delta)
				bytes += float64(rep.BytesWire)
				total += rep.TotalMS
				down += rep.DowntimeMS
				b.StartTimer()
			}
			n := float64(b.N)
			b.ReportMetric(pages/n, "pages-sent")
			b.ReportMetric(bytes/n/1e6, "wire-MB")
			b.ReportMetric(total/n, "total-ms")
			b.ReportMetric(down/n, "downtime-ms")
		})
	}
}
