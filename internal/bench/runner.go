package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/godwit-vm/godwit/internal/testbed"
)

// Config is how RunSuite runs a suite.
type Config struct {
	// Godwit is the godwit binary whose run, migrate, verify and quit commands the godwit
	// runs use.
	Godwit string
	// Systems to run each scenario on (default both, godwit first).
	Systems []string
	// Repeat is the number of runs of each scenario on each system (default 1).
	Repeat int
	// Out is the directory results.jsonl is written to as runs end (created if missing).
	Out string
	// WorkDir holds the VMs' control and QMP sockets; it must allow Unix sockets (not a 9p
	// share). Default: os.TempDir().
	WorkDir string
	// WarmUp is how long the guest runs on the source before the migration (default 3s; a
	// scenario's own warm-up, if longer, wins; QEMU's guest also first finishes its first
	// verification of memory, see qemuVerifyInterval).
	WarmUp time.Duration
	// RawTCPBytes is the size of the raw TCP transfer before each run (default 32 MiB).
	RawTCPBytes int64
	// Timeout bounds each migration (default 2 minutes).
	Timeout time.Duration
	// Progress, if set, is told about each run as it starts and ends.
	Progress func(Event)
	// Log, if set, receives the VMs' own output (stderr, QEMU's log) for diagnosis.
	Log io.Writer
}

// Event is a run starting (Run nil) or ending.
type Event struct {
	Index, Count int // this scenario and how many (1-based)
	Scenario     Scenario
	System       string
	Repeat       int // 0-based
	Phase        string
	Run          *Run // the finished run
	Elapsed      time.Duration
}

func (c *Config) defaults() {
	if len(c.Systems) == 0 {
		c.Systems = []string{SystemGodwit, SystemQEMU}
	}
	if c.Repeat <= 0 {
		c.Repeat = 1
	}
	if c.WorkDir == "" {
		c.WorkDir = os.TempDir()
	}
	if c.WarmUp <= 0 {
		c.WarmUp = 3 * time.Second
	}
	if c.RawTCPBytes <= 0 {
		c.RawTCPBytes = 32 << 20
	}
	if c.Timeout <= 0 {
		c.Timeout = 2 * time.Minute
	}
	if c.Log == nil {
		c.Log = io.Discard
	}
}

// RunSuite runs every scenario Repeat times on every system, each scenario in a testbed of its
// own, appending each run to Out/results.jsonl as it ends, and returns the runs. A run that
// fails is recorded as an error and the suite goes on; RunSuite itself fails only when it
// cannot write its results or ctx is done.
func RunSuite(ctx context.Context, cfg Config, scenarios []Scenario) ([]Run, error) {
	cfg.defaults()
	if err := os.MkdirAll(cfg.Out, 0o755); err != nil {
		return nil, err
	}
	f, err := os.Create(filepath.Join(cfg.Out, "results.jsonl"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	start := time.Now()
	var runs []Run
	for i, s := range scenarios {
		if err := ctx.Err(); err != nil {
			return runs, err
		}
		rs := runScenario(ctx, &cfg, s, i+1, len(scenarios), start)
		if err := WriteJSONL(f, rs...); err != nil {
			return runs, err
		}
		runs = append(runs, rs...)
	}
	return runs, ctx.Err()
}

func runScenario(ctx context.Context, cfg *Config, s Scenario, index, count int, start time.Time) []Run {
	var runs []Run
	event := func(sys string, rep int, phase string, r *Run) {
		if cfg.Progress != nil {
			cfg.Progress(Event{Index: index, Count: count, Scenario: s, System: sys, Repeat: rep, Phase: phase, Run: r, Elapsed: time.Since(start)})
		}
	}
	tb, err := testbed.New(testbed.Config{Bandwidth: s.LinkBps})
	if err != nil {
		for rep := 0; rep < cfg.Repeat; rep++ {
			for _, sys := range cfg.Systems {
				r := newRun(s, sys, rep)
				r.fail(fmt.Errorf("testbed: %w", err))
				event(sys, rep, "done", &r)
				runs = append(runs, r)
			}
		}
		return runs
	}
	defer tb.Close()
	meter, err := newLinkMeter(tb.Host(0))
	if err != nil {
		fmt.Fprintf(cfg.Log, "bench: %s: no link counters: %v\n", s.Name, err)
	} else {
		defer meter.close()
	}
	for rep := 0; rep < cfg.Repeat; rep++ {
		for _, sys := range cfg.Systems {
			if ctx.Err() != nil {
				return runs
			}
			r := newRun(s, sys, rep)
			event(sys, rep, "start", nil)
			t0 := time.Now()
			err = nil
			if s.Hosts != HostsSame { // on one host there is no link to measure
				r.RawTCPBps, err = tb.MeasureTCPConns(cfg.RawTCPBytes, max(1, s.Streams))
			}
			if err != nil {
				r.fail(fmt.Errorf("raw TCP baseline: %w", err))
			} else {
				phase := func(p string) {
					fmt.Fprintf(cfg.Log, "%s bench: %s %s run %d: %s\n", time.Now().Format("15:04:05.000"), s.Name, sys, rep+1, p)
					event(sys, rep, p, nil)
				}
				env := &runEnv{cfg: cfg, tb: tb, meter: meter, s: s, run: &r, port: nextPort(), phase: phase}
				var err error
				switch sys {
				case SystemGodwit:
					err = env.godwit(ctx)
				case SystemQEMU:
					err = env.qemu(ctx)
				default:
					err = fmt.Errorf("unknown system %q", sys)
				}
				var skip skipError
				switch {
				case errors.As(err, &skip):
					r.Result, r.Error = ResultSkipped, skip.reason
				case err != nil:
					r.fail(err)
				default:
					r.Result = ResultOK
					if r.TotalMS > 0 && r.RawTCPBps > 0 {
						r.LinkUse = float64(r.BytesWire) / (r.TotalMS / 1000) / r.RawTCPBps
					}
					r.setWorkLost()
					r.setMemory()
				}
			}
			r.WallMS = ms(time.Since(t0))
			fmt.Fprintf(cfg.Log, "%s bench: %s %s run %d: %s %s\n", time.Now().Format("15:04:05.000"), s.Name, sys, rep+1, r.Result, r.Error)
			event(sys, rep, "done", &r)
			runs = append(runs, r)
		}
	}
	return runs
}

func newRun(s Scenario, sys string, rep int) Run {
	return Run{Scenario: s.Name, System: sys, Technique: s.Technique, Repeat: rep, Started: time.Now(), Setup: s, Result: ResultError}
}

func (r *Run) fail(err error) { r.Result, r.Error = ResultError, err.Error() }

// skipError is a scenario the system cannot run.
type skipError struct{ reason string }

func (e skipError) Error() string { return "skipped: " + e.reason }

// runEnv is what one run needs.
type runEnv struct {
	cfg   *Config
	tb    *testbed.Testbed
	meter *linkMeter
	s     Scenario
	run   *Run
	port  int
	phase func(string)
	// memBase is the host memory in use before the run's VMs started (hostUsed).
	memBase int64
}

var ports struct {
	sync.Mutex
	next int
}

// nextPort is a fresh TCP port for a destination to listen on (every run gets its own, so
// that no run waits for a previous one's sockets to leave TIME_WAIT).
func nextPort() int {
	ports.Lock()
	defer ports.Unlock()
	if ports.next == 0 || ports.next > 9900 {
		ports.next = 7400
	}
	ports.next++
	return ports.next
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// warmUp is how long the run's guest runs before the migration: the suite's warm-up or the
// scenario's, whichever is longer.
func (e *runEnv) warmUp() time.Duration { return max(e.cfg.WarmUp, e.s.WarmUp) }

// linkMeter reads the transmit counter of a host's end of the link.
type linkMeter struct{ h *netlink.Handle }

func newLinkMeter(host *testbed.Host) (*linkMeter, error) {
	ns, err := netns.GetFromPath(host.NetnsPath())
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, syscall.NETLINK_ROUTE)
	if err != nil {
		return nil, err
	}
	return &linkMeter{h}, nil
}

// tx is the bytes sent so far (-1 if unknown).
func (m *linkMeter) tx() int64 {
	if m == nil {
		return -1
	}
	l, err := m.h.LinkByName(testbed.IfName)
	if err != nil || l.Attrs().Statistics == nil {
		return -1
	}
	return int64(l.Attrs().Statistics.TxBytes)
}

func (m *linkMeter) close() { m.h.Close() }

// sampler calls f about every period from now until stop, and once more at stop, collecting
// samples: the last one is taken after whatever the caller waited for has ended.
type sampler struct {
	quit    chan struct{}
	done    chan struct{}
	samples []Sample
}

func startSampler(period time.Duration, f func(time.Time) Sample) *sampler {
	sm := &sampler{quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(sm.done)
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			sm.samples = append(sm.samples, f(time.Now()))
			select {
			case <-sm.quit:
				sm.samples = append(sm.samples, f(time.Now()))
				return
			case <-t.C:
			}
		}
	}()
	return sm
}

// stop ends the sampling and returns the samples.
func (sm *sampler) stop() []Sample {
	select {
	case <-sm.quit:
	default:
		close(sm.quit)
	}
	<-sm.done
	return sm.samples
}

// relative makes the samples' link bytes relative to base (the count when the migration was
// issued).
func relative(samples []Sample, base int64) {
	for i := range samples {
		if samples[i].LinkBytes >= 0 && base >= 0 {
			samples[i].LinkBytes -= base
		} else {
			samples[i].LinkBytes = -1
		}
	}
}

// tail keeps the last max bytes written to it.
type tail struct {
	mu  sync.Mutex
	max int
	b   []byte
	tee io.Writer
}

func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.tee != nil {
		t.tee.Write(p)
	}
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append([]byte(nil), t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
