package migration_test

import (
	"net"
	"testing"

	"github.com/godwit-vm/godwit/migration"
	mt "github.com/godwit-vm/godwit/migration/migrationtest"
)

// benchMigrate measures whole pre-copy migrations of an idle 256 MiB guest with random
// (incompressible, non-zero) memory. Bytes per op are the guest's memory. One untimed
// migration first faults in the destination's memory, which later ones reuse: the kernel's
// first-touch cost is the VMM's business, not the engine's. The oracle runs after the last one.
// Besides time, it reports the mean downtime and source pause -> acknowledgement per migration.
func benchMigrate(b *testing.B, pair func(testing.TB) (net.Conn, net.Conn)) {
	const size = 256 * MiB
	g := mt.NewGuest(mt.SimpleDescription(size))
	g.Fill(1, 0, 0)
	d := mt.NewDest()
	var downtime, pauseToAck float64
	var n int
	once := func() {
		if err := g.Resume(); err != nil { // a previous migration left it paused
			b.Fatal(err)
		}
		d.Reset()
		sc, dc := pair(b)
		s, r := migrate(b.Context(), g, d, sc, dc, migration.SendOptions{}, migration.ReceiveOptions{})
		if s.err != nil || r.err != nil {
			b.Fatalf("source %v, destination %v", s.err, r.err)
		}
		downtime += s.rep.DowntimeMS
		pauseToAck += s.rep.PauseToAckMS
		n++
	}
	once()
	downtime, pauseToAck, n = 0, 0, 0
	b.SetBytes(size)
	for b.Loop() {
		once()
	}
	b.StopTimer()
	b.ReportMetric(downtime/float64(n), "downtime-ms")
	b.ReportMetric(pauseToAck/float64(n), "pause-to-ack-ms")
	if err := mt.Compare(g, d); err != nil {
		b.Fatal(err)
	}
}

func BenchmarkMigratePipe(b *testing.B) {
	benchMigrate(b, func(testing.TB) (net.Conn, net.Conn) { return net.Pipe() })
}

func BenchmarkMigrateTCP(b *testing.B) { benchMigrate(b, tcpPair) }
