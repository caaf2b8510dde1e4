// Package transport names where a migration connects and makes its connections: TCP between
// hosts (plain, or with mutual TLS: see Security), Unix sockets within one, which also pass
// file descriptors (a memory handover). Every
// connection of a migration (the main one, extra page streams, a fault channel, a reconnection)
// is made from the same Address, so that they all reach the same listener.
//
// The engine tunes the sockets it is given (TCP_NOTSENT_LOWAT, the receive window): it finds
// the socket behind any net.Conn that has one, wrapped or not, and leaves the options a socket
// does not have (a Unix socket has no TCP ones) alone.
package transport

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

// Networks.
const (
	TCP  = "tcp"
	Unix = "unix"
)

// DialTimeout bounds each Dial unless ctx ends sooner.
const DialTimeout = 10 * time.Second

// Address is a migration endpoint: tcp:HOST:PORT, tcp:HOST:PORT/ROUTE (the agent on
// HOST:PORT routes the connection to the migration ROUTE), unix:PATH, or routed:PATH (the
// Unix socket on which a process takes the connections an agent routes to it).
type Address struct {
	Network string // TCP, Unix or Routed
	Addr    string // HOST:PORT, or the socket's path
	// Route, for TCP, opens every connection with a route preamble: see Router.
	Route string
	// Security, if set, puts mutual TLS on every TCP connection dialled to or accepted on the
	// address.
	Security *Security
}

// Parse reads tcp:HOST:PORT[/ROUTE], HOST:PORT[/ROUTE] (TCP), unix:PATH or routed:PATH.
func Parse(s string) (Address, error) {
	for _, n := range []string{Unix, Routed} {
		if p, ok := strings.CutPrefix(s, n+":"); ok {
			if p == "" {
				return Address{}, fmt.Errorf("%q: want %s:PATH with a path", s, n)
			}
			return Address{Network: n, Addr: p}, nil
		}
	}
	a := strings.TrimPrefix(s, "tcp:")
	if a == s && strings.Contains(s, "://") {
		return Address{}, fmt.Errorf("%q: want tcp:HOST:PORT or unix:PATH", s)
	}
	a, route, routed := strings.Cut(a, "/")
	if routed {
		if err := checkRoute(route); err != nil {
			return Address{}, fmt.Errorf("%q: %w", s, err)
		}
	}
	host, port, err := net.SplitHostPort(a)
	if err != nil || port == "" {
		return Address{}, fmt.Errorf("%q: want tcp:HOST:PORT or unix:PATH", s)
	}
	return Address{Network: TCP, Addr: net.JoinHostPort(host, port), Route: route}, nil
}

func (a Address) String() string {
	if a.Route != "" {
		return a.Network + ":" + a.Addr + "/" + a.Route
	}
	return a.Network + ":" + a.Addr
}

// Dial connects to a, for at most DialTimeout. A Unix connection is a *FileConn.
func (a Address) Dial(ctx context.Context) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, DialTimeout)
	defer cancel()
	if err := a.checkSecurity(); err != nil {
		return nil, err
	}
	if a.Network == Routed {
		return nil, fmt.Errorf("transport: %s is listened on, not dialled: dial the agent's tcp:HOST:PORT/ROUTE", a)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, a.Network, a.Addr)
	if err != nil {
		return nil, err
	}
	if a.Route != "" {
		if err := dialRoute(ctx, c, a.Route); err != nil {
			c.Close()
			return nil, fmt.Errorf("transport: %s: the route preamble: %w", a, err)
		}
	}
	if a.Security != nil {
		return a.Security.dial(ctx, c, a.Addr)
	}
	return wrap(c), nil
}

func (a Address) checkSecurity() error {
	if a.Security != nil && a.Network == Unix {
		return fmt.Errorf("transport: %s: TLS is for connections between hosts (tcp: or routed:), not %s", a, a.Network)
	}
	return nil
}

// Listen listens on a. A Unix socket's path is taken over if a stale socket file is there
// (no listener answers it), and refused if anything else is.
func (a Address) Listen() (net.Listener, error) {
	if err := a.checkSecurity(); err != nil {
		return nil, err
	}
	var ln net.Listener
	var err error
	switch a.Network {
	case Unix:
		if err := removeStale(a.Addr); err != nil {
			return nil, err
		}
		ln, err = net.Listen(a.Network, a.Addr)
	case Routed:
		ln, err = listenRouted(a.Addr)
	default:
		if a.Route != "" {
			return nil, fmt.Errorf("transport: %s: a route is dialled, not listened on", a)
		}
		ln, err = net.Listen(a.Network, a.Addr)
	}
	switch {
	case err != nil:
		return nil, err
	case a.Security != nil:
		return a.Security.listen(ln), nil
	case a.Network == Unix:
		return fileListener{ln}, nil
	}
	return ln, nil
}

// fileListener accepts Unix connections as *FileConn.
type fileListener struct{ net.Listener }

func (l fileListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return wrap(c), nil
}

func wrap(c net.Conn) net.Conn {
	if u, ok := c.(*net.UnixConn); ok {
		return &FileConn{UnixConn: u}
	}
	return c
}

// removeStale removes path if it is a Unix socket nobody listens on.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("transport: %s exists and is not a socket", path)
	}
	if c, err := net.DialTimeout(Unix, path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("transport: %s: another process listens there", path)
	}
	return os.Remove(path)
}
