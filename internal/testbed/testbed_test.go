package testbed

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// requireRoot fails, never skips: a run without root must not pass the network tests silently.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("testbed tests need root for network namespaces (uid %d)", os.Geteuid())
	}
}

func newTestbed(t *testing.T, cfg Config) *Testbed {
	t.Helper()
	requireRoot(t)
	tb, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tb.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return tb
}

// listen opens a TCP listener in host h on port 0 and returns it with its address.
func listen(t *testing.T, h *Host) (net.Listener, string) {
	t.Helper()
	var l net.Listener
	err := h.Do(func() (err error) {
		l, err = net.Listen("tcp", netip.AddrPortFrom(h.Addr(), 0).String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, l.Addr().String()
}

func dial(t *testing.T, h *Host, addr string) net.Conn {
	t.Helper()
	var c net.Conn
	err := h.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", addr, 10*time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("host %d dialing %s: %v", h.Index(), addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestHostsTalkTCP(t *testing.T) {
	tb := newTestbed(t, Config{Name: "talk"})
	a, b := tb.Host(0), tb.Host(1)
	if a.Addr() == b.Addr() || !a.Prefix().Contains(b.Addr()) {
		t.Fatalf("addresses %v and %v are not distinct hosts of one subnet", a.Prefix(), b.Prefix())
	}
	l, addr := listen(t, b)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		// Echo, reporting the peer's address.
		line, _ := bufio.NewReader(c).ReadString('\n')
		fmt.Fprintf(c, "%s from %s", line, c.RemoteAddr().(*net.TCPAddr).IP)
	}()
	c := dial(t, a, addr)
	fmt.Fprintf(c, "hello\n")
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if want := "hello\n from " + a.Addr().String(); string(got) != want {
		t.Errorf("got %q, want %q", got, want)
	}

	// The caller's namespace has no route to the testbed.
	if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
		c.Close()
		t.Errorf("dialing %s from the test's own namespace succeeded", addr)
	}
}

func TestCommandRunsInHost(t *testing.T) {
	tb := newTestbed(t, Config{Name: "cmd"})
	h := tb.Host(1)
	out, err := h.Command("readlink", "/proc/self/ns/net").Output()
	if err != nil {
		t.Fatalf("readlink in host 1: %v", err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(h.NetnsPath(), &st); err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("net:[%d]", st.Ino); strings.TrimSpace(string(out)) != want {
		t.Errorf("command's namespace %q, want %q", strings.TrimSpace(string(out)), want)
	}
	// The command sees the host's interface and address.
	out, err = h.Command("ip", "-o", "addr", "show", "dev", IfName).Output()
	if err != nil {
		t.Fatalf("ip addr in host 1: %v", err)
	}
	if !strings.Contains(string(out), h.Prefix().String()) {
		t.Errorf("ip addr in host 1 shows %q, want %v", out, h.Prefix())
	}
	// The test's own thread is back in its namespace.
	self, _ := os.Readlink("/proc/thread-self/ns/net")
	if self == strings.TrimSpace(string(out)) {
		t.Errorf("the caller is in the host's namespace")
	}
	if err := tb.Host(0).Command("kvmhost-no-such-program").Run(); err == nil {
		t.Error("a missing program ran")
	}
}

// transfer sends as fast as possible from host src to host dst for d and returns the receiver's
// rate in bits per second, measured after the first quarter of d (slow start, the bucket's
// initial burst).
func transfer(t *testing.T, src, dst *Host, d time.Duration) float64 {
	t.Helper()
	l, addr := listen(t, dst)
	type mark struct {
		at time.Time
		n  int64
	}
	var received atomic.Int64
	doneRecv := make(chan struct{})
	go func() {
		defer close(doneRecv)
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 1<<20)
		for {
			n, err := c.Read(buf)
			received.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()
	c := dial(t, src, addr)
	stop := make(chan struct{})
	go func() {
		buf := make([]byte, 1<<20)
		for {
			select {
			case <-stop:
				c.Close()
				return
			default:
			}
			c.SetWriteDeadline(time.Now().Add(time.Second))
			if _, err := c.Write(buf); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				return
			}
		}
	}()
	time.Sleep(d / 4)
	m0 := mark{time.Now(), received.Load()}
	time.Sleep(d * 3 / 4)
	m1 := mark{time.Now(), received.Load()}
	close(stop)
	<-doneRecv
	return float64(m1.n-m0.n) * 8 / m1.at.Sub(m0.at).Seconds()
}

func fmtRate(bps float64) string { return strconv.FormatFloat(bps/1e6, 'f', 0, 64) + " Mbit/s" }

// TestBandwidth measures bulk TCP throughput unshaped, shaped to 1 Gbit/s, and changed at run
// time to 100 Mbit/s. Inside an emulated kvmhost VM the unshaped link may itself be slower than
// 1 Gbit/s, so the 1 Gbit/s check is against what the link can do.
func TestBandwidth(t *testing.T) {
	tb := newTestbed(t, Config{Name: "bw", Bandwidth: 1_000_000_000})
	a, b := tb.Host(0), tb.Host(1)
	const d = 3 * time.Second

	shaped := transfer(t, a, b, d)
	if err := tb.SetBandwidth(0); err != nil {
		t.Fatal(err)
	}
	unshaped := transfer(t, a, b, d)
	if err := tb.SetBandwidth(100_000_000); err != nil {
		t.Fatal(err)
	}
	slow := transfer(t, b, a, d)
	t.Logf("bulk TCP throughput: unshaped %s, shaped to 1 Gbit/s %s, shaped to 100 Mbit/s (reverse direction) %s",
		fmtRate(unshaped), fmtRate(shaped), fmtRate(slow))

	check := func(what string, got, want float64) {
		if got < 0.5*want || got > 1.2*want {
			t.Errorf("%s: %s, want within 0.5x..1.2x of %s", what, fmtRate(got), fmtRate(want))
		}
	}
	check("shaped to 100 Mbit/s", slow, 1e8)
	if unshaped >= 2e9 {
		check("shaped to 1 Gbit/s", shaped, 1e9)
		if unshaped < 2*shaped {
			t.Errorf("unshaped %s is not clearly faster than shaped %s", fmtRate(unshaped), fmtRate(shaped))
		}
	} else {
		// The CPU, not the shaper, limits the link (an emulated VM): the shaper must not
		// exceed its rate nor, loosely, cost much of what the link can do.
		t.Logf("the unshaped link carries less than 2 Gbit/s: checking the 1 Gbit/s shaping loosely")
		if shaped > 1.2e9 || shaped < 0.3*unshaped {
			t.Errorf("shaped to 1 Gbit/s: %s, want at most 1200 Mbit/s and at least 0.3x the unshaped %s",
				fmtRate(shaped), fmtRate(unshaped))
		}
	}
	if unshaped < 2e8 {
		t.Errorf("unshaped link only carries %s", fmtRate(unshaped))
	}
}

// TestLinkCutAndRestore: a transfer stalls while the link is down and continues on the same
// connection once it is up again.
func TestLinkCutAndRestore(t *testing.T) {
	tb := newTestbed(t, Config{Name: "cut", Bandwidth: 100_000_000})
	a, b := tb.Host(0), tb.Host(1)
	l, addr := listen(t, b)
	var received atomic.Int64
	recvErr := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			recvErr <- err
			return
		}
		defer c.Close()
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			received.Add(int64(n))
			if err != nil {
				recvErr <- err
				return
			}
		}
	}()
	c := dial(t, a, addr)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sendErr := make(chan error, 1)
	go func() {
		buf := make([]byte, 16<<10)
		for ctx.Err() == nil {
			c.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
			if _, err := c.Write(buf); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				sendErr <- err
				return
			}
		}
		sendErr <- nil
	}()

	waitFor := func(what string, limit time.Duration, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(limit)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within %v (received %d bytes)", what, limit, received.Load())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitFor("data flowing", 10*time.Second, func() bool { return received.Load() > 1<<20 })

	if err := tb.SetLink(false); err != nil {
		t.Fatal(err)
	}
	// Let what was in flight drain, then nothing more may arrive.
	time.Sleep(300 * time.Millisecond)
	before := received.Load()
	time.Sleep(1500 * time.Millisecond)
	if after := received.Load(); after != before {
		t.Fatalf("%d bytes arrived while the link was down", after-before)
	}

	if err := tb.SetLink(true); err != nil {
		t.Fatal(err)
	}
	restored := time.Now()
	// TCP resends after its backoff (a few hundred ms to a few s after this short cut).
	waitFor("data flowing again after restore", 30*time.Second, func() bool { return received.Load() > before+1<<20 })
	t.Logf("transfer resumed %v after the link came back", time.Since(restored).Round(time.Millisecond))
	select {
	case err := <-recvErr:
		t.Fatalf("receiver ended: %v", err)
	case err := <-sendErr:
		t.Fatalf("sender ended: %v", err)
	default:
	}
	cancel()
}

func netnsNames(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir(netnsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func hasPrefix(names []string, prefix string) []string {
	var out []string
	for _, n := range names {
		if strings.HasPrefix(n, prefix) {
			out = append(out, n)
		}
	}
	return out
}

func TestCloseRemovesEverything(t *testing.T) {
	requireRoot(t)
	tb, err := New(Config{Name: "close", Bandwidth: 1e9})
	if err != nil {
		t.Fatal(err)
	}
	if got := hasPrefix(netnsNames(t), "godwit-close-"); len(got) != 2 {
		t.Fatalf("namespaces while open: %v, want 2", got)
	}
	// Keep a handle on a host's namespace to see inside it after Close.
	h, err := netns.GetFromPath(tb.Host(0).NetnsPath())
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := tb.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tb.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if got := hasPrefix(netnsNames(t), "godwit-close-"); len(got) != 0 {
		t.Errorf("namespaces left after Close: %v", got)
	}
	if _, err := os.Stat(lockDir + "/close.lock"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lock file left after Close: %v", err)
	}
	if err := tb.SetLink(true); err == nil {
		t.Error("SetLink on a closed testbed succeeded")
	}
	// The caller's namespace never had any of the testbed's links.
	links, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		if strings.HasPrefix(l.Name, "godwit") {
			t.Errorf("link %s in the caller's namespace", l.Name)
		}
	}
	// A new testbed of the same name works at once.
	tb2 := newTestbed(t, Config{Name: "close"})
	tb2.Close()
}

// TestLeftoversOfCrashedRun: namespaces of a previous run whose process died (no lock held) are
// removed by New; a testbed still in use is not touched.
func TestLeftoversOfCrashedRun(t *testing.T) {
	requireRoot(t)
	for _, n := range []string{"godwit-crashed-h0", "godwit-crashed-h1", "godwit-crashed-h7"} {
		h, err := newNamedNetns(n)
		if err != nil {
			t.Fatal(err)
		}
		h.Close()
	}
	t.Cleanup(func() { removeNamespaces("crashed") })
	tb := newTestbed(t, Config{Name: "crashed"})
	if got := hasPrefix(netnsNames(t), "godwit-crashed-"); len(got) != 2 {
		t.Errorf("namespaces after New over leftovers: %v, want h0 and h1 only", got)
	}
	if _, err := New(Config{Name: "crashed"}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("second New with a live name: %v, want an in-use error", err)
	}
	// And the live testbed still works.
	l, addr := listen(t, tb.Host(1))
	go func() {
		if c, err := l.Accept(); err == nil {
			c.Close()
		}
	}()
	dial(t, tb.Host(0), addr)
}

func TestConfigErrors(t *testing.T) {
	requireRoot(t)
	for _, cfg := range []Config{
		{Name: "bad/name"},
		{Name: strings.Repeat("x", 33)},
		{Name: "three", Hosts: 3},
		{Name: "neg", Bandwidth: -1},
	} {
		if tb, err := New(cfg); err == nil {
			tb.Close()
			t.Errorf("New(%+v) succeeded", cfg)
		}
	}
	if got := hasPrefix(netnsNames(t), "godwit-three-"); len(got) != 0 {
		t.Errorf("failed New left namespaces: %v", got)
	}
	// An empty name picks a unique one.
	tb1 := newTestbed(t, Config{})
	tb2 := newTestbed(t, Config{})
	if tb1.Name() == tb2.Name() {
		t.Errorf("two unnamed testbeds share the name %q", tb1.Name())
	}
}

// TestCutLinkRedials: while the link is cut a peer waiting on an open connection hears nothing
// (as the migration engine's link timeout needs) and new connections fail; once CutLink
// restores it, a redial succeeds and the link is still shaped.
func TestCutLinkRedials(t *testing.T) {
	tb := newTestbed(t, Config{Name: "redial", Bandwidth: 100_000_000})
	a, b := tb.Host(0), tb.Host(1)
	l, addr := listen(t, b)
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	c := dial(t, a, addr)
	srv := <-accepted
	defer srv.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(srv, buf); err != nil {
		t.Fatal(err)
	}

	const cut = 3 * time.Second
	restore, err := tb.CutLink(cut)
	if err != nil {
		t.Fatal(err)
	}
	defer restore()
	cutAt := time.Now()
	if tb.LinkUp() {
		t.Fatal("LinkUp after CutLink")
	}
	// The open connection stalls: a write is accepted locally, nothing arrives.
	if _, err := c.Write([]byte("lost")); err != nil {
		t.Fatalf("write on a cut link: %v (want it queued)", err)
	}
	srv.SetReadDeadline(time.Now().Add(time.Second))
	if n, err := srv.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read on a cut link: %d bytes, %v; want a timeout", n, err)
	}
	// Redials fail, and quickly.
	var derr error
	var dialTook time.Duration
	a.Do(func() error {
		start := time.Now()
		var dc net.Conn
		dc, derr = net.DialTimeout("tcp", addr, time.Second)
		dialTook = time.Since(start)
		if dc != nil {
			dc.Close()
		}
		return nil
	})
	if derr == nil {
		t.Fatal("dial across a cut link succeeded")
	}
	t.Logf("dial across the cut link: %v after %v", derr, dialTook.Round(time.Millisecond))

	// The link comes back by itself after the cut; a redial then succeeds.
	deadline := cutAt.Add(cut + 10*time.Second)
	var c2 net.Conn
	for c2 == nil {
		if time.Now().After(deadline) {
			t.Fatalf("no connection within %v of the cut (link up: %v)", cut+10*time.Second, tb.LinkUp())
		}
		a.Do(func() (err error) {
			c2, err = net.DialTimeout("tcp", addr, 500*time.Millisecond)
			return err
		})
		if c2 == nil {
			time.Sleep(100 * time.Millisecond)
		}
	}
	defer c2.Close()
	if since := time.Since(cutAt); since < cut {
		t.Fatalf("redial succeeded %v after a cut of %v", since, cut)
	}
	if !tb.LinkUp() {
		t.Fatal("LinkUp false after the restore")
	}
	if err := restore(); err != nil {
		t.Fatalf("restore after the automatic restore: %v", err)
	}
	// The stalled bytes arrive on the old connection too.
	srv.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.ReadFull(srv, buf); err != nil || string(buf) != "lost" {
		t.Fatalf("old connection after restore: %q, %v", buf, err)
	}
	c2.Close()
	srv.SetReadDeadline(time.Time{})

	if got := transfer(t, a, b, 2*time.Second); got > 1.2e8 || got < 0.5e8 {
		t.Errorf("after the cut: %s, want the 100 Mbit/s shaping still in force", fmtRate(got))
	}
}
