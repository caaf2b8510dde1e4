package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/godwit-vm/godwit/migration"
)

// MigrateCmd is 'godwit migrate'.
type MigrateCmd struct {
	ControlFlag
	To            string        `required:"" placeholder:"tcp:HOST:PORT" help:"The destination: a 'godwit run --incoming' waiting there."`
	DowntimeLimit time.Duration `default:"300ms" help:"Stop and copy once the expected downtime is within this."`
	MaxBandwidth  Bandwidth     `default:"0" help:"Cap on migration traffic: bytes/s with K, M, G suffixes (125M) or bits/s (1gbit); 0 = no cap."`
	AutoConverge  bool          `help:"Throttle the vCPUs when the guest dirties memory faster than the link carries it."`
	Force         bool          `help:"If pre-copy does not converge, stop and copy anyway (longer downtime) instead of failing."`
	Timeout       time.Duration `default:"0" help:"Give up (the VM keeps running here) after this long; 0 = no limit."`
}

// Bandwidth is bytes per second.
type Bandwidth int64

func (b *Bandwidth) UnmarshalText(t []byte) error {
	s := strings.ToLower(strings.TrimSpace(string(t)))
	bits := false
	for _, suf := range []string{"bit/s", "bps", "bit"} {
		if strings.HasSuffix(s, suf) {
			s, bits = strings.TrimSuffix(s, suf), true
			break
		}
	}
	s = strings.TrimSuffix(strings.TrimSuffix(s, "/s"), "b")
	mult := 1.0
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'k':
			mult, s = 1e3, s[:n-1]
		case 'm':
			mult, s = 1e6, s[:n-1]
		case 'g':
			mult, s = 1e9, s[:n-1]
		}
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f < 0 {
		return fmt.Errorf("bandwidth %q: want bytes/s such as 125M or bits/s such as 1gbit", string(t))
	}
	if bits {
		f /= 8
	}
	*b = Bandwidth(f * mult)
	return nil
}

func (c *MigrateCmd) Run(g *Globals, ctx context.Context) error {
	if _, err := parseTCPAddr(c.To); err != nil {
		return fmt.Errorf("--to: %w", err)
	}
	req := MigrateRequest{
		To: c.To, DowntimeLimitMS: c.DowntimeLimit.Milliseconds(), MaxBandwidth: int64(c.MaxBandwidth),
		AutoConverge: c.AutoConverge, Force: c.Force, TimeoutMS: c.Timeout.Milliseconds(),
	}
	cl := c.client()
	tty := !g.JSON && isTerminal(os.Stdout)
	// Interrupting asks the VM process to cancel, then waits for its final report: the stream
	// itself is not cut, so the report of the cancelled migration still arrives.
	go func() {
		<-ctx.Done()
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		cl.Call(cctx, http.MethodDelete, "/v1/migrate", nil, nil)
	}()
	var rep migration.Report
	err := cl.Stream(context.Background(), http.MethodPost, "/v1/migrate", req, func(raw json.RawMessage) {
		if !tty {
			return
		}
		var p migration.Progress
		if json.Unmarshal(raw, &p) == nil {
			fmt.Printf("\r\033[K%s", progressLine(p))
		}
	}, &rep)
	if tty {
		fmt.Print("\r\033[K")
	}
	if rep.Result == "" {
		rep.Result = "failed"
		if err != nil {
			rep.Error = err.Error()
		}
	}
	if g.JSON {
		printJSON(rep)
	} else {
		printReport(rep)
	}
	if err != nil || rep.Result != "ok" {
		if g.JSON {
			return exitError{1}
		}
		if err != nil {
			return err
		}
		return exitError{1}
	}
	return nil
}

func progressLine(p migration.Progress) string {
	return fmt.Sprintf("round %d  %s sent  dirty %.0f pages/s  remaining %d pages  expected downtime %v  throttle %d%%  (%s)",
		p.Round, formatBytes(uint64(p.BytesWire)), p.DirtyRate, p.PagesRemaining, p.ExpectedDowntime.Round(100*time.Microsecond), p.Throttle, p.Phase)
}

func printReport(r migration.Report) {
	fmt.Printf("result       %s", r.Result)
	if r.Error != "" {
		fmt.Printf(" (%s)", r.Error)
	}
	fmt.Println()
	if r.Mode == "" {
		return
	}
	fmt.Printf("mode         %s, %d rounds, converged %v", r.Mode, r.Rounds, r.Converged)
	if r.Reason != "" {
		fmt.Printf(" (%s)", r.Reason)
	}
	fmt.Println()
	fmt.Printf("total        %.1f ms\n", r.TotalMS)
	fmt.Printf("downtime     %.2f ms (final round %.2f, state %.2f, ack %.2f, of which restore %.2f and start %.2f)\n",
		r.DowntimeMS, r.Downtime.FinalRoundMS, r.Downtime.StateMS, r.Downtime.AckMS, r.Downtime.RestoreMS, r.Downtime.StartMS)
	if r.BlackoutMS != nil {
		fmt.Printf("blackout     %.2f ms (largest gap in guest heartbeats)\n", *r.BlackoutMS)
	}
	mbps := 0.0
	if r.TotalMS > 0 {
		mbps = float64(r.BytesWire) * 8 / (r.TotalMS / 1000) / 1e6
	}
	fmt.Printf("wire         %s (%.0f Mbit/s over the total time)\n", formatBytes(uint64(r.BytesWire)), mbps)
	fmt.Printf("pages        raw %d, zero %d, holes skipped %d\n", r.Pages.Raw, r.Pages.Zero, r.Pages.Hole)
	if r.ThrottleMax > 0 {
		fmt.Printf("throttle     up to %d%%\n", r.ThrottleMax)
	}
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
