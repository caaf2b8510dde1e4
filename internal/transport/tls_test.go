package transport

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/certs"
)

// testPKI is a CA with certificates for hosts a and b, and a second CA (another operator's)
// with a certificate for a host that calls itself a.
type testPKI struct {
	roots, otherRoots *x509.CertPool
	a, b, rogue       tls.Certificate
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	ca, err := certs.NewCA("test CA")
	if err != nil {
		t.Fatal(err)
	}
	other, err := certs.NewCA("another CA")
	if err != nil {
		t.Fatal(err)
	}
	p := &testPKI{roots: x509.NewCertPool(), otherRoots: x509.NewCertPool()}
	p.roots.AppendCertsFromPEM(ca.Cert)
	p.otherRoots.AppendCertsFromPEM(other.Cert)
	for _, c := range []struct {
		ca   certs.Pair
		name string
		into *tls.Certificate
	}{{ca, "a", &p.a}, {ca, "b", &p.b}, {other, "a", &p.rogue}} {
		pair, err := certs.Issue(c.ca, certs.Host{Name: c.name, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
		if err != nil {
			t.Fatal(err)
		}
		if *c.into, err = tls.X509KeyPair(pair.Cert, pair.Key); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// refusals collects what a listener refused.
type refusals struct {
	mu   sync.Mutex
	errs []error
	seen chan struct{}
}

func (r *refusals) add(_ net.Addr, err error) {
	r.mu.Lock()
	r.errs = append(r.errs, err)
	r.mu.Unlock()
	r.seen <- struct{}{}
}

// TestMutualTLS: a peer with a certificate of the same CA gets through both ways and carries
// bytes; a peer of another CA, one with a name not accepted, one without a certificate and
// one speaking plain TCP are refused in the handshake, and the listener serves the next peer.
func TestMutualTLS(t *testing.T) {
	p := newTestPKI(t)
	ref := &refusals{seen: make(chan struct{}, 8)}
	server := &Security{Roots: p.roots, Cert: p.b, Peers: []string{"a"}, Refused: ref.add}
	ln, err := (Address{Network: TCP, Addr: "127.0.0.1:0", Security: server}).Listen()
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go echoAll(ln)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	to := func(s *Security) Address { return Address{Network: TCP, Addr: ln.Addr().String(), Security: s} }

	// The good peer: it checks that the listener is a host of its CA at 127.0.0.1.
	c, err := to(&Security{Roots: p.roots, Cert: p.a}).Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("pages"))
	b := make([]byte, 5)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "pages" {
		t.Fatalf("echo over TLS: %q %v", b, err)
	}
	// The engine tunes the TCP socket under it (migration's sockopt code unwraps NetConn).
	if w, ok := c.(interface{ NetConn() net.Conn }); !ok {
		t.Errorf("%T shows no socket under it", c)
	} else if _, ok := w.NetConn().(*net.TCPConn); !ok {
		t.Errorf("under the TLS connection: %T, want a TCP socket", w.NetConn())
	}
	c.Close()

	// The dialler refuses a listener that is not the peer it wants.
	if _, err := to(&Security{Roots: p.roots, Cert: p.a, Peers: []string{"c"}}).Dial(ctx); err == nil || !strings.Contains(err.Error(), "names none of the accepted peers [c]") {
		t.Errorf("dialling a listener with another name: %v", err)
	}
	if _, err := to(&Security{Roots: p.otherRoots, Cert: p.rogue}).Dial(ctx); err == nil || !strings.Contains(err.Error(), "unknown authority") {
		t.Errorf("dialling a listener of another CA: %v", err)
	}
	<-ref.seen // the listener saw those handshakes fail too
	<-ref.seen

	// The listener refuses: another CA's certificate, an unaccepted name, none, plain TCP.
	bad := []struct {
		want string // in the listener's refusal
		try  func() error
	}{
		{"unknown authority", func() error { return echo(ctx, to(&Security{Roots: p.roots, Cert: p.rogue})) }},
		{"names none of the accepted peers [a]", func() error { return echo(ctx, to(&Security{Roots: p.roots, Cert: p.b})) }},
		{"certificate", func() error {
			c, err := tls.Dial(TCP, ln.Addr().String(), &tls.Config{InsecureSkipVerify: true})
			if err != nil {
				return err
			}
			defer c.Close()
			c.Write([]byte("x"))
			_, err = c.Read(make([]byte, 1))
			return err
		}},
		{"", func() error { return echo(ctx, Address{Network: TCP, Addr: ln.Addr().String()}) }},
	}
	for i, b := range bad {
		if err := b.try(); err == nil {
			t.Errorf("bad peer %d got through", i)
		}
		select {
		case <-ref.seen:
		case <-time.After(HandshakeTimeout + 5*time.Second):
			t.Fatalf("bad peer %d: the listener reported no refusal", i)
		}
		ref.mu.Lock()
		err := ref.errs[len(ref.errs)-1]
		ref.mu.Unlock()
		t.Logf("refused peer %d: %v", i, err)
		if !strings.Contains(err.Error(), b.want) {
			t.Errorf("refusal of bad peer %d: %v, want %q", i, err, b.want)
		}
	}

	// The listener still serves a good peer.
	if err := echo(ctx, to(&Security{Roots: p.roots, Cert: p.a})); err != nil {
		t.Fatalf("a good peer after the refusals: %v", err)
	}
}

// echoAll echoes every connection ln accepts until it is closed.
func echoAll(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() { io.Copy(c, c); c.Close() }()
	}
}

// echo dials a, writes and reads back a few bytes.
func echo(ctx context.Context, a Address) error {
	c, err := a.Dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(HandshakeTimeout + 5*time.Second))
	if _, err := c.Write([]byte("hello")); err != nil {
		return err
	}
	b := make([]byte, 5)
	_, err = io.ReadFull(c, b)
	return err
}

// BenchmarkLoopback moves bytes over loopback TCP, plain and with mutual TLS, one connection
// each: what TLS costs a stream of pages on one core.
func BenchmarkLoopback(b *testing.B) {
	p := newTestPKI(b)
	for _, c := range []struct {
		name     string
		src, dst *Security
	}{
		{"plain", nil, nil},
		{"tls", &Security{Roots: p.roots, Cert: p.a}, &Security{Roots: p.roots, Cert: p.b}},
	} {
		b.Run(c.name, func(b *testing.B) {
			ln, err := (Address{Network: TCP, Addr: "127.0.0.1:0", Security: c.dst}).Listen()
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			got := make(chan int64, 1)
			go func() {
				conn, err := ln.Accept()
				if err != nil {
					got <- -1
					return
				}
				n, _ := io.Copy(io.Discard, conn)
				got <- n
			}()
			conn, err := (Address{Network: TCP, Addr: ln.Addr().String(), Security: c.src}).Dial(context.Background())
			if err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, 1<<20)
			b.SetBytes(int64(len(buf)))
			b.ResetTimer()
			for range b.N {
				if _, err := conn.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			conn.Close()
			if n := <-got; n != int64(b.N)*int64(len(buf)) {
				b.Fatalf("received %d bytes of %d", n, int64(b.N)*int64(len(buf)))
			}
		})
	}
}
