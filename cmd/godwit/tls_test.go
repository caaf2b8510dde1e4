package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/migration"
)

// TestMutualTLSAcrossHosts migrates a heavy writer between the namespace hosts with mutual
// TLS on every connection (hybrid, two page streams and the fault channel), made from the
// certificates 'godwit cert' writes; before that, sources with another CA's certificate, with
// a name the destination does not accept, and without TLS are refused in the handshake: the
// destination creates no VM, and the source runs on.
func TestMutualTLSAcrossHosts(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, gbit)
	dir, rogue := t.TempDir(), t.TempDir()
	for _, c := range [][]string{
		{"cert", "--dir", dir, "host-a=" + tb.Host(0).Addr().String(), "host-b=" + tb.Host(1).Addr().String(), "host-c"},
		{"cert", "--dir", rogue, "host-a=" + tb.Host(0).Addr().String()},
	} {
		if out, err := godwit(c...).CombinedOutput(); err != nil {
			t.Fatalf("godwit %v: %v %s", c, err, out)
		}
	}
	tlsFlags := func(dir, name string, peers ...string) []string {
		f := []string{"--tls-ca", filepath.Join(dir, "ca.crt"), "--tls-cert", filepath.Join(dir, name+".crt"), "--tls-key", filepath.Join(dir, name+".key")}
		for _, p := range peers {
			f = append(f, "--tls-peer", p)
		}
		return f
	}
	addr := fmt.Sprintf("tcp:%s:7650", tb.Host(1).Addr())
	dst := startVM(t, tb.Host(1), "dst", append([]string{"--incoming", addr}, tlsFlags(dir, "host-b", "host-a")...)...)
	src := startVM(t, tb.Host(0), "src", "--mem", "256M", "--workload", "dirty", "--wss", "128M", "--rate", "max", "--pattern", "random", "--content", "random")
	src.waitHeartbeats(t, 100)

	for _, c := range []struct {
		what  string
		flags []string
		want  string
	}{
		// It trusts the right CA but shows a certificate another CA signed.
		{"another CA's certificate", []string{"--tls-ca", filepath.Join(dir, "ca.crt"), "--tls-cert", filepath.Join(rogue, "host-a.crt"), "--tls-key", filepath.Join(rogue, "host-a.key")}, "refused this host's TLS certificate"},
		{"a certificate the destination does not accept (host-c)", tlsFlags(dir, "host-c"), "refused this host's TLS certificate"},
		{"no TLS", nil, "stream closed"},
	} {
		rep, err := migrate(t, src, addr, c.flags...)
		if err == nil || rep.Result == migration.ResultOK || !strings.Contains(rep.Error, c.want) {
			t.Fatalf("a source with %s: %v, %+v; want %q", c.what, err, rep, c.want)
		}
		t.Logf("a source with %s: refused: %s", c.what, rep.Error)
		if s := dst.stats(t); s.State != "incoming" {
			t.Fatalf("after a source with %s the destination is %s, want still waiting (incoming)", c.what, s.State)
		}
		src.waitHeartbeats(t, src.stats(t).Heartbeats+20)
	}
	// The source checks the destination too: its CA, and its name.
	rep, err := migrate(t, src, addr, tlsFlags(rogue, "host-a")...)
	if err == nil || !strings.Contains(rep.Error, "unknown authority") {
		t.Fatalf("a destination whose certificate another CA signed: %v, %+v", err, rep)
	}
	rep, err = migrate(t, src, addr, tlsFlags(dir, "host-a", "host-c")...)
	if err == nil || !strings.Contains(rep.Error, "names none of the accepted peers [host-c]") {
		t.Fatalf("a destination whose certificate is not the peer asked for: %v, %+v", err, rep)
	}

	rep, err = migrate(t, src, addr, append([]string{"--mode", "hybrid", "--streams", "2", "--hybrid-rounds", "2"}, tlsFlags(dir, "host-a", "host-b")...)...)
	logReport(t, "hybrid over mutual TLS", rep)
	if err != nil || rep.Result != migration.ResultOK {
		t.Fatalf("migrate over mutual TLS: %v, %+v", err, rep)
	}
	if len(rep.Streams) < 2 {
		t.Errorf("the pages went over %d connections, want 2", len(rep.Streams))
	}
	select {
	case err := <-src.exited:
		if err != nil {
			t.Fatalf("source process: %v %s", err, src.stderr)
		}
	case <-time.After(time.Minute):
		t.Fatal("the source process did not end after the migration")
	}
	dst.verifyClean(t)
	if n := strings.Count(dst.stderr.String(), "refused a connection from"); n < 5 {
		t.Errorf("the destination logged %d refusals, want 5 or more: %s", n, dst.stderr)
	}
}
