package main

import (
	"fmt"
	"io"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/testbed"
)

// rawTCP measures a bulk TCP transfer of n bytes from host 0 to host 1 of tb: the link's real
// capacity in this run, the baseline migration throughput is compared with.
func rawTCP(b testing.TB, tb *testbed.Testbed, n int64) float64 {
	b.Helper()
	bps, err := tb.MeasureTCP(n)
	if err != nil {
		b.Fatal(err)
	}
	return bps
}

// BenchmarkPrecopyIdle1G migrates an idle 1 GiB VM (a quarter of its memory written once)
// between two namespaces, over a 1 Gbit/s shaped link and over an unshaped one, and reports
// godwit's throughput (bytes on the wire over the total time) as a share of a raw TCP transfer
// measured on the same link in the same run, plus downtime and blackout.
func BenchmarkPrecopyIdle1G(b *testing.B) {
	requireKVM(b)
	for _, link := range []struct {
		name string
		bps  int64
	}{{"1gbit", gbit}, {"unshaped", 0}} {
		b.Run(link.name, func(b *testing.B) {
			tb := newTestbed(b, link.bps)
			raw := rawTCP(b, tb, 256<<20)
			var rate, down, black, total float64
			for i := 0; i < b.N; i++ {
				addr := fmt.Sprintf("tcp:%s:%d", tb.Host(1).Addr(), 7500+i)
				src := startVM(b, tb.Host(0), "src", "--mem", "1G", "--workload", "idle", "--touch", "0.25", "--content", "text")
				dst := startVM(b, tb.Host(1), "dst", "--incoming", addr)
				src.waitHeartbeats(b, 20)
				rep, err := migrate(b, src, addr)
				if err != nil || rep.Result != "ok" {
					b.Fatalf("migrate: %v %+v", err, rep)
				}
				dst.verifyClean(b)
				rate += float64(rep.BytesWire) / (rep.TotalMS / 1000)
				down += rep.DowntimeMS
				total += rep.TotalMS
				if rep.BlackoutMS != nil {
					black += *rep.BlackoutMS
				}
				godwit("quit", "--control", dst.sock).Run()
			}
			n := float64(b.N)
			b.ReportMetric(rate/n/1e6, "godwit-MB/s")
			b.ReportMetric(raw/1e6, "rawtcp-MB/s")
			b.ReportMetric(rate/n/raw, "link-use")
			b.ReportMetric(down/n, "downtime-ms")
			b.ReportMetric(black/n, "blackout-ms")
			b.ReportMetric(total/n, "total-ms")
		})
	}
}

// pageRTT measures, n times, what serving one demand fault costs on the wire between the
// testbed's hosts: host 1 (the destination) sends a 16-byte request, host 0 (the source)
// answers with a 4 KiB page. It returns the p50 and p99 in microseconds: the baseline for the
// fault service latency, measured on the same link in the same run.
func pageRTT(b testing.TB, tb *testbed.Testbed, n int) (p50, p99 float64) {
	b.Helper()
	var ln net.Listener
	if err := tb.Host(0).Do(func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(tb.Host(0).Addr().String(), "0"))
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		req, page := make([]byte, 16), make([]byte, 4096)
		for {
			if _, err := io.ReadFull(c, req); err != nil {
				return
			}
			if _, err := c.Write(page); err != nil {
				return
			}
		}
	}()
	var c net.Conn
	if err := tb.Host(1).Do(func() (err error) {
		c, err = net.Dial("tcp", ln.Addr().String())
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	req, page := make([]byte, 16), make([]byte, 4096)
	lat := make([]float64, 0, n)
	for i := 0; i < n+n/10; i++ {
		start := time.Now()
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, page); err != nil {
			b.Fatal(err)
		}
		if i >= n/10 { // the first tenth warms the connection up
			lat = append(lat, float64(time.Since(start).Nanoseconds())/1e3)
		}
	}
	slices.Sort(lat)
	return lat[len(lat)/2], lat[len(lat)*99/100]
}

// BenchmarkPostcopy measures post-copy against baselines from the same run:
//
//   - unshaped: a VM that keeps writing (2000 pages/s over 64 MiB) moves there by pre-copy
//     (auto-converge) and back by post-copy;
//     the post-copy downtime is reported against the pre-copy one, and the fault service
//     latency (p50, p99) against the round trip of a 4 KiB page request on the same link;
//   - 1gbit: the heavy writer (256 MiB random working set, rate max) moves by post-copy over a
//     1 Gbit/s shaped link; the total time is reported against the time its bytes on the wire
//     take over raw TCP on the same link.
func BenchmarkPostcopy(b *testing.B) {
	requireKVM(b)
	b.Run("unshaped", func(b *testing.B) {
		tb := newTestbed(b, 0)
		rtt50, rtt99 := pageRTT(b, tb, 2000)
		var pre, post, f50, f99, faults float64
		for i := 0; i < b.N; i++ {
			there := fmt.Sprintf("tcp:%s:%d", tb.Host(1).Addr(), 7600+2*i)
			back := fmt.Sprintf("tcp:%s:%d", tb.Host(0).Addr(), 7601+2*i)
			src := startVM(b, tb.Host(0), "src", "--mem", "256M", "--workload", "dirty", "--wss", "64M", "--rate", "2k", "--pattern", "random", "--content", "text")
			mid := startVM(b, tb.Host(1), "mid", "--incoming", there)
			src.waitHeartbeats(b, 20)
			rep, err := migrate(b, src, there, "--auto-converge")
			if err != nil || rep.Result != "ok" {
				b.Fatalf("pre-copy: %v %+v", err, rep)
			}
			pre += rep.DowntimeMS
			mid.waitHeartbeats(b, 20)
			dst := startVM(b, tb.Host(0), "dst", "--incoming", back)
			rep, err = migrate(b, mid, back, "--mode", "postcopy")
			if err != nil || rep.Result != "ok" || rep.Postcopy == nil {
				b.Fatalf("post-copy: %v %+v", err, rep)
			}
			dst.verifyClean(b)
			post += rep.DowntimeMS
			f50 += rep.Postcopy.FaultLatencyP50US
			f99 += rep.Postcopy.FaultLatencyP99US
			faults += float64(rep.Postcopy.DemandFaults)
			godwit("quit", "--control", dst.sock).Run()
		}
		n := float64(b.N)
		b.ReportMetric(post/n, "postcopy-downtime-ms")
		b.ReportMetric(pre/n, "precopy-downtime-ms")
		b.ReportMetric(post/pre, "downtime-vs-precopy")
		b.ReportMetric(f50/n, "fault-p50-us")
		b.ReportMetric(f99/n, "fault-p99-us")
		b.ReportMetric(rtt50, "page-rtt-p50-us")
		b.ReportMetric(rtt99, "page-rtt-p99-us")
		b.ReportMetric(f50/n/rtt50, "fault-p50-vs-rtt")
		b.ReportMetric(f99/n/rtt99, "fault-p99-vs-rtt")
		b.ReportMetric(faults/n, "demand-faults")
	})
	b.Run("1gbit", func(b *testing.B) {
		tb := newTestbed(b, gbit)
		raw := rawTCP(b, tb, 256<<20)
		var total, ideal, nominal float64
		for i := 0; i < b.N; i++ {
			addr := fmt.Sprintf("tcp:%s:%d", tb.Host(1).Addr(), 7700+i)
			src := startVM(b, tb.Host(0), "src", "--mem", "512M", "--vcpus", "2", "--workload", "dirty", "--wss", "256M", "--rate", "max", "--pattern", "random", "--content", "random")
			dst := startVM(b, tb.Host(1), "dst", "--incoming", addr)
			src.waitHeartbeats(b, 20)
			rep, err := migrate(b, src, addr, "--mode", "postcopy")
			if err != nil || rep.Result != "ok" {
				b.Fatalf("post-copy: %v %+v", err, rep)
			}
			dst.verifyClean(b)
			total += rep.TotalMS
			ideal += float64(rep.BytesWire) / raw * 1000
			nominal += float64(rep.BytesWire) * 8 / gbit * 1000
			godwit("quit", "--control", dst.sock).Run()
		}
		n := float64(b.N)
		b.ReportMetric(total/n, "total-ms")
		b.ReportMetric(ideal/n, "bytes-over-rawtcp-ms")
		b.ReportMetric(nominal/n, "bytes-over-1gbit-ms")
		b.ReportMetric(raw/1e6, "rawtcp-MB/s")
		b.ReportMetric(total/ideal, "total-vs-rawtcp")
	})
}
