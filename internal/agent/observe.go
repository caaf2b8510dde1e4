package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/godwit-vm/godwit/internal/control"
	"github.com/godwit-vm/godwit/migration"
)

// What the agent sees of migrations: every migration of one of its VMs goes through its API
// (POST /v1/vms/NAME/migrate), whose progress stream it reads as it passes. From it come the
// Prometheus metrics and the event stream (GET /v1/events).

// Event is one line of the event stream: a migration of VM began (setup), finished a pre-copy
// round (round), switched to post-copy (switch), or ended (completed, failed; with its
// report). Progress has the fields of 'godwit migrate --json' progress lines.
type Event struct {
	Time     time.Time           `json:"time"`
	VM       string              `json:"vm"`
	Event    string              `json:"event"`
	Progress *migration.Progress `json:"progress,omitempty"`
	Report   *migration.Report   `json:"report,omitempty"`
	Error    string              `json:"error,omitempty"`
	Template *TemplatePush       `json:"template,omitempty"` // event template-pushed
}

// observer keeps the metrics and hands events to the event stream's subscribers.
type observer struct {
	reg        *prometheus.Registry
	migrations *prometheus.CounterVec
	bytes      *prometheus.CounterVec
	downtime   *prometheus.HistogramVec
	total      *prometheus.HistogramVec
	faults     prometheus.Counter
	pushBytes  prometheus.Counter
	faultLat   prometheus.Histogram

	mu   sync.Mutex
	subs map[chan Event]struct{}
}

func newObserver(a *Agent) *observer {
	o := &observer{reg: prometheus.NewRegistry(), subs: map[chan Event]struct{}{}}
	o.migrations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "godwit_migrations_total", Help: "Migrations of this agent's VMs that ended, by result and mode.",
	}, []string{"result", "mode"})
	o.bytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "godwit_migration_bytes_total", Help: "Bytes the migrations of this agent's VMs wrote to their connections, by mode.",
	}, []string{"mode"})
	o.downtime = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "godwit_migration_downtime_seconds", Help: "Downtime of the migrations that completed, by mode.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14), // 0.5 ms to 4 s
	}, []string{"mode"})
	o.total = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "godwit_migration_total_seconds", Help: "Total time of the migrations that completed, by mode.",
		Buckets: prometheus.ExponentialBuckets(0.005, 2, 14), // 5 ms to 40 s
	}, []string{"mode"})
	o.faults = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "godwit_postcopy_demand_faults_total", Help: "Post-copy demand faults of the destinations of this agent's VMs (pages the guest waited for).",
	})
	o.faultLat = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "godwit_postcopy_fault_latency_seconds", Help: "Post-copy fault service latency at the destination (each migration's sample of up to 1000 faults).",
		Buckets: prometheus.ExponentialBuckets(0.00002, 2, 14), // 20 µs to 160 ms
	})
	o.pushBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "godwit_template_push_bytes_total", Help: "Bytes of templates this agent pushed to other agents (apart from any migration's bytes).",
	})
	o.reg.MustRegister(o.migrations, o.bytes, o.downtime, o.total, o.faults, o.faultLat, o.pushBytes, vmCollector{a})
	return o
}

// handler serves the metrics.
func (o *observer) handler() http.Handler {
	return promhttp.HandlerFor(o.reg, promhttp.HandlerOpts{})
}

func (o *observer) publish(e Event) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for c := range o.subs {
		select {
		case c <- e:
		default: // a subscriber that does not keep up misses events rather than holding up migrations
		}
	}
}

// pushed counts a template pushed to another agent and publishes it.
func (o *observer) pushed(p TemplatePush) {
	o.pushBytes.Add(float64(p.Bytes))
	o.publish(Event{Time: time.Now(), Event: "template-pushed", Template: &p})
}

// ended counts a migration's end and publishes it.
func (o *observer) ended(vm string, rep *migration.Report, errText string) {
	e := Event{Time: time.Now(), VM: vm, Event: "completed", Report: rep, Error: errText}
	result, mode := migration.ResultFailed, "unknown"
	if rep != nil {
		result, mode = rep.Result, rep.Mode
	}
	if errText != "" || result != migration.ResultOK {
		e.Event = "failed"
	}
	o.migrations.WithLabelValues(result, mode).Inc()
	if rep != nil {
		o.bytes.WithLabelValues(mode).Add(float64(rep.BytesWire))
		if e.Event == "completed" {
			o.downtime.WithLabelValues(mode).Observe(rep.DowntimeMS / 1000)
			o.total.WithLabelValues(mode).Observe(rep.TotalMS / 1000)
		}
		if pc := rep.Postcopy; pc != nil {
			o.faults.Add(float64(pc.DemandFaults))
			for _, us := range pc.FaultLatencyUS {
				o.faultLat.Observe(us / 1e6)
			}
		}
	}
	o.publish(e)
}

// events serves GET /v1/events: server-sent events, one per Event, until the client leaves.
func (o *observer) events(w http.ResponseWriter, r *http.Request) {
	fl, ok := w.(http.Flusher)
	if !ok {
		control.WriteError(w, http.StatusInternalServerError, fmt.Errorf("events: the connection cannot stream"))
		return
	}
	c := make(chan Event, 256)
	o.mu.Lock()
	o.subs[c] = struct{}{}
	o.mu.Unlock()
	defer func() {
		o.mu.Lock()
		delete(o.subs, c)
		o.mu.Unlock()
	}()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	fmt.Fprint(w, ": godwit agent events\n\n")
	fl.Flush()
	for {
		select {
		case <-r.Context().Done():
			return
		case e := <-c:
			b, _ := json.Marshal(e)
			fmt.Fprintf(w, "event: %s\ndata: %s\n\n", e.Event, b)
			fl.Flush()
		}
	}
}

// migrationTap reads a migration's progress stream (control's stream lines) as it passes to
// the client: the first line is its setup, a new round or the switch to post-copy are events
// of their own, and the result line is its end.
type migrationTap struct {
	io.ReadCloser
	o     *observer
	vm    string
	buf   []byte
	seen  bool // a line went by
	round int
	stage migration.Stage
	done  bool
}

func (t *migrationTap) Read(p []byte) (int, error) {
	n, err := t.ReadCloser.Read(p)
	t.buf = append(t.buf, p[:n]...)
	for {
		i := bytes.IndexByte(t.buf, '\n')
		if i < 0 {
			break
		}
		t.line(t.buf[:i])
		t.buf = t.buf[i+1:]
	}
	if len(t.buf) > 16<<20 {
		t.buf = nil // not a stream of lines: stop looking
	}
	if err != nil && !t.done {
		t.done = true
		if err == io.EOF {
			t.o.ended(t.vm, nil, "the VM process closed the stream without a result")
		} else {
			t.o.ended(t.vm, nil, "the stream broke: "+err.Error())
		}
	}
	return n, err
}

func (t *migrationTap) line(b []byte) {
	var l control.StreamLine
	if t.done || json.Unmarshal(b, &l) != nil {
		return
	}
	if l.Progress == nil {
		t.done = true
		var rep *migration.Report
		if l.Result != nil {
			rep = new(migration.Report)
			if json.Unmarshal(l.Result, rep) != nil {
				rep = nil
			}
		}
		t.o.ended(t.vm, rep, l.Error)
		return
	}
	var p migration.Progress
	if json.Unmarshal(l.Progress, &p) != nil {
		return
	}
	var evs []string
	if !t.seen {
		evs = append(evs, "setup")
	}
	switch {
	case p.Stage == migration.StageSwitched && t.stage != migration.StageSwitched:
		evs = append(evs, "switch") // the first line may be the switch already
	case p.Round > t.round:
		evs = append(evs, "round")
	}
	t.seen, t.round, t.stage = true, max(t.round, p.Round), p.Stage
	for _, ev := range evs {
		t.o.publish(Event{Time: time.Now(), VM: t.vm, Event: ev, Progress: &p})
	}
}

// vmCollector reports the agent's VMs on each scrape: how many in each state, and per VM that
// runs its guest's progress and the memory it holds (asked of the VM processes then).
type vmCollector struct{ a *Agent }

var (
	vmsDesc       = prometheus.NewDesc("godwit_vms", "The agent's VMs, by state.", []string{"state"}, nil)
	heartbeatDesc = prometheus.NewDesc("godwit_guest_heartbeats_total", "Heartbeats of each running VM's guest (its progress; the count travels with a migrated guest).", []string{"vm"}, nil)
	unitsDesc     = prometheus.NewDesc("godwit_guest_work_units_total", "Units of work of each running VM's guest.", []string{"vm"}, nil)
	residentDesc  = prometheus.NewDesc("godwit_vm_resident_bytes", "Guest memory the host holds for each running VM.", []string{"vm"}, nil)
)

func (c vmCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- vmsDesc
	ch <- heartbeatDesc
	ch <- unitsDesc
	ch <- residentDesc
}

func (c vmCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	counts := map[string]int{Running: 0, Exited: 0, Failed: 0}
	for _, v := range c.a.list(ctx) {
		counts[v.State]++
		var s struct {
			Heartbeats    uint64 `json:"heartbeats"`
			WorkUnits     uint64 `json:"work_units"`
			ResidentBytes uint64 `json:"resident_bytes"`
		}
		if v.Stats == nil || json.Unmarshal(v.Stats, &s) != nil {
			continue
		}
		ch <- prometheus.MustNewConstMetric(heartbeatDesc, prometheus.CounterValue, float64(s.Heartbeats), v.Name)
		ch <- prometheus.MustNewConstMetric(unitsDesc, prometheus.CounterValue, float64(s.WorkUnits), v.Name)
		ch <- prometheus.MustNewConstMetric(residentDesc, prometheus.GaugeValue, float64(s.ResidentBytes), v.Name)
	}
	for st, n := range counts {
		ch <- prometheus.MustNewConstMetric(vmsDesc, prometheus.GaugeValue, float64(n), st)
	}
}
