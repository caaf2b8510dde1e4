package transport

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	for in, want := range map[string]Address{
		"tcp:10.0.0.2:7000":         {Network: TCP, Addr: "10.0.0.2:7000"},
		"10.0.0.2:7000":             {Network: TCP, Addr: "10.0.0.2:7000"},
		"tcp:[fe80::1]:7000":        {Network: TCP, Addr: "[fe80::1]:7000"},
		"tcp:10.0.0.2:7700/a1-b_2":  {Network: TCP, Addr: "10.0.0.2:7700", Route: "a1-b_2"},
		"tcp:[fe80::1]:7700/r":      {Network: TCP, Addr: "[fe80::1]:7700", Route: "r"},
		"unix:/run/vm.sock":         {Network: Unix, Addr: "/run/vm.sock"},
		"routed:/run/vm.route.sock": {Network: Routed, Addr: "/run/vm.route.sock"},
	} {
		got, err := Parse(in)
		if err != nil || got != want {
			t.Errorf("Parse(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "tcp:", "unix:", "routed:", "http://x:1", "host", "tcp:host:", "tcp:h:1/", "tcp:h:1/a b", "tcp:h:1/" + strings.Repeat("r", MaxRouteLen+1)} {
		if a, err := Parse(in); err == nil {
			t.Errorf("Parse(%q) = %+v, want an error", in, a)
		}
	}
}

// TestUnixListenDial: a Unix address listens, takes over a stale socket file, refuses a path
// another listener holds or that is no socket, and carries bytes.
func TestUnixListenDial(t *testing.T) {
	path := filepath.Join(t.TempDir(), "m.sock")
	a, _ := Parse("unix:" + path)
	stale, err := net.Listen(Unix, path)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close() // the file stays, nobody listens
	ln, err := a.Listen()
	if err != nil {
		t.Fatalf("listen over a stale socket: %v", err)
	}
	defer ln.Close()
	if _, err := a.Listen(); err == nil || !strings.Contains(err.Error(), "another process listens") {
		t.Fatalf("second listener: %v", err)
	}
	go func() {
		// Every connection gets the greeting: the probe of the refused listener is queued
		// before the dial below.
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, "hello")
			c.Close()
		}
	}()
	c, err := a.Dial(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	b, _ := io.ReadAll(c)
	if string(b) != "hello" {
		t.Fatalf("read %q", b)
	}
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o600)
	if _, err := (Address{Network: Unix, Addr: file}).Listen(); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("listen on a plain file: %v", err)
	}
}
