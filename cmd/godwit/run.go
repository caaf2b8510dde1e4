package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/godwit-vm/godwit/internal/control"
	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/vmm"
)

// WorkloadFlags choose what the built-in guest does.
type WorkloadFlags struct {
	Workload string        `enum:"idle,dirty" default:"idle" help:"idle: touch a fraction of memory once, then only heartbeat; dirty: rewrite pages of a working set at a rate (${enum})."`
	WSS      Size          `name:"wss" default:"64M" help:"dirty: working set size, split evenly between vCPUs."`
	Rate     Rate          `default:"max" help:"dirty: page writes per second over all vCPUs, or 'max' for as fast as the guest can."`
	Pattern  string        `enum:"sequential,random,hotcold" default:"random" help:"dirty: which pages of the working set are written (${enum})."`
	Content  string        `enum:"zero,text,random,image" default:"text" help:"Page content: zero pages, compressible text, incompressible random, or image-like pages that repeat within and across VMs of the same seed (${enum})."`
	Seed     uint64        `default:"1" help:"Seed of page content and write pattern."`
	Touch    float64       `default:"0.25" help:"idle: fraction of memory the guest writes once at start (0..1)."`
	Batch    int           `default:"64" help:"Pages written per unit of work; the guest heartbeats once per unit."`
	HotSize  float64       `name:"hot-size" default:"0.1" help:"hotcold: fraction of the working set that is hot."`
	HotProb  float64       `name:"hot-prob" default:"0.9" help:"hotcold: fraction of writes that go to the hot part."`
	Interval time.Duration `name:"idle-interval" default:"1ms" help:"idle: time between heartbeats."`
}

// RunCmd is 'godwit run'.
type RunCmd struct {
	Name      string `default:"vm" help:"The VM's name."`
	Mem       Size   `default:"1G" help:"Guest memory: a size such as 512M or 1G (a plain number means MiB)."`
	VCPUs     int    `name:"vcpus" default:"1" help:"Number of vCPUs; each runs the workload on its own slice of memory."`
	Control   string `placeholder:"PATH" help:"Control socket to serve (default /run/godwit/NAME.sock)."`
	KVMDevice string `name:"kvm-device" default:"/dev/kvm" help:"The KVM device."`
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
	if c.Workload == "dirty" {
		w["wss"] = uint64(c.WSS)
		w["rate"] = c.Rate.String()
		w["pattern"] = c.Pattern
	} else {
		w["touch"] = c.Touch
	}
	return w
}

// runSummary is what 'godwit run --json' prints when the VM ends.
type runSummary struct {
	Result string            `json:"result"`
	Error  string            `json:"error,omitempty"`
	Verify *vmm.VerifyReport `json:"verify,omitempty"`
	Stats  vmm.Stats         `json:"stats"`
}

func (c *RunCmd) Run(g *Globals, ctx context.Context) error {
	params, err := c.paramsBuilder()
	if err != nil {
		return err
	}
	m, err := vmm.New(vmm.Config{
		Name: c.Name, MemBytes: uint64(c.Mem), VCPUs: c.VCPUs, KVMDevice: c.KVMDevice,
		Image: guest.Image, Params: params, Workload: c.workloadDescription(),
		Console: consolePrinter(g),
	})
	if err != nil {
		return err
	}
	defer m.Close()
	return serveMachine(g, ctx, m, c.controlPath())
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

// serveMachine starts m, serves its control socket, and waits until the guest exits, fails, is
// told to quit, or the process is interrupted (then the guest verifies and exits).
func serveMachine(g *Globals, ctx context.Context, m *vmm.Machine, path string) error {
	srv, err := control.Listen(path)
	if err != nil {
		return err
	}
	quit := make(chan vmm.VerifyReport, 1)
	registerMachine(srv, m, quit)
	go srv.Serve()
	defer srv.Close()
	if err := m.Start(); err != nil {
		return err
	}
	if !g.JSON {
		fmt.Printf("godwit: VM %q running (%s, %d vCPUs); control socket %s\n", m.Name(), formatBytes(m.Config().MemBytes), m.VCPUs(), path)
	}
	var final *vmm.VerifyReport
	var runErr error
	select {
	case r := <-quit:
		final = &r
	case <-m.Done():
		_, runErr = m.State()
		if runErr == nil {
			// The vCPUs end when a quit request made the guest exit; its report follows.
			select {
			case r := <-quit:
				final = &r
			case <-time.After(5 * time.Second):
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
	return finish(g, m, final, runErr)
}

func finish(g *Globals, m *vmm.Machine, final *vmm.VerifyReport, runErr error) error {
	sum := runSummary{Result: "ok", Verify: final, Stats: m.Stats()}
	sum.Stats.Console = nil
	if runErr != nil {
		sum.Result, sum.Error = "failed", runErr.Error()
	} else if final != nil && final.Mismatches > 0 {
		sum.Result = "corrupt"
	}
	if g.JSON {
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

// registerMachine wires the machine's control endpoints.
func registerMachine(srv *control.Server, m *vmm.Machine, quit chan<- vmm.VerifyReport) {
	srv.Handle(http.MethodGet, "/v1/stats", func(context.Context, []byte) (any, error) {
		return m.Stats(), nil
	})
	srv.Handle(http.MethodPost, "/v1/verify", func(ctx context.Context, _ []byte) (any, error) {
		return m.Verify(ctx)
	})
	srv.Handle(http.MethodPost, "/v1/pause", func(context.Context, []byte) (any, error) {
		return nil, conflict(m.Pause())
	})
	srv.Handle(http.MethodPost, "/v1/resume", func(context.Context, []byte) (any, error) {
		return nil, conflict(m.Resume())
	})
	srv.Handle(http.MethodPost, "/v1/quit", func(ctx context.Context, _ []byte) (any, error) {
		r, err := m.Quit(ctx)
		if err != nil {
			return nil, err
		}
		select {
		case quit <- r:
		default:
		}
		return r, nil
	})
	srv.Handle(http.MethodPost, "/v1/debug/write", func(_ context.Context, body []byte) (any, error) {
		var req struct {
			GPA  uint64 `json:"gpa"`
			Data string `json:"data"` // base64
		}
		if err := json.Unmarshal(body, &req); err != nil {
			return nil, &control.StatusError{Status: http.StatusBadRequest, Err: fmt.Errorf("debug write: %w", err)}
		}
		data, err := base64.StdEncoding.DecodeString(req.Data)
		if err != nil {
			return nil, &control.StatusError{Status: http.StatusBadRequest, Err: fmt.Errorf("debug write: data: %w", err)}
		}
		if err := m.WriteGuest(req.GPA, data); err != nil {
			return nil, &control.StatusError{Status: http.StatusBadRequest, Err: err}
		}
		return map[string]any{"written": len(data)}, nil
	})
}

func conflict(err error) error {
	if err == nil {
		return nil
	}
	return &control.StatusError{Status: http.StatusConflict, Err: err}
}
