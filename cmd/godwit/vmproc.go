package main

import (
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/godwit-vm/godwit/internal/control"
	"github.com/godwit-vm/godwit/internal/transport"
	"github.com/godwit-vm/godwit/internal/vmm"
	"github.com/godwit-vm/godwit/migration"
)

// vmProcess is one 'godwit run' process: a control socket and the machine behind it. The
// socket is up before the machine exists (a destination waiting for an incoming migration
// answers stats), and the machine can leave (migrated away), which ends the process.
type vmProcess struct {
	g    *Globals
	name string
	srv  *control.Server

	mu       sync.Mutex
	m        *vmm.Machine
	incoming string            // address while waiting for an incoming migration
	arrive   bool              // the machine runs but its incoming migration is not over
	inReport *migration.Report // the migration that brought the machine here
	out      *outgoing         // the outgoing migration in flight, or held after a failed post-copy

	quit     chan vmm.VerifyReport  // the guest verified and exited on request
	migrated chan *migration.Report // the machine moved away
}

func newVMProcess(g *Globals, name, path string) (*vmProcess, error) {
	srv, err := control.Listen(path)
	if err != nil {
		return nil, err
	}
	p := &vmProcess{g: g, name: name, srv: srv, quit: make(chan vmm.VerifyReport, 1), migrated: make(chan *migration.Report, 1)}
	p.register()
	go srv.Serve()
	return p, nil
}

func (p *vmProcess) close() { p.srv.Close() }

func (p *vmProcess) machine() (*vmm.Machine, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m == nil {
		if p.incoming != "" {
			return nil, &control.StatusError{Status: http.StatusServiceUnavailable, Err: fmt.Errorf("VM %q is waiting for an incoming migration on %s", p.name, p.incoming)}
		}
		return nil, &control.StatusError{Status: http.StatusServiceUnavailable, Err: fmt.Errorf("VM %q has no machine", p.name)}
	}
	return p.m, nil
}

func (p *vmProcess) setMachine(m *vmm.Machine) {
	p.mu.Lock()
	p.m, p.incoming, p.arrive = m, "", false
	p.mu.Unlock()
}

// arriving shows m, which runs while its incoming migration goes on (post-copy).
func (p *vmProcess) arriving(m *vmm.Machine) {
	p.mu.Lock()
	p.m, p.arrive = m, true
	p.mu.Unlock()
}

// stillArriving refuses what must wait until the incoming migration is over.
func (p *vmProcess) stillArriving(what string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.arrive {
		return conflict(fmt.Errorf("VM %q is still arriving (incoming migration on %s): %s must wait until it is over", p.name, p.incoming, what))
	}
	return nil
}

// run waits until the guest exits, fails, is told to quit, migrates away, or the process is
// interrupted (then the guest verifies and exits) and prints the summary.
func (p *vmProcess) run(ctx context.Context, m *vmm.Machine) error {
	if !p.g.JSON {
		fmt.Printf("godwit: VM %q running (%s, %d vCPUs); control socket %s\n", m.Name(), formatBytes(m.Config().MemBytes), m.VCPUs(), p.srv.Path())
	}
	var final *vmm.VerifyReport
	var runErr error
	select {
	case r := <-p.quit:
		final = &r
	case rep := <-p.migrated:
		return p.finishMigrated(m, rep)
	case <-m.Done():
		select { // the machine also ends when it migrates away or quits; their reports follow
		case rep := <-p.migrated:
			return p.finishMigrated(m, rep)
		case r := <-p.quit:
			final = &r
		case <-time.After(5 * time.Second):
			_, runErr = m.State()
			if runErr == nil {
				runErr = errors.New("the guest stopped without being asked to")
			}
		}
	case <-ctx.Done():
		if err := p.holding(); err != nil {
			// The guest cannot verify here: it runs at the destination.
			return p.finish(m, nil, fmt.Errorf("interrupted: %w; its memory here is discarded", err))
		}
		qctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		r, err := m.Quit(qctx)
		cancel()
		if err != nil {
			runErr = err
		} else {
			final = &r
		}
	}
	return p.finish(m, final, runErr)
}

// runSummary is what 'godwit run --json' prints when the VM ends.
type runSummary struct {
	Result   string            `json:"result"` // ok, corrupt, failed, migrated
	Error    string            `json:"error,omitempty"`
	Verify   *vmm.VerifyReport `json:"verify,omitempty"`
	Incoming *migration.Report `json:"incoming,omitempty"`
	Outgoing *migration.Report `json:"outgoing,omitempty"`
	Stats    vmm.Stats         `json:"stats"`
}

func (p *vmProcess) summary(m *vmm.Machine) runSummary {
	p.mu.Lock()
	in := p.inReport
	p.mu.Unlock()
	s := runSummary{Result: "ok", Incoming: in, Stats: m.Stats()}
	s.Stats.Console = nil
	return s
}

func (p *vmProcess) finish(m *vmm.Machine, final *vmm.VerifyReport, runErr error) error {
	sum := p.summary(m)
	sum.Verify = final
	if runErr != nil {
		sum.Result, sum.Error = "failed", runErr.Error()
	} else if final != nil && final.Mismatches > 0 {
		sum.Result = "corrupt"
	}
	if p.g.JSON {
		printJSON(sum)
	} else {
		if final != nil {
			printVerify(os.Stdout, *final)
		}
		if runErr != nil {
			fmt.Fprintf(os.Stderr, "godwit: VM %q failed: %v\n", m.Name(), runErr)
		} else {
			fmt.Printf("godwit: VM %q ended: %d heartbeats, %d pages written\n", m.Name(), sum.Stats.Heartbeats, sum.Stats.PagesWritten)
		}
	}
	if sum.Result != "ok" {
		return exitError{1}
	}
	return nil
}

func (p *vmProcess) finishMigrated(m *vmm.Machine, rep *migration.Report) error {
	sum := p.summary(m)
	sum.Result, sum.Outgoing = "migrated", rep
	if p.g.JSON {
		printJSON(sum)
	} else {
		fmt.Printf("godwit: VM %q migrated away; memory released\n", m.Name())
	}
	return nil
}

// register wires the control endpoints.
func (p *vmProcess) register() {
	srv := p.srv
	srv.Handle(http.MethodGet, "/v1/stats", func(context.Context, []byte) (any, error) {
		p.mu.Lock()
		m, incoming := p.m, p.incoming
		p.mu.Unlock()
		if m == nil {
			return vmm.Stats{Name: p.name, State: "incoming", Error: "waiting for an incoming migration on " + incoming}, nil
		}
		s := m.Stats()
		if err := p.holding(); err != nil {
			s.Error = err.Error()
		}
		return s, nil
	})
	withMachine := func(f func(ctx context.Context, m *vmm.Machine, body []byte) (any, error)) control.Handler {
		return func(ctx context.Context, body []byte) (any, error) {
			m, err := p.machine()
			if err != nil {
				return nil, err
			}
			if err := p.holding(); err != nil {
				return nil, err
			}
			return f(ctx, m, body)
		}
	}
	srv.Handle(http.MethodPost, "/v1/verify", withMachine(func(ctx context.Context, m *vmm.Machine, _ []byte) (any, error) {
		r, err := m.Verify(ctx)
		return r, conflict(err)
	}))
	srv.Handle(http.MethodPost, "/v1/pause", withMachine(func(_ context.Context, m *vmm.Machine, _ []byte) (any, error) {
		return nil, conflict(m.Pause())
	}))
	srv.Handle(http.MethodPost, "/v1/resume", withMachine(func(_ context.Context, m *vmm.Machine, _ []byte) (any, error) {
		return nil, conflict(m.Resume())
	}))
	srv.Handle(http.MethodPost, "/v1/quit", withMachine(func(ctx context.Context, m *vmm.Machine, _ []byte) (any, error) {
		if err := p.stillArriving("quit"); err != nil {
			return nil, err
		}
		r, err := m.Quit(ctx)
		if err != nil {
			return nil, conflict(err)
		}
		select {
		case p.quit <- r:
		default:
		}
		return r, nil
	}))
	srv.Handle(http.MethodPost, "/v1/debug/write", withMachine(func(_ context.Context, m *vmm.Machine, body []byte) (any, error) {
		var req struct {
			GPA  uint64 `json:"gpa"`
			Data string `json:"data"` // base64
		}
		if err := p.stillArriving("a debug write"); err != nil {
			return nil, err
		}
		if err := json.Unmarshal(body, &req); err != nil {
			return nil, badRequest(fmt.Errorf("debug write: %w", err))
		}
		data, err := base64.StdEncoding.DecodeString(req.Data)
		if err != nil {
			return nil, badRequest(fmt.Errorf("debug write: data: %w", err))
		}
		if err := m.WriteGuest(req.GPA, data); err != nil {
			return nil, badRequest(err)
		}
		return map[string]any{"written": len(data)}, nil
	}))
	srv.HandleStream(http.MethodPost, "/v1/migrate", p.migrateOut)
	srv.Handle(http.MethodDelete, "/v1/migrate", func(context.Context, []byte) (any, error) {
		p.mu.Lock()
		o := p.out
		p.mu.Unlock()
		if o == nil {
			return nil, conflict(errors.New("no migration in progress"))
		}
		if o.isSwitched() {
			return nil, conflict(fmt.Errorf("the migration of VM %q has switched to post-copy and cannot be cancelled: the VM runs at the destination and needs this host's memory until every page has arrived", p.name))
		}
		o.mu.Lock()
		r := o.cur
		o.mu.Unlock()
		if r != nil {
			r.cancel(context.Canceled)
		}
		return map[string]string{"cancelled": "requested"}, nil
	})
}

// MigrateRequest is the body of POST /v1/migrate.
type MigrateRequest struct {
	To              string `json:"to"` // tcp:HOST:PORT
	DowntimeLimitMS int64  `json:"downtime_limit_ms"`
	MaxBandwidth    int64  `json:"max_bandwidth"` // bytes/s, 0 = unlimited
	AutoConverge    bool   `json:"auto_converge"`
	Force           bool   `json:"force"`
	TimeoutMS       int64  `json:"timeout_ms"`
	// Post-copy and hybrid; empty and zero values take the engine's defaults.
	Mode              string `json:"mode,omitempty"`             // precopy (default), postcopy, hybrid
	Prepage           string `json:"prepage,omitempty"`          // sequential (default), bubble, hot, none
	SampleBeforeMS    int64  `json:"sample_before_ms,omitempty"` // postcopy: watch the guest this long first; 0 = default
	HybridRounds      int    `json:"hybrid_rounds,omitempty"`
	HybridAfterMS     int64  `json:"hybrid_after_ms,omitempty"`
	LinkTimeoutMS     int64  `json:"link_timeout_ms,omitempty"`
	ReconnectWindowMS int64  `json:"reconnect_window_ms,omitempty"` // redial the same address this long; 0 = not at all
	Streams           int    `json:"streams,omitempty"`             // precopy: connections for the pages; 0 = 1
	NoFaultChannel    bool   `json:"no_fault_channel,omitempty"`    // postcopy, hybrid: requested pages on the main connection
	// Resume finishes the interrupted post-copy migration of this VM at To; every other field
	// is ignored (the migration keeps its options).
	Resume bool `json:"resume,omitempty"`
}

// minResumeWindow is how long a resume request's address is redialled when the migration's
// own reconnect window is shorter (or 0).
const minResumeWindow = 10 * time.Second

// outgoing is the migration of this process's VM to another host. It lives in the VM process,
// not in the request that started it: after a switch to post-copy it outlives a client that
// goes away, and a post-copy that failed after the switch stays here, the VM paused with its
// memory, until 'migrate --resume' finishes it.
type outgoing struct {
	p      *vmProcess
	m      *vmm.Machine
	start  time.Time
	window time.Duration
	opts   migration.SendOptions // as the migration started; a resume reuses them

	mu          sync.Mutex
	addr        transport.Address // where to (re)dial: the destination's current address
	cur         *sendRun
	switched    bool          // past the switch to post-copy: the VM must never run here again
	brokenSince time.Time     // when the link broke, while the reconnector redials
	kick        chan struct{} // a resume request brought an address
	emit        func(any)     // the attached client's progress, if any
	last        migration.Progress
	recovered   int // reconnections and resumes that succeeded
	resumes     int
}

// sendRun is one call of migration.Send: the first, and one per resume.
type sendRun struct {
	at     time.Time // when Send was called
	cancel context.CancelCauseFunc
	done   chan struct{} // closed once Send returned and rep, err are final
	rep    *migration.Report
	err    error
	gaveUp error // the reconnect window passed: why
}

// migrateOut starts an outgoing migration (or, with Resume, resumes the interrupted one) and
// streams its progress until it ends. On success the machine's memory is released and the
// process ends; on a failure before any switch to post-copy the VM keeps running here; after
// the switch it stays paused here with its memory until a resume finishes the migration.
func (p *vmProcess) migrateOut(ctx context.Context, body []byte, emit func(any)) (any, error) {
	start := time.Now()
	var req MigrateRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, fmt.Errorf("migrate: bad request: %w", err)
	}
	addr, err := transport.Parse(req.To)
	if err != nil {
		return nil, badRequest(fmt.Errorf("migrate: --to: %w", err))
	}
	if req.Resume {
		return p.resumeOut(ctx, addr, emit)
	}
	mode := cmp.Or(req.Mode, migration.ModePrecopy)
	if mode != migration.ModePrecopy && mode != migration.ModePostcopy && mode != migration.ModeHybrid {
		return nil, badRequest(fmt.Errorf("migrate: mode %q: want precopy, postcopy or hybrid", req.Mode))
	}
	if req.Streams < 0 || req.Streams > 64 || (req.Streams > 1 && mode != migration.ModePrecopy) {
		return nil, badRequest(fmt.Errorf("migrate: streams %d: want 1..64, and more than 1 only with mode precopy", req.Streams))
	}
	if req.SampleBeforeMS < 0 || (req.SampleBeforeMS > 0 && mode != migration.ModePostcopy) {
		return nil, badRequest(fmt.Errorf("migrate: sample_before_ms %d: want 0, or a positive time with mode postcopy", req.SampleBeforeMS))
	}
	m, err := p.machine()
	if err != nil {
		return nil, err
	}
	if err := p.stillArriving("migrating it on"); err != nil {
		return nil, err
	}
	o := &outgoing{p: p, m: m, start: start, addr: addr, kick: make(chan struct{}, 1),
		window: time.Duration(req.ReconnectWindowMS) * time.Millisecond}
	p.mu.Lock()
	if old := p.out; old != nil {
		p.mu.Unlock()
		if old.isSwitched() {
			return nil, conflict(fmt.Errorf("migrate: VM %q is in a post-copy migration to %s; to finish it use 'godwit migrate --resume --to tcp:HOST:PORT'", p.name, old.address()))
		}
		return nil, conflict(errors.New("migrate: a migration of this VM is already in progress"))
	}
	p.out = o
	p.mu.Unlock()

	conn, err := addr.Dial(ctx)
	if err != nil {
		p.mu.Lock()
		p.out = nil
		p.mu.Unlock()
		rep := failedReport(start, "cannot reach the destination: "+err.Error())
		rep.Mode = mode
		return rep, fmt.Errorf("migrate: cannot reach the destination %s: %w (the VM keeps running here)", addr, err)
	}
	// Which godwit sends it, for matching the two sides' logs (the destination logs its own).
	fmt.Fprintf(os.Stderr, "godwit: VM %q: migrating to %s (%s); %s\n", p.name, conn.RemoteAddr(), mode, versionLine())
	m.ResetHeartbeatGap()
	o.opts = migration.SendOptions{
		DowntimeLimit: time.Duration(req.DowntimeLimitMS) * time.Millisecond,
		MaxBandwidth:  req.MaxBandwidth,
		AutoConverge:  req.AutoConverge,
		Force:         req.Force,
		Timeout:       time.Duration(req.TimeoutMS) * time.Millisecond,
		Progress:      o.progress,
		Mode:          mode,
		Prepage:       req.Prepage,
		SampleBefore:  time.Duration(req.SampleBeforeMS) * time.Millisecond,
		HybridRounds:  req.HybridRounds,
		HybridAfter:   time.Duration(req.HybridAfterMS) * time.Millisecond,
		LinkTimeout:   time.Duration(req.LinkTimeoutMS) * time.Millisecond,
		Streams:       req.Streams,
		FaultChannel:  !req.NoFaultChannel,
		DialStream: func(ctx context.Context) (io.ReadWriter, error) {
			return addr.Dial(ctx)
		},
	}
	if mode != migration.ModePrecopy {
		o.opts.Reconnect = o.reconnect
	}
	return o.follow(ctx, emit, o.send(conn, o.opts))
}

// send starts one call of migration.Send on conn, in the process's context (see outgoing).
func (o *outgoing) send(conn net.Conn, opts migration.SendOptions) *sendRun {
	ctx, cancel := context.WithCancelCause(context.Background())
	r := &sendRun{at: time.Now(), cancel: cancel, done: make(chan struct{})}
	o.mu.Lock()
	o.cur = r
	o.mu.Unlock()
	go func() {
		rep, err := migration.Send(ctx, vmm.MigrationSource{M: o.m}, conn, opts)
		conn.Close()
		o.finish(r, rep, err)
		cancel(nil)
	}()
	return r
}

// finish settles what becomes of the VM here once Send returned.
func (o *outgoing) finish(r *sendRun, rep *migration.Report, err error) {
	if rep == nil {
		rep = failedReport(o.start, "")
		rep.Mode = o.opts.Mode
	}
	engineTotal := rep.TotalMS
	stranded := err != nil && errors.Is(err, migration.ErrStranded)
	o.mu.Lock()
	if stranded {
		o.switched = true
	}
	if rep.Postcopy != nil && o.recovered > rep.Postcopy.Reconnects {
		// A resume is a recovery too; the engine counts only those of its own call.
		rep.Postcopy.Reconnects = o.recovered
	}
	gaveUp := r.gaveUp
	o.mu.Unlock()
	p := o.p
	switch {
	case err == nil:
		// The destination runs the guest and has every page: release everything here. Total
		// time ends now; after a post-copy it ended when the destination had every page (the
		// engine's figure, from its call), since the source may release its memory from then on
		// and only waits for the destination's figures.
		o.m.Close()
		rep.TotalMS = float64(time.Since(o.start).Microseconds()) / 1000
		if rep.Postcopy != nil && rep.TotalMS > 0 {
			rep.TotalMS = float64(r.at.Sub(o.start).Microseconds())/1000 + engineTotal
		}
		p.mu.Lock()
		p.out = nil
		p.mu.Unlock()
		select {
		case p.migrated <- rep:
		default:
		}
	case stranded:
		if gaveUp != nil {
			// The reconnect window, not the caller, ended it.
			rep.Result = migration.ResultFailed
		}
		rep.TotalMS = float64(time.Since(o.start).Microseconds()) / 1000
		err = fmt.Errorf("migrate: %w; the VM stays paused here with its memory, waiting for 'godwit migrate --control %s --resume --to tcp:HOST:PORT' (the destination's old or new address)",
			err, p.srv.Path())
		rep.Error = err.Error()
		fmt.Fprintf(os.Stderr, "godwit: VM %q: %v\n", o.m.Name(), err)
		// p.out stays: the process holds the VM's memory, and says so.
	default:
		if rep.Result == "" || rep.Result == migration.ResultOK {
			rep.Result = migration.ResultFailed
		}
		rep.TotalMS = float64(time.Since(o.start).Microseconds()) / 1000
		err = fmt.Errorf("migrate: %w (the VM keeps running here)", err)
		p.mu.Lock()
		p.out = nil
		p.mu.Unlock()
	}
	r.rep, r.err = rep, err
	close(r.done)
}

// follow streams a run's progress to a client until it ends or the client goes away (which
// cancels the migration before the switch to post-copy, and only detaches after it).
func (o *outgoing) follow(ctx context.Context, emit func(any), r *sendRun) (any, error) {
	o.mu.Lock()
	o.emit = emit
	o.mu.Unlock()
	defer func() {
		o.mu.Lock()
		o.emit = nil
		o.mu.Unlock()
	}()
	select {
	case <-r.done:
		return r.rep, r.err
	case <-ctx.Done():
		if !o.isSwitched() {
			r.cancel(errors.New("the client went away"))
			<-r.done
			return r.rep, r.err
		}
		return nil, errors.New("migrate: client went away; the post-copy migration goes on")
	}
}

// resumeOut gives the migration the destination's new address: a post-copy migration in
// flight dials it at its next reconnection (at once if it is reconnecting now), and one that
// failed after the switch is resumed there.
func (p *vmProcess) resumeOut(ctx context.Context, addr transport.Address, emit func(any)) (any, error) {
	p.mu.Lock()
	o := p.out
	p.mu.Unlock()
	if o == nil {
		return nil, conflict(fmt.Errorf("migrate --resume: VM %q has no interrupted migration to resume", p.name))
	}
	o.mu.Lock()
	r, switched := o.cur, o.switched
	o.mu.Unlock()
	if r == nil {
		return nil, conflict(fmt.Errorf("migrate --resume: the migration of VM %q is only starting: there is nothing to resume", p.name))
	}
	select {
	case <-r.done:
	default:
		// In flight.
		if !switched {
			return nil, conflict(fmt.Errorf("migrate --resume: the migration of VM %q has not switched to post-copy: there is nothing to resume (it goes on; cancel it with Ctrl-C on its 'migrate')", p.name))
		}
		o.mu.Lock()
		o.addr = addr
		o.mu.Unlock()
		select {
		case o.kick <- struct{}{}:
		default:
		}
		return o.follow(ctx, emit, r)
	}
	// Stranded: Send failed after the switch. Resume it at addr.
	id := ""
	if r.rep != nil && r.rep.Postcopy != nil {
		id = r.rep.Postcopy.MigrationID
	}
	if id == "" {
		return nil, fmt.Errorf("migrate --resume: the migration of VM %q cannot be resumed: its report names no migration id (%v)", p.name, r.err)
	}
	conn, err := addr.Dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("migrate --resume: cannot reach the destination at %s: %w (the migration stays interrupted; the VM stays paused here)", addr, err)
	}
	o.mu.Lock()
	if o.cur != r {
		o.mu.Unlock()
		conn.Close()
		return nil, conflict(errors.New("migrate --resume: another resume of this migration is under way"))
	}
	o.addr = addr
	o.recovered++
	o.resumes++
	o.brokenSince = time.Time{}
	o.mu.Unlock()
	fmt.Fprintf(os.Stderr, "godwit: VM %q: resuming the post-copy migration %s at %s\n", o.m.Name(), id, addr)
	opts := o.opts
	opts.ResumeID = id
	return o.follow(ctx, emit, o.send(conn, opts))
}

// progress passes the engine's progress to the attached client.
func (o *outgoing) progress(pr migration.Progress) {
	o.mu.Lock()
	defer o.mu.Unlock()
	switch pr.Phase {
	case "postcopy", "reconnecting", "rejoin", "waiting for post-copy stats":
		o.switched = true
	}
	if pr.Phase == "postcopy" {
		o.brokenSince = time.Time{} // the link works (again)
	}
	o.last = pr
	if o.emit != nil {
		o.emit(pr)
	}
}

// note shows a recovery step on the attached client's progress line and on the VM process's
// standard error.
func (o *outgoing) note(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	fmt.Fprintf(os.Stderr, "godwit: VM %q: %s\n", o.m.Name(), msg)
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.emit != nil {
		pr := o.last
		pr.Phase = msg
		pr.Elapsed = time.Since(o.start)
		o.emit(pr)
	}
}

// reconnect is the source's migration.Reconnector, called by the engine after the link broke
// during post-copy (and again if a new connection fails to rejoin). It redials the
// destination's current address until the reconnect window, counted from the break, has
// passed; a resume request brings a new address at any time and opens a new window. When the
// window passes it ends the migration's Send (which then fails, stranded: the VM stays paused
// here, and a resume can finish it).
func (o *outgoing) reconnect(ctx context.Context) (io.ReadWriter, error) {
	o.mu.Lock()
	o.switched = true
	r := o.cur
	if o.brokenSince.IsZero() {
		o.brokenSince = time.Now()
		o.mu.Unlock()
		if o.window > 0 {
			o.note("the link to the destination %s broke after the switch to post-copy; redialling for %v", o.address(), o.window)
		}
	} else {
		o.mu.Unlock()
	}
	window := o.window
	for attempt := 1; ; attempt++ {
		o.mu.Lock()
		addr, deadline := o.addr, o.brokenSince.Add(window)
		o.mu.Unlock()
		if time.Now().Before(deadline) {
			dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			c, err := addr.Dial(dctx)
			cancel()
			if err == nil {
				o.mu.Lock()
				o.recovered++
				o.mu.Unlock()
				o.note("reconnected to %s (attempt %d)", addr, attempt)
				return c, nil
			}
		} else {
			why := fmt.Errorf("could not reach the destination at %s within the reconnect window of %v", addr, window)
			if window == 0 {
				why = errors.New("the link broke and automatic redialling is off (--reconnect-window 0)")
			}
			o.note("%v; the VM stays paused here", why)
			o.mu.Lock()
			r.gaveUp = why
			o.mu.Unlock()
			r.cancel(why)
			return nil, why
		}
		t := time.NewTimer(250 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, context.Cause(ctx)
		case <-o.kick:
			o.mu.Lock()
			addr = o.addr
			// A new window, at least minResumeWindow long, from now.
			o.brokenSince = time.Now().Add(max(window, minResumeWindow) - window)
			o.mu.Unlock()
			o.note("resuming: dialling %s", addr)
		case <-t.C:
		}
		t.Stop()
	}
}

func (o *outgoing) isSwitched() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.switched
}

func (o *outgoing) address() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.addr.String()
}

// holding returns a non-nil error when the VM ran away by post-copy and only its memory is held
// here: then it must not be resumed, verified or quit.
func (p *vmProcess) holding() error {
	p.mu.Lock()
	o := p.out
	p.mu.Unlock()
	if o == nil || !o.isSwitched() {
		return nil
	}
	o.mu.Lock()
	r := o.cur
	o.mu.Unlock()
	select {
	case <-r.done:
		return conflict(fmt.Errorf("VM %q runs at the destination since its switch to post-copy, and the migration failed after the switch (%v); this process holds the VM's memory, paused: it must not run here again; finish the migration with 'godwit migrate --resume'", p.name, r.err))
	default:
	}
	return conflict(fmt.Errorf("VM %q runs at the destination since its switch to post-copy to %s; this process serves its memory until every page has arrived: it must not run here again", p.name, o.address()))
}

func failedReport(start time.Time, msg string) *migration.Report {
	return &migration.Report{Side: "source", Result: "failed", Error: msg, Mode: "precopy", TotalMS: float64(time.Since(start).Microseconds()) / 1000}
}

func conflict(err error) error {
	if err == nil {
		return nil
	}
	return &control.StatusError{Status: http.StatusConflict, Err: err}
}

func badRequest(err error) error {
	return &control.StatusError{Status: http.StatusBadRequest, Err: err}
}
