package migration

import (
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/godwit-vm/godwit/migration/pages"
	"github.com/godwit-vm/godwit/migration/wire"
)

// Results of a migration.
const (
	ResultOK        = "ok"
	ResultCancelled = "cancelled" // the caller's context was cancelled
	ResultFailed    = "failed"    // anything else: peer, stream, VMM, timeout, no convergence
)

// Engine errors. Errors from the stream match the sentinels of package wire as well.
var (
	ErrNotConverged = errors.New("migration: pre-copy did not converge")
	ErrTimeout      = errors.New("migration: timed out")
	ErrProtocol     = errors.New("migration: protocol violation")
	// ErrNoPostcopy: post-copy or hybrid was asked for and the destination cannot demand-page.
	// The source has not paused.
	ErrNoPostcopy = errors.New("migration: the destination does not support post-copy")
	// ErrLinkTimeout: during post-copy nothing arrived from the peer for LinkTimeout.
	ErrLinkTimeout = errors.New("migration: link timed out")
	// ErrStranded: a post-copy migration failed after the switch. The destination runs the VM
	// and lacks pages that only the paused source holds; neither side may give up its part, and
	// a resume (SendOptions.ResumeID) can finish the migration.
	ErrStranded = errors.New("migration: post-copy interrupted after the switch")
)

// PageCounts counts pages by how they travelled, over all rounds.
type PageCounts struct {
	Raw        uint64 `json:"raw"`
	Zero       uint64 `json:"zero"`
	Hole       uint64 `json:"hole"` // skipped: not populated in round 1
	Compressed uint64 `json:"compressed"`
	Dedup      uint64 `json:"dedup"`
	Delta      uint64 `json:"delta"`
}

func pageCounts(c *pages.Counters) PageCounts {
	return PageCounts{
		Raw: c.Get(pages.Raw), Zero: c.Get(pages.Zero), Hole: c.Get(pages.Hole),
		Compressed: c.Get(pages.Compressed), Dedup: c.Get(pages.Dedup), Delta: c.Get(pages.Delta),
	}
}

// RoundReport describes one round.
type RoundReport struct {
	Round      int     `json:"round"`
	Final      bool    `json:"final"` // the stop-and-copy round
	Pages      uint64  `json:"pages"`
	Bytes      uint64  `json:"bytes"`
	DurationMS float64 `json:"duration_ms"` // source: first write -> round end written
	DirtyPages uint64  `json:"dirty_pages"` // pages dirtied during the round (the next round's set)
	Throttle   int     `json:"throttle"`    // throttle in force during the round
	// AckWaitMS (source, live rounds) runs from the round's end marker to the destination's
	// acknowledgement that every page of it is placed: the backlog that was still in socket
	// buffers and in the destination's pipeline, plus one round trip: time the guest would
	// otherwise spend paused, for the last live round.
	AckWaitMS float64 `json:"ack_wait_ms"`
}

// DowntimeParts splits the downtime into consecutive spans that add up to it: final round,
// state and delivery by the source's wall clock, arm, restore and start by the destination's.
// Delivery ends at the destination's wall clock, so, like the downtime itself, it assumes the
// two clocks agree (it is clamped at zero where they visibly do not). AckMS is not part of the
// downtime: it also counts Resumed's way back, after the destination already runs.
type DowntimeParts struct {
	FinalRoundMS float64 `json:"final_round_ms"` // pause -> last page written (fetch, read, send)
	StateMS      float64 `json:"state_ms"`       // save and send state, send Complete
	DeliveryMS   float64 `json:"delivery_ms"`    // Complete written -> the destination has read it (socket buffers draining, the destination's last placing)
	ArmMS        float64 `json:"arm_ms"`         // destination, post-copy: discard stale pages, register userfaultfd
	RestoreMS    float64 `json:"restore_ms"`     // destination: RestoreState
	StartMS      float64 `json:"start_ms"`       // destination: Start
	AckMS        float64 `json:"ack_ms"`         // not a part: Complete sent -> Resumed received, on the source
}

// Sum is the total of the parts that make up the downtime (AckMS excluded).
func (d DowntimeParts) Sum() float64 {
	return d.FinalRoundMS + d.StateMS + d.DeliveryMS + d.ArmMS + d.RestoreMS + d.StartMS
}

// CheckDowntimeParts returns an error when r's downtime parts do not add up to its downtime
// (within the slack of taking each mark a moment after the event) or one exceeds it. Tests of
// real migrations call it on their reports.
func CheckDowntimeParts(r Report) error {
	const slackMS = 1
	d := r.Downtime
	parts := []float64{d.FinalRoundMS, d.StateMS, d.DeliveryMS, d.ArmMS, d.RestoreMS, d.StartMS}
	for _, p := range parts {
		if p < 0 || p > r.DowntimeMS+slackMS {
			return fmt.Errorf("migration: downtime %.3f ms has a part of %.3f ms: %+v", r.DowntimeMS, p, d)
		}
	}
	if sum := d.Sum(); math.Abs(sum-r.DowntimeMS) > slackMS {
		return fmt.Errorf("migration: downtime parts add up to %.3f ms, the downtime is %.3f ms: %+v", sum, r.DowntimeMS, d)
	}
	return nil
}

// downtimeParts splits the downtime from the source's marks (pause, last page, Complete
// written, Resumed received) and the destination's Resumed.
func downtimeParts(pauseAt, finalAt, completeAt, ackAt time.Time, res *wire.Resumed) DowntimeParts {
	destNanos := int64(res.ArmNanos + res.RestoreNanos + res.StartNanos)
	delivery := time.Duration(res.ResumeUnixNano - destNanos - completeAt.UnixNano())
	return DowntimeParts{
		FinalRoundMS: ms(finalAt.Sub(pauseAt)),
		StateMS:      ms(completeAt.Sub(finalAt)),
		DeliveryMS:   ms(max(delivery, 0)),
		ArmMS:        ms(time.Duration(res.ArmNanos)),
		RestoreMS:    ms(time.Duration(res.RestoreNanos)),
		StartMS:      ms(time.Duration(res.StartNanos)),
		AckMS:        ms(ackAt.Sub(completeAt)),
	}
}

// Report describes a migration, from either side.
//
// Metrics (see DESIGN.md): total time runs from the call to the end (on the source: the
// destination's acknowledgement, after which the source may release its memory). Downtime is
// the destination's resume time minus the source's pause time, both read from wall clocks;
// this is only meaningful when the two hosts share a synchronised clock (our testbeds do), so
// the source also records its local pause -> acknowledgement time, which needs no shared clock
// and bounds the downtime from above by one network trip. Blackout is the guest's first
// heartbeat after resume minus its last before pause, when both VMMs can report heartbeats.
// Converged, Reason and the throttle are the source's to know; a destination leaves them zero.
type Report struct {
	Side         string        `json:"side"` // "source" or "destination"
	Result       string        `json:"result"`
	Error        string        `json:"error,omitempty"`
	Mode         string        `json:"mode"`
	TotalMS      float64       `json:"total_ms"`
	DowntimeMS   float64       `json:"downtime_ms"`
	PauseToAckMS float64       `json:"pause_to_ack_ms"` // source-local: pause -> Resumed received
	Downtime     DowntimeParts `json:"downtime_parts"`
	BlackoutMS   *float64      `json:"blackout_ms"` // null when not measured
	BytesWire    int64         `json:"bytes_wire"`  // bytes this side wrote to the connection
	BytesRead    int64         `json:"bytes_read"`  // bytes this side read from it
	Pages        PageCounts    `json:"pages"`
	Rounds       int           `json:"rounds"`
	RoundDetails []RoundReport `json:"round_details"`
	ThrottleMax  int           `json:"throttle_max"`
	Converged    bool          `json:"converged"`
	// ExpectedDowntimeMS is the source's estimate when it decided to stop and copy, to set
	// against DowntimeMS.
	ExpectedDowntimeMS float64  `json:"expected_downtime_ms"`
	Reason             string   `json:"reason,omitempty"` // why pre-copy did not converge
	ProtocolVersion    uint32   `json:"protocol_version"`
	Warnings           []string `json:"warnings,omitempty"` // problems after the point of no return
	// Postcopy is set when the migration switched to post-copy (modes postcopy and hybrid).
	Postcopy *PostcopyReport `json:"postcopy,omitempty"`
}

// PostcopyReport describes the post-copy phase. The source's report carries the destination's
// figures (faults, latencies, progress during and after) as the destination sent them at the end.
type PostcopyReport struct {
	// MigrationID names the migration for a resume (SendOptions.ResumeID).
	MigrationID    string `json:"migration_id"`
	Prepage        string `json:"prepage"`
	SwitchedAfter  int    `json:"switched_after_rounds"` // live pre-copy rounds before the switch (0 for postcopy)
	SwitchReason   string `json:"switch_reason"`         // why hybrid switched: rounds, time, not converging
	MissingAtStart uint64 `json:"missing_at_switch"`     // pages the destination lacked when its vCPUs started
	PagesPushed    uint64 `json:"pages_pushed"`          // sent by the background push
	PagesDemanded  uint64 `json:"pages_demanded"`        // sent because the destination asked
	DemandFaults   uint64 `json:"demand_faults"`         // first accesses that had to wait for the network
	// Fault service latency: a fault seen by the destination's VMM -> its page installed.
	FaultLatencyP50US float64 `json:"fault_latency_p50_us"`
	FaultLatencyP99US float64 `json:"fault_latency_p99_us"`
	FaultLatencyMaxUS float64 `json:"fault_latency_max_us"`
	// FaultLatencyUS is a sample of at most 1000 latencies (for a CDF), in microseconds.
	FaultLatencyUS []float64 `json:"fault_latency_us,omitempty"`
	PostcopyMS     float64   `json:"postcopy_ms"` // destination start -> every page present
	Reconnects     int       `json:"reconnects"`  // times the link broke and was recovered
	// DestinationReconnects is the destination's count (source report only): it differs from
	// Reconnects when a connection attempt failed half-way.
	DestinationReconnects int `json:"destination_reconnects"`

	// Guest progress (heartbeats per second): in the second before the pause on the source,
	// on the destination from start until every page is present, and in the second after.
	ProgressBefore float64 `json:"progress_rate_before"`
	ProgressDuring float64 `json:"progress_rate_during"`
	ProgressAfter  float64 `json:"progress_rate_after"`
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
