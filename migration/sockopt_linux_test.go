//go:build linux

package migration_test

import (
	"context"
	"net"
	"syscall"
	"testing"

	"github.com/godwit-vm/godwit/migration"
	mt "github.com/godwit-vm/godwit/migration/migrationtest"
	"golang.org/x/sys/unix"
)

func tcpOpt(t *testing.T, c net.Conn, opt int) int { return sockOpt(t, c, unix.IPPROTO_TCP, opt) }

func sockOpt(t *testing.T, c net.Conn, level, opt int) int {
	t.Helper()
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), level, opt) }); err != nil || gerr != nil {
		t.Fatal(err, gerr)
	}
	return v
}

// TestPostcopyTCPSocketOptions: over real TCP, the source's send buffer is limited
// (TCP_NOTSENT_LOWAT) and the destination's receive buffer small while pages are missing,
// and both go back to what they were once the migration is over.
func TestPostcopyTCPSocketOptions(t *testing.T) {
	g := newGuest(64*MiB, 40)
	d := mt.NewPostcopyDest()
	sc, dc := tcpPair(t)
	defer sc.Close()
	defer dc.Close()
	lowat0, clamp0 := tcpOpt(t, sc, unix.TCP_NOTSENT_LOWAT), sockOpt(t, dc, unix.SOL_SOCKET, unix.SO_RCVBUF)
	var lowat, clamp int
	g.Hook = func(op string, n int) error {
		// Pages are viewed for the push after the switch: the options are in force by then.
		if op == "ViewPages" && n == 100 {
			lowat, clamp = tcpOpt(t, sc, unix.TCP_NOTSENT_LOWAT), sockOpt(t, dc, unix.SOL_SOCKET, unix.SO_RCVBUF)
		}
		return nil
	}
	ctx, stop := context.WithCancel(t.Context())
	wait := d.RunVCPU(ctx, mt.VCPUConfig{Pages: mt.LocalityPattern(1, 0, 64*MiB/4096, 4096, 16), Once: true})
	done := make(chan outcome, 1)
	go func() {
		rep, err := migration.Receive(t.Context(), d, dc, migration.ReceiveOptions{})
		done <- outcome{rep, err}
	}()
	var s outcome
	s.rep, s.err = migration.Send(t.Context(), g, sc, migration.SendOptions{Mode: migration.ModePostcopy})
	r := <-done
	stop()
	wait()
	checkOK(t, g, d.Dest, s, r)
	// SO_RCVBUF reports twice the size set: the window is 64 KiB at least, a few MiB at most
	// on a loopback connection.
	if lowat == 0 || lowat > 1<<20 || clamp < 128<<10 || clamp > 64<<20 {
		t.Errorf("during post-copy: TCP_NOTSENT_LOWAT %d (was %d), SO_RCVBUF %d (was %d)", lowat, lowat0, clamp, clamp0)
	}
	if got := tcpOpt(t, sc, unix.TCP_NOTSENT_LOWAT); got != lowat0 {
		t.Errorf("TCP_NOTSENT_LOWAT %d after Send, was %d", got, lowat0)
	}
	if got := sockOpt(t, dc, unix.SOL_SOCKET, unix.SO_RCVBUF); got < clamp0 {
		t.Errorf("SO_RCVBUF %d after Receive, was %d", got, clamp0)
	}
	t.Logf("lowat %d, receive buffer %d (was %d, now %d); faults %d, p50 %.0fus", lowat, clamp, clamp0, sockOpt(t, dc, unix.SOL_SOCKET, unix.SO_RCVBUF), s.rep.Postcopy.DemandFaults, s.rep.Postcopy.FaultLatencyP50US)
}
