package transport

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"sync"
	"time"
)

// HandshakeTimeout bounds a TLS handshake on either side: a peer that connects and says
// nothing holds no listener up for longer.
const HandshakeTimeout = 10 * time.Second

// Security is mutual TLS for the connections of a migration between hosts. Each side shows a
// certificate signed by the operator's CA and takes the peer only if the peer's certificate
// chains to that CA and names a peer it accepts: one of Peers, or where Peers is empty, on
// the dialling side the host it dialled and on the listening side any host the CA signed.
// Everything is checked in the handshake, before a byte of the migration moves.
type Security struct {
	Roots *x509.CertPool
	Cert  tls.Certificate
	Peers []string
	// Refused, if set, hears of every connection a listener refused (its handshake failed).
	Refused func(remote net.Addr, err error)
}

// LoadSecurity reads the CA's certificate, this host's certificate and its key (PEM files,
// as 'godwit cert' writes them).
func LoadSecurity(caFile, certFile, keyFile string, peers []string) (*Security, error) {
	if caFile == "" || certFile == "" || keyFile == "" {
		return nil, errors.New("transport: tls: want the CA's certificate, this host's certificate and its key")
	}
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("transport: tls: the CA: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("transport: tls: the CA: %s holds no PEM certificate", caFile)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("transport: tls: this host's certificate %s and key %s: %w", certFile, keyFile, err)
	}
	return &Security{Roots: roots, Cert: cert, Peers: peers}, nil
}

// config is the TLS configuration of one side. Verification is done here, in
// VerifyConnection, the same way on both sides: the chain against Roots for the peer's role,
// then the peer's name. crypto/tls's own check would name only one server and no client.
func (s *Security) config(dialled string) *tls.Config {
	usage := x509.ExtKeyUsageClientAuth
	if dialled != "" {
		usage = x509.ExtKeyUsageServerAuth
	}
	return &tls.Config{
		Certificates:       []tls.Certificate{s.Cert},
		MinVersion:         tls.VersionTLS13,
		ClientAuth:         tls.RequireAnyClientCert,
		InsecureSkipVerify: true, // VerifyConnection below checks chain and name
		VerifyConnection:   func(cs tls.ConnectionState) error { return s.verify(cs, usage, dialled) },
	}
}

func (s *Security) verify(cs tls.ConnectionState, usage x509.ExtKeyUsage, dialled string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("the peer shows no certificate")
	}
	leaf := cs.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: s.Roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return fmt.Errorf("the peer's certificate (%s): %w", describe(leaf), err)
	}
	names := s.Peers
	if len(names) == 0 {
		if dialled == "" {
			return nil
		}
		names = []string{dialled}
	}
	for _, n := range names {
		if leaf.VerifyHostname(n) == nil {
			return nil
		}
	}
	return fmt.Errorf("the peer's certificate (%s) names none of the accepted peers %v", describe(leaf), names)
}

// describe names a certificate in an error: its subject and the names it holds.
func describe(c *x509.Certificate) string {
	names := slices.Clone(c.DNSNames)
	for _, ip := range c.IPAddresses {
		names = append(names, ip.String())
	}
	return fmt.Sprintf("%q for %v", c.Subject.CommonName, names)
}

// dial makes a TLS connection over c to addr and finishes the handshake.
func (s *Security) dial(ctx context.Context, c net.Conn, addr string) (net.Conn, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	tc := tls.Client(c, s.config(host))
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("transport: tls with %s: %w", addr, err)
	}
	return clientConn{tc, addr}, nil
}

// clientConn says what a peer's TLS alert means. In TLS 1.3 the dialling side's handshake
// ends before the listener has checked its certificate, so a refusal arrives as an alert on
// the first read, which the migration would report as a stream cut short.
type clientConn struct {
	*tls.Conn
	addr string
}

func (c clientConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	return n, c.explain(err)
}

func (c clientConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	return n, c.explain(err)
}

func (c clientConn) explain(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Op == "remote error" {
		return fmt.Errorf("transport: the peer at %s refused this host's TLS certificate (%w)", c.addr, err)
	}
	return err
}

// tlsListener accepts connections whose handshake succeeded. Handshakes run concurrently, so
// a slow or silent peer holds up nobody else; refused ones are reported and dropped.
type tlsListener struct {
	net.Listener
	s     *Security
	conns chan net.Conn
	errc  chan error
	done  chan struct{}
	once  sync.Once
}

func (s *Security) listen(ln net.Listener) net.Listener {
	l := &tlsListener{Listener: ln, s: s, conns: make(chan net.Conn), errc: make(chan error, 1), done: make(chan struct{})}
	go l.loop()
	return l
}

func (l *tlsListener) loop() {
	cfg := l.s.config("")
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			l.errc <- err
			return
		}
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), HandshakeTimeout)
			defer cancel()
			tc := tls.Server(c, cfg)
			if err := tc.HandshakeContext(ctx); err != nil {
				c.Close()
				if l.s.Refused != nil {
					l.s.Refused(c.RemoteAddr(), err)
				}
				return
			}
			select {
			case l.conns <- tc:
			case <-l.done:
				tc.Close()
			}
		}()
	}
}

func (l *tlsListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case err := <-l.errc:
		l.errc <- err // every later Accept fails the same way
		return nil, err
	}
}

func (l *tlsListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// Listener puts the listening side of s on the connections ln accepts: those whose handshake
// succeeds, as listening on an Address with Security does.
func (s *Security) Listener(ln net.Listener) net.Listener { return s.listen(ln) }
