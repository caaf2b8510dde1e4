package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/godwit-vm/godwit/internal/control"
	"github.com/godwit-vm/godwit/internal/vmm"
)

// ControlFlag names a VM: by its control socket, or under an agent by its name.
type ControlFlag struct {
	Control string `placeholder:"PATH" help:"The VM's control socket (as given to 'godwit run --control')."`
	VM      string `name:"vm" placeholder:"NAME" help:"With --agent: the agent's VM of this name."`
}

func (c ControlFlag) client(g *Globals) (*control.Client, error) {
	switch {
	case g.Agent != "" && c.Control != "":
		return nil, errors.New("--agent names a VM with --vm NAME, not --control")
	case g.Agent != "":
		if c.VM == "" {
			return nil, errors.New("--agent: which VM? give --vm NAME ('godwit --agent SOCK ps' lists them)")
		}
		return control.Dial(g.Agent).Under("/v1/vms/" + url.PathEscape(c.VM)), nil
	case c.VM != "":
		return nil, errors.New("--vm NAME names a VM of an agent: give --agent SOCK too, or --control PATH")
	case c.Control == "":
		return nil, errors.New("which VM? give --control PATH (its control socket), or --agent SOCK and --vm NAME")
	}
	return control.Dial(c.Control), nil
}

// StatsCmd is 'godwit stats'.
type StatsCmd struct {
	ControlFlag
}

func (c *StatsCmd) Run(g *Globals, ctx context.Context) error {
	cl, err := c.client(g)
	if err != nil {
		return err
	}
	var s vmm.Stats
	if err := cl.Call(ctx, http.MethodGet, "/v1/stats", nil, &s); err != nil {
		return err
	}
	if g.JSON {
		return printJSON(s)
	}
	printStats(s)
	return nil
}

func printStats(s vmm.Stats) {
	fmt.Printf("name          %s\n", s.Name)
	fmt.Printf("state         %s", s.State)
	if s.Error != "" {
		fmt.Printf(" (%s)", s.Error)
	}
	fmt.Println()
	fmt.Printf("vcpus         %d\n", s.VCPUs)
	fmt.Printf("memory        %s (resident %s)\n", formatBytes(s.MemBytes), formatBytes(s.ResidentBytes))
	switch {
	case s.MemoryFile != "" && s.Localizing:
		fmt.Printf("memory file   %s (moving out of it into this process's memory)\n", s.MemoryFile)
	case s.MemoryFile != "":
		fmt.Printf("memory file   %s\n", s.MemoryFile)
	case s.Localized != nil:
		l := s.Localized
		fmt.Printf("memory file   none: moved out of %s (%d pages in %d rounds and %d in a pause of %.2f ms, %.0f ms in all)\n",
			l.From, l.Pages-l.Final, l.Rounds, l.Final, l.PauseMS, l.TotalMS)
	}
	if s.BalloonTarget != "" || s.BalloonBytes > 0 {
		target := s.BalloonTarget
		if target == "" {
			target = "set before a migration"
		}
		fmt.Printf("balloon       %s (target %s; %d pages released here; %d taken back, %d of them on demand)\n",
			formatBytes(s.BalloonBytes), target, s.BalloonReleased, s.BalloonDeflated, s.BalloonOnDemand)
	}
	if len(s.Workload) > 0 {
		var parts []string
		for _, k := range []string{"workload", "wss", "touch", "peak", "rate", "pattern", "content", "seed"} {
			if v, ok := s.Workload[k]; ok {
				if f, isNum := v.(float64); isNum && k == "wss" {
					v = formatBytes(uint64(f))
				}
				parts = append(parts, fmt.Sprintf("%s=%v", k, v))
			}
		}
		fmt.Printf("workload      %s\n", strings.Join(parts, " "))
	}
	fmt.Printf("uptime        %s\n", (time.Duration(s.UptimeMS) * time.Millisecond).String())
	if s.FirstHeartbeatMS != nil {
		fmt.Printf("first beat    %.2f ms after start\n", *s.FirstHeartbeatMS)
	}
	fmt.Printf("heartbeats    %d (%.0f/s), largest gap %.2f ms\n", s.Heartbeats, s.HeartbeatsPerSec, s.MaxHeartbeatGapMS)
	fmt.Printf("pages written %d\n", s.PagesWritten)
	if s.ThrottlePct > 0 {
		fmt.Printf("throttle      %d%%\n", s.ThrottlePct)
	}
	if pc := s.Postcopy; pc != nil {
		fmt.Printf("post-copy     %d pages missing at the switch, %d still to come; %d demand faults (%d by the VMM), %d pages placed\n",
			pc.Missing, pc.Left, pc.Faults, pc.VMMFaults, pc.PagesPlaced)
	}
	if s.LastVerify != nil {
		fmt.Printf("last verify   %d pages checked, %d mismatches\n", s.LastVerify.PagesChecked, s.LastVerify.Mismatches)
	}
}

// VerifyCmd is 'godwit verify'.
type VerifyCmd struct {
	ControlFlag
	Timeout time.Duration `default:"2m" help:"How long to wait for the guest's report."`
}

func (c *VerifyCmd) Run(g *Globals, ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()
	cl, err := c.client(g)
	if err != nil {
		return err
	}
	var r vmm.VerifyReport
	if err := cl.Call(ctx, http.MethodPost, "/v1/verify", nil, &r); err != nil {
		return err
	}
	return reportVerify(g, r)
}

func reportVerify(g *Globals, r vmm.VerifyReport) error {
	if g.JSON {
		printJSON(r)
	} else {
		printVerify(os.Stdout, r)
	}
	if r.Mismatches > 0 {
		return exitError{1}
	}
	return nil
}

func printVerify(w *os.File, r vmm.VerifyReport) {
	fmt.Fprintf(w, "verified %d pages (%d written by the guest) on %d vCPUs in %.1f ms: %d mismatches\n",
		r.PagesChecked, r.PagesVersioned, r.VCPUs, r.DurationMS, r.Mismatches)
	if r.FirstBadGPA != nil {
		fmt.Fprintf(w, "first bad page at guest address 0x%x, offset %d: expected 0x%016x, found 0x%016x\n",
			*r.FirstBadGPA, r.FirstBadOffset, r.Expected, r.Found)
	}
}

// PauseCmd is 'godwit pause'.
type PauseCmd struct{ ControlFlag }

func (c *PauseCmd) Run(g *Globals, ctx context.Context) error {
	cl, err := c.client(g)
	if err != nil {
		return err
	}
	return simpleCall(g, ctx, cl, "/v1/pause", "paused")
}

// ResumeCmd is 'godwit resume'.
type ResumeCmd struct{ ControlFlag }

func (c *ResumeCmd) Run(g *Globals, ctx context.Context) error {
	cl, err := c.client(g)
	if err != nil {
		return err
	}
	return simpleCall(g, ctx, cl, "/v1/resume", "running")
}

func simpleCall(g *Globals, ctx context.Context, cl *control.Client, path, done string) error {
	var out json.RawMessage
	if err := cl.Call(ctx, http.MethodPost, path, nil, &out); err != nil {
		return err
	}
	if g.JSON {
		os.Stdout.Write(out)
		return nil
	}
	fmt.Println(done)
	return nil
}

// BalloonCmd is 'godwit balloon'.
type BalloonCmd struct {
	ControlFlag
	Target string `arg:"" placeholder:"SIZE|auto[:SHARE]|0" help:"Free guest memory to keep in the balloon: a size (512M), auto[:SHARE] (a share, 0..1, default 0.9, of whatever is free), or 0 to let it all go."`
}

func (c *BalloonCmd) Run(g *Globals, ctx context.Context) error {
	b, err := vmm.ParseBalloon(c.Target, parseSize)
	if err != nil {
		return err
	}
	cl, err := c.client(g)
	if err != nil {
		return err
	}
	var out vmm.Balloon
	if err := cl.Call(ctx, http.MethodPost, "/v1/balloon", b, &out); err != nil {
		return err
	}
	if g.JSON {
		printJSON(out)
		return nil
	}
	fmt.Printf("balloon target %s (see 'godwit stats' for its size)\n", out)
	return nil
}

// QuitCmd is 'godwit quit'.
type QuitCmd struct {
	ControlFlag
	Timeout time.Duration `default:"2m" help:"How long to wait for the guest to verify and exit."`
}

func (c *QuitCmd) Run(g *Globals, ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()
	cl, err := c.client(g)
	if err != nil {
		return err
	}
	var r vmm.VerifyReport
	if err := cl.Call(ctx, http.MethodPost, "/v1/quit", nil, &r); err != nil {
		return err
	}
	return reportVerify(g, r)
}

func formatBytes(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
