package main

import (
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/testbed"
)

// rawTCP measures a bulk TCP transfer of n bytes from host 0 to host 1 of tb: the link's real
// capacity in this run, the baseline migration throughput is compared with.
func rawTCP(b testing.TB, tb *testbed.Testbed, n int64) float64 {
	b.Helper()
	var ln net.Listener
	if err := tb.Host(1).Do(func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(tb.Host(1).Addr().String(), "0"))
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	got := make(chan time.Duration, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- 0
			return
		}
		defer c.Close()
		buf := make([]byte, 1<<20)
		io.ReadFull(c, buf[:1])
		start := time.Now()
		io.CopyBuffer(io.Discard, io.LimitReader(c, n-1), buf)
		got <- time.Since(start)
	}()
	var c net.Conn
	if err := tb.Host(0).Do(func() (err error) {
		c, err = net.Dial("tcp", ln.Addr().String())
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 1<<20)
	for sent := int64(0); sent < n; {
		k := min(int64(len(buf)), n-sent)
		if _, err := c.Write(buf[:k]); err != nil {
			b.Fatal(err)
		}
		sent += k
	}
	d := <-got
	if d <= 0 {
		b.Fatal("raw TCP transfer failed")
	}
	return float64(n-1) / d.Seconds()
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
