package certs

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"testing"
)

// TestWriteDir: the CA is made once and reused, host certificates chain to it and hold the
// host's name and addresses for both roles, keys are private, and nothing is overwritten.
func TestWriteDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	if _, err := WriteDir(dir, []Host{{Name: "a", IPs: []net.IP{net.IPv4(10, 0, 0, 1)}}}); err != nil {
		t.Fatal(err)
	}
	caCert, _ := Files(dir, CAName)
	ca1, _ := os.ReadFile(caCert)
	wrote, err := WriteDir(dir, []Host{{Name: "b"}})
	if err != nil || len(wrote) != 2 {
		t.Fatalf("a second host: wrote %v, %v (want its two files, the CA reused)", wrote, err)
	}
	if ca2, _ := os.ReadFile(caCert); string(ca1) != string(ca2) {
		t.Fatal("the CA was made again")
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca1)
	c, k := Files(dir, "a")
	pair, err := tls.LoadX509KeyPair(c, k)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(pair.Certificate[0])
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Errorf("usage %v: %v", usage, err)
		}
	}
	if leaf.VerifyHostname("a") != nil || leaf.VerifyHostname("10.0.0.1") != nil || leaf.VerifyHostname("b") == nil {
		t.Errorf("names %v %v", leaf.DNSNames, leaf.IPAddresses)
	}
	if fi, err := os.Stat(k); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key mode: %v %v", fi.Mode(), err)
	}
	if _, err := WriteDir(dir, []Host{{Name: "a"}}); err == nil {
		t.Error("a host whose files exist: overwritten")
	}
	for _, bad := range []string{"", "ca", "x/y"} {
		if _, err := WriteDir(dir, []Host{{Name: bad}}); err == nil {
			t.Errorf("host name %q accepted", bad)
		}
	}
}
