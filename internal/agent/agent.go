// Package agent is godwit's per-host daemon. It starts VM processes ('godwit run') and keeps
// a record of each, watches them (a VM process that dies is reported with how it ended, never
// restarted behind the operator's back), and serves an HTTP+JSON API on a Unix socket that
// only its owner may use (mode 0600):
//
//	GET    /v1/vms               every VM it knows: its record and, while it runs, its stats
//	POST   /v1/vms               start one: {"name": "web", "args": ["--mem", "1G", ...]}
//	GET    /v1/vms/NAME          one VM
//	DELETE /v1/vms/NAME          forget a VM that has ended
//	*      /v1/vms/NAME/REST     the VM process's own control API at /v1/REST (stats, verify,
//	                             pause, resume, quit, migrate with its progress stream, ...)
//	GET    /v1/events            server-sent events of the migrations that pass through
//	                             (setup, round, switch, completed, failed: see Event)
//
// With Config.Metrics it serves Prometheus metrics at http://ADDR/metrics: migrations by
// result and mode, their bytes, downtime and total time, post-copy demand faults and fault
// latency, and per VM its guest's progress and memory (see observe.go).
//
// VM processes run in sessions of their own and write to log files, so they outlive the
// agent: an agent that stops (or dies) leaves them running, and the next one started on the
// same state directory adopts them from their records.
package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/godwit-vm/godwit/internal/control"
	"github.com/godwit-vm/godwit/internal/transport"
)

// Config is what an agent needs.
type Config struct {
	StateDir string  // the VMs' records, logs and control sockets (made 0700)
	Socket   string  // the API's Unix socket
	Binary   string  // the godwit binary the VMs run
	Metrics  string  // where to serve Prometheus metrics (HOST:PORT, GET /metrics); "": nowhere
	Peering  Peering // how other agents reach this one (peer.go)
	// Templates is the template store (templates.go); its VMs are started with it, and a
	// clone's template is pushed from it to a destination agent that lacks it. "": none.
	Templates string
	Log       *slog.Logger // nil: slog.Default()
}

// StartTimeout bounds how long a VM process may take to serve its control socket.
const StartTimeout = time.Minute

// Agent is a running agent.
type Agent struct {
	cfg    Config
	vmsDir string
	log    *slog.Logger
	srv    *control.Server
	obs    *observer
	mln    net.Listener      // the metrics' listener, if any
	pln    net.Listener      // other agents', if any
	router *transport.Router // pln's connections: those routed to VM processes go there

	mu       sync.Mutex
	vms      map[string]*Record
	draining bool
}

// StartRequest is the body of POST /v1/vms.
type StartRequest struct {
	Name string   `json:"name"`
	Args []string `json:"args"` // 'godwit run' flags; the agent sets --name, --control and --json

	route string // an incoming migration's route, set by the agent alone
}

// VM is what the API shows of one VM: its record and, while it runs, the VM process's stats
// (vmm.Stats) or why they could not be had.
type VM struct {
	Record
	Stats      json.RawMessage `json:"stats,omitempty"`
	StatsError string          `json:"stats_error,omitempty"`
}

// New makes the state directory, adopts the VMs whose records say they run, and listens on
// the socket.
func New(cfg Config) (*Agent, error) {
	a := &Agent{cfg: cfg, vmsDir: filepath.Join(cfg.StateDir, "vms"), log: cfg.Log, vms: map[string]*Record{}}
	if a.log == nil {
		a.log = slog.Default()
	}
	if cfg.Binary == "" {
		return nil, errors.New("agent: no godwit binary to run VMs with")
	}
	if err := os.MkdirAll(a.vmsDir, 0o700); err != nil {
		return nil, fmt.Errorf("agent: state directory: %w", err)
	}
	if err := os.Chmod(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("agent: state directory: %w", err)
	}
	recs, err := LoadRecords(a.vmsDir)
	if err != nil {
		return nil, err
	}
	for i := range recs {
		r := &recs[i]
		a.vms[r.Name] = r
		if r.State == Running {
			a.adopt(r)
		}
	}
	// The socket is created owner-only from the start, not chmod-ed after: nobody else may
	// connect, not even in between.
	old := syscall.Umask(0o177)
	srv, err := control.Listen(cfg.Socket)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	a.srv = srv
	a.obs = newObserver(a)
	if cfg.Metrics != "" {
		if a.mln, err = net.Listen("tcp", cfg.Metrics); err != nil {
			srv.Close()
			return nil, fmt.Errorf("agent: metrics: %w", err)
		}
	}
	if cfg.Peering.Listen != "" {
		if a.pln, err = a.listenPeers(); err != nil {
			srv.Close()
			if a.mln != nil {
				a.mln.Close()
			}
			return nil, err
		}
	}
	srv.Handle(http.MethodGet, "/v1/vms", func(ctx context.Context, _ []byte) (any, error) { return a.list(ctx), nil })
	srv.Handle(http.MethodPost, "/v1/vms", a.start)
	srv.Handle(http.MethodPost, "/v1/gang/prepare", a.prepareGang)
	srv.HandleUnder("/v1/vms/", http.HandlerFunc(a.perVM))
	srv.HandleUnder("/v1/events", http.HandlerFunc(a.obs.events))
	srv.HandleUnder("/v1/templates/", http.HandlerFunc(a.apiPush))
	return a, nil
}

// MetricsAddr is where the metrics are served ("" without).
func (a *Agent) MetricsAddr() string {
	if a.mln == nil {
		return ""
	}
	return a.mln.Addr().String()
}

// Serve answers the API until ctx ends; then it refuses new work and stops. The VM processes
// run on.
func (a *Agent) Serve(ctx context.Context) error {
	a.log.Info("agent serving", "socket", a.cfg.Socket, "state", a.cfg.StateDir, "vms", len(a.vms))
	errc := make(chan error, 2)
	go func() { errc <- a.srv.Serve() }()
	if a.mln != nil {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", a.obs.handler())
		ms := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go ms.Serve(a.mln)
		defer ms.Close()
		a.log.Info("serving metrics", "addr", a.MetricsAddr())
	}
	if a.pln != nil {
		ps := a.servePeers(a.pln)
		defer ps.Close()
		a.log.Info("taking migrations from other agents", "addr", a.pln.Addr().String(), "tls", a.cfg.Peering.Security != nil)
	}
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	a.mu.Lock()
	a.draining = true
	running := 0
	for _, r := range a.vms {
		if r.State == Running {
			running++
		}
	}
	a.mu.Unlock()
	// Requests in flight (a migration's progress stream) get a moment; a migration whose
	// client goes away before its switch is cancelled by its VM process, which runs on.
	a.srv.Close()
	a.log.Info("agent stopped; its VM processes run on, and an agent started on the same state directory adopts them", "running", running)
	return nil
}

func (a *Agent) start(ctx context.Context, body []byte) (any, error) {
	var req StartRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, badRequest(fmt.Errorf("start: bad request: %w", err))
	}
	return a.startVM(ctx, req)
}

// startVM starts a VM process and returns once it serves its control socket.
func (a *Agent) startVM(ctx context.Context, req StartRequest) (VM, error) {
	if err := checkName(req.Name); err != nil {
		return VM{}, badRequest(err)
	}
	for _, arg := range req.Args {
		flag, _, _ := strings.Cut(arg, "=")
		if slices.Contains([]string{"--name", "--control", "--json", "--agent", "--help", "-h", "--version"}, flag) {
			return VM{}, badRequest(fmt.Errorf("start: %s is the agent's to set (it names the VM, its control socket and its output)", flag))
		}
	}
	if a.cfg.Templates != "" && !slices.ContainsFunc(req.Args, func(arg string) bool { return strings.HasPrefix(arg, "--templates") }) {
		req.Args = append(slices.Clip(req.Args), "--templates", a.cfg.Templates)
	}
	a.mu.Lock()
	if a.draining {
		a.mu.Unlock()
		return VM{}, &control.StatusError{Status: http.StatusServiceUnavailable, Err: errDraining}
	}
	if old := a.vms[req.Name]; old != nil && old.State == Running {
		a.mu.Unlock()
		return VM{}, &control.StatusError{Status: http.StatusConflict, Err: fmt.Errorf("start: VM %q runs already (pid %d)", req.Name, old.PID)}
	}
	rec := &Record{
		Name: req.Name, Args: req.Args, Started: time.Now(), State: Running, Route: req.route,
		Control: filepath.Join(a.vmsDir, req.Name+".sock"), Log: filepath.Join(a.vmsDir, req.Name+".log"),
	}
	a.vms[req.Name] = rec // holds the name while the process starts
	a.mu.Unlock()

	done, err := a.spawn(rec)
	if err == nil {
		err = waitReady(ctx, rec.Control, done)
	}
	if err != nil {
		if done == nil {
			a.mu.Lock()
			delete(a.vms, req.Name)
			a.mu.Unlock()
			return VM{}, fmt.Errorf("start VM %q: %w", req.Name, err)
		}
		syscall.Kill(rec.PID, syscall.SIGKILL)
		<-done
		return VM{}, fmt.Errorf("start VM %q: %w; its log (%s) ends:\n%s", req.Name, err, rec.Log, tailLines(rec.Log, 8))
	}
	a.log.Info("VM started", "vm", req.Name, "pid", rec.PID, "args", strings.Join(req.Args, " "))
	return a.snapshot(rec), nil
}

// spawn starts the VM process of rec and returns a channel that is closed once it has ended
// and its end is recorded.
func (a *Agent) spawn(rec *Record) (chan struct{}, error) {
	log, err := os.OpenFile(rec.Log, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	defer log.Close()
	cmd := exec.Command(a.cfg.Binary, append([]string{"run", "--json", "--name", rec.Name, "--control", rec.Control}, rec.Args...)...)
	cmd.Stdout, cmd.Stderr = log, log
	// A session of its own: the agent's end (a signal to its process group) is not the VM's.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	a.mu.Lock()
	rec.PID = cmd.Process.Pid
	err = rec.Save(a.vmsDir)
	a.mu.Unlock()
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		err := cmd.Wait()
		exit := "exit status 0"
		if err != nil {
			exit = err.Error()
		}
		a.ended(rec, exit)
		close(done)
	}()
	return done, nil
}

// waitReady waits until the VM process serves its control socket, or ends.
func waitReady(ctx context.Context, sock string, done chan struct{}) error {
	ctx, cancel := context.WithTimeout(ctx, StartTimeout)
	defer cancel()
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return nil
		}
		select {
		case <-done:
			return errors.New("its process ended before it served its control socket")
		case <-ctx.Done():
			return fmt.Errorf("no control socket after %v", StartTimeout)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// adopt takes over a VM an earlier agent started, if its process still runs, and watches it.
func (a *Agent) adopt(r *Record) {
	if !isVMProcess(r.PID, r.Control) {
		a.ended(r, "ended while no agent watched it")
		return
	}
	fd, err := unix.PidfdOpen(r.PID, 0)
	if err != nil {
		a.ended(r, "ended while no agent watched it")
		return
	}
	r.Adopted = true
	r.Save(a.vmsDir)
	a.log.Info("VM adopted", "vm", r.Name, "pid", r.PID)
	go func() {
		defer unix.Close(fd)
		for {
			_, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, -1)
			if err != unix.EINTR {
				break
			}
		}
		a.ended(r, "ended (exit status unknown: an earlier agent started it)")
	}()
}

// isVMProcess says whether pid runs the VM whose control socket is sock (and is not another
// process that got its pid since).
func isVMProcess(pid int, sock string) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && slices.Contains(strings.Split(string(b), "\x00"), sock)
}

// ended records how r's process ended: its exit, and its last report from the log.
func (a *Agent) ended(r *Record, exit string) {
	result, errText := lastReport(r.Log)
	a.mu.Lock()
	defer a.mu.Unlock()
	now := time.Now()
	r.Ended, r.Exit, r.Result, r.Error = &now, exit, result, errText
	r.State = Failed
	if result == "ok" || result == "migrated" {
		r.State = Exited
	}
	if cur := a.vms[r.Name]; cur != r {
		return // a new VM of that name replaced it, and its record
	}
	if r.Route != "" && a.router != nil {
		a.router.Remove(r.Route)
	}
	if err := r.Save(a.vmsDir); err != nil {
		a.log.Error("VM record not saved", "vm", r.Name, "err", err)
	}
	lvl := slog.LevelInfo
	if r.State == Failed {
		lvl = slog.LevelWarn
	}
	a.log.Log(context.Background(), lvl, "VM ended", "vm", r.Name, "pid", r.PID, "state", r.State, "exit", exit, "result", result, "error", errText)
}

func (a *Agent) snapshot(r *Record) VM {
	a.mu.Lock()
	defer a.mu.Unlock()
	return VM{Record: *r}
}

// list is every VM, by name, with the stats of those that run.
func (a *Agent) list(ctx context.Context) []VM {
	a.mu.Lock()
	out := make([]VM, 0, len(a.vms))
	for _, r := range a.vms {
		out = append(out, VM{Record: *r})
	}
	a.mu.Unlock()
	slices.SortFunc(out, func(x, y VM) int { return strings.Compare(x.Name, y.Name) })
	var wg sync.WaitGroup
	for i := range out {
		if out[i].State != Running {
			continue
		}
		wg.Add(1)
		go func(v *VM) {
			defer wg.Done()
			v.Stats, v.StatsError = stats(ctx, v.Control)
		}(&out[i])
	}
	wg.Wait()
	return out
}

func stats(ctx context.Context, sock string) (json.RawMessage, string) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var raw json.RawMessage
	if err := control.Dial(sock).Call(ctx, http.MethodGet, "/v1/stats", nil, &raw); err != nil {
		return nil, err.Error()
	}
	return raw, ""
}

// perVM serves /v1/vms/NAME and passes /v1/vms/NAME/REST on to the VM process.
func (a *Agent) perVM(w http.ResponseWriter, r *http.Request) {
	name, rest, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/v1/vms/"), "/")
	a.mu.Lock()
	rec := a.vms[name]
	var snap Record
	if rec != nil {
		snap = *rec
	}
	a.mu.Unlock()
	if rec == nil {
		control.WriteError(w, http.StatusNotFound, fmt.Errorf("no VM %q here ('godwit --agent SOCK ps' lists them)", name))
		return
	}
	switch {
	case rest == "" && r.Method == http.MethodGet:
		v := VM{Record: snap}
		if snap.State == Running {
			v.Stats, v.StatsError = stats(r.Context(), snap.Control)
		}
		writeJSON(w, v)
	case rest == "" && r.Method == http.MethodDelete:
		a.mu.Lock()
		defer a.mu.Unlock()
		if rec.State == Running {
			control.WriteError(w, http.StatusConflict, fmt.Errorf("VM %q runs: quit it first", name))
			return
		}
		delete(a.vms, name)
		for _, f := range []string{rec.Log, filepath.Join(a.vmsDir, name+".json")} {
			os.Remove(f)
		}
		writeJSON(w, map[string]string{"forgot": name})
	case rest == "":
		control.WriteError(w, http.StatusMethodNotAllowed, fmt.Errorf("%s %s: want GET or DELETE", r.Method, r.URL.Path))
	case snap.State != Running:
		control.WriteError(w, http.StatusConflict, fmt.Errorf("VM %q is not running: it %s (%s)", name, snap.State, snap.Exit))
	default:
		p := a.proxy(snap.Control, rest)
		if rest == "migrate" && r.Method == http.MethodPost {
			if err := a.rewriteMigrate(r, name); err != nil {
				control.WriteError(w, http.StatusBadRequest, fmt.Errorf("migrate VM %q: %w", name, err))
				return
			}
			p.ModifyResponse = func(resp *http.Response) error {
				if resp.StatusCode == http.StatusOK {
					resp.Body = &migrationTap{ReadCloser: resp.Body, o: a.obs, vm: name}
				}
				return nil
			}
		}
		p.ServeHTTP(w, r)
	}
}

// proxy passes a request on to the VM process's control socket at /v1/rest, streams and all.
func (a *Agent) proxy(sock, rest string) *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme, pr.Out.URL.Host, pr.Out.URL.Path, pr.Out.URL.RawPath = "http", "vm", "/v1/"+rest, ""
		},
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			},
		},
		FlushInterval: -1, // progress lines as they come
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			control.WriteError(w, http.StatusBadGateway, fmt.Errorf("the VM process at %s: %w", sock, err))
		},
	}
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func badRequest(err error) error {
	return &control.StatusError{Status: http.StatusBadRequest, Err: err}
}

// rewriteMigrate turns a migration to agent:HOST:PORT into one to the VM process that agent
// starts for it (toAgent); other migrations pass as they are.
func (a *Agent) rewriteMigrate(r *http.Request, name string) error {
	b, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		return err
	}
	var body map[string]any
	if json.Unmarshal(b, &body) == nil {
		if to, _ := body["to"].(string); strings.HasPrefix(to, "agent:") {
			if resume, _ := body["resume"].(bool); resume {
				return errors.New("--resume goes to the destination VM's own address (its agent's ps shows it), not to agent:")
			}
			if err := a.toAgent(r.Context(), name, strings.TrimPrefix(to, "agent:"), body); err != nil {
				return err
			}
			if b, err = json.Marshal(body); err != nil {
				return err
			}
		}
	}
	r.Body, r.ContentLength = io.NopCloser(bytes.NewReader(b)), int64(len(b))
	return nil
}
