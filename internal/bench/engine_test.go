package bench

import (
	"context"
	"net"
	"os"
	"testing"

	"github.com/godwit-vm/godwit/internal/testbed"
	"github.com/godwit-vm/godwit/migration"
	mt "github.com/godwit-vm/godwit/migration/migrationtest"
)

const gbit = 1_000_000_000

// BenchmarkEngineIdle1G migrates an idle 1 GiB guest with a quarter of its memory written
// (random, incompressible content) between the two hosts of a testbed, over a 1 Gbit/s
// shaped link and over an unshaped one, with the in-memory guest of migrationtest in place of
// a VM. It isolates the engine and the link from the VMM and from KVM, which on machines
// without hardware virtualization run emulated. It reports godwit's throughput (bytes on the
// wire over the total time) as a share of a raw TCP transfer on the same link in the same run
// (link-use), and the downtime. The destination's memory is compared with the source's after
// every migration.
func BenchmarkEngineIdle1G(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Fatal("network namespaces need root")
	}
	for _, link := range []struct {
		name string
		bps  int64
	}{{"1gbit", gbit}, {"unshaped", 0}} {
		b.Run(link.name, func(b *testing.B) {
			tb, err := testbed.New(testbed.Config{Bandwidth: link.bps})
			if err != nil {
				b.Fatal(err)
			}
			defer tb.Close()
			raw, err := tb.MeasureTCP(512 << 20)
			if err != nil {
				b.Fatal(err)
			}
			const size = 1 << 30
			src := mt.NewGuest(mt.SimpleDescription(size))
			src.Fill(1, 0.75, 0)
			dst := mt.NewDest()
			var rate, down, total float64
			for i := 0; i < b.N; i++ {
				if err := src.Resume(); err != nil { // the previous migration left it paused
					b.Fatal(err)
				}
				dst.Reset()
				rep := migrateOver(b, tb, src, dst, migration.SendOptions{})
				rate += float64(rep.BytesWire) / (rep.TotalMS / 1000)
				down += rep.DowntimeMS
				total += rep.TotalMS
				if err := mt.Compare(src, dst); err != nil {
					b.Fatal(err)
				}
			}
			n := float64(b.N)
			b.ReportMetric(rate/n/1e6, "godwit-MB/s")
			b.ReportMetric(raw/1e6, "rawtcp-MB/s")
			b.ReportMetric(rate/n/raw, "link-use")
			b.ReportMetric(down/n, "downtime-ms")
			b.ReportMetric(total/n, "total-ms")
		})
	}
}

// migrateOver runs one migration from host 0 to host 1 of tb over TCP and returns the source's
// report.
func migrateOver(b testing.TB, tb *testbed.Testbed, src migration.Source, dst migration.Destination, opts migration.SendOptions) *migration.Report {
	b.Helper()
	var ln net.Listener
	if err := tb.Host(1).Do(func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(tb.Host(1).Addr().String(), "0"))
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	ctx := context.Background()
	recvErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			recvErr <- err
			return
		}
		defer c.Close()
		_, err = migration.Receive(ctx, dst, c, migration.ReceiveOptions{})
		recvErr <- err
	}()
	var c net.Conn
	if err := tb.Host(0).Do(func() (err error) {
		c, err = net.Dial("tcp", ln.Addr().String())
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	rep, err := migration.Send(ctx, src, c, opts)
	if rerr := <-recvErr; err != nil || rerr != nil {
		b.Fatalf("migration failed: source %v, destination %v", err, rerr)
	}
	return rep
}
