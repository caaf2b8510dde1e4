package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/godwit-vm/godwit/internal/certs"
	"github.com/godwit-vm/godwit/internal/transport"
)

// TLSFlags put mutual TLS on every connection of a migration between hosts (the main one, the
// page streams, the fault channel, a reconnection).
type TLSFlags struct {
	TLSCA    string   `name:"tls-ca" placeholder:"FILE" group:"Mutual TLS" help:"Mutual TLS on every connection of the migration: the CA certificate (PEM) the peer's certificate must be signed by. Needs --tls-cert and --tls-key; 'godwit cert' makes a test CA and host certificates."`
	TLSCert  string   `name:"tls-cert" placeholder:"FILE" group:"Mutual TLS" help:"This host's certificate (PEM), signed by the CA of --tls-ca."`
	TLSKey   string   `name:"tls-key" placeholder:"FILE" group:"Mutual TLS" help:"The private key of --tls-cert (PEM)."`
	TLSPeers []string `name:"tls-peer" placeholder:"NAME,..." sep:"," group:"Mutual TLS" help:"Accept a peer only if its certificate names one of these hosts. Default: the host dialled (migrate), any host the CA signed (run --incoming)."`
}

func (f *TLSFlags) given() bool {
	return f.TLSCA != "" || f.TLSCert != "" || f.TLSKey != "" || len(f.TLSPeers) > 0
}

// check says what is missing or does not fit, for a connection to or on addr.
func (f *TLSFlags) check(addr transport.Address) error {
	if !f.given() {
		return nil
	}
	if f.TLSCA == "" || f.TLSCert == "" || f.TLSKey == "" {
		return errors.New("mutual TLS needs all of --tls-ca, --tls-cert and --tls-key")
	}
	if addr.Network == transport.Unix {
		return fmt.Errorf("mutual TLS is for migrations between hosts (tcp:HOST:PORT), not %s", addr)
	}
	return nil
}

// absolute makes the files' paths absolute: the VM process that reads them may not share the
// command's working directory.
func (f *TLSFlags) absolute() error {
	for _, p := range []*string{&f.TLSCA, &f.TLSCert, &f.TLSKey} {
		if *p == "" {
			continue
		}
		a, err := filepath.Abs(*p)
		if err != nil {
			return err
		}
		*p = a
	}
	return nil
}

// security loads the files; nil without TLS.
func (f *TLSFlags) security() (*transport.Security, error) {
	if !f.given() {
		return nil, nil
	}
	return transport.LoadSecurity(f.TLSCA, f.TLSCert, f.TLSKey, f.TLSPeers)
}

// CertCmd is 'godwit cert'.
type CertCmd struct {
	Dir   string   `default:"certs" placeholder:"DIR" help:"Directory for the files: ca.crt and ca.key (made unless there already), NAME.crt and NAME.key per host. Keys are readable by their owner only. Default ${default}."`
	Hosts []string `arg:"" name:"host" placeholder:"NAME[=IP,...]" help:"A host to make a certificate for: its name (the name peers accept it under with --tls-peer), and the addresses it is dialled at, so that a peer that checks the dialled host finds them."`
}

func (c *CertCmd) Help() string {
	return `Makes a test CA and, signed by it, a certificate per host for the mutual TLS of migrations
between hosts ('run --incoming --tls-*', 'migrate --tls-*'). Each certificate serves both for
dialling and for listening. An operator's own CA serves as well.

    godwit cert --dir /etc/godwit/tls host-a=10.0.0.1 host-b=10.0.0.2
    # host B: godwit run --incoming tcp:0.0.0.0:7000 --tls-ca ca.crt --tls-cert host-b.crt --tls-key host-b.key --tls-peer host-a
    # host A: godwit migrate --to tcp:10.0.0.2:7000 --tls-ca ca.crt --tls-cert host-a.crt --tls-key host-a.key --tls-peer host-b`
}

func (c *CertCmd) Run(g *Globals) error {
	var hosts []certs.Host
	for _, arg := range c.Hosts {
		name, ips, _ := strings.Cut(arg, "=")
		h := certs.Host{Name: name}
		if ips != "" {
			for _, s := range strings.Split(ips, ",") {
				ip := net.ParseIP(s)
				if ip == nil {
					return fmt.Errorf("host %q: %q is no IP address", arg, s)
				}
				h.IPs = append(h.IPs, ip)
			}
		}
		hosts = append(hosts, h)
	}
	wrote, err := certs.WriteDir(c.Dir, hosts)
	if err != nil {
		return err
	}
	if g.JSON {
		return printJSON(map[string]any{"dir": c.Dir, "wrote": wrote})
	}
	for _, f := range wrote {
		fmt.Fprintln(os.Stdout, f)
	}
	return nil
}
