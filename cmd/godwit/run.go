package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/transport"
	"github.com/godwit-vm/godwit/internal/vmm"
	"github.com/godwit-vm/godwit/migration"
)

// WorkloadFlags choose what the built-in guest does.
type WorkloadFlags struct {
	Workload string `enum:"idle,dirty,churn" default:"idle" help:"idle: touch a fraction of memory once, then only heartbeat; dirty: rewrite pages of a working set at a rate; churn: a page allocator that writes every page once, frees all but --touch of them (they keep their stale content), then frees and allocates (and writes) pages at random at --rate; it reports its free pages to a migration (see 'migrate --free-pages') (${enum})."`
	WSS      Size   `name:"wss" default:"64M" help:"dirty: working set size, split evenly between vCPUs."`
	Rate     Rate   `default:"max" help:"dirty: page writes per second over all vCPUs (churn: allocations, each with a free and a page write), or 'max' for as fast as the guest can."`
	Pattern  string `enum:"sequential,random,hotcold" default:"random" help:"dirty: which pages of the working set are written (${enum})."`
	Content  string `enum:"zero,text,random,image,patch" default:"text" help:"Page content: zero pages, compressible text, incompressible random, image-like pages that repeat within and across VMs of the same seed, or patch: text pages of which each write changes one 64-byte slot (what 'migrate --delta' is for) (${enum})."`
	Seed     uint64 `default:"1" help:"Seed of page content and write pattern."`
	// Gangs of VMs cloned from one image: what they share, and what is their own.
	Private     float64       `default:"0" help:"image: fraction of pages that are the VM's own (random, from --private-seed) beside the pool it shares with every VM of the same --seed (0..1)."`
	Near        float64       `default:"0" help:"image: fraction of pages that are near-duplicates: a pool page with 4 of its 8-byte words changed, where and to what by --private-seed; what sub-page deduplication and differential compression find (0..1; with --private at most 1)."`
	ImagePool   int           `name:"image-pool" default:"256" help:"image: how many distinct pages the image's pool holds. With a pool smaller than the VM, pages repeat within each VM (what a migration's own dedup finds); with one as large as the VM, each VM holds most pool pages once, and only VMs of the same --seed share them (what a gang's dedup across VMs finds)."`
	PrivateSeed uint64        `name:"private-seed" default:"0" help:"image: seed of the VM's own pages and of its near-duplicates' changes; 0 = from the VM's name, so that VMs of different names differ."`
	Touch       float64       `default:"0.25" help:"idle: fraction of memory the guest writes once at start; churn: fraction of its pages allocated (0..1)."`
	Peak        float64       `default:"0" help:"churn: make the allocated fraction swing between --touch and this one (above --touch, at most 1): units of work that only allocate until it is reached, then units that only free down to --touch, at --rate. A guest that needs memory again takes it back out of its balloon (deflate on demand). 0 = no swing."`
	Batch       int           `default:"64" help:"Pages written per unit of work; the guest heartbeats once per unit."`
	HotSize     float64       `name:"hot-size" default:"0.1" help:"hotcold: fraction of the working set that is hot."`
	HotProb     float64       `name:"hot-prob" default:"0.9" help:"hotcold: fraction of writes that go to the hot part."`
	Interval    time.Duration `name:"idle-interval" default:"1ms" help:"idle: time between heartbeats."`
}

// RunCmd is 'godwit run'.
type RunCmd struct {
	Name            string        `default:"vm" help:"The VM's name."`
	Mem             Size          `default:"1G" help:"Guest memory: a size such as 512M or 1G (a plain number means MiB)."`
	VCPUs           int           `name:"vcpus" default:"1" help:"Number of vCPUs; each runs the workload on its own slice of memory."`
	Control         string        `placeholder:"PATH" help:"Control socket to serve (default /run/godwit/NAME.sock)."`
	KVMDevice       string        `name:"kvm-device" default:"/dev/kvm" help:"The KVM device."`
	Incoming        string        `placeholder:"tcp:HOST:PORT|unix:PATH|routed:PATH" help:"Wait for a VM migrated to this address (unix:PATH: a Unix socket, for a migration within this host; routed:PATH: a Unix socket on which an agent passes on the connections it takes on its port for this migration) instead of booting one; its size and workload come from the source. The listener stays open until the migration ends, for a post-copy source that reconnects."`
	IncomingTimeout time.Duration `name:"incoming-timeout" default:"0s" placeholder:"DURATION" help:"With --incoming: give up and end if no migration has connected after this long. 0 = wait as long as it takes."`
	// LinkTimeout is the destination's side of 'migrate --link-timeout'.
	LinkTimeout time.Duration `name:"link-timeout" default:"3s" placeholder:"DURATION" help:"With --incoming, in post-copy: a link on which nothing arrives for this long is broken; then the VM waits for the source to reconnect. Give the same value as the source's 'migrate --link-timeout'. Default ${default}."`
	// DirtyTracking is vmm.Config.DirtyTracking.
	Balloon       string `default:"0" placeholder:"SIZE|auto[:SHARE]" help:"churn: self-ballooning from the start: keep SIZE of free guest memory in the guest's balloon, or with auto a SHARE (0..1, default 0.9) of whatever is free as it comes and goes; the VMM releases ballooned memory to the host, and no migration sends it. 0 = none. Change it later with 'godwit balloon'. Default ${default}."`
	DirtyTracking string `name:"dirty-tracking" enum:"auto,ring,bitmap" default:"auto" help:"How a migration away from this VM learns of the pages the guest writes: ring, KVM's dirty ring (its cost follows the pages written), or bitmap, KVM's dirty bitmap (its cost follows the memory's size, written or not); auto takes the ring where KVM offers it. The migration report says which (${enum})."`
	MemoryFile    string `name:"memory-file" placeholder:"PATH" help:"Put guest memory in this file on shared memory (tmpfs such as /dev/shm, hugetlbfs, or a DAX device) instead of anonymous memory: another host that maps the same memory can take the VM over with 'migrate --shared-memory', which copies no page. The file must not exist; it holds the memory and a label page that names it. With --incoming: the memory file of the VM to come, as this host sees it (the source's, for --shared-memory; else a new one). The file stays when the VM ends."`
	TLSFlags
	Template    string  `placeholder:"ID" help:"Clone the VM from this template (its id or enough of its first digits; see 'godwit template'): its memory maps the template's copy-on-write, so clones share every page they do not write, and it continues where the template's VM was paused. Size, vCPUs and workload are the template's (--mem, --vcpus and the workload flags do not apply). A clone migrates by pre-copy to a host whose store holds the template, sending only the pages it changed."`
	Diverge     float64 `default:"0" help:"With --template: the fraction of its data pages (0..1) the clone rewrites once as it starts, with content of its own (from --diverge-seed): the private data clones of one template hold."`
	DivergeSeed uint32  `name:"diverge-seed" default:"0" help:"With --diverge: the seed of what the clone writes; 0 = from the VM's name."`
	TemplateStoreFlag
	Localize bool `help:"With --incoming and --memory-file: once the migration is over, move guest memory out of the memory file into memory of this process while the guest runs (copy rounds with the dirty log on, then a pause of a millisecond or two for the last pages), as a VM that arrived on a shared memory pool moves into the host's own memory. Stats show it; migrating the VM on waits until it is done. The memory file stays, for its owner to remove."`
	WorkloadFlags
}

func (c *RunCmd) controlPath() string {
	if c.Control != "" {
		return c.Control
	}
	return filepath.Join("/run/godwit", c.Name+".sock")
}

// workloadDescription is what stats and the destination of a migration show of the workload.
func (c *RunCmd) workloadDescription() map[string]any {
	w := map[string]any{"workload": c.Workload, "content": c.Content, "seed": c.Seed}
	switch c.Workload {
	case "dirty":
		w["wss"] = uint64(c.WSS)
		w["rate"] = c.Rate.String()
		w["pattern"] = c.Pattern
	case "churn":
		w["touch"] = c.Touch
		if c.Peak > 0 {
			w["peak"] = c.Peak
		}
		w["rate"] = c.Rate.String()
	default:
		w["touch"] = c.Touch
	}
	if c.Content == "image" && (c.Private > 0 || c.Near > 0) {
		w["private"], w["near"] = c.Private, c.Near
	}
	return w
}

func (c *RunCmd) Run(g *Globals, ctx context.Context) error {
	if c.TLSFlags.given() && c.Incoming == "" {
		return errors.New("--tls-* secure an incoming migration: they need --incoming (for a migration away, give them to 'godwit migrate')")
	}
	if c.Localize && (c.Incoming == "" || c.MemoryFile == "") {
		return errors.New("--localize moves the memory of a VM that arrives in a memory file: it needs --incoming and --memory-file")
	}
	if c.IncomingTimeout < 0 || (c.IncomingTimeout > 0 && c.Incoming == "") {
		return fmt.Errorf("--incoming-timeout %v: want a positive duration, with --incoming", c.IncomingTimeout)
	}
	if c.Template != "" && (c.Incoming != "" || c.MemoryFile != "" || c.Balloon != "0") {
		return errors.New("--template clones a VM: its memory is the template's, so it takes no --incoming, --memory-file or --balloon")
	}
	if c.Diverge < 0 || c.Diverge > 1 || (c.Diverge > 0 && c.Template == "") {
		return fmt.Errorf("--diverge %v: want a fraction 0..1, with --template", c.Diverge)
	}
	if g.Agent != "" {
		return c.runUnderAgent(g, ctx)
	}
	if c.Template != "" {
		return c.runClone(g, ctx)
	}
	if c.Incoming != "" {
		return c.runIncoming(g, ctx)
	}
	params, err := c.paramsBuilder()
	if err != nil {
		return err
	}
	balloon, err := vmm.ParseBalloon(c.Balloon, parseSize)
	if err != nil {
		return fmt.Errorf("--balloon: %w", err)
	}
	m, err := vmm.New(vmm.Config{
		Name: c.Name, MemBytes: uint64(c.Mem), VCPUs: c.VCPUs, KVMDevice: c.KVMDevice,
		Image: guest.Image, Params: params, Workload: c.workloadDescription(),
		Console: consolePrinter(g), DirtyTracking: c.DirtyTracking, MemoryFile: c.MemoryFile,
	})
	if err != nil {
		return err
	}
	defer m.Close()
	if balloon != (vmm.Balloon{}) {
		if err := m.SetBalloon(balloon); err != nil {
			return fmt.Errorf("--balloon: %w", err)
		}
	}
	p, err := newVMProcess(g, c.Name, c.controlPath())
	if err != nil {
		return err
	}
	defer p.close()
	p.setMachine(m)
	if err := m.Start(); err != nil {
		return err
	}
	return p.run(ctx, m)
}

// runClone runs a VM cloned from a template.
func (c *RunCmd) runClone(g *Globals, ctx context.Context) error {
	t, err := c.store().Find(c.Template)
	if err != nil {
		return fmt.Errorf("--template: %w", err)
	}
	tsecs, err := t.Sections()
	if err != nil {
		return fmt.Errorf("--template: %w", err)
	}
	secs := make([]vmm.Section, len(tsecs))
	for i, s := range tsecs {
		secs[i] = vmm.Section{ID: s.ID, Version: s.Version, Data: s.Data}
	}
	m, err := vmm.NewClone(vmm.Config{
		Name: c.Name, MemBytes: t.Meta.MemBytes, VCPUs: t.Meta.VCPUs, KVMDevice: c.KVMDevice,
		Console: consolePrinter(g), DirtyTracking: c.DirtyTracking,
		Clone: &vmm.CloneSource{ID: t.ID, MemoryPath: t.MemoryPath()},
	}, secs)
	if err != nil {
		return err
	}
	defer m.Close()
	p, err := newVMProcess(g, c.Name, c.controlPath())
	if err != nil {
		return err
	}
	defer p.close()
	p.setMachine(m)
	if c.Diverge > 0 {
		salt := c.DivergeSeed
		if salt == 0 {
			salt = cloneSalt(c.Name)
		}
		if err := m.Diverge(uint32(c.Diverge*1000+0.5), salt); err != nil {
			return fmt.Errorf("--diverge: %w", err)
		}
	}
	if err := m.Start(); err != nil {
		return err
	}
	if !g.JSON {
		fmt.Fprintf(os.Stderr, "godwit: VM %q cloned from template %s\n", c.Name, t.ID.Short())
	}
	return p.run(ctx, m)
}

// bases finds a template of the store by id, for an incoming clone.
func (c *RunCmd) bases(id [32]byte) (string, error) {
	t, err := c.store().Get(id)
	if err != nil {
		return "", fmt.Errorf("%w (push it with 'godwit template push')", err)
	}
	return t.MemoryPath(), nil
}

// runIncoming waits for one incoming migration, then runs the machine it brought. The listener
// stays open until the migration ends: after a switch to post-copy, a source whose link broke
// reconnects on it (the engine checks that the new connection belongs to the same migration).
func (c *RunCmd) runIncoming(g *Globals, ctx context.Context) error {
	addr, err := transport.Parse(c.Incoming)
	if err != nil {
		return fmt.Errorf("--incoming: %w", err)
	}
	if c.LinkTimeout <= 0 {
		return fmt.Errorf("--link-timeout %v: want a positive duration", c.LinkTimeout)
	}
	if err := c.TLSFlags.check(addr); err != nil {
		return fmt.Errorf("--incoming: %w", err)
	}
	if addr.Security, err = c.TLSFlags.security(); err != nil {
		return fmt.Errorf("--incoming: %w", err)
	}
	if addr.Security != nil {
		addr.Security.Refused = func(from net.Addr, err error) {
			fmt.Fprintf(os.Stderr, "godwit: VM %q: refused a connection from %s: %v\n", c.Name, from, err)
		}
	}
	p, err := newVMProcess(g, c.Name, c.controlPath())
	if err != nil {
		return err
	}
	defer p.close()
	ln, err := addr.Listen()
	if err != nil {
		return fmt.Errorf("--incoming: %w", err)
	}
	acc := newAcceptor(ln)
	defer acc.close()
	p.mu.Lock()
	p.incoming = ln.Addr().String()
	p.mu.Unlock()
	if !g.JSON {
		fmt.Printf("godwit: VM %q waiting for an incoming migration on %s; control socket %s\n", c.Name, ln.Addr(), c.controlPath())
	}
	conn, err := acc.first(ctx, c.IncomingTimeout)
	if err != nil {
		if g.JSON {
			printJSON(runSummary{Result: "failed", Error: err.Error()})
			return exitError{1}
		}
		return err
	}
	// Which godwit receives it, for matching the two sides' logs (the source logs its own).
	fmt.Fprintf(os.Stderr, "godwit: VM %q: incoming migration from %s; %s\n", c.Name, conn.RemoteAddr(), versionLine())
	vdst := &vmm.MigrationDestination{Template: vmm.Config{Name: c.Name, KVMDevice: c.KVMDevice, Console: consolePrinter(g), DirtyTracking: c.DirtyTracking, MemoryFile: c.MemoryFile}}
	vdst.Bases = c.bases
	dst := arrivingDestination{vdst, func() { p.arriving(vdst.M) }}
	opts := migration.ReceiveOptions{
		LinkTimeout: c.LinkTimeout,
		// The source's extra page connections arrive on the same port.
		AcceptStream: func(ctx context.Context) (io.ReadWriter, error) { return acc.next(ctx) },
		Reconnect: func(ctx context.Context) (io.ReadWriter, error) {
			fmt.Fprintf(os.Stderr, "godwit: VM %q: the link to the source broke during post-copy; waiting for it to reconnect on %s\n", c.Name, ln.Addr())
			acc.closeAccepted() // the engine has given up on them
			conn, err := acc.next(ctx)
			if err == nil {
				fmt.Fprintf(os.Stderr, "godwit: VM %q: the source reconnected from %s\n", c.Name, conn.RemoteAddr())
			}
			return conn, err
		},
	}
	rep, err := migration.Receive(ctx, dst, conn, opts)
	acc.close() // the migration has ended: no more connections
	if err != nil {
		if g.JSON {
			printJSON(runSummary{Result: "failed", Error: err.Error(), Incoming: rep})
			return exitError{1}
		}
		return fmt.Errorf("incoming migration failed: %w", err)
	}
	m := vdst.M
	defer m.Close()
	p.mu.Lock()
	p.inReport = rep
	p.localizing = c.Localize // before the machine shows: no migration away may start first
	p.mu.Unlock()
	p.setMachine(m)
	if c.Localize {
		go p.localize(ctx, m)
	}
	return p.run(ctx, m)
}

// arrivingDestination is the machine's migration destination, which also shows the machine on
// the control socket as soon as it runs: during a post-copy, before every page has arrived, its
// stats and verify work (the guest's accesses to missing pages are demand faults).
type arrivingDestination struct {
	*vmm.MigrationDestination
	started func()
}

// faultEnv names a fault to inject into an incoming migration, for the tests of what a
// failure leaves behind: faultExitAfterAdopt makes the process die once it has mapped the
// memory of a handover, before it answers.
const (
	faultEnv            = "GODWIT_FAULT"
	faultExitAfterAdopt = "exit-after-adopt"
	// faultDedupCollide gives every page the same dedup hash at the source: each page after
	// the first is a candidate reference to another's content, which the destination's check
	// must refuse.
	faultDedupCollide = "dedup-collide"
)

func (d arrivingDestination) AdoptMemory(desc migration.Description, fds []int) error {
	if err := d.MigrationDestination.AdoptMemory(desc, fds); err != nil {
		return err
	}
	if os.Getenv(faultEnv) == faultExitAfterAdopt {
		fmt.Fprintf(os.Stderr, "godwit: %s=%s: exiting with the memory handed over mapped\n", faultEnv, faultExitAfterAdopt)
		os.Exit(3)
	}
	return nil
}

func (d arrivingDestination) Start() error {
	if err := d.MigrationDestination.Start(); err != nil {
		return err
	}
	d.started()
	return nil
}

// acceptor accepts connections on an incoming migration's listener until closed, and closes
// on close every connection it handed out.
type acceptor struct {
	ln    net.Listener
	conns chan net.Conn
	errc  chan error
	quit  chan struct{} // closed by close

	mu     sync.Mutex
	closed bool
	all    []net.Conn
}

func newAcceptor(ln net.Listener) *acceptor {
	a := &acceptor{ln: ln, conns: make(chan net.Conn), errc: make(chan error, 1), quit: make(chan struct{})}
	go a.loop()
	return a
}

func (a *acceptor) loop() {
	for {
		c, err := a.ln.Accept()
		if err != nil {
			a.errc <- err
			return
		}
		a.mu.Lock()
		if a.closed {
			a.mu.Unlock()
			c.Close()
			continue
		}
		a.mu.Unlock()
		select {
		case a.conns <- c:
			a.mu.Lock()
			a.all = append(a.all, c)
			a.mu.Unlock()
		case <-a.quit:
			c.Close()
		}
	}
}

// first waits for an incoming migration's first connection, for at most timeout (0: as long as
// it takes), and says why there was none.
func (a *acceptor) first(ctx context.Context, timeout time.Duration) (net.Conn, error) {
	first := ctx
	if timeout > 0 {
		var cancel context.CancelFunc
		first, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	conn, err := a.next(first)
	switch {
	case err == nil:
		return conn, nil
	case ctx.Err() != nil:
		return nil, errors.New("interrupted while waiting for an incoming migration")
	case first.Err() != nil:
		return nil, fmt.Errorf("no migration connected within --incoming-timeout %v", timeout)
	}
	return nil, fmt.Errorf("--incoming: accept: %w", err)
}

// next returns the next connection, or an error when ctx is done or the listener failed.
func (a *acceptor) next(ctx context.Context) (net.Conn, error) {
	select {
	case c := <-a.conns:
		return c, nil
	case err := <-a.errc:
		a.errc <- err
		return nil, err
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

// closeAccepted closes the connections handed out so far (not one accepted and still waiting to
// be taken: a source may reconnect before this side noticed the break).
func (a *acceptor) closeAccepted() {
	a.mu.Lock()
	all := a.all
	a.all = nil
	a.mu.Unlock()
	for _, c := range all {
		c.Close()
	}
}

// close closes the listener and every connection accepted (a no-op the second time).
func (a *acceptor) close() {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return
	}
	a.closed = true
	all := a.all
	a.mu.Unlock()
	close(a.quit)
	a.ln.Close()
	for _, c := range all {
		c.Close()
	}
}

// consolePrinter shows guest console text: on stdout normally, on stderr with --json so that
// stdout stays one JSON document.
func consolePrinter(g *Globals) func(int, string) {
	out := os.Stdout
	if g.JSON {
		out = os.Stderr
	}
	return func(vcpu int, text string) {
		fmt.Fprintf(out, "guest[%d]: %s\n", vcpu, trimNL(text))
	}
}

func trimNL(s string) string {
	for len(s) > 0 && (s[len(s)-1] == '\n' || s[len(s)-1] == 0) {
		s = s[:len(s)-1]
	}
	return s
}
