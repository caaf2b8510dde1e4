package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/godwit-vm/godwit/internal/agent"
	"github.com/godwit-vm/godwit/internal/control"
	"github.com/godwit-vm/godwit/internal/gang"
	"github.com/godwit-vm/godwit/internal/guestmem"
	"github.com/godwit-vm/godwit/internal/transport"
	"github.com/godwit-vm/godwit/internal/vmm"
	"github.com/godwit-vm/godwit/migration"
	"github.com/godwit-vm/godwit/migration/outgoing"
)

// runGang is 'godwit migrate --gang': the VMs named by c.Gang (control sockets, or with
// --agent the agent's VM names) go to c.To as one migration.
func (c *MigrateCmd) runGang(g *Globals, ctx context.Context, req MigrateRequest) error {
	mode := req.Mode
	if mode == "" {
		mode = migration.ModePrecopy
	}
	if mode != migration.ModePrecopy {
		return fmt.Errorf("--gang: mode %s: a gang migrates by pre-copy", mode)
	}
	if c.Control != "" || c.VM != "" || c.Resume {
		return errors.New("--gang names the VMs: leave out --control, --vm and --resume")
	}
	socks, names, err := gangMembers(g, ctx, c.Gang)
	if err != nil {
		return err
	}
	tf := c.TLSFlags
	if peer, ok := strings.CutPrefix(req.To, "agent:"); ok {
		// The destination agent starts the gang's VM processes and its receiver; this
		// process migrates the gang there with this host's agent's certificates.
		var prep agent.GangPrepared
		if err := control.Dial(g.Agent).Call(ctx, http.MethodPost, "/v1/gang/prepare", agent.GangPrepareRequest{To: peer, Names: names}, &prep); err != nil {
			return fmt.Errorf("--gang --to %s: %w", req.To, err)
		}
		req.To = prep.To
		tf = TLSFlags{TLSCA: prep.TLSCA, TLSCert: prep.TLSCert, TLSKey: prep.TLSKey, TLSPeers: prep.TLSPeers}
	}
	addr, err := transport.Parse(req.To)
	if err != nil {
		return fmt.Errorf("--to: %w", err)
	}
	if addr.Security, err = tf.security(); err != nil {
		return err
	}
	start := time.Now()
	lent := make([]*lentVM, len(socks))
	errs := make([]error, len(socks))
	var wg sync.WaitGroup
	for i := range socks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lent[i], errs[i] = borrow(ctx, names[i], socks[i])
		}()
	}
	wg.Wait()
	defer func() {
		for _, v := range lent {
			if v != nil {
				v.giveBack()
			}
		}
	}()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("--gang: %w", err)
	}
	members := make([]gang.Member, len(lent))
	for i, v := range lent {
		members[i] = gang.Member{Name: v.name, Src: v}
	}
	src, err := gang.NewSource(members)
	if err != nil {
		return err
	}
	var released []string
	o := outgoing.Start(outgoing.Config{
		Source:  src,
		To:      addr,
		Options: req.sendOptions(mode),
		Release: func() {
			for _, v := range lent {
				if err := v.release(&migration.Report{Side: "source", Result: migration.ResultOK, Mode: mode}); err != nil {
					fmt.Fprintf(os.Stderr, "godwit: gang: VM %q runs at the destination, but its process here did not take the news: %v\n", v.name, err)
				}
				released = append(released, v.name)
			}
		},
		Note:  func(msg string) { fmt.Fprintf(os.Stderr, "godwit: gang %s: %s\n", strings.Join(names, ","), msg) },
		Start: start,
	})
	rep, err := o.Wait(ctx)
	if rep == nil {
		rep = &migration.Report{Side: "source", Result: migration.ResultFailed}
	}
	if err != nil && rep.Error == "" {
		rep.Result, rep.Error = migration.ResultFailed, err.Error()
	}
	out := gangReport{Report: *rep, VMs: names}
	if g.JSON {
		printJSON(out)
	} else {
		fmt.Printf("gang         %s (%d VMs)\n", strings.Join(names, ", "), len(names))
		printReport(*rep)
	}
	if err != nil || rep.Result != migration.ResultOK {
		if err == nil || g.JSON {
			return exitError{1}
		}
		return fmt.Errorf("gang migration failed; its VMs run on here: %w", err)
	}
	return nil
}

// gangReport is what 'migrate --gang --json' prints: the gang's migration report and its VMs.
type gangReport struct {
	migration.Report
	VMs []string `json:"vms"`
}

// gangMembers resolves the --gang list: control sockets, or with --agent its VM names.
func gangMembers(g *Globals, ctx context.Context, list string) (socks, names []string, err error) {
	for _, item := range strings.Split(list, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		if g.Agent == "" {
			socks = append(socks, item)
			names = append(names, strings.TrimSuffix(filepath.Base(item), ".sock"))
			continue
		}
		var v struct{ Control string }
		if err := control.Dial(g.Agent).Call(ctx, http.MethodGet, "/v1/vms/"+item, nil, &v); err != nil {
			return nil, nil, fmt.Errorf("--gang: VM %q: %w", item, err)
		}
		socks, names = append(socks, v.Control), append(names, item)
	}
	if len(socks) < 2 {
		return nil, nil, fmt.Errorf("--gang %q: name two VMs at least, separated by commas", list)
	}
	return socks, names, nil
}

// GangCmd is 'godwit gang'.
type GangCmd struct {
	Receive GangReceiveCmd `cmd:"" help:"Wait for a gang migration ('godwit migrate --gang') and run each of its VMs in a VM process of its own here."`
}

// GangReceiveCmd is 'godwit gang receive'.
type GangReceiveCmd struct {
	Incoming        string        `required:"" placeholder:"tcp:HOST:PORT|routed:PATH" help:"Where the gang's source connects."`
	Dir             string        `required:"" placeholder:"DIR" help:"Where each VM's control socket (NAME.sock) and log (NAME.log) go."`
	IncomingTimeout time.Duration `name:"incoming-timeout" default:"0s" placeholder:"DURATION" help:"Give up if no migration has connected after this long. 0 = wait as long as it takes."`
	Started         bool          `help:"The VM processes were started already (by an agent), each waiting on DIR/NAME.in: hand the VMs over to them instead of starting them."`
	TLSFlags
}

func (c *GangReceiveCmd) Help() string {
	return `The gang's memory arrives here, into memory of this process (a memfd per VM), as one
migration: pages identical across the gang's VMs travel once, as references. Each VM's
process is started as the migration begins ('godwit run --incoming unix:DIR/NAME.in'); once
the source has stopped the gang and its state is here, each VM's memory and state are handed
over to its process (no copy) and the VMs run. This process then prints the report and ends;
the VMs run on, each with its control socket in DIR.`
}

func (c *GangReceiveCmd) Run(g *Globals, ctx context.Context) error {
	addr, err := transport.Parse(c.Incoming)
	if err != nil {
		return fmt.Errorf("--incoming: %w", err)
	}
	if err := c.TLSFlags.check(addr); err != nil {
		return fmt.Errorf("--incoming: %w", err)
	}
	if addr.Security, err = c.TLSFlags.security(); err != nil {
		return fmt.Errorf("--incoming: %w", err)
	}
	if err := os.MkdirAll(c.Dir, 0o700); err != nil {
		return err
	}
	ln, err := addr.Listen()
	if err != nil {
		return fmt.Errorf("--incoming: %w", err)
	}
	acc := newAcceptor(ln)
	defer acc.close()
	if !g.JSON {
		fmt.Printf("godwit: waiting for a gang migration on %s\n", ln.Addr())
	}
	conn, err := acc.first(ctx, c.IncomingTimeout)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "godwit: gang migration from %s; %s\n", conn.RemoteAddr(), versionLine())
	var mu sync.Mutex
	var parked []*parkedVM
	dst := &gang.Destination{New: func(name string, d migration.Description) (migration.Destination, error) {
		p := &parkedVM{name: name, dir: c.Dir, started: c.Started}
		mu.Lock()
		parked = append(parked, p)
		mu.Unlock()
		return p, nil
	}}
	opts := migration.ReceiveOptions{AcceptStream: func(ctx context.Context) (io.ReadWriter, error) { return acc.next(ctx) }}
	rep, err := migration.Receive(ctx, dst, conn, opts)
	acc.close()
	out := gangArrival{Report: rep}
	for _, p := range parked {
		out.VMs = append(out.VMs, gangVM{Name: p.name, Control: p.control(), PID: p.pid()})
	}
	if err != nil {
		if rep != nil {
			out.Report = rep
		}
		if g.JSON {
			printJSON(out)
			return exitError{1}
		}
		return fmt.Errorf("gang migration failed: %w", err)
	}
	if g.JSON {
		return printJSON(out)
	}
	for _, v := range out.VMs {
		fmt.Printf("godwit: VM %q arrived; it runs in process %d, control socket %s\n", v.Name, v.PID, v.Control)
	}
	printReport(*rep)
	return nil
}

// gangArrival is what 'gang receive --json' prints.
type gangArrival struct {
	Report *migration.Report `json:"report"`
	VMs    []gangVM          `json:"vms"`
}

type gangVM struct {
	Name    string `json:"name"`
	Control string `json:"control"`
	PID     int    `json:"pid"`
}

// parkedVM is one VM of an arriving gang: its memory in a memfd of this process until the
// gang is complete, then handed over to the VM process started for it.
type parkedVM struct {
	name string
	dir  string
	desc migration.Description
	// mem is nil once handed over or aborted; life guards it against the streams' writes,
	// which may still run when the engine aborts.
	life    sync.RWMutex
	mem     *guestmem.Region
	writing atomic.Int32 // WritePages calls in flight
	secs    []migration.Section
	cmd     *exec.Cmd
	started bool // its VM process was started by someone else (an agent)
	// conn is the handover's connection, open from Prepare on: the VM process waits on it
	// for as long as the gang takes, and ends if this process does before the handover.
	conn net.Conn
}

var (
	_ migration.Destination = (*parkedVM)(nil)
	_ migration.PageReader  = (*parkedVM)(nil)
	_ migration.Source      = (*parkedSource)(nil)
	_ migration.MemoryFiles = (*parkedSource)(nil)
)

func (p *parkedVM) control() string  { return filepath.Join(p.dir, p.name+".sock") }
func (p *parkedVM) handover() string { return filepath.Join(p.dir, p.name+".in") }
func (p *parkedVM) pid() int {
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// Prepare makes the VM's memory and starts its process, which waits for the handover.
func (p *parkedVM) Prepare(d migration.Description) error {
	l := d.Layout
	if l.PageSize != guestmem.PageSize || len(l.Regions) != 1 || l.Regions[0].GPA != 0 {
		return fmt.Errorf("a memory layout this VMM cannot build (page size %d, %d regions)", l.PageSize, len(l.Regions))
	}
	d.VCPUs = vmm.VCPUsOf(d.Devices)
	p.desc = d
	var err error
	if p.mem, err = guestmem.NewRegion(p.name, 0, l.Regions[0].Size); err != nil {
		return err
	}
	if !p.started {
		if err := p.spawn(); err != nil {
			return err
		}
	}
	return p.waitAndDial()
}

// spawn starts the VM's process, which waits for the handover on DIR/NAME.in.
func (p *parkedVM) spawn() error {
	log, err := os.OpenFile(filepath.Join(p.dir, p.name+".log"), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	bin, err := os.Executable()
	if err != nil {
		return err
	}
	os.Remove(p.handover())
	p.cmd = exec.Command(bin, "run", "--json", "--name", p.name, "--control", p.control(), "--incoming", "unix:"+p.handover(), "--incoming-timeout", "1m")
	p.cmd.Stdout, p.cmd.Stderr = log, log
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true} // it outlives this process
	if err := p.cmd.Start(); err != nil {
		return fmt.Errorf("starting its VM process: %w", err)
	}
	go p.cmd.Wait()
	return nil
}

// waitAndDial waits until the VM's process waits for the handover, and connects to it.
func (p *parkedVM) waitAndDial() error {
	for deadline := time.Now().Add(time.Minute); ; {
		var s vmm.Stats
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := control.Dial(p.control()).Call(cctx, http.MethodGet, "/v1/stats", nil, &s)
		cancel()
		if err == nil && s.Incoming != "" {
			p.conn, err = transport.Address{Network: transport.Unix, Addr: p.handover()}.Dial(context.Background())
			if err != nil {
				return fmt.Errorf("its VM process: %w", err)
			}
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("its VM process does not wait for the handover (see %s)", filepath.Join(p.dir, p.name+".log"))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// WritePages writes with pwrite, which fills a fresh page without clearing it first (the
// cost of fresh memory dominates here); while another stream writes to the same VM, through
// the mapping (FillAt) instead, as pwrite serialises on the memfd.
func (p *parkedVM) WritePages(r int, first uint64, src []byte) error {
	return p.memory(func(m *guestmem.Region) error {
		defer p.writing.Add(-1)
		if p.writing.Add(1) > 1 {
			return m.FillAt(src, int64(first*guestmem.PageSize))
		}
		_, err := m.WriteAt(src, int64(first*guestmem.PageSize))
		return err
	})
}

func (p *parkedVM) ZeroPages(r int, first, n uint64) error {
	return p.memory(func(m *guestmem.Region) error { return m.PunchPages(first, n) })
}

func (p *parkedVM) ReadPages(r int, first uint64, dst []byte) error {
	return p.memory(func(m *guestmem.Region) error {
		_, err := m.ReadAt(dst, int64(first*guestmem.PageSize))
		return err
	})
}

// memory runs f on the VM's memory while it is still here.
func (p *parkedVM) memory(f func(*guestmem.Region) error) error {
	p.life.RLock()
	defer p.life.RUnlock()
	if p.mem == nil {
		return fmt.Errorf("VM %q: its memory is gone (handed over or aborted)", p.name)
	}
	return f(p.mem)
}

func (p *parkedVM) RestoreState(secs []migration.Section) error {
	p.secs = secs
	return nil
}

// Start hands the VM's memory (its memfd) and state over to its process, which runs it.
func (p *parkedVM) Start() error {
	defer p.conn.Close()
	rep, err := migration.Send(context.Background(), &parkedSource{p}, p.conn, migration.SendOptions{Mode: migration.ModeHandover})
	if rep != nil {
		fmt.Fprintf(os.Stderr, "godwit: VM %q handed over to its process in %.1f ms (downtime %.1f ms)\n", p.name, rep.TotalMS, rep.DowntimeMS)
	}
	if err != nil {
		return fmt.Errorf("handing it over to its VM process: %w", err)
	}
	// Our view of the memory goes after the VM runs: unmapping a mapping of a GiB that
	// FillAt populated can take a good part of a second here, and the VM does not need it.
	p.life.Lock()
	mem := p.mem
	p.mem = nil
	p.life.Unlock()
	go mem.Close()
	return nil
}

func (p *parkedVM) Abort() {
	if p.conn != nil {
		p.conn.Close()
	}
	if p.cmd != nil && p.cmd.Process != nil {
		p.cmd.Process.Kill()
	}
	p.life.Lock()
	defer p.life.Unlock()
	if p.mem != nil {
		p.mem.Close()
		p.mem = nil
	}
}

// parkedSource is a parked VM as the source of its handover: paused already, its state here.
type parkedSource struct{ p *parkedVM }

func (s *parkedSource) Describe() migration.Description { return s.p.desc }
func (s *parkedSource) MemoryFDs() ([]int, error)       { return []int{s.p.mem.Fd()}, nil }
func (s *parkedSource) Pause() error                    { return nil }
func (s *parkedSource) Resume() error                   { return nil }
func (s *parkedSource) SaveState() ([]migration.Section, error) {
	return s.p.secs, nil
}
func (s *parkedSource) StartDirtyLog() error { return nil }
func (s *parkedSource) StopDirtyLog() error  { return nil }
func (s *parkedSource) Populated() ([]migration.Bitmap, error) {
	return nil, errors.New("a parked VM is only handed over")
}
func (s *parkedSource) FetchDirty() ([]migration.Bitmap, error) {
	return nil, errors.New("a parked VM is only handed over")
}
func (s *parkedSource) ReadPages(r int, first uint64, dst []byte) error {
	return s.p.ReadPages(r, first, dst)
}
