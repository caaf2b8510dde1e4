// Package certs makes the certificates of a test CA for mutual TLS between godwit hosts: a CA,
// and per host a certificate that the CA signs, good both for dialling and for listening (a
// host is the source of one migration and the destination of another). An operator's own CA
// serves as well; these are for testbeds and first steps.
package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Validity is how long the certificates made here are good for.
const Validity = 365 * 24 * time.Hour

// Host names a host's certificate: Name is its name (a DNS name in the certificate; the name
// peers accept it under) and IPs the addresses it is dialled at, so that a peer that checks
// the dialled address finds them too.
type Host struct {
	Name string
	IPs  []net.IP
}

// Pair is a certificate and its private key, PEM-encoded.
type Pair struct {
	Cert, Key []byte
}

// NewCA makes a self-signed CA named name.
func NewCA(name string) (Pair, error) {
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: name},
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	return create(tmpl, nil, nil)
}

// Issue makes h's certificate, signed by ca.
func Issue(ca Pair, h Host) (Pair, error) {
	if h.Name == "" {
		return Pair{}, errors.New("certs: a host without a name")
	}
	caCert, caKey, err := parse(ca)
	if err != nil {
		return Pair{}, fmt.Errorf("certs: the CA: %w", err)
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: h.Name},
		DNSNames:    []string{h.Name},
		IPAddresses: h.IPs,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	if ip := net.ParseIP(h.Name); ip != nil {
		tmpl.DNSNames, tmpl.IPAddresses = nil, append([]net.IP{ip}, h.IPs...)
	}
	return create(tmpl, caCert, caKey)
}

func create(tmpl *x509.Certificate, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (Pair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Pair{}, fmt.Errorf("certs: key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return Pair{}, fmt.Errorf("certs: serial: %w", err)
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = time.Now().Add(-time.Hour) // hosts whose clocks differ a little
	tmpl.NotAfter = time.Now().Add(Validity)
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		return Pair{}, fmt.Errorf("certs: %s: %w", tmpl.Subject.CommonName, err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return Pair{}, fmt.Errorf("certs: key: %w", err)
	}
	return Pair{
		Cert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		Key:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}),
	}, nil
}

func parse(p Pair) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	cb, _ := pem.Decode(p.Cert)
	kb, _ := pem.Decode(p.Key)
	if cb == nil || kb == nil {
		return nil, nil, errors.New("not a PEM certificate and key")
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, nil, err
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

// Files are where a directory made by WriteDir keeps a host's certificate and key, and the
// CA's.
func Files(dir, name string) (cert, key string) {
	return filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
}

// CAName is the file name (before .crt and .key) of the CA in a directory.
const CAName = "ca"

// WriteDir makes the CA in dir unless it is there already (ca.crt, ca.key) and a certificate
// for each host (NAME.crt, NAME.key), and returns the files it wrote. Keys are readable by
// their owner only. A host's files that exist are refused rather than overwritten.
func WriteDir(dir string, hosts []Host) ([]string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("certs: %w", err)
	}
	var wrote []string
	caCert, caKey := Files(dir, CAName)
	var ca Pair
	var err error
	if ca.Cert, err = os.ReadFile(caCert); err == nil {
		if ca.Key, err = os.ReadFile(caKey); err != nil {
			return nil, fmt.Errorf("certs: the CA's certificate is in %s but its key is not: %w", dir, err)
		}
	} else if errors.Is(err, os.ErrNotExist) {
		if ca, err = NewCA("godwit test CA"); err != nil {
			return nil, err
		}
		if err := writePair(ca, caCert, caKey); err != nil {
			return nil, err
		}
		wrote = append(wrote, caCert, caKey)
	} else {
		return nil, fmt.Errorf("certs: %w", err)
	}
	for _, h := range hosts {
		if h.Name == CAName || filepath.Base(h.Name) != h.Name {
			return wrote, fmt.Errorf("certs: host name %q: want a name that is not %q and has no slash", h.Name, CAName)
		}
		p, err := Issue(ca, h)
		if err != nil {
			return wrote, err
		}
		c, k := Files(dir, h.Name)
		if err := writePair(p, c, k); err != nil {
			return wrote, err
		}
		wrote = append(wrote, c, k)
	}
	return wrote, nil
}

func writePair(p Pair, cert, key string) error {
	for _, f := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{{key, p.Key, 0o600}, {cert, p.Cert, 0o644}} {
		w, err := os.OpenFile(f.path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, f.mode)
		if err != nil {
			return fmt.Errorf("certs: %w", err)
		}
		_, err = w.Write(f.data)
		if cerr := w.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("certs: %w", err)
		}
	}
	return nil
}
