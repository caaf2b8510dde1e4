package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/godwit-vm/godwit/internal/bench"
	"github.com/godwit-vm/godwit/internal/kvm"
	"github.com/godwit-vm/godwit/internal/qemu"
)

// BenchCmd is 'godwit bench'.
type BenchCmd struct {
	Quick      bool          `help:"Run the quick suite (a few scenarios; about 2 minutes in the nested KVM host) instead of the default one (about 10 minutes there): --suite quick."`
	Suite      string        `default:"default" enum:"default,quick,streams,downtime,compress,freepages,delta,dedup,handover,tls" placeholder:"SUITE" help:"The scenario suite: default, quick, streams (the link-speed scenarios on the unshaped link with 1 to 8 connections: godwit --streams, QEMU multifd, raw TCP over as many; direct KVM only, about 15 minutes), downtime (idle VMs of 1, 4 and 16 GiB by pre-copy and post-copy: the stop window against the memory's size; direct KVM only), or compress (text VMs without and with zstd over 1 Gbit/s and unshaped: godwit --compress zstd, QEMU multifd-compression zstd, both over 2 connections), or freepages (a churning 1 GiB VM with 70% of its memory free: godwit with and without the guest's free page reports, pre-copy and post-copy, over 1 Gbit/s), or delta (a writer that changes pages a little, godwit --delta against QEMU xbzrle), or dedup (VMs whose pages repeat, godwit without and with --dedup; QEMU plain), or handover (VMs of 1, 4 and 16 GiB moved to another process on the same host: godwit handing its memfds over, QEMU x-ignore-shared on a shared memory file, and both copying over a Unix socket; with the memory both processes hold; direct KVM only), or tls (godwit without and with mutual TLS on every connection, pre-copy on 1 and 4 connections and post-copy, over the unshaped link; QEMU runs the plain ones only). Default ${default}."`
	Scenario   string        `placeholder:"REGEX" help:"Run only the scenarios of the suite whose names match this regular expression (see --list)."`
	Repeat     int           `default:"1" placeholder:"N" help:"Runs of each scenario on each system; the report shows medians. Default ${default}."`
	Out        string        `default:"bench-results" placeholder:"DIR" help:"Directory for results.jsonl, report.md, the plots (SVG) and bench.log. Default ${default}."`
	System     []string      `default:"godwit,qemu" placeholder:"SYSTEM,..." help:"Systems to run: godwit, qemu or both. Default ${default}."`
	List       bool          `help:"List the scenarios of the suite and exit."`
	ReportOnly bool          `name:"report-only" help:"Run nothing: make report.md and the plots again from DIR/results.jsonl (needs no KVM)."`
	WarmUp     time.Duration `name:"warm-up" default:"3s" placeholder:"DURATION" help:"How long the guest runs on the source before each migration (QEMU's guest also finishes its first self-verification first). Default ${default}."`
	Timeout    time.Duration `default:"2m" placeholder:"DURATION" help:"Bound on each migration. Default ${default}."`
}

// Help is the detailed help of 'godwit bench --help'.
func (c *BenchCmd) Help() string {
	return `Runs a suite of migration scenarios on godwit and, as the baseline, on QEMU, and writes a
report of both side by side.

Each scenario (a guest: memory size, workload, working set, write rate and pattern, page
content; a link: 1 Gbit/s shaped or unshaped; a technique: precopy, postcopy or hybrid with its
options) runs on both systems with the same guest, the same link and the same bandwidth cap.
For every scenario the suite builds a testbed (two network namespaces joined by a veth pair)
and for every run measures raw TCP on the link first. A godwit run starts 'godwit run' on one
host and 'godwit run --incoming' on the other, migrates with 'godwit migrate --json' and
requires 'godwit verify' on the destination to find no wrong page. A QEMU run boots the same
guest (its multiboot build) under QEMU-KVM on both hosts and migrates with QEMU's own
migration (max-bandwidth as the cap); the destination guest's own verification must find no
wrong page. Runs where godwit cannot do a technique yet are recorded as skipped.

Per run, results.jsonl records total time, downtime, blackout (largest gap in the guest's
heartbeats), bytes on the wire, pages, post-copy faults and fault latencies, link use (bytes
over total time against raw TCP) and a timeline of bytes sent and guest progress sampled
every 100 ms. report.md has a table per scenario with both systems' medians and the
godwit/QEMU ratios; the plots are bars per technique, a timeline per scenario and the
post-copy fault-latency CDF.

It needs KVM, root (network namespaces) and qemu-system-x86. tools/kvmhost runs it directly
where /dev/kvm runs godwit's guest, and in the nested KVM host otherwise, where everything runs
10 to 50 times slower: most VMs are sized for that (256 MiB, 64 MiB working sets); leave out the
two large ones (writer-1g, idle-4g) there with --scenario '^([^g]|g[^-])*$'.

  go build -o bin/godwit ./cmd/godwit && go run ./tools/kvmhost -- bin/godwit bench --out docs/bench`
}

func (c *BenchCmd) Run(g *Globals, ctx context.Context) error {
	all, err := bench.Scenarios()
	if err != nil {
		return err
	}
	var re *regexp.Regexp
	if c.Scenario != "" {
		if re, err = regexp.Compile(c.Scenario); err != nil {
			return fmt.Errorf("--scenario: %w", err)
		}
	}
	suite := c.Suite
	if c.Quick {
		suite = "quick"
	}
	scen := bench.Select(all, suite, re)
	if c.List {
		return listScenarios(g, suite, scen)
	}
	if c.ReportOnly {
		runs, err := bench.ReadJSONL(filepath.Join(c.Out, bench.ResultsFile))
		if err != nil {
			return err
		}
		meta, err := bench.ReadMeta(c.Out)
		if err != nil {
			meta = bench.Meta{Command: "godwit bench --report-only --out " + c.Out, Host: hostDescription(), QEMU: qemuVersion()}
		}
		if meta.Godwit == "" {
			meta.Godwit = versionLine()
		}
		return c.report(g, runs, meta, time.Now())
	}
	if len(scen) == 0 {
		return fmt.Errorf("no scenario of the %s suite matches --scenario %q (see godwit bench --list)", suite, c.Scenario)
	}
	if c.Repeat < 1 {
		return fmt.Errorf("--repeat %d: want at least 1", c.Repeat)
	}
	var systems []string
	for _, s := range c.System {
		for _, x := range strings.Split(s, ",") {
			switch x = strings.TrimSpace(x); x {
			case bench.SystemGodwit, bench.SystemQEMU:
				systems = append(systems, x)
			case "both":
				systems = append(systems, bench.SystemGodwit, bench.SystemQEMU)
			default:
				return fmt.Errorf("--system %q: want godwit, qemu or both", x)
			}
		}
	}
	if err := kvm.Available("/dev/kvm"); err != nil {
		return fmt.Errorf("godwit bench needs KVM: %w\n(on a machine without /dev/kvm, run the suite inside the nested KVM host: go build -o bin/godwit ./cmd/godwit && go run ./tools/kvmhost -- bin/godwit bench %s)", err, strings.Join(os.Args[2:], " "))
	}
	if os.Geteuid() != 0 {
		return errors.New("godwit bench needs root: its testbeds are network namespaces")
	}
	for _, s := range systems {
		if s == bench.SystemQEMU {
			if _, err := qemu.FindBinary(""); err != nil {
				return fmt.Errorf("the QEMU baseline needs QEMU: %w (or run with --system godwit)", err)
			}
		}
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(c.Out, 0o755); err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(c.Out, "bench.log"))
	if err != nil {
		return err
	}
	defer logf.Close()

	out := io.Writer(os.Stdout)
	if g.JSON {
		out = os.Stderr
	}
	tty := isTerminal(out.(*os.File))
	start := time.Now()
	cfg := bench.Config{
		Godwit: self, Systems: systems, Repeat: c.Repeat, Out: c.Out, WarmUp: c.WarmUp, Timeout: c.Timeout,
		Log: logf,
		Progress: func(e bench.Event) {
			head := fmt.Sprintf("[%d/%d] %s %s run %d/%d", e.Index, e.Count, e.Scenario.Name, e.System, e.Repeat+1, c.Repeat)
			el := e.Elapsed.Round(time.Second)
			switch {
			case e.Run != nil:
				if tty {
					fmt.Fprint(out, "\r\033[K")
				}
				fmt.Fprintf(out, "%s: %s (elapsed %v)\n", head, runLine(e.Run), el)
			case tty:
				fmt.Fprintf(out, "\r\033[K%s: %s (elapsed %v)", head, e.Phase, el)
			case e.Phase == "start":
				fmt.Fprintf(out, "%s: %s, %s, %s (elapsed %v)\n", head, e.Scenario.Technique, e.Scenario.Link(), e.Scenario.Guest(), el)
			}
		},
	}
	fmt.Fprintf(out, "godwit bench: %d scenarios of the %s suite x %d systems x %d runs; results in %s\n", len(scen), suite, len(systems), c.Repeat, c.Out)
	runs, err := bench.RunSuite(ctx, cfg, scen)
	if err != nil && len(runs) == 0 {
		return err
	}
	meta := bench.Meta{Command: "godwit " + strings.Join(os.Args[1:], " "), Started: start, Duration: time.Since(start),
		Host: hostDescription(), QEMU: qemuVersion(), Godwit: versionLine()}
	if merr := bench.WriteMeta(c.Out, meta); merr != nil {
		return merr
	}
	if rerr := c.report(g, runs, meta, start); rerr != nil {
		return rerr
	}
	if err != nil {
		return err
	}
	for _, r := range runs {
		if r.Result == bench.ResultError {
			return exitError{1}
		}
	}
	return nil
}

// report writes report.md and the plots and shows where they are.
func (c *BenchCmd) report(g *Globals, runs []bench.Run, meta bench.Meta, start time.Time) error {
	plots, err := bench.WriteReport(c.Out, runs, meta)
	if err != nil {
		return err
	}
	counts := map[string]int{}
	for _, r := range runs {
		counts[r.Result]++
	}
	if g.JSON {
		var paths []string
		for _, p := range plots {
			paths = append(paths, filepath.Join(c.Out, p))
		}
		return printJSON(map[string]any{
			"out": c.Out, "results": filepath.Join(c.Out, bench.ResultsFile), "report": filepath.Join(c.Out, bench.ReportFile),
			"plots": paths, "runs": len(runs), "ok": counts[bench.ResultOK], "errors": counts[bench.ResultError],
			"skipped": counts[bench.ResultSkipped], "elapsed_ms": time.Since(start).Milliseconds(),
			"ratios_markdown": bench.SummaryTable(runs),
		})
	}
	fmt.Printf("\ngodwit / QEMU (medians; below 1: godwit takes less)\n\n%s\n", bench.SummaryTable(runs))
	fmt.Printf("%d runs: %d ok, %d failed, %d skipped; report %s, %d plots, results %s\n", len(runs), counts[bench.ResultOK],
		counts[bench.ResultError], counts[bench.ResultSkipped], filepath.Join(c.Out, bench.ReportFile), len(plots), filepath.Join(c.Out, bench.ResultsFile))
	return nil
}

func runLine(r *bench.Run) string {
	switch r.Result {
	case bench.ResultSkipped:
		return "skipped: " + r.Error
	case bench.ResultError:
		return "FAILED: " + r.Error
	}
	s := fmt.Sprintf("ok  total %.0f ms, downtime %.1f ms, blackout %.1f ms, %s, link use %.2f", r.TotalMS, r.DowntimeMS, r.BlackoutMS,
		formatBytes(uint64(r.BytesWire)), r.LinkUse)
	if r.Faults > 0 {
		s += fmt.Sprintf(", %d faults", r.Faults)
	}
	return s
}

func listScenarios(g *Globals, suite string, scen []bench.Scenario) error {
	if g.JSON {
		return printJSON(scen)
	}
	fmt.Printf("%s suite: %d scenarios (each on godwit and on QEMU)\n", suite, len(scen))
	for _, s := range scen {
		fmt.Printf("  %-30s %s; link %s; %s\n", s.Name, s.Guest(), s.Link(), s.Options())
	}
	return nil
}

// hostDescription says what the suite ran on.
func hostDescription() string {
	var u unix.Utsname
	unix.Uname(&u)
	d := fmt.Sprintf("%d CPUs", runtime.NumCPU())
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				d += " (" + strings.TrimSpace(v) + ")"
				break
			}
		}
	}
	d += ", Linux " + unix.ByteSliceToString(u.Release[:])
	if b, err := os.ReadFile("/proc/cmdline"); err == nil && strings.Contains(string(b), "kvmhost.dir=") {
		return d + ", inside the nested KVM host (tools/kvmhost: QEMU TCG with emulated SVM)"
	}
	// Which KVM runs the guests directly: the module that provides it.
	for _, m := range []string{"kvm_pvm", "kvm_intel", "kvm_amd"} {
		if _, err := os.Stat("/sys/module/" + m); err == nil {
			return d + ", direct KVM (" + m + ")"
		}
	}
	return d
}

func qemuVersion() string {
	bin, err := qemu.FindBinary("")
	if err != nil {
		return ""
	}
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return ""
	}
	l, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(strings.TrimPrefix(l, "QEMU emulator version "))
}
