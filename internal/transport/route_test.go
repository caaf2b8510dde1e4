package transport

import (
	"bytes"
	"context"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRouter: on one port, a connection that names a known route reaches the process that
// listens for it (with mutual TLS end to end, the router in between seeing only the
// preamble), a connection without a preamble reaches the router's own Accept with its first
// bytes intact, and one that names an unknown route, or a route whose process is gone, is
// closed and reported.
func TestRouter(t *testing.T) {
	p := newTestPKI(t)
	raw, err := net.Listen(TCP, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := NewRouter(raw)
	dropped := make(chan error, 4)
	r.Dropped = func(_ net.Addr, err error) { dropped <- err }
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// The router's own connections: the agent's API.
	go echoAll(r)
	for _, msg := range []string{"POST /v1/incoming", "GWRX more", "\x16\x03\x01\x02\x00"} {
		if err := echoRaw(raw.Addr().String(), msg); err != nil {
			t.Errorf("a connection without a route, sending %q: %v", msg, err)
		}
	}

	path := filepath.Join(t.TempDir(), "vm.route.sock")
	vm, err := (Address{Network: Routed, Addr: path, Security: &Security{Roots: p.roots, Cert: p.b, Peers: []string{"a"}}}).Listen()
	if err != nil {
		t.Fatal(err)
	}
	go echoAll(vm)
	if err := r.Add("m-1", path); err != nil {
		t.Fatal(err)
	}
	to := Address{Network: TCP, Addr: raw.Addr().String(), Route: "m-1", Security: &Security{Roots: p.roots, Cert: p.a}}
	for i := 0; i < 3; i++ { // every connection of a migration
		if err := echo(ctx, to); err != nil {
			t.Fatalf("a routed connection over TLS: %v", err)
		}
	}
	// The process checks the certificate itself: the router lets anyone through to it.
	if err := echo(ctx, Address{Network: TCP, Addr: raw.Addr().String(), Route: "m-1", Security: &Security{Roots: p.otherRoots, Cert: p.rogue}}); err == nil {
		t.Error("a peer with another CA's certificate got through to the routed process")
	}

	unknown := to
	unknown.Route = "m-2"
	if err := echo(ctx, unknown); err == nil {
		t.Error("a connection to an unknown route got through")
	}
	if err := <-dropped; !strings.Contains(err.Error(), `no migration waits for route "m-2"`) {
		t.Errorf("the unknown route dropped with %v", err)
	}
	vm.Close()
	if err := echo(ctx, to); err == nil {
		t.Error("a connection to a route whose process is gone got through")
	}
	if err := <-dropped; !strings.Contains(err.Error(), "the process that waits for it") {
		t.Errorf("the route without its process dropped with %v", err)
	}
	r.Remove("m-1")
	if err := echo(ctx, to); err == nil {
		t.Error("a connection to a removed route got through")
	}
	<-dropped
	if _, err := (Address{Network: Routed, Addr: path}).Dial(ctx); err == nil {
		t.Error("a routed: address dialled")
	}
}

// echoRaw sends msg on a plain connection to addr and wants it back.
func echoRaw(addr, msg string) error {
	c, err := net.DialTimeout(TCP, addr, DialTimeout)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	b := make([]byte, len(msg))
	if _, err := io.ReadFull(c, b); err != nil {
		return err
	}
	if string(b) != msg {
		return &net.AddrError{Err: "echoed " + string(b), Addr: addr}
	}
	return nil
}

// FuzzReadPreamble: whatever a peer sends first, the router either finds a route, having read
// exactly the preamble that names it, or gives back what it read (a prefix of the input, no
// longer than the magic), or fails; it never reads past the preamble.
func FuzzReadPreamble(f *testing.F) {
	f.Add(routePreamble("abc"))
	f.Add(append(routePreamble("m-1"), "\x16\x03\x01"...))
	f.Add([]byte("GWRT\x00"))
	f.Add([]byte("GWRT\x41"))
	f.Add([]byte("POST / HTTP/1.1\r\n"))
	f.Add([]byte("GW"))
	f.Fuzz(func(t *testing.T, in []byte) {
		rd := bytes.NewReader(in)
		route, read, err := readPreamble(rd)
		consumed := len(in) - rd.Len()
		switch {
		case err != nil:
			if route != "" {
				t.Fatalf("a route %q and an error %v", route, err)
			}
		case route != "":
			want := routePreamble(route)
			if !bytes.HasPrefix(in, want) || consumed != len(want) || checkRoute(route) != nil {
				t.Fatalf("route %q from %q, having read %d bytes", route, in, consumed)
			}
		default:
			if len(read) > len(routeMagic) || !bytes.HasPrefix(in, read) || consumed != len(read) {
				t.Fatalf("gave back %q of %q, having read %d bytes", read, in, consumed)
			}
		}
	})
}
