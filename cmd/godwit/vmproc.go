package main

import (
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/zeebo/xxh3"

	"github.com/godwit-vm/godwit/internal/control"
	"github.com/godwit-vm/godwit/internal/transport"
	"github.com/godwit-vm/godwit/internal/vmm"
	"github.com/godwit-vm/godwit/migration"
	"github.com/godwit-vm/godwit/migration/dedup"
	"github.com/godwit-vm/godwit/migration/outgoing"
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
	incoming string              // address while waiting for an incoming migration
	arrive   bool                // the machine runs but its incoming migration is not over
	inReport *migration.Report   // the migration that brought the machine here
	out      *outgoing.Migration // the outgoing migration in flight, or stranded after the switch
	lease    *lease              // lent to a gang migration (gang.go)
	// localizing: the machine moves its memory out of its memory file ('run --localize');
	// localized is closed when that is over.
	localizing bool
	localized  chan struct{}

	quit     chan vmm.VerifyReport  // the guest verified and exited on request
	migrated chan *migration.Report // the machine moved away
}

func newVMProcess(g *Globals, name, path string) (*vmProcess, error) {
	srv, err := control.Listen(path)
	if err != nil {
		return nil, err
	}
	p := &vmProcess{g: g, name: name, srv: srv, quit: make(chan vmm.VerifyReport, 1), migrated: make(chan *migration.Report, 1), localized: make(chan struct{})}
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

// localize moves m's memory out of its memory file (run --localize) and says how that went;
// a failure leaves the VM running on the file.
func (p *vmProcess) localize(ctx context.Context, m *vmm.Machine) {
	defer close(p.localized)
	rep, err := m.Localize(ctx)
	p.mu.Lock()
	p.localizing = false
	p.mu.Unlock()
	if err != nil {
		fmt.Fprintf(os.Stderr, "godwit: VM %q: localize failed, the VM runs on in its memory file %s: %v\n", p.name, rep.From, err)
		return
	}
	fmt.Fprintf(os.Stderr, "godwit: VM %q: memory moved out of %s into this process: %d pages in %d rounds and %d in a pause of %.2f ms, %.0f ms in all\n",
		p.name, rep.From, rep.Pages-rep.Final, rep.Rounds, rep.Final, rep.PauseMS, rep.TotalMS)
}

// busyLocalizing refuses what must wait until the memory is out of its memory file.
func (p *vmProcess) busyLocalizing(what string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.busyLocalizingLocked(what)
}

func (p *vmProcess) busyLocalizingLocked(what string) error {
	if p.localizing {
		return conflict(fmt.Errorf("VM %q is moving its memory out of its memory file (--localize): %s must wait until it is done (see stats)", p.name, what))
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
		p.mu.Lock()
		localizing := p.localizing
		p.mu.Unlock()
		if localizing {
			<-p.localized // ctx ends it too, at its next round or after its pause
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
			return vmm.Stats{Name: p.name, State: "incoming", Error: "waiting for an incoming migration on " + incoming, Incoming: incoming}, nil
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
		if err := p.busyLocalizing("a pause"); err != nil {
			return nil, err
		}
		return nil, conflict(m.Pause())
	}))
	srv.Handle(http.MethodPost, "/v1/balloon", withMachine(func(_ context.Context, m *vmm.Machine, body []byte) (any, error) {
		var b vmm.Balloon
		if err := json.Unmarshal(body, &b); err != nil {
			return nil, fmt.Errorf("balloon: bad request body: %w", err)
		}
		if err := m.SetBalloon(b); err != nil {
			return nil, err
		}
		return b, nil
	}))
	srv.Handle(http.MethodPost, "/v1/resume", withMachine(func(_ context.Context, m *vmm.Machine, _ []byte) (any, error) {
		if err := p.busyLocalizing("a resume"); err != nil {
			return nil, err
		}
		return nil, conflict(m.Resume())
	}))
	srv.Handle(http.MethodPost, "/v1/quit", withMachine(func(ctx context.Context, m *vmm.Machine, _ []byte) (any, error) {
		if err := p.stillArriving("quit"); err != nil {
			return nil, err
		}
		if err := p.busyLocalizing("quit"); err != nil {
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
	srv.Handle(http.MethodPost, "/v1/template", withMachine(func(_ context.Context, m *vmm.Machine, body []byte) (any, error) {
		var req templateSaveRequest
		if err := json.Unmarshal(body, &req); err != nil || req.Store == "" {
			return nil, badRequest(fmt.Errorf("template save: bad request body (want the store's directory): %v", err))
		}
		if err := p.busyLocalizing("a template save"); err != nil {
			return nil, err
		}
		return saveTemplate(m, req.Store)
	}))
	srv.HandleStream(http.MethodPost, "/v1/gang/lend", p.lend)
	srv.Handle(http.MethodPost, "/v1/gang/op", p.gangOp)
	srv.HandleStream(http.MethodPost, "/v1/migrate", p.migrateOut)
	srv.Handle(http.MethodDelete, "/v1/migrate", func(context.Context, []byte) (any, error) {
		p.mu.Lock()
		o := p.out
		p.mu.Unlock()
		if o == nil {
			return nil, conflict(errors.New("no migration in progress"))
		}
		if err := o.Cancel(context.Canceled); err != nil {
			return nil, conflict(fmt.Errorf("VM %q: %w", p.name, err))
		}
		return map[string]string{"cancelled": "requested"}, nil
	})
}

// sendOptions are the engine's options of the migration req asks for, in mode.
func (req MigrateRequest) sendOptions(mode string) migration.SendOptions {
	var collide dedup.HashFunc
	if os.Getenv(faultEnv) == faultDedupCollide {
		fmt.Fprintf(os.Stderr, "godwit: %s=%s: every page's dedup hash is the same\n", faultEnv, faultDedupCollide)
		collide = func([]byte, uint64) xxh3.Uint128 { return xxh3.Uint128{} }
	}
	return migration.SendOptions{
		DedupHash:       collide,
		DowntimeLimit:   time.Duration(req.DowntimeLimitMS) * time.Millisecond,
		MaxBandwidth:    req.MaxBandwidth,
		AutoConverge:    req.AutoConverge,
		Force:           req.Force,
		Timeout:         time.Duration(req.TimeoutMS) * time.Millisecond,
		Mode:            mode,
		Prepage:         req.Prepage,
		SampleBefore:    time.Duration(req.SampleBeforeMS) * time.Millisecond,
		HybridRounds:    req.HybridRounds,
		HybridAfter:     time.Duration(req.HybridAfterMS) * time.Millisecond,
		LinkTimeout:     time.Duration(req.LinkTimeoutMS) * time.Millisecond,
		Streams:         req.Streams,
		FaultChannel:    !req.NoFaultChannel,
		Compress:        req.Compress,
		CompressLevel:   req.CompressLevel,
		IgnoreFreePages: req.IgnoreFreePages,
		Delta:           req.Delta,
		DeltaCache:      req.DeltaCacheBytes,
		Dedup:           req.Dedup,
	}
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
	Mode              string `json:"mode,omitempty"`             // precopy, postcopy, hybrid, handover; default: handover to unix:, else precopy
	Prepage           string `json:"prepage,omitempty"`          // sequential (default), bubble, hot, none
	SampleBeforeMS    int64  `json:"sample_before_ms,omitempty"` // postcopy: watch the guest this long first; 0 = default
	HybridRounds      int    `json:"hybrid_rounds,omitempty"`
	HybridAfterMS     int64  `json:"hybrid_after_ms,omitempty"`
	LinkTimeoutMS     int64  `json:"link_timeout_ms,omitempty"`
	ReconnectWindowMS int64  `json:"reconnect_window_ms,omitempty"` // redial the same address this long; 0 = not at all
	Streams           int    `json:"streams,omitempty"`             // precopy: connections for the pages; 0 = chosen by the engine
	NoFaultChannel    bool   `json:"no_fault_channel,omitempty"`    // postcopy, hybrid: requested pages on the main connection
	Compress          string `json:"compress,omitempty"`            // none (default), zstd, s2 or auto
	CompressLevel     string `json:"compress_level,omitempty"`      // zstd: fastest (default), default, better, best
	IgnoreFreePages   bool   `json:"ignore_free_pages,omitempty"`   // send the pages the guest reports free too
	Delta             bool   `json:"delta,omitempty"`               // precopy, hybrid: pages that changed little as deltas
	DeltaCacheBytes   uint64 `json:"delta_cache_bytes,omitempty"`   // the source's cache for them; 0 = default
	Flatten           bool   `json:"flatten,omitempty"`             // a clone: send the template's pages too
	Dedup             bool   `json:"dedup,omitempty"`               // precopy, hybrid: pages identical to one sent before as references
	// Mutual TLS on every connection (files on this host; tcp: only): all three files, or
	// none for plain TCP.
	TLSCA    string   `json:"tls_ca,omitempty"`
	TLSCert  string   `json:"tls_cert,omitempty"`
	TLSKey   string   `json:"tls_key,omitempty"`
	TLSPeers []string `json:"tls_peers,omitempty"` // names the destination's certificate must hold one of; default: the host dialled
	// Resume finishes the interrupted post-copy migration of this VM at To; every other field
	// is ignored (the migration keeps its options, its TLS too).
	Resume bool `json:"resume,omitempty"`
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
	tf := TLSFlags{TLSCA: req.TLSCA, TLSCert: req.TLSCert, TLSKey: req.TLSKey, TLSPeers: req.TLSPeers}
	if err := tf.check(addr); err != nil {
		return nil, badRequest(fmt.Errorf("migrate: %w", err))
	}
	if addr.Security, err = tf.security(); err != nil {
		return nil, badRequest(fmt.Errorf("migrate: %w", err))
	}
	if req.Resume {
		return p.resumeOut(ctx, addr, emit)
	}
	mode := cmp.Or(req.Mode, defaultMode(addr))
	switch mode {
	case migration.ModePrecopy, migration.ModePostcopy, migration.ModeHybrid:
	case migration.ModeHandover:
		if addr.Network != transport.Unix {
			return nil, badRequest(fmt.Errorf("migrate: mode handover passes the memory's files to a process on this host: it needs a unix:PATH destination, not %s", addr))
		}
	case migration.ModeSharedMemory:
	default:
		return nil, badRequest(fmt.Errorf("migrate: mode %q: want precopy, postcopy, hybrid, handover or shared-memory", req.Mode))
	}
	if req.Streams < 0 || req.Streams > 64 || (req.Streams == 64 && mode != migration.ModePrecopy && !req.NoFaultChannel) {
		return nil, badRequest(fmt.Errorf("migrate: streams %d: want 1..64 (1..63 with the fault channel of mode %s)", req.Streams, mode))
	}
	if err := migration.CheckCompress(req.Compress, req.CompressLevel); err != nil {
		return nil, badRequest(fmt.Errorf("migrate: %w", err))
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
	if c := m.Config().Clone; c != nil && !req.Flatten && mode != migration.ModePrecopy {
		return nil, badRequest(fmt.Errorf("migrate: mode %s: VM %q is a clone of template %x, which moves by pre-copy to a host that holds the template (its memory is the template's file mapped copy-on-write: nothing to hand over or demand-page into), or whole with --flatten in any mode that copies", mode, p.name, c.ID[:6]))
	}
	if _, ok := (vmm.MigrationSource{M: m}).SharedMemoryID(); mode == migration.ModeSharedMemory && !ok {
		return nil, badRequest(fmt.Errorf("migrate: mode shared-memory: VM %q's memory is not in a memory file on shared memory (start it with 'godwit run --memory-file PATH')", p.name))
	}
	cfg := outgoing.Config{
		Source:          vmm.MigrationSource{M: m, Flatten: req.Flatten},
		To:              addr,
		Options:         req.sendOptions(mode),
		ReconnectWindow: time.Duration(req.ReconnectWindowMS) * time.Millisecond,
		Release:         func() { m.Close() },
		Note: func(msg string) {
			if strings.HasPrefix(msg, "migrating to ") {
				// Which godwit sends it, for matching the two sides' logs (the destination
				// logs its own).
				msg += "; " + versionLine()
			}
			fmt.Fprintf(os.Stderr, "godwit: VM %q: %s\n", p.name, msg)
		},
		ResumeHint: fmt.Sprintf("godwit migrate --control %s --resume --to tcp:HOST:PORT", p.srv.Path()),
		Start:      start,
	}
	p.mu.Lock()
	if err := p.busyLocalizingLocked("migrating it on"); err != nil {
		p.mu.Unlock()
		return nil, err
	}
	if old := p.out; old != nil {
		p.mu.Unlock()
		if old.State().Switched() {
			return nil, conflict(fmt.Errorf("migrate: VM %q is in a post-copy migration to %s; to finish it use 'godwit migrate --resume --to tcp:HOST:PORT'", p.name, old.Address()))
		}
		return nil, conflict(errors.New("migrate: a migration of this VM is already in progress"))
	}
	if p.lease != nil {
		p.mu.Unlock()
		return nil, conflict(fmt.Errorf("migrate: VM %q is lent to a gang migration", p.name))
	}
	m.ResetHeartbeatGap()
	o := outgoing.Start(cfg)
	p.out = o
	p.mu.Unlock()
	go p.settle(o)
	return p.follow(ctx, o, emit)
}

// settle acts on the migration's end for good: after a success the process ends (the memory
// was released already), after a failure the VM runs on here and may migrate again. A stranded
// migration stays in p.out: the process holds the VM's memory and says so.
func (p *vmProcess) settle(o *outgoing.Migration) {
	<-o.Done()
	rep, _ := o.Result()
	p.forget(o)
	if o.State() == outgoing.Succeeded {
		select {
		case p.migrated <- rep:
		default:
		}
	}
}

// forget drops o, over for good, so that the VM may migrate again.
func (p *vmProcess) forget(o *outgoing.Migration) {
	p.mu.Lock()
	if p.out == o {
		p.out = nil
	}
	p.mu.Unlock()
}

// follow streams the migration's progress to a client until its current call of Send ends, or
// the client goes away (which cancels the migration before the switch to post-copy, and only
// detaches after it).
func (p *vmProcess) follow(ctx context.Context, o *outgoing.Migration, emit func(any)) (any, error) {
	stop := o.Watch(func(pr migration.Progress) { emit(pr) })
	defer stop()
	rep, err := o.Wait(ctx)
	if o.State().Over() {
		p.forget(o) // before the client hears of it: it may migrate again at once
	}
	if errors.Is(err, outgoing.ErrDetached) {
		return nil, errors.New("migrate: client went away; the post-copy migration goes on")
	}
	if err != nil {
		err = fmt.Errorf("migrate: %w", err)
	}
	return rep, err
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
	if addr.Security == nil {
		addr.Security = o.Address().Security // the new address is the same destination's
	}
	if err := o.Resume(ctx, addr); err != nil {
		err = fmt.Errorf("migrate --resume: VM %q: %w", p.name, err)
		var se *outgoing.StateError
		if errors.As(err, &se) {
			return nil, conflict(err)
		}
		return nil, err
	}
	return p.follow(ctx, o, emit)
}

// holding returns a non-nil error when the VM ran away by post-copy and only its memory is held
// here: then it must not be resumed, verified or quit.
func (p *vmProcess) holding() error {
	p.mu.Lock()
	o := p.out
	p.mu.Unlock()
	if o == nil {
		return nil
	}
	switch o.State() {
	case outgoing.Undecided:
		_, err := o.Result()
		return conflict(fmt.Errorf("VM %q was handed over without copying its memory, and the migration failed once the destination had its state (%v): the destination may run it on the same memory, so it must not run here again; this process holds it paused", p.name, err))
	case outgoing.Stranded:
		_, err := o.Result()
		return conflict(fmt.Errorf("VM %q runs at the destination since its switch to post-copy, and the migration failed after the switch (%v); this process holds the VM's memory, paused: it must not run here again; finish the migration with 'godwit migrate --resume'", p.name, err))
	case outgoing.Switched, outgoing.Recovering:
		return conflict(fmt.Errorf("VM %q runs at the destination since its switch to post-copy to %s; this process serves its memory until every page has arrived: it must not run here again", p.name, o.Address()))
	}
	return nil
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

// defaultMode is the mode of a migration to addr that names none: a handover to a process on
// this host (a Unix socket), else pre-copy.
func defaultMode(addr transport.Address) string {
	if addr.Network == transport.Unix {
		return migration.ModeHandover
	}
	return migration.ModePrecopy
}
