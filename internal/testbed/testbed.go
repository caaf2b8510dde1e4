// Package testbed builds networks of "hosts" on one machine for migration tests: each host is a
// named network namespace, two hosts are joined by a veth pair, and the link can be shaped
// (token bucket filter on both ends), cut and restored.
//
// Everything lives in the testbed's own namespaces: nothing is added to the caller's network
// namespace, and traffic between hosts never leaves the machine. Namespaces are named
// godwit-NAME-hI and appear in /run/netns, so `ip netns exec godwit-NAME-h0 ...` works too.
//
// Requires root (CAP_NET_ADMIN and CAP_SYS_ADMIN for the namespace bind mounts) and the veth and
// sch_tbf kernel modules, which kvmhost VMs load.
package testbed

import (
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Config describes a testbed.
type Config struct {
	// Name identifies the testbed's namespaces; letters, digits, '.', '_' and '-', at most 32
	// characters. Empty picks a name unique to this process. A testbed left behind by a crashed
	// run with the same name is removed by New; one still in use by a live process is an error.
	Name string
	// Hosts is the number of hosts; 0 means 2, and 2 is the only count supported so far (one
	// veth pair).
	Hosts int
	// Bandwidth is the link rate in bits per second in each direction; 0 leaves it unshaped.
	Bandwidth int64
}

// Link parameters of the token bucket filter. The burst is what the link may send at full
// speed after an idle period; the latency bounds the queue (limit = rate x latency + burst),
// beyond which packets are dropped, as on a real bottleneck.
const (
	tbfBurst     = 256 << 10
	tbfLatencyUS = 50_000
)

// IfName is the name of each host's end of the link, inside its namespace.
const IfName = "eth0"

// Testbed is a set of hosts. Its methods are safe for concurrent use.
type Testbed struct {
	name  string
	hosts []*Host
	lock  *os.File // flock held while the testbed exists

	mu        sync.Mutex
	closed    bool
	bandwidth int64
	down      bool // the link is cut
}

// Host is one network namespace of a testbed.
type Host struct {
	tb     *Testbed
	index  int
	netns  string // name in /run/netns
	handle netns.NsHandle
	prefix netip.Prefix
}

var (
	nameRE    = regexp.MustCompile(`^[A-Za-z0-9._-]{1,32}$`)
	autoNames atomic.Int64
)

const (
	netnsDir = "/run/netns"
	lockDir  = "/run/godwit-testbed"
)

func nsName(name string, i int) string { return fmt.Sprintf("godwit-%s-h%d", name, i) }

// New creates a testbed. On error nothing is left behind.
func New(cfg Config) (tb *Testbed, err error) {
	if cfg.Name == "" {
		cfg.Name = fmt.Sprintf("p%d-%d", os.Getpid(), autoNames.Add(1))
	}
	if !nameRE.MatchString(cfg.Name) {
		return nil, fmt.Errorf("testbed: name %q: want 1 to 32 letters, digits, '.', '_' or '-'", cfg.Name)
	}
	if cfg.Hosts == 0 {
		cfg.Hosts = 2
	}
	if cfg.Hosts != 2 {
		return nil, fmt.Errorf("testbed %s: %d hosts requested; only 2 (one veth pair) are supported", cfg.Name, cfg.Hosts)
	}
	if cfg.Bandwidth < 0 {
		return nil, fmt.Errorf("testbed %s: negative bandwidth %d", cfg.Name, cfg.Bandwidth)
	}
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("testbed %s: network namespaces need root (running as uid %d)", cfg.Name, os.Geteuid())
	}

	tb = &Testbed{name: cfg.Name}
	if err := tb.takeLock(); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			tb.Close()
			tb = nil
		}
	}()
	// Leftovers of a crashed run with this name: their namespaces (and with them the veth
	// pair, which lives only inside them) go when the names are deleted.
	if err := removeNamespaces(cfg.Name); err != nil {
		return tb, err
	}

	// Addresses: 10.200.X.0/24 with X derived from the name, so that testbeds are told apart
	// in packet dumps (they cannot clash: each pair of namespaces is its own network).
	h := fnv.New32a()
	h.Write([]byte(cfg.Name))
	x := byte(h.Sum32()%254 + 1)
	for i := range cfg.Hosts {
		host := &Host{tb: tb, index: i, netns: nsName(cfg.Name, i), handle: netns.None(),
			prefix: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 200, x, byte(i + 1)}), 24)}
		tb.hosts = append(tb.hosts, host)
		if host.handle, err = newNamedNetns(host.netns); err != nil {
			return tb, fmt.Errorf("testbed %s: creating network namespace %s: %w", cfg.Name, host.netns, err)
		}
	}

	// The pair is created from the caller's namespace straight into the two hosts', so its
	// names only need to be unique there.
	a, b := tb.hosts[0], tb.hosts[1]
	attrs := netlink.NewLinkAttrs()
	attrs.Name = IfName
	attrs.Namespace = netlink.NsFd(int(a.handle))
	veth := &netlink.Veth{LinkAttrs: attrs, PeerName: IfName, PeerNamespace: netlink.NsFd(int(b.handle))}
	if err := netlink.LinkAdd(veth); err != nil {
		return tb, fmt.Errorf("testbed %s: creating the veth pair (is the veth module loaded?): %w", cfg.Name, err)
	}
	for _, host := range tb.hosts {
		if err := host.setUp(); err != nil {
			return tb, fmt.Errorf("testbed %s: host %d: %w", cfg.Name, host.index, err)
		}
	}
	if err := tb.SetBandwidth(cfg.Bandwidth); err != nil {
		return tb, err
	}
	return tb, nil
}

// takeLock holds an flock on /run/godwit-testbed/NAME.lock while the testbed exists. The kernel
// drops it when the process dies, so a held lock means a live owner, and a free one with
// namespaces present means leftovers.
func (tb *Testbed) takeLock() error {
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		return fmt.Errorf("testbed %s: %w", tb.name, err)
	}
	f, err := os.OpenFile(filepath.Join(lockDir, tb.name+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return fmt.Errorf("testbed %s: %w", tb.name, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return fmt.Errorf("testbed %s is in use by a live testbed (this process or another)", tb.name)
		}
		return fmt.Errorf("testbed %s: locking: %w", tb.name, err)
	}
	tb.lock = f
	return nil
}

// removeNamespaces deletes the named namespaces of testbed name.
func removeNamespaces(name string) error {
	ents, err := os.ReadDir(netnsDir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("testbed %s: listing %s: %w", name, netnsDir, err)
	}
	prefix := "godwit-" + name + "-h"
	var errs []error
	for _, e := range ents {
		if rest, ok := strings.CutPrefix(e.Name(), prefix); ok && isDigits(rest) {
			if err := deleteNamedNetns(e.Name()); err != nil {
				errs = append(errs, fmt.Errorf("removing network namespace %s: %w", e.Name(), err))
			}
		}
	}
	return errors.Join(errs...)
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// newNamedNetns creates a network namespace named in /run/netns and returns a handle to it,
// leaving the calling goroutine's namespace as it was.
func newNamedNetns(name string) (netns.NsHandle, error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return netns.None(), err
	}
	defer orig.Close()
	// NewNamed unshares the calling thread into the new namespace.
	h, err := netns.NewNamed(name)
	if rerr := netns.Set(orig); rerr != nil {
		// This thread is in the wrong namespace for good: leave it locked so that the
		// runtime discards it when the goroutine ends.
		if h.IsOpen() {
			h.Close()
		}
		return netns.None(), fmt.Errorf("returning to the original network namespace: %w", rerr)
	}
	runtime.UnlockOSThread()
	if err != nil {
		// NewNamed may leave the empty name file behind.
		os.Remove(filepath.Join(netnsDir, name))
		return netns.None(), err
	}
	return h, nil
}

func deleteNamedNetns(name string) error {
	err := netns.DeleteNamed(name)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		// Not mounted (a half-created namespace): remove the file anyway.
		if rerr := os.Remove(filepath.Join(netnsDir, name)); rerr == nil || errors.Is(rerr, os.ErrNotExist) {
			return nil
		}
		return err
	}
	return nil
}

// netlinkHandle returns a rtnetlink handle inside the host's namespace. Only NETLINK_ROUTE: by
// default the library also opens xfrm and netfilter sockets, which fail where those modules are
// not loaded (kvmhost VMs).
func (h *Host) netlinkHandle() (*netlink.Handle, error) {
	return netlink.NewHandleAt(h.handle, syscall.NETLINK_ROUTE)
}

// setUp brings up lo and the link end with its address.
func (h *Host) setUp() error {
	nh, err := h.netlinkHandle()
	if err != nil {
		return fmt.Errorf("netlink handle in %s: %w", h.netns, err)
	}
	defer nh.Close()
	lo, err := nh.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("finding lo in %s: %w", h.netns, err)
	}
	if err := nh.LinkSetUp(lo); err != nil {
		return fmt.Errorf("setting lo up in %s: %w", h.netns, err)
	}
	link, err := nh.LinkByName(IfName)
	if err != nil {
		return fmt.Errorf("finding %s in %s: %w", IfName, h.netns, err)
	}
	addr := &netlink.Addr{IPNet: prefixToIPNet(h.prefix)}
	if err := nh.AddrAdd(link, addr); err != nil {
		return fmt.Errorf("adding address %v to %s in %s: %w", h.prefix, IfName, h.netns, err)
	}
	if err := nh.LinkSetUp(link); err != nil {
		return fmt.Errorf("setting %s up in %s: %w", IfName, h.netns, err)
	}
	return nil
}

// Name returns the testbed's name.
func (tb *Testbed) Name() string { return tb.name }

// Hosts returns the number of hosts.
func (tb *Testbed) Hosts() int { return len(tb.hosts) }

// Host returns host i (0-based). It panics if i is out of range.
func (tb *Testbed) Host(i int) *Host { return tb.hosts[i] }

// Bandwidth returns the current link rate in bits per second (0: unshaped).
func (tb *Testbed) Bandwidth() int64 {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	return tb.bandwidth
}

// SetBandwidth shapes both directions of the link to bps bits per second with a token bucket
// filter on each end (0 removes the shaping).
func (tb *Testbed) SetBandwidth(bps int64) error {
	if bps < 0 {
		return fmt.Errorf("testbed %s: negative bandwidth %d", tb.name, bps)
	}
	tb.mu.Lock()
	defer tb.mu.Unlock()
	if tb.closed {
		return fmt.Errorf("testbed %s is closed", tb.name)
	}
	for _, h := range tb.hosts {
		if err := h.shape(bps); err != nil {
			return fmt.Errorf("testbed %s: host %d: %w", tb.name, h.index, err)
		}
	}
	tb.bandwidth = bps
	return nil
}

func (h *Host) shape(bps int64) error {
	nh, err := h.netlinkHandle()
	if err != nil {
		return fmt.Errorf("netlink handle in %s: %w", h.netns, err)
	}
	defer nh.Close()
	link, err := nh.LinkByName(IfName)
	if err != nil {
		return fmt.Errorf("finding %s in %s: %w", IfName, h.netns, err)
	}
	attrs := netlink.QdiscAttrs{LinkIndex: link.Attrs().Index, Handle: netlink.MakeHandle(1, 0), Parent: netlink.HANDLE_ROOT}
	if bps == 0 {
		// Back to the default qdisc. Deleting the root qdisc when there is none fails with
		// ENOENT or EINVAL, which is the state we want.
		err := nh.QdiscDel(&netlink.Tbf{QdiscAttrs: attrs})
		if err != nil && !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.EINVAL) {
			return fmt.Errorf("removing the tbf qdisc from %s in %s: %w", IfName, h.netns, err)
		}
		return nil
	}
	rate := uint64(bps) / 8 // bytes per second
	if rate == 0 {
		return fmt.Errorf("bandwidth %d bit/s is below one byte per second", bps)
	}
	q := &netlink.Tbf{
		QdiscAttrs: attrs,
		Rate:       rate,
		// The kernel takes the bucket size as the time to send it at the rate, in
		// scheduler ticks, and the queue limit in bytes.
		Buffer: netlink.Xmittime(rate, tbfBurst),
		Limit:  uint32(min(rate*tbfLatencyUS/1_000_000+tbfBurst, 1<<31)),
	}
	if err := nh.QdiscReplace(q); err != nil {
		return fmt.Errorf("setting tbf rate %d bit/s on %s in %s (is sch_tbf loaded?): %w", bps, IfName, h.netns, err)
	}
	return nil
}

// SetLink takes both ends of the link down (up=false), cutting the hosts apart, or brings them
// back up (`ip link set eth0 down|up` in each namespace, through netlink). While the link is
// down, open connections stall: their packets are dropped, nothing arrives at either end, and
// TCP resends them once the link is back (after its retransmission backoff), so a peer that
// waits longer than its own timeout declares the connection broken. New connections fail at
// once (the hosts have no route to each other) until the link is up again. The shaping set by
// SetBandwidth stays in force across a cut.
func (tb *Testbed) SetLink(up bool) error {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	if tb.closed {
		return fmt.Errorf("testbed %s is closed", tb.name)
	}
	for _, h := range tb.hosts {
		if err := h.setLink(up); err != nil {
			return fmt.Errorf("testbed %s: host %d: %w", tb.name, h.index, err)
		}
	}
	tb.down = !up
	return nil
}

// CutLink cuts the link now and restores it after d, in the background. The returned function
// restores it at once (if it is still cut) and reports the error of the restore, if any; call
// it before the test ends.
func (tb *Testbed) CutLink(d time.Duration) (restore func() error, err error) {
	if err := tb.SetLink(false); err != nil {
		return nil, err
	}
	var once sync.Once
	var rerr error
	up := func() error {
		once.Do(func() { rerr = tb.SetLink(true) })
		return rerr
	}
	t := time.AfterFunc(d, func() { up() })
	return func() error {
		t.Stop()
		return up()
	}, nil
}

// LinkUp reports whether the link is up (not cut by SetLink or CutLink).
func (tb *Testbed) LinkUp() bool {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	return !tb.down
}

func (h *Host) setLink(up bool) error {
	nh, err := h.netlinkHandle()
	if err != nil {
		return fmt.Errorf("netlink handle in %s: %w", h.netns, err)
	}
	defer nh.Close()
	link, err := nh.LinkByName(IfName)
	if err != nil {
		return fmt.Errorf("finding %s in %s: %w", IfName, h.netns, err)
	}
	if up {
		err = nh.LinkSetUp(link)
	} else {
		err = nh.LinkSetDown(link)
	}
	if err != nil {
		return fmt.Errorf("setting %s up=%v in %s: %w", IfName, up, h.netns, err)
	}
	return nil
}

// Close removes the testbed's namespaces and with them the link. Processes still running in a
// host keep its namespace alive (unnamed) until they exit: stop them first. Close is
// idempotent.
func (tb *Testbed) Close() error {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	if tb.closed {
		return nil
	}
	tb.closed = true
	var errs []error
	for _, h := range tb.hosts {
		if h.handle.IsOpen() {
			h.handle.Close()
		}
	}
	if err := removeNamespaces(tb.name); err != nil {
		errs = append(errs, err)
	}
	if tb.lock != nil {
		os.Remove(tb.lock.Name())
		tb.lock.Close()
	}
	return errors.Join(errs...)
}

// Index returns the host's index in its testbed.
func (h *Host) Index() int { return h.index }

// Netns returns the name of the host's network namespace (as `ip netns` shows it).
func (h *Host) Netns() string { return h.netns }

// NetnsPath returns the path of the host's network namespace file.
func (h *Host) NetnsPath() string { return filepath.Join(netnsDir, h.netns) }

// Addr returns the host's address on the link.
func (h *Host) Addr() netip.Addr { return h.prefix.Addr() }

// Prefix returns the host's address with the link's prefix length.
func (h *Host) Prefix() netip.Prefix { return h.prefix }

// Do runs fn on a thread switched into the host's network namespace. Sockets fn creates
// (listeners, connections) stay in the namespace for their lifetime and may be used from any
// goroutine afterwards; goroutines fn starts do not run in the namespace.
func (h *Host) Do(fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("testbed %s: host %d: current network namespace: %w", h.tb.name, h.index, err)
	}
	defer orig.Close()
	if err := netns.Set(h.handle); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("testbed %s: host %d: entering %s: %w", h.tb.name, h.index, h.netns, err)
	}
	restored := false
	defer func() {
		if restored {
			runtime.UnlockOSThread()
		}
		// Otherwise the thread stays locked and the runtime discards it with the goroutine,
		// rather than letting other goroutines run in the wrong namespace.
	}()
	fnErr := fn()
	if err := netns.Set(orig); err != nil {
		return errors.Join(fnErr, fmt.Errorf("testbed %s: host %d: leaving %s: %w", h.tb.name, h.index, h.netns, err))
	}
	restored = true
	return fnErr
}

// Command returns a command that runs name with args in the host's network namespace (in the
// caller's other namespaces), to be started like any exec.Cmd. It runs through nsenter(1) from
// util-linux, which enters the namespace and then executes the program in place, so the started
// process is the program itself (same PID, signals reach it directly).
func (h *Host) Command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command("nsenter", append([]string{"--net=" + h.NetnsPath(), "--", name}, args...)...)
	if cmd.Err != nil {
		cmd.Err = fmt.Errorf("testbed: running commands in a host needs nsenter (util-linux): %w", cmd.Err)
	}
	return cmd
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
