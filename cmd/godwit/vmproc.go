package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/godwit-vm/godwit/internal/control"
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
	incoming string             // address while waiting for an incoming migration
	inReport *migration.Report  // the migration that brought the machine here
	cancel   context.CancelFunc // cancels the outgoing migration in flight, if any

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
	p.m, p.incoming = m, ""
	p.mu.Unlock()
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
		return m.Stats(), nil
	})
	withMachine := func(f func(ctx context.Context, m *vmm.Machine, body []byte) (any, error)) control.Handler {
		return func(ctx context.Context, body []byte) (any, error) {
			m, err := p.machine()
			if err != nil {
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
		cancel := p.cancel
		p.mu.Unlock()
		if cancel == nil {
			return nil, conflict(errors.New("no migration in progress"))
		}
		cancel()
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
}

// migrateOut runs an outgoing pre-copy migration, streaming its progress. On success the
// machine's memory is released and the process ends; on any failure the VM keeps running here.
func (p *vmProcess) migrateOut(ctx context.Context, body []byte, emit func(any)) (any, error) {
	start := time.Now()
	var req MigrateRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, fmt.Errorf("migrate: bad request: %w", err)
	}
	m, err := p.machine()
	if err != nil {
		return nil, err
	}
	addr, err := parseTCPAddr(req.To)
	if err != nil {
		return nil, fmt.Errorf("migrate: --to: %w", err)
	}
	mctx, cancel := context.WithCancel(ctx)
	defer cancel()
	p.mu.Lock()
	if p.cancel != nil {
		p.mu.Unlock()
		return nil, errors.New("migrate: a migration of this VM is already in progress")
	}
	p.cancel = cancel
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.cancel = nil
		p.mu.Unlock()
	}()
	var d net.Dialer
	dctx, dcancel := context.WithTimeout(mctx, 10*time.Second)
	conn, err := d.DialContext(dctx, "tcp", addr)
	dcancel()
	if err != nil {
		return failedReport(start, "cannot reach the destination: "+err.Error()), fmt.Errorf("migrate: cannot reach the destination %s: %w (the VM keeps running here)", addr, err)
	}
	defer conn.Close()
	m.ResetHeartbeatGap()
	opts := migration.SendOptions{
		DowntimeLimit: time.Duration(req.DowntimeLimitMS) * time.Millisecond,
		MaxBandwidth:  req.MaxBandwidth,
		AutoConverge:  req.AutoConverge,
		Force:         req.Force,
		Timeout:       time.Duration(req.TimeoutMS) * time.Millisecond,
		Progress:      func(pr migration.Progress) { emit(pr) },
	}
	rep, err := migration.Send(mctx, vmm.MigrationSource{M: m}, conn, opts)
	if err != nil {
		if rep != nil && rep.Result == "" {
			rep.Result = "failed"
		}
		return rep, fmt.Errorf("migrate: %w (the VM keeps running here)", err)
	}
	// The destination runs the guest: release everything here. Total time ends now.
	conn.Close()
	m.Close()
	rep.TotalMS = float64(time.Since(start).Microseconds()) / 1000
	select {
	case p.migrated <- rep:
	default:
	}
	return rep, nil
}

func failedReport(start time.Time, msg string) *migration.Report {
	return &migration.Report{Side: "source", Result: "failed", Error: msg, Mode: "precopy", TotalMS: float64(time.Since(start).Microseconds()) / 1000}
}

// parseTCPAddr accepts tcp:HOST:PORT (and HOST:PORT) and returns HOST:PORT.
func parseTCPAddr(s string) (string, error) {
	a := strings.TrimPrefix(s, "tcp:")
	if a == s && strings.Contains(s, "://") {
		return "", fmt.Errorf("%q: want tcp:HOST:PORT", s)
	}
	host, port, err := net.SplitHostPort(a)
	if err != nil || port == "" {
		return "", fmt.Errorf("%q: want tcp:HOST:PORT", s)
	}
	return net.JoinHostPort(host, port), nil
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
