package bench

import (
	"bufio"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"time"

	"github.com/godwit-vm/godwit/migration"
)

// Outcomes of a run.
const (
	ResultOK      = "ok"
	ResultError   = "error"   // the migration failed, or the destination found wrong pages
	ResultSkipped = "skipped" // the system cannot run the scenario (e.g. a technique it lacks)
)

// Run is one migration of one scenario on one system: a line of results.jsonl.
type Run struct {
	Scenario  string    `json:"scenario"`
	System    string    `json:"system"` // godwit or qemu
	Technique string    `json:"technique"`
	Repeat    int       `json:"repeat"` // 0-based
	Started   time.Time `json:"started"`
	Result    string    `json:"result"` // ok, error, skipped
	Error     string    `json:"error,omitempty"`

	// The scenario's settings, so that each line stands alone.
	Setup Scenario `json:"setup"`

	// RawTCPBps is a bulk TCP transfer's throughput on the same link just before the
	// migration (bytes/s): this run's baseline.
	RawTCPBps float64 `json:"raw_tcp_Bps"`

	// TotalMS: migration issued -> the source is done (godwit: memory released; QEMU: the
	// source reports completed). DowntimeMS: source vCPUs stopped -> destination vCPUs
	// running (godwit: its report; QEMU: the source's STOP event to the destination's RESUME
	// event). BlackoutMS: the largest gap in the guest's heartbeats, timestamped by the host.
	TotalMS    float64 `json:"total_ms"`
	DowntimeMS float64 `json:"downtime_ms"`
	BlackoutMS float64 `json:"blackout_ms"` // 0: not measured
	// BytesWire: the system's own count of migration bytes it sent (godwit: socket writes;
	// QEMU: ram transferred, except with multifd compression, which it counts before
	// compressing: then LinkBytes). LinkBytes: bytes the source host's end of the link transmitted
	// during the migration (IP packets, headers included), the same meter for both systems.
	BytesWire int64 `json:"bytes_wire"`
	LinkBytes int64 `json:"link_bytes"`
	// LinkUse is BytesWire / TotalMS as a share of RawTCPBps.
	LinkUse float64 `json:"link_use"`
	// Pages sent in full, pages sent as zero (or found zero), pages skipped as holes.
	PagesRaw  uint64 `json:"pages_raw"`
	PagesZero uint64 `json:"pages_zero"`
	PagesHole uint64 `json:"pages_hole"`
	// PagesCompressed (godwit) were sent compressed; QEMU does not count them apart.
	PagesCompressed uint64 `json:"pages_compressed,omitempty"`
	// PagesDelta were sent as deltas (godwit --delta; QEMU: XBZRLE pages).
	PagesDelta uint64 `json:"pages_delta,omitempty"`
	// PagesDedup (godwit --dedup) were sent as references to identical pages sent before.
	PagesDedup uint64 `json:"pages_dedup,omitempty"`
	// PagesFree (godwit) were not sent: the guest reported them free.
	PagesFree uint64 `json:"pages_free,omitempty"`
	Rounds    int    `json:"rounds"` // pre-copy rounds (QEMU: dirty-bitmap syncs)
	Converged bool   `json:"converged"`
	Throttle  int    `json:"throttle_max,omitempty"`

	// Post-copy: demand faults (QEMU: post-copy page requests), fault service latency
	// (godwit only: QEMU 7.2 does not report it) and a sample of latencies.
	Faults         uint64    `json:"faults,omitempty"`
	FaultP50US     float64   `json:"fault_p50_us,omitempty"`
	FaultP99US     float64   `json:"fault_p99_us,omitempty"`
	FaultLatencyUS []float64 `json:"fault_latency_us,omitempty"`
	PostcopyMS     float64   `json:"postcopy_ms,omitempty"`

	// System-specific extra figures (QEMU's own downtime, the heartbeat baseline gap, ...).
	Extra map[string]float64 `json:"extra,omitempty"`
	// RoundDetails are godwit's pre-copy rounds as its report gives them (pages, bytes,
	// duration, pages dirtied meanwhile, throttle, wait for the destination's acknowledgement).
	RoundDetails []migration.RoundReport `json:"round_details,omitempty"`

	// VerifyPages is how many pages the destination guest checked after the migration (0
	// mismatches, or the run is an error).
	VerifyPages uint64 `json:"verify_pages"`

	// Timeline samples bytes and guest progress about every 100 ms, from a second before
	// the migration to its end.
	Timeline []Sample `json:"timeline,omitempty"`
	// EndMS is when the migration ended on the timeline's clock (ms since it was issued):
	// godwit, when 'godwit migrate' returned (its total time starts only once the VM process
	// has the request, later than the timeline's 0, so 0 + total_ms would end the window
	// before the downtime ends); QEMU, the later of the source's completion and the
	// destination's RESUME event.
	EndMS float64 `json:"end_ms,omitempty"`
	// WorkLostMS is the guest work the migration cost over [0, EndMS], in milliseconds of
	// work at the guest's rate in the second before it (WorkLost); absent where the timeline
	// cannot tell.
	WorkLostMS *float64 `json:"work_lost_ms,omitempty"`
	// WallMS is how long the whole run took (start of the VMs to their end).
	WallMS float64 `json:"wall_ms"`
}

// Sample is a point of a run's timeline.
type Sample struct {
	// TMS is the time since the migration was issued (negative before).
	TMS float64 `json:"t_ms"`
	// LinkBytes is what the source's end of the link has sent since the migration was
	// issued; Bytes the system's own count (-1 where the system does not say).
	LinkBytes int64 `json:"link_bytes"`
	Bytes     int64 `json:"bytes"`
	// Units is the guest's work done so far (units of work, one heartbeat each: the same
	// counter on the source and, once it runs there, on the destination); -1 if unknown.
	Units int64 `json:"units"`
	// MemBytes is the host memory in use above what was before the run's VMs started: what
	// both VMs' processes hold (vmMemory); 0 if unknown.
	MemBytes int64 `json:"mem_bytes,omitempty"`
}

// WriteJSONL appends runs to w, one JSON object per line.
func WriteJSONL(w io.Writer, runs ...Run) error {
	enc := json.NewEncoder(w)
	for _, r := range runs {
		if err := enc.Encode(r); err != nil {
			return err
		}
	}
	return nil
}

// ReadJSONL reads runs written by WriteJSONL.
func ReadJSONL(path string) ([]Run, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var runs []Run
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for n := 1; sc.Scan(); n++ {
		if len(sc.Bytes()) == 0 {
			continue
		}
		var r Run
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			return nil, fmt.Errorf("%s:%d: %w", path, n, err)
		}
		runs = append(runs, r)
	}
	return runs, sc.Err()
}

// median of the values (NaN for none).
func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// Metric is a figure of a run the report compares.
type Metric struct {
	Key   string
	Label string
	Unit  string
	Get   func(Run) float64
}

// Metrics are the figures the report and the bar plots compare, in order.
var Metrics = []Metric{
	{"total", "total time", "ms", func(r Run) float64 { return r.TotalMS }},
	{"downtime", "downtime", "ms", func(r Run) float64 { return r.DowntimeMS }},
	// A blackout of 0 is one the system did not measure (a real gap is never 0).
	{"blackout", "blackout", "ms", func(r Run) float64 {
		if r.BlackoutMS <= 0 {
			return math.NaN()
		}
		return r.BlackoutMS
	}},
	{"bytes", "bytes on the wire", "MiB", func(r Run) float64 { return float64(r.BytesWire) / (1 << 20) }},
	{"work_lost", "guest work lost", "ms", WorkLostMS},
}

// Summary is the medians of one scenario on one system.
type Summary struct {
	Scenario, System string
	OK, Errors, Skip int
	Median           map[string]float64 // by Metric.Key, plus link_use, link_mib, faults, fault_p50/p99
	Note             string             // the first error or skip reason
}

// Summarize groups runs by scenario and system, in the order the scenarios first appear.
func Summarize(runs []Run) (scenarios []string, by map[string]map[string]*Summary) {
	by = map[string]map[string]*Summary{}
	vals := map[*Summary]map[string][]float64{}
	for _, r := range runs {
		m := by[r.Scenario]
		if m == nil {
			m = map[string]*Summary{}
			by[r.Scenario] = m
			scenarios = append(scenarios, r.Scenario)
		}
		s := m[r.System]
		if s == nil {
			s = &Summary{Scenario: r.Scenario, System: r.System, Median: map[string]float64{}}
			m[r.System] = s
			vals[s] = map[string][]float64{}
		}
		switch r.Result {
		case ResultOK:
			s.OK++
			for _, mt := range Metrics {
				if v := mt.Get(r); !math.IsNaN(v) {
					vals[s][mt.Key] = append(vals[s][mt.Key], v)
				}
			}
			vals[s]["link_use"] = append(vals[s]["link_use"], r.LinkUse)
			vals[s]["link_mib"] = append(vals[s]["link_mib"], float64(r.LinkBytes)/(1<<20))
			vals[s]["raw_tcp_mbps"] = append(vals[s]["raw_tcp_mbps"], r.RawTCPBps*8/1e6)
			if w := WorkRate(r.Timeline); w > 0 {
				vals[s]["work_rate"] = append(vals[s]["work_rate"], w)
			}
			if r.Technique != Precopy {
				vals[s]["faults"] = append(vals[s]["faults"], float64(r.Faults))
				if r.FaultP50US > 0 {
					vals[s]["fault_p50"] = append(vals[s]["fault_p50"], r.FaultP50US)
					vals[s]["fault_p99"] = append(vals[s]["fault_p99"], r.FaultP99US)
				}
			}
		case ResultSkipped:
			s.Skip++
		default:
			s.Errors++
		}
		if s.Note == "" && r.Error != "" {
			s.Note = r.Error
		}
	}
	for s, v := range vals {
		for k, xs := range v {
			s.Median[k] = median(xs)
		}
	}
	return scenarios, by
}

// WorkRate is the guest's work (units per second: a unit is a batch of page writes, or an idle
// interval) in the second before the migration, from the timeline; 0 if unknown. It shows
// whether both systems' guests wrote memory equally fast.
func WorkRate(tl []Sample) float64 {
	first, last := -1, -1
	for i, s := range tl {
		if s.Units < 0 || s.TMS < -1000 || s.TMS > 0 {
			continue
		}
		if first < 0 {
			first = i
		}
		last = i
	}
	if first < 0 || last <= first || tl[last].TMS <= tl[first].TMS {
		return 0
	}
	return float64(tl[last].Units-tl[first].Units) / (tl[last].TMS - tl[first].TMS) * 1000
}

// WorkLost is the guest work a migration cost: how much less the guest did between start and
// end (ms on the timeline's clock) than it would have at its rate in the second before the
// migration (WorkRate), in milliseconds of that work. Downtime, throttling, stalls on dirty
// logging and post-copy's demand faults all count. A guest that kept its pace loses 0 (below 0,
// noise in the rate, counts as 0); one stopped throughout loses the whole window. Both systems'
// guests count the same units of work, so the figures compare. The window is clipped to the
// samples that know the guest's count, and the count is interpolated between them; ok is false
// where the timeline has no rate before the migration or no such samples in the window.
func WorkLost(tl []Sample, start, end float64) (lostMS float64, ok bool) {
	perMS := WorkRate(tl) / 1000
	if perMS <= 0 {
		return 0, false
	}
	pts := workCounts(tl)
	if len(pts) < 2 {
		return 0, false
	}
	start, end = max(start, pts[0].TMS), min(end, pts[len(pts)-1].TMS)
	if end <= start {
		return 0, false
	}
	done := unitsAt(pts, end) - unitsAt(pts, start)
	return max(0, end-start-done/perMS), true
}

// workCounts are the samples that know the guest's work count. The count only grows: a sample
// below an earlier one comes from a side that has not caught up (the destination's copy of the
// counter before it runs), so each gets the largest count so far.
func workCounts(tl []Sample) []Sample {
	var pts []Sample
	for _, s := range tl {
		if s.Units < 0 {
			continue
		}
		if n := len(pts); n > 0 && s.Units < pts[n-1].Units {
			s.Units = pts[n-1].Units
		}
		pts = append(pts, s)
	}
	return pts
}

// unitsAt interpolates the work count at t between the samples around it (pts ascending in
// time, t within their span).
func unitsAt(pts []Sample, t float64) float64 {
	i, found := slices.BinarySearchFunc(pts, t, func(s Sample, t float64) int { return cmp.Compare(s.TMS, t) })
	switch {
	case found || i == 0:
		return float64(pts[i].Units)
	case i == len(pts):
		return float64(pts[i-1].Units)
	}
	a, b := pts[i-1], pts[i]
	return float64(a.Units) + float64(b.Units-a.Units)*(t-a.TMS)/(b.TMS-a.TMS)
}

// WorkLostMS is the run's guest work lost (ms): the figure it recorded or, for a results.jsonl
// line without one (and without end_ms), the same from its timeline over [0, total time]; NaN
// if unknown.
func WorkLostMS(r Run) float64 {
	if r.WorkLostMS != nil {
		return *r.WorkLostMS
	}
	if v, ok := WorkLost(r.Timeline, 0, r.TotalMS); ok && r.Result == ResultOK {
		return v
	}
	return math.NaN()
}

// setWorkLost records the run's work lost over [0, EndMS] (or the total time, if the run has
// no end).
func (r *Run) setWorkLost() {
	end := r.EndMS
	if end <= 0 {
		end = r.TotalMS
	}
	r.WorkLostMS = nil
	if v, ok := WorkLost(r.Timeline, 0, end); ok {
		r.WorkLostMS = &v
	}
}
