package transport

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// Routed connections. A host's agent takes every migration to that host on its one port: a
// connection that opens with a route preamble is passed, as a file descriptor, to the process
// that listens for that route (a VM process waiting for its migration), which then does the
// TLS handshake and everything after it itself, so the agent copies no byte of the migration.
// A connection without the preamble is the agent's own (its API for other agents).
//
// The preamble, in the clear, before anything else on the connection (TLS included):
//
//	"GWRT"      4 bytes, the magic
//	length      1 byte, 1..MaxRouteLen
//	route       length bytes of [0-9A-Za-z_-]
//
// A route is a random token the destination agent hands out for one migration. It grants
// nothing: the process it reaches still demands the peer's certificate.
//
// Within the host the descriptor travels over a Unix socket (an Address of network Routed,
// which the receiving process listens on): one connection per passed descriptor, which
// arrives with one byte.

// Routed is the network of a Unix socket on which a process receives connections an agent
// routed to it.
const Routed = "routed"

// MaxRouteLen bounds a route's length.
const MaxRouteLen = 64

var routeMagic = []byte("GWRT")

// checkRoute says whether r can be a route.
func checkRoute(r string) error {
	if r == "" || len(r) > MaxRouteLen {
		return fmt.Errorf("a route of %d bytes: want 1..%d", len(r), MaxRouteLen)
	}
	for _, c := range []byte(r) {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || c == '-' || c == '_') {
			return fmt.Errorf("route %q: want letters, digits, - and _ only", r)
		}
	}
	return nil
}

// routePreamble is what a dialler sends first to reach route.
func routePreamble(route string) []byte {
	return append(append(append([]byte{}, routeMagic...), byte(len(route))), route...)
}

// readPreamble reads a connection's first bytes. If they are a route preamble, it returns
// the route, having read exactly the preamble; if they are not, it returns the bytes it read
// (at most len(routeMagic)), which belong to whoever takes the connection instead.
func readPreamble(r io.Reader) (route string, read []byte, err error) {
	head := make([]byte, len(routeMagic)+1)
	n, err := io.ReadFull(r, head[:len(routeMagic)])
	if err != nil || !bytes.Equal(head[:n], routeMagic) {
		if err == io.ErrUnexpectedEOF || (err == io.EOF && n == 0) {
			err = nil // a short connection that is not routed: its taker sees it end
		}
		return "", head[:n], err
	}
	if _, err := io.ReadFull(r, head[len(routeMagic):]); err != nil {
		return "", nil, fmt.Errorf("route preamble: %w", err)
	}
	l := int(head[len(routeMagic)])
	if l == 0 || l > MaxRouteLen {
		return "", nil, fmt.Errorf("route preamble: a route of %d bytes: want 1..%d", l, MaxRouteLen)
	}
	b := make([]byte, l)
	if _, err := io.ReadFull(r, b); err != nil {
		return "", nil, fmt.Errorf("route preamble: %w", err)
	}
	if err := checkRoute(string(b)); err != nil {
		return "", nil, fmt.Errorf("route preamble: %w", err)
	}
	return string(b), nil, nil
}

// PreambleTimeout bounds the wait for a connection's first bytes at a Router.
const PreambleTimeout = HandshakeTimeout

// Router is a TCP listener that passes routed connections on to the Unix sockets their
// routes name, and gives the others to Accept with their first bytes intact. Connections are
// read concurrently, so a silent peer holds up nobody else.
type Router struct {
	ln net.Listener
	// Dropped, if set, hears of every connection the router closed: a bad preamble, a route
	// it does not know, a process that did not take it.
	Dropped func(remote net.Addr, err error)

	mu     sync.Mutex
	routes map[string]string // route: the socket's path
	conns  chan net.Conn
	errc   chan error
	done   chan struct{}
	once   sync.Once
}

// NewRouter routes the connections ln accepts (TCP).
func NewRouter(ln net.Listener) *Router {
	r := &Router{ln: ln, routes: map[string]string{}, conns: make(chan net.Conn), errc: make(chan error, 1), done: make(chan struct{})}
	go r.loop()
	return r
}

// Add routes the connections that name route to the Routed socket at path.
func (r *Router) Add(route, path string) error {
	if err := checkRoute(route); err != nil {
		return fmt.Errorf("transport: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.routes[route] = path
	return nil
}

// Remove forgets route: later connections that name it are closed.
func (r *Router) Remove(route string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.routes, route)
}

func (r *Router) loop() {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			r.errc <- err
			return
		}
		go r.take(c)
	}
}

func (r *Router) take(c net.Conn) {
	c.SetReadDeadline(time.Now().Add(PreambleTimeout))
	route, read, err := readPreamble(c)
	c.SetReadDeadline(time.Time{})
	if err == nil && route != "" {
		err = r.pass(c, route)
		c.Close() // passed, the process holds a descriptor of its own
		if err == nil {
			return
		}
	}
	if err != nil {
		c.Close()
		if r.Dropped != nil {
			r.Dropped(c.RemoteAddr(), err)
		}
		return
	}
	select {
	case r.conns <- &prefixConn{Conn: c, prefix: read}:
	case <-r.done:
		c.Close()
	}
}

// pass sends c's descriptor to the socket of route.
func (r *Router) pass(c net.Conn, route string) error {
	r.mu.Lock()
	path, ok := r.routes[route]
	r.mu.Unlock()
	if !ok {
		return fmt.Errorf("no migration waits for route %q", route)
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return fmt.Errorf("route %q: a %T has no descriptor to pass", route, c)
	}
	f, err := tc.File()
	if err != nil {
		return fmt.Errorf("route %q: %w", route, err)
	}
	defer f.Close()
	u, err := net.DialTimeout("unix", path, DialTimeout)
	if err != nil {
		return fmt.Errorf("route %q: the process that waits for it: %w", route, err)
	}
	defer u.Close()
	u.SetDeadline(time.Now().Add(DialTimeout))
	if _, _, err := u.(*net.UnixConn).WriteMsgUnix([]byte{0}, syscall.UnixRights(int(f.Fd())), nil); err != nil {
		return fmt.Errorf("route %q: pass the connection on: %w", route, err)
	}
	// Its answer, or its end, says it has the descriptor: closing ours before would be fine
	// for the kernel, but a process that died with it unread must be told apart.
	if _, err := u.Read(make([]byte, 1)); err != nil {
		return fmt.Errorf("route %q: the process that waits for it did not take the connection: %w", route, err)
	}
	return nil
}

// Accept returns the next connection that named no route.
func (r *Router) Accept() (net.Conn, error) {
	select {
	case c := <-r.conns:
		return c, nil
	case err := <-r.errc:
		r.errc <- err
		return nil, err
	}
}

func (r *Router) Addr() net.Addr { return r.ln.Addr() }

func (r *Router) Close() error {
	r.once.Do(func() { close(r.done) })
	return r.ln.Close()
}

// prefixConn gives back the bytes read before it.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (c *prefixConn) Read(b []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(b, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

// routedListener accepts the connections passed to its Unix socket.
type routedListener struct {
	ln *net.UnixListener
}

func listenRouted(path string) (net.Listener, error) {
	if err := removeStale(path); err != nil {
		return nil, err
	}
	// Owner-only from the start: whoever can connect can hand this process connections.
	old := syscall.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	return routedListener{ln}, nil
}

func (l routedListener) Accept() (net.Conn, error) {
	for {
		u, err := l.ln.AcceptUnix()
		if err != nil {
			return nil, err
		}
		c, err := receiveConn(u)
		u.Close()
		if err == nil {
			return c, nil
		}
		// A bad hand-over loses only that connection: the router, unanswered, reports it.
	}
}

// receiveConn reads one passed descriptor from u and acknowledges it.
func receiveConn(u *net.UnixConn) (net.Conn, error) {
	u.SetDeadline(time.Now().Add(DialTimeout))
	oob := make([]byte, syscall.CmsgSpace(4))
	_, oobn, flags, _, err := u.ReadMsgUnix(make([]byte, 1), oob)
	if err != nil {
		return nil, err
	}
	if flags&syscall.MSG_CTRUNC != 0 {
		return nil, errors.New("more than one descriptor passed")
	}
	fds, err := parseRights(oob[:oobn])
	if err != nil {
		return nil, err
	}
	if len(fds) != 1 {
		for _, fd := range fds {
			syscall.Close(fd)
		}
		return nil, fmt.Errorf("%d descriptors passed, want 1", len(fds))
	}
	f := os.NewFile(uintptr(fds[0]), "routed")
	c, err := net.FileConn(f) // a descriptor of its own
	f.Close()
	if err != nil {
		return nil, err
	}
	if _, ok := c.(*net.TCPConn); !ok {
		c.Close()
		return nil, fmt.Errorf("a %T passed, want a TCP connection", c)
	}
	if _, err := u.Write([]byte{0}); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func (l routedListener) Addr() net.Addr { return l.ln.Addr() }
func (l routedListener) Close() error   { return l.ln.Close() }

// dialRoute opens a routed connection: the preamble goes first.
func dialRoute(ctx context.Context, c net.Conn, route string) error {
	if dl, ok := ctx.Deadline(); ok {
		c.SetWriteDeadline(dl)
		defer c.SetWriteDeadline(time.Time{})
	}
	_, err := c.Write(routePreamble(route))
	return err
}
