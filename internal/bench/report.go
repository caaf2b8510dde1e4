package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Meta describes where and how the results were made, for the report's header.
type Meta struct {
	Command  string        `json:"command"`  // the command line that made them
	Started  time.Time     `json:"started"`  // when the suite started
	Duration time.Duration `json:"duration"` // how long it ran
	Host     string        `json:"host"`     // machine, kernel, whether nested
	QEMU     string        `json:"qemu"`     // QEMU's version
	Godwit   string        `json:"godwit"`   // godwit's version
}

// WriteMeta saves meta in dir (meta.json), for a later --report-only.
func WriteMeta(dir string, meta Meta) error {
	b, err := json.MarshalIndent(meta, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, MetaFile), append(b, '\n'), 0o644)
}

// ReadMeta reads what WriteMeta saved.
func ReadMeta(dir string) (Meta, error) {
	var m Meta
	b, err := os.ReadFile(filepath.Join(dir, MetaFile))
	if err != nil {
		return m, err
	}
	return m, json.Unmarshal(b, &m)
}

// Files the report writes into its directory.
const (
	ResultsFile = "results.jsonl"
	ReportFile  = "report.md"
	MetaFile    = "meta.json"
)

// WriteReport writes report.md and the plots for runs into dir and returns the plots' file
// names.
func WriteReport(dir string, runs []Run, meta Meta) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	plots, err := WritePlots(dir, runs)
	if err != nil {
		return plots, err
	}
	f, err := os.Create(filepath.Join(dir, ReportFile))
	if err != nil {
		return plots, err
	}
	defer f.Close()
	if err := writeMarkdown(f, runs, meta, plots); err != nil {
		return plots, err
	}
	return plots, f.Close()
}

// ratio is a/b as text ("-" where either is missing or b is 0).
func ratio(a, b float64) string {
	if math.IsNaN(a) || math.IsNaN(b) || b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", a/b)
}

func num(v float64, unit string) string {
	if math.IsNaN(v) {
		return "-"
	}
	switch {
	case unit == "":
		return fmt.Sprintf("%.2f", v)
	case unit == "count":
		return fmt.Sprintf("%.0f", v)
	case unit == "MiB":
		return fmt.Sprintf("%.1f", v)
	case v < 10:
		return fmt.Sprintf("%.2f", v)
	case v < 1000:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.0f", v)
}

func get(s *Summary, key string) float64 {
	if s == nil {
		return math.NaN()
	}
	v, ok := s.Median[key]
	if !ok {
		return math.NaN()
	}
	return v
}

// SummaryTable is the markdown table of godwit/QEMU ratios of the medians, one row per
// scenario (the table README.md shows).
func SummaryTable(runs []Run) string {
	var b strings.Builder
	names, by := Summarize(runs)
	setup := setups(runs)
	b.WriteString("| scenario | technique | link |")
	for _, m := range Metrics {
		b.WriteString(" " + m.Label + " |")
	}
	b.WriteString("\n|---|---|---|" + strings.Repeat("---:|", len(Metrics)) + "\n")
	for _, n := range names {
		g, q := by[n][SystemGodwit], by[n][SystemQEMU]
		s := setup[n]
		fmt.Fprintf(&b, "| %s | %s | %s |", n, s.Technique, s.Link())
		for _, m := range Metrics {
			fmt.Fprintf(&b, " %s |", ratio(get(g, m.Key), get(q, m.Key)))
		}
		b.WriteString("\n")
	}
	return b.String()
}

func setups(runs []Run) map[string]Scenario {
	m := map[string]Scenario{}
	for _, r := range runs {
		if _, ok := m[r.Scenario]; !ok {
			m[r.Scenario] = r.Setup
		}
	}
	return m
}

func writeMarkdown(w io.Writer, runs []Run, meta Meta, plots []string) error {
	var b strings.Builder
	b.WriteString("# godwit bench: godwit against QEMU\n\n")
	if meta.Command != "" {
		fmt.Fprintf(&b, "Made by `%s`", meta.Command)
		if !meta.Started.IsZero() {
			fmt.Fprintf(&b, " on %s", meta.Started.UTC().Format("2006-01-02 15:04 MST"))
		}
		if meta.Duration > 0 {
			fmt.Fprintf(&b, " in %v", meta.Duration.Round(time.Second))
		}
		b.WriteString(".")
	}
	if meta.Host != "" {
		fmt.Fprintf(&b, " Host: %s.", meta.Host)
	}
	if meta.Godwit != "" {
		fmt.Fprintf(&b, " %s.", meta.Godwit)
	}
	if meta.QEMU != "" {
		fmt.Fprintf(&b, " QEMU: %s.", meta.QEMU)
	}
	b.WriteString("\n\n")
	b.WriteString(`Every scenario runs on both systems with the same guest (godwit's built-in workload guest;
QEMU runs its multiboot build), one vCPU, the same testbed link (two network namespaces joined by
a veth pair, shaped by a token bucket or not) and the same bandwidth cap (godwit --max-bandwidth,
QEMU max-bandwidth and max-postcopy-bandwidth). Most VMs are small (256 MiB, 64 MiB working
sets) so that the suite fits in minutes in the nested KVM host (tools/kvmhost), where everything
runs 10 to 50 times slower than on hardware: absolute figures from there are not either system's
speed, the ratios are the point. The scenarios with a size in their name (a 2 GiB writer of a
1 GiB working set, an idle 4 GiB VM) are for direct KVM. A run counts only if the destination
guest then checks every page of its memory and finds none wrong (godwit verify; QEMU's guest
verifies itself on a timer).

Definitions: **total** is the migration issued to the source done (godwit: memory released;
QEMU: completed; godwit's clock starts when its VM process gets the request, so the start of
the 'godwit migrate' process itself, about half a second in the nested host, is not counted,
as QEMU's starts at the QMP migrate command); **downtime** is source vCPUs stopped to destination vCPUs running (godwit's
report; QEMU: the source's STOP event to the destination's RESUME event); **blackout** is the
largest gap between the guest's heartbeats, timestamped by the host; **bytes** is the system's
own count of what it sent (godwit: socket writes; QEMU: RAM transferred); **link bytes** is what
the source's end of the link sent, IP headers included, the same meter for both; **link use**
is bytes over total time as a share of a raw TCP transfer on the same link just before the run;
**guest work lost** is how much less work the guest did from the migration's issue to its end
than at its own pace in the second before (units of work counted by the guest on both hosts, in
milliseconds at that pace; 0 for a guest the migration did not slow down): downtime, throttling,
stalls and post-copy's demand faults all count.
Values are medians over the repeats; ratios are godwit / QEMU (below 1: godwit takes less).

`)
	b.WriteString("## godwit / QEMU\n\n")
	b.WriteString(SummaryTable(runs))
	b.WriteString("\n")

	names, by := Summarize(runs)
	setup := setups(runs)
	b.WriteString("## Scenarios\n\n")
	for _, n := range names {
		s := setup[n]
		g, q := by[n][SystemGodwit], by[n][SystemQEMU]
		fmt.Fprintf(&b, "### %s\n\n", n)
		fmt.Fprintf(&b, "Guest: %s. Link: %s. %s.", s.Guest(), s.Link(), capitalize(s.Options()))
		for _, sm := range []*Summary{g, q} {
			if sm != nil {
				fmt.Fprintf(&b, " %s: %d ok", systemLabel[sm.System], sm.OK)
				if sm.Errors > 0 {
					fmt.Fprintf(&b, ", %d failed", sm.Errors)
				}
				if sm.Skip > 0 {
					fmt.Fprintf(&b, ", %d skipped", sm.Skip)
				}
				b.WriteString(".")
			}
		}
		b.WriteString("\n\n| | godwit | QEMU | godwit/QEMU |\n|---|---:|---:|---:|\n")
		row := func(label, key, unit string, withRatio bool) {
			gv, qv := get(g, key), get(q, key)
			if math.IsNaN(gv) && math.IsNaN(qv) {
				return
			}
			rt := ""
			if withRatio {
				rt = ratio(gv, qv)
			}
			u := ""
			if unit != "" && unit != "count" {
				u = " (" + unit + ")"
			}
			fmt.Fprintf(&b, "| %s%s | %s | %s | %s |\n", label, u, num(gv, unit), num(qv, unit), rt)
		}
		for _, m := range Metrics {
			row(m.Label, m.Key, m.Unit, true)
		}
		row("link bytes", "link_mib", "MiB", true)
		row("link use (of raw TCP)", "link_use", "", true)
		row("raw TCP", "raw_tcp_mbps", "Mbit/s", false)
		row("guest work before the migration", "work_rate", "units/s", true)
		if s.Technique != Precopy {
			row("post-copy demand faults", "faults", "count", true)
			row("fault latency p50", "fault_p50", "us", false)
			row("fault latency p99", "fault_p99", "us", false)
		}
		b.WriteString("\n")
		for _, sm := range []*Summary{g, q} {
			if sm != nil && sm.Note != "" {
				fmt.Fprintf(&b, "%s: %s\n\n", systemLabel[sm.System], oneLine(sm.Note, 400))
			}
		}
		if f := timelineFile(n); contains(plots, f) {
			fmt.Fprintf(&b, "![timeline of %s](%s)\n\n", n, f)
		}
	}
	if len(plots) > 0 {
		b.WriteString("## Plots\n\n")
		for _, p := range plots {
			if !strings.HasPrefix(p, "timeline-") {
				fmt.Fprintf(&b, "![%s](%s)\n\n", strings.TrimSuffix(p, filepath.Ext(p)), p)
			}
		}
	}
	b.WriteString(notes(runs))
	_, err := io.WriteString(w, b.String())
	return err
}

// notes lists what a reader should know about the runs: QEMU verifications that fell inside
// a migration (the guest does not write while it verifies), post-copy or hybrid runs that
// never left pre-copy, godwit pre-copies forced to stop.
func notes(runs []Run) string {
	var ls []string
	for _, r := range runs {
		if r.Result != ResultOK {
			continue
		}
		if r.Extra["verify_during_migration"] == 1 {
			ls = append(ls, fmt.Sprintf("%s, QEMU, run %d: the guest verified its memory during the migration (it neither writes nor heartbeats meanwhile: that run's blackout and work lost include the verification; a longer warm-up moves it past the migration).", r.Scenario, r.Repeat+1))
		}
		if r.BlackoutMS <= 0 {
			ls = append(ls, fmt.Sprintf("%s, %s, run %d: the migration report has no blackout figure (not counted in the medians).", r.Scenario, systemLabel[r.System], r.Repeat+1))
		}
		if pb, ok := r.Extra["postcopy_bytes"]; ok && pb == 0 && r.Technique != Precopy && r.System == SystemQEMU {
			ls = append(ls, fmt.Sprintf("%s, QEMU, run %d: completed in pre-copy, never in post-copy (QEMU switches only while pre-copy has not converged; its figures are pre-copy's).", r.Scenario, r.Repeat+1))
		}
		if r.Technique != Precopy && r.System == SystemGodwit && r.PostcopyMS == 0 {
			ls = append(ls, fmt.Sprintf("%s, godwit, run %d: completed in pre-copy, never in post-copy (its figures are pre-copy's).", r.Scenario, r.Repeat+1))
		}
		if r.System == SystemGodwit && r.Technique == Precopy && !r.Converged {
			ls = append(ls, fmt.Sprintf("%s, godwit, run %d: pre-copy did not converge and was forced to stop and copy.", r.Scenario, r.Repeat+1))
		}
	}
	if len(ls) == 0 {
		return ""
	}
	return "## Notes\n\n- " + strings.Join(ls, "\n- ") + "\n"
}

func capitalize(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		s = s[:n] + "..."
	}
	return s
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
