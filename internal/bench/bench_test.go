package bench

import (
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/qemu"
)

func TestScenarioTableParses(t *testing.T) {
	all, err := Scenarios()
	if err != nil {
		t.Fatal(err)
	}
	def, quick := Select(all, "default", nil), Select(all, "quick", nil)
	if len(quick) == 0 || len(quick) >= len(def) {
		t.Fatalf("%d quick and %d default scenarios", len(quick), len(def))
	}
	techniques, links, workloads, contents := map[string]bool{}, map[bool]bool{}, map[string]bool{}, map[string]bool{}
	for _, s := range def {
		techniques[s.Technique] = true
		links[s.LinkBps == 0] = true
		workloads[s.Workload+"/"+s.Pattern] = true
		contents[s.Content] = true
		if s.VCPUs != 1 {
			t.Errorf("%s: %d vCPUs; QEMU's guest has one", s.Name, s.VCPUs)
		}
		if s.LinkBps > 0 && s.CapBps != s.LinkBps {
			t.Errorf("%s: cap %d on a %d bit/s link", s.Name, s.CapBps, s.LinkBps)
		}
		if _, err := qemuGuest(s); err != nil {
			t.Errorf("%s: QEMU guest: %v", s.Name, err)
		}
	}
	for _, want := range []string{Precopy, Postcopy, Hybrid} {
		if !techniques[want] {
			t.Errorf("no %s scenario in the default suite", want)
		}
	}
	if !links[true] || !links[false] {
		t.Errorf("the default suite lacks a shaped or an unshaped link: %v", links)
	}
	for _, want := range []string{"idle/random", "dirty/random", "dirty/hotcold"} {
		if !workloads[want] {
			t.Errorf("no %s workload in the default suite", want)
		}
	}
	if !contents["text"] || !contents["random"] {
		t.Errorf("contents %v: want text and random", contents)
	}
	// QEMU's guest verifies its memory every qemuVerifyInterval, and a migration must fit
	// between two verifications: sending what the guest has written at the cap must take
	// well under that.
	for _, s := range def {
		written := float64(s.WSSBytes)
		if s.Workload == "idle" {
			written = s.Touch * float64(s.MemBytes)
		}
		bps := float64(s.CapBps)
		if bps == 0 {
			bps = 1e9 // unshaped: at least a Gbit/s
		}
		every := qemuVerifyInterval(max(3*time.Second, s.WarmUp)) // 3 s: --warm-up's default
		if send := time.Duration(written * 8 / bps * float64(time.Second)); 2*send > every {
			t.Errorf("%s: %v to send what the guest wrote, QEMU's guest verifies every %v: give it a longer warm-up", s.Name, send, every)
		}
	}
	if got := Select(all, "default", mustRE(t, "postcopy")); len(got) == 0 || !strings.Contains(got[0].Name, "postcopy") {
		t.Errorf("select postcopy: %v", got)
	}
}

func TestParseScenarioErrors(t *testing.T) {
	good := "a workload=dirty wss=32M rate=20k pattern=hotcold hot-size=0.2 link=500mbit cap=none technique=hybrid hybrid-rounds=3 downtime=100ms warm-up=10s suites=quick"
	ss, err := ParseScenarios(good)
	if err != nil {
		t.Fatal(err)
	}
	s := ss[0]
	if s.WSSBytes != 32<<20 || s.Rate != 20000 || s.HotSize != 0.2 || s.LinkBps != 500_000_000 || s.CapBps != 0 ||
		s.HybridRounds != 3 || s.DowntimeLimit != 100*time.Millisecond || s.WarmUp != 10*time.Second || !s.InSuite("quick") || s.InSuite("default") {
		t.Fatalf("parsed %+v", s)
	}
	for _, bad := range []string{
		"",
		"A workload=idle",
		"a workload=busy",
		"a mem=lots",
		"a link=1gb",
		"a technique=teleport",
		"a colour=blue",
		"a wss",
		"a workload=dirty wss=200M mem=256M",
		"a mem=65G",
		"a warm-up=0s",
		"a warm-up=soon",
		"a suites=nightly",
		"a\na",
	} {
		if _, err := ParseScenarios(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

func TestGuestFlagsMatch(t *testing.T) {
	s := defaultScenario()
	s.Workload, s.Pattern, s.Content, s.Rate, s.WSSBytes, s.CapBps = "dirty", "hotcold", "random", 5000, 64<<20, s.LinkBps
	args := strings.Join(godwitRunArgs(s), " ")
	for _, want := range []string{"--mem 256M", "--vcpus 1", "--workload dirty", "--wss 65536K", "--rate 5000", "--pattern hotcold", "--content random", "--hot-size 0.1", "--hot-prob 0.9"} {
		if !strings.Contains(args, want) {
			t.Errorf("godwit run %s: no %q", args, want)
		}
	}
	c, err := qemuGuest(s)
	if err != nil {
		t.Fatal(err)
	}
	if c.WSSPages != 16384 || c.Rate != 5000 || c.Pattern != guest.PatternHotCold || c.Content != guest.ContentRandom || c.HotPermille != 100 || c.HotProbPermille != 900 {
		t.Errorf("QEMU guest %+v", c)
	}
	for tech, want := range map[string][]string{
		Precopy:  {"--downtime-limit 300ms", "--auto-converge", "--force", "--max-bandwidth 1000000000bit"},
		Postcopy: {"--mode postcopy", "--prepage sequential", "--max-bandwidth"},
		Hybrid:   {"--mode hybrid", "--hybrid-rounds 2", "--auto-converge"},
	} {
		s.Technique = tech
		a := strings.Join(godwitMigrateArgs(s, time.Minute), " ")
		for _, w := range want {
			if !strings.Contains(a, w) {
				t.Errorf("%s: migrate %s: no %q", tech, a, w)
			}
		}
		if tech == Postcopy && (strings.Contains(a, "--downtime-limit") || strings.Contains(a, "--auto-converge") || strings.Contains(a, "--force")) {
			t.Errorf("postcopy: migrate %s takes pre-copy flags", a)
		}
	}
}

// synthetic makes runs of three scenarios on both systems, as a suite would.
func synthetic(t *testing.T) []Run {
	all, err := ParseScenarios(`
idle-precopy-1gbit workload=idle
writer-postcopy-1gbit workload=dirty technique=postcopy
writer-hybrid-unshaped workload=dirty technique=hybrid link=unshaped`)
	if err != nil {
		t.Fatal(err)
	}
	var runs []Run
	for i, s := range all {
		for rep := 0; rep < 3; rep++ {
			for k, sys := range []string{SystemGodwit, SystemQEMU} {
				r := newRun(s, sys, rep)
				r.Result = ResultOK
				f := float64(1 + k) // QEMU takes twice as long in this made-up world
				r.TotalMS = f * float64(1000*(i+1)+rep*100)
				r.DowntimeMS, r.BlackoutMS = f*10, f*20+float64(rep)
				r.BytesWire = int64(f * (64 << 20))
				r.LinkBytes = r.BytesWire + 1<<20
				r.RawTCPBps = 100e6
				r.LinkUse = float64(r.BytesWire) / (r.TotalMS / 1000) / r.RawTCPBps
				for j := 0; j < 50; j++ {
					r.Timeline = append(r.Timeline, Sample{TMS: float64(j*100 - 1000), LinkBytes: int64(max(0, j-10)) << 20, Bytes: -1, Units: int64(j * 10 / int(f))})
				}
				lost := f * f * 100 // recorded, as a run records it: godwit 100 ms, QEMU 400
				r.WorkLostMS = &lost
				if s.Technique != Precopy {
					r.Faults = 100
					// The hybrid's first QEMU run and third godwit run never leave pre-copy.
					if sys == SystemQEMU {
						if r.Extra == nil {
							r.Extra = map[string]float64{}
						}
						r.Extra["postcopy_bytes"] = 1 << 20
						if s.Technique == Hybrid && rep == 0 {
							r.Extra["postcopy_bytes"] = 0
						}
					} else if s.Technique != Hybrid || rep != 2 {
						r.PostcopyMS = 500
					}
					if sys == SystemGodwit {
						r.FaultP50US, r.FaultP99US = 200, 900
						for j := 1; j <= 100; j++ {
							r.FaultLatencyUS = append(r.FaultLatencyUS, float64(j*j))
						}
					}
				}
				runs = append(runs, r)
			}
		}
	}
	// A failed and a skipped run are reported, not counted in the medians.
	bad := newRun(all[0], SystemGodwit, 3)
	bad.fail(os.ErrDeadlineExceeded)
	skip := newRun(all[1], SystemGodwit, 3)
	skip.Result, skip.Error = ResultSkipped, "this godwit cannot migrate with --mode postcopy yet"
	return append(runs, bad, skip)
}

func TestReportAndPlots(t *testing.T) {
	runs := synthetic(t)
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, ResultsFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := WriteJSONL(f, runs...); err != nil {
		t.Fatal(err)
	}
	f.Close()
	back, err := ReadJSONL(filepath.Join(dir, ResultsFile))
	if err != nil || len(back) != len(runs) {
		t.Fatalf("read back %d runs of %d: %v", len(back), len(runs), err)
	}
	plots, err := WriteReport(dir, back, Meta{Command: "godwit bench --test", Started: time.Now(), Duration: time.Minute, Host: "test"})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"bars-precopy.svg", "bars-postcopy.svg", "bars-hybrid.svg", "timeline-idle-precopy-1gbit.svg", FaultCDFFile} {
		if !slices.Contains(plots, want) {
			t.Errorf("plots %v: no %s", plots, want)
		}
	}
	for _, p := range plots {
		b, err := os.ReadFile(filepath.Join(dir, p))
		if err != nil || len(b) < 1000 || !strings.Contains(string(b[:min(len(b), 500)]), "<svg") {
			t.Errorf("%s: %d bytes, %v", p, len(b), err)
		}
		svg := string(b)
		// One legend for the whole figure, above the plots, not one in each plot.
		if strings.HasPrefix(p, "bars-") && strings.Count(svg, ">godwit<") != 1 {
			t.Errorf("%s: %d legend entries for godwit, want 1", p, strings.Count(svg, ">godwit<"))
		}
		if strings.HasPrefix(p, "timeline-") && !strings.Contains(svg, "work lost: godwit 100 ms, QEMU 400 ms") {
			t.Errorf("%s: no work lost in the title", p)
		}
	}
	md, err := os.ReadFile(filepath.Join(dir, ReportFile))
	if err != nil {
		t.Fatal(err)
	}
	report := string(md)
	t.Log(report)
	// godwit/QEMU is 0.50 for total, downtime and bytes in every scenario (blackout: 20+r
	// against 40+r, medians 21 and 41).
	for _, want := range []string{
		"| idle-precopy-1gbit | precopy | 1 Gbit/s | 0.50 | 0.50 | 0.51 | 0.50 | 0.25 |",
		"| guest work lost (ms) | 100.0 | 400.0 | 0.25 |",
		"| writer-hybrid-unshaped | hybrid | unshaped | 0.50 |",
		"### writer-postcopy-1gbit",
		"| total time (ms) | 2100 | 4200 | 0.50 |",
		"| fault latency p50 (us) | 200.0 | - |",
		"godwit: 3 ok, 1 failed. QEMU: 3 ok.",
		"| guest work before the migration (units/s) | 100.0 | 50.0 | 2.00 |",
		"godwit: 3 ok, 1 skipped.",
		"![timeline of idle-precopy-1gbit](timeline-idle-precopy-1gbit.svg)",
		"(" + FaultCDFFile + ")",
		"writer-hybrid-unshaped, QEMU, run 1: completed in pre-copy, never in post-copy",
		"writer-hybrid-unshaped, godwit, run 3: completed in pre-copy, never in post-copy",
	} {
		if !strings.Contains(report, want) {
			t.Errorf("report lacks %q", want)
		}
	}
}

func TestMedianAndProgress(t *testing.T) {
	if m := median([]float64{3, 1, 2}); m != 2 {
		t.Errorf("median %v", m)
	}
	if m := median([]float64{4, 1, 2, 3}); m != 2.5 {
		t.Errorf("median %v", m)
	}
	if !math.IsNaN(median(nil)) {
		t.Error("median of nothing")
	}
	// 10 units per 100 ms before, nothing for 300 ms, then 5 per 100 ms.
	var tl []Sample
	u := int64(0)
	for j := 0; j < 20; j++ {
		tm := float64(j*100 - 1000)
		switch {
		case tm <= 0 && j > 0:
			u += 10
		case tm > 300:
			u += 5
		}
		tl = append(tl, Sample{TMS: tm, Units: u})
	}
	xy := progressSeconds(tl, 800)
	if first, last := xy[0], xy[len(xy)-1]; first.X != -1 || first.Y != -1 || last.X != 0.8 || math.Abs(last.Y-0.25) > 1e-9 {
		t.Errorf("progress %v", xy)
	}
	// QEMU's heartbeat lines become the timeline's work counts.
	t0 := time.Now()
	samples := []Sample{{TMS: 0}, {TMS: 100}, {TMS: 200}}
	addUnits(samples, t0, []unitAt{{t0.Add(-time.Millisecond), 5}, {t0.Add(150 * time.Millisecond), 9}}, []unitAt{{t0.Add(190 * time.Millisecond), 12}})
	if samples[0].Units != 5 || samples[1].Units != 5 || samples[2].Units != 12 {
		t.Errorf("units %+v", samples)
	}
}

func mustRE(t *testing.T, s string) *regexp.Regexp {
	t.Helper()
	re, err := regexp.Compile(s)
	if err != nil {
		t.Fatal(err)
	}
	return re
}

// guestTimeline samples a guest every 100 ms from -1 s to 4 s whose work rate (units per
// 100 ms) at each sample's time is rate(t ms); the count starts at 100.
func guestTimeline(rate func(t float64) float64) []Sample {
	var tl []Sample
	u := 100.0
	for ms := -1000.0; ms <= 4000; ms += 100 {
		tl = append(tl, Sample{TMS: ms, Units: int64(math.Round(u))})
		u += rate(ms)
	}
	return tl
}

func TestWorkLost(t *testing.T) {
	// 10 units/s, none from 1 s to 2 s.
	stall := guestTimeline(func(t float64) float64 {
		if t >= 1000 && t < 2000 {
			return 0
		}
		return 1
	})
	// Half its pace from 0 to 2 s, then twice it for 0.5 s (a catch-up is not negative loss
	// where it falls outside the window, and cannot make the loss negative inside it).
	slow := guestTimeline(func(t float64) float64 {
		switch {
		case t >= 0 && t < 2000:
			return 0.5
		case t >= 2000 && t < 2500:
			return 2
		}
		return 1
	})
	unknown := slices.Clone(stall)
	for i := range unknown {
		if tm := unknown[i].TMS; tm > 1000 && tm < 2000 {
			unknown[i].Units = -1 // a side that did not answer
		}
	}
	dip := slices.Clone(stall)
	dip[25].Units = 3 // the destination's copy of the counter, before it runs
	for _, c := range []struct {
		name       string
		tl         []Sample
		start, end float64
		want       float64
		ok         bool
	}{
		{"stall", stall, 0, 3000, 1000, true},
		{"stall, window past the samples", stall, -5000, 9000, 1000, true},
		{"stall, window inside it", stall, 1200, 1700, 500, true},
		{"stall, window before it", stall, 0, 900, 0, true},
		{"interpolated", stall, 950, 1050, 50, true},
		{"half pace", slow, 0, 2000, 1000, true},
		{"catch-up in the window", slow, 2000, 2500, 0, true},
		{"unknown samples", unknown, 0, 3000, 1000, true},
		{"a dip", dip, 0, 3000, 1000, true},
		{"no rate before", stall[10:], 0, 3000, 0, false},
		{"empty window", stall, 3000, 3000, 0, false},
		{"no timeline", nil, 0, 3000, 0, false},
	} {
		got, ok := WorkLost(c.tl, c.start, c.end)
		if ok != c.ok || math.Abs(got-c.want) > 1e-6 {
			t.Errorf("%s: work lost %.3f ms (ok %v), want %.3f (ok %v)", c.name, got, ok, c.want, c.ok)
		}
	}
}

// TestRunWorkLost: a run's window ends at end_ms, not at total_ms, and its figure goes into
// results.jsonl; runs written without one get it from their timeline.
func TestRunWorkLost(t *testing.T) {
	// A stall of 300 ms ending 3.3 s after the migration was issued (the downtime), of a
	// migration whose total time, counted from later, is 3 s.
	tl := guestTimeline(func(t float64) float64 {
		if t >= 3000 && t < 3300 {
			return 0
		}
		return 1
	})
	r := Run{Result: ResultOK, TotalMS: 3000, EndMS: 3400, Timeline: tl}
	r.setWorkLost()
	if r.WorkLostMS == nil || math.Abs(*r.WorkLostMS-300) > 1e-6 {
		t.Fatalf("work lost %v, want 300 ms", r.WorkLostMS)
	}
	var b strings.Builder
	if err := WriteJSONL(&b, r); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), `"end_ms":3400,"work_lost_ms":300`) {
		t.Errorf("results line %s", b.String())
	}
	recorded := r
	recorded.WorkLostMS = new(float64)
	*recorded.WorkLostMS = 42
	old := r
	old.WorkLostMS, old.EndMS = nil, 0
	for _, c := range []struct {
		r    Run
		want float64
	}{{r, 300}, {recorded, 42}, {old, 0}} {
		if got := WorkLostMS(c.r); got != c.want {
			t.Errorf("WorkLostMS %v, want %v", got, c.want)
		}
	}
	old.Result = ResultError
	if got := WorkLostMS(old); !math.IsNaN(got) {
		t.Errorf("failed run: work lost %v", got)
	}
}

// TestSamplerLastSample: the sampler samples once more when stopped, after whatever the run
// waited for.
func TestSamplerLastSample(t *testing.T) {
	n := 0
	sm := startSampler(time.Hour, func(time.Time) Sample { n++; return Sample{TMS: float64(n)} })
	for n == 0 {
		time.Sleep(time.Millisecond)
	}
	if got := sm.stop(); len(got) != 2 || got[1].TMS != 2 {
		t.Fatalf("samples %+v, want the first and one at stop", got)
	}
}

func TestQEMUEnd(t *testing.T) {
	issued := time.Now()
	res := &qemu.Result{Total: 5 * time.Second}
	if got := qemuEnd(res, issued); !got.Equal(issued.Add(5 * time.Second)) {
		t.Errorf("no events: end %v after issue", got.Sub(issued))
	}
	res.Statuses = []qemu.StatusAt{{Status: "active", Time: issued}, {Status: "completed", Time: issued.Add(4900 * time.Millisecond)}}
	if got := qemuEnd(res, issued); got.Sub(issued) != 4900*time.Millisecond {
		t.Errorf("completed event: end %v after issue", got.Sub(issued))
	}
	res.Resume = issued.Add(5100 * time.Millisecond)
	if got := qemuEnd(res, issued); got.Sub(issued) != 5100*time.Millisecond {
		t.Errorf("later RESUME: end %v after issue", got.Sub(issued))
	}
}
