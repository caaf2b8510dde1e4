package migration

import (
	"errors"
	"fmt"
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
	// ErrNoHandover: a handover was asked for and cannot be: the destination declined it, or
	// the connection cannot pass files. The source has not paused.
	ErrNoHandover = errors.New("migration: no memory handover")
	// ErrHandoverUndecided: a handover failed after the state went out, and the destination
	// did not say that it failed before it ran the VM: it may have run it on the memory handed
	// over. The source stays paused and must not run the VM again.
	ErrHandoverUndecided = errors.New("migration: handover undecided")
	// ErrNoBase: the source's VM is a clone of a template the destination does not hold (or
	// the mode cannot move a clone). The source has not paused.
	ErrNoBase = errors.New("migration: the VM's template is not at the destination")
)

// PageCounts counts pages by how they travelled, over all rounds.
type PageCounts struct {
	Raw        uint64 `json:"raw"`
	Zero       uint64 `json:"zero"`
	Hole       uint64 `json:"hole"`       // skipped: not populated in round 1
	Free       uint64 `json:"free"`       // skipped: reported free by the guest (each time a set dropped one)
	Base       uint64 `json:"base"`       // skipped: the template's pages a clone never changed (the destination clones it too)
	Compressed uint64 `json:"compressed"` // zstd or s2 (the report's compression says which)
	Dedup      uint64 `json:"dedup"`
	Delta      uint64 `json:"delta"`
}

func pageCounts(c *pages.Counters) PageCounts {
	return PageCounts{
		Raw: c.Get(pages.Raw), Zero: c.Get(pages.Zero), Hole: c.Get(pages.Hole), Free: c.Get(pages.Free), Base: c.Get(pages.Base),
		Compressed: c.Get(pages.Compressed) + c.Get(pages.S2), Dedup: c.Get(pages.Dedup), Delta: c.Get(pages.Delta),
	}
}

// SavedBytes is what the cheaper encodings saved, by encoding: page data not sent (the pages
// so sent times the page size, less their encoded size).
type SavedBytes struct {
	Compressed uint64 `json:"compressed"`
	Dedup      uint64 `json:"dedup"`
	Delta      uint64 `json:"delta"`
	Free       uint64 `json:"free"` // the page sends skipped as free, whole
}

func savedBytes(c *pages.Classifier, ps int) SavedBytes {
	saved := func(k pages.Kind) uint64 { return c.Counters.Get(k)*uint64(ps) - c.Encoded.Get(k) }
	return SavedBytes{Compressed: saved(pages.Compressed) + saved(pages.S2), Dedup: saved(pages.Dedup), Delta: saved(pages.Delta),
		Free: c.Counters.Get(pages.Free) * uint64(ps)}
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

// DowntimeParts splits the downtime into consecutive spans that add up to it (see
// splitDowntime): the source's first, the destination's last, delivery between them. The
// destination's own report has only its parts.
type DowntimeParts struct {
	FinalRoundMS float64 `json:"final_round_ms"` // source: pause -> last page written (post-copy: the missing set)
	StateMS      float64 `json:"state_ms"`       // source: save and send the state, write Complete
	DeliveryMS   float64 `json:"delivery_ms"`    // Complete written -> read by the destination (the stream's tail in flight and placed)
	ArmMS        float64 `json:"arm_ms"`         // destination, post-copy: discard stale pages, register userfaultfd
	RestoreMS    float64 `json:"restore_ms"`     // destination: RestoreState
	StartMS      float64 `json:"start_ms"`       // destination: Start
}

// Sum is the total of the parts.
func (d DowntimeParts) Sum() float64 {
	return d.FinalRoundMS + d.StateMS + d.DeliveryMS + d.ArmMS + d.RestoreMS + d.StartMS
}

// CheckDowntimeParts returns an error when one of r's downtime parts is negative or exceeds
// the downtime, or when they add up to more than it (or, in the source's report, which has
// them all, to less). Tests of real migrations call it on their reports.
func CheckDowntimeParts(r Report) error {
	const epsMS = 1e-3 // rounding: the parts are converted to milliseconds one by one
	d := r.Downtime
	for _, p := range []float64{d.FinalRoundMS, d.StateMS, d.DeliveryMS, d.ArmMS, d.RestoreMS, d.StartMS} {
		if p < 0 || p > r.DowntimeMS+epsMS {
			return fmt.Errorf("migration: %s downtime of %.3f ms has a part of %.3f ms: %+v", r.Side, r.DowntimeMS, p, d)
		}
	}
	sum := d.Sum()
	if sum > r.DowntimeMS+epsMS || (r.Side == "source" && sum < r.DowntimeMS-epsMS) {
		return fmt.Errorf("migration: %s downtime of %.3f ms has parts that add up to %.3f ms: %+v", r.Side, r.DowntimeMS, sum, d)
	}
	return nil
}

// splitDowntime measures the downtime and its parts from the source's marks (pause, last page
// written, Complete written, Resumed received) and the destination's Resumed.
//
// The whole is the destination's resume minus the source's pause, by their wall clocks, kept
// within what each side's own clock proves: no less than the destination's parts (taken between
// reading Complete and resuming), no more than the source's pause to Resumed received. The
// destination's parts end it; the source's begin it, cut short where they would run into the
// destination's: a mark taken late (the thread that wrote Complete not scheduled again before
// the destination had restored) or clocks that disagree must not make two parts overlap.
// Delivery is the rest, the one span that crosses from one clock to the other. So the parts
// always add up to the whole. The source's Complete -> Resumed span is no part: it covers the
// delivery and the destination's parts, and then Resumed's way back after the downtime ended,
// which on a busy destination can take longer than the whole downtime.
func splitDowntime(pauseAt, finalAt, completeAt, ackAt time.Time, res *wire.Resumed) (time.Duration, DowntimeParts) {
	toAck := max(ackAt.Sub(pauseAt), 0)
	// The peer's figures bounded by the window they happened in, so that nothing overflows.
	span := func(n uint64) time.Duration { return time.Duration(min(n, uint64(toAck))) }
	arm, restore, start := span(res.ArmNanos), span(res.RestoreNanos), span(res.StartNanos)
	dest := arm + restore + start
	whole := max(min(time.Duration(res.ResumeUnixNano-pauseAt.UnixNano()), toAck), dest)
	room := whole - dest // for the source's parts and the delivery
	final := min(max(finalAt.Sub(pauseAt), 0), room)
	state := min(max(completeAt.Sub(finalAt), 0), room-final)
	return whole, DowntimeParts{
		FinalRoundMS: ms(final),
		StateMS:      ms(state),
		DeliveryMS:   ms(room - final - state),
		ArmMS:        ms(arm),
		RestoreMS:    ms(restore),
		StartMS:      ms(start),
	}
}

// Report describes a migration, from either side.
//
// Metrics (see DESIGN.md): total time runs from the call to the end (on the source: the
// destination's acknowledgement, after which the source may release its memory). Downtime is
// the destination's resume time minus the source's pause time, both read from wall clocks;
// this is only meaningful when the two hosts share a synchronised clock (our testbeds do), so
// the source also records its local pause -> acknowledgement time, which needs no shared clock
// and bounds the downtime from above by one network trip (the source's downtime is kept within
// that bound, and its parts add up to it: see splitDowntime). Blackout is the guest's first
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
	Saved        SavedBytes    `json:"saved_bytes"` // source: what compression, dedup and delta saved
	// Compression is the source's page encoding as the handshake settled it ("zstd
	// (fastest)", or "none" and why), when SendOptions.Compress asked for one.
	Compression string `json:"compression,omitempty"`
	// FreePages (source) says whether the guest's free page reports were used ("reported by
	// the guest", "not reported by the guest", "off"); empty where the source cannot report.
	// FreePagesReported counts the pages the guest reported free during the migration.
	FreePages string `json:"free_pages,omitempty"`
	// Delta (source) says whether pages went as deltas (SendOptions.Delta), and with what
	// cache, or why not.
	Delta string `json:"delta,omitempty"`
	// Dedup (source) says whether pages went as references to identical pages sent before
	// (SendOptions.Dedup), or why not.
	Dedup             string        `json:"dedup,omitempty"`
	FreePagesReported uint64        `json:"free_pages_reported"`
	Rounds            int           `json:"rounds"`
	RoundDetails      []RoundReport `json:"round_details"`
	ThrottleMax       int           `json:"throttle_max"`
	Converged         bool          `json:"converged"`
	// ExpectedDowntimeMS is the source's estimate when it decided to stop and copy, to set
	// against DowntimeMS.
	ExpectedDowntimeMS float64  `json:"expected_downtime_ms"`
	Reason             string   `json:"reason,omitempty"` // why pre-copy did not converge
	ProtocolVersion    uint32   `json:"protocol_version"`
	Warnings           []string `json:"warnings,omitempty"` // problems after the point of no return
	// Postcopy is set when the migration switched to post-copy (modes postcopy and hybrid).
	Postcopy *PostcopyReport `json:"postcopy,omitempty"`
	// Handover is set when the memory was handed over as files (mode handover) or both hosts
	// map it (mode shared-memory).
	Handover *HandoverReport `json:"handover,omitempty"`
	// Streams is each connection's share of the pages when they took several
	// (SendOptions.Streams); empty with one.
	Streams []StreamReport `json:"streams,omitempty"`
	// StreamsChosen says how many streams AutoStreams chose, and why, when the caller left
	// the choice to the engine (SendOptions.Streams 0).
	StreamsChosen string `json:"streams_chosen,omitempty"`
	// DirtyTracking is how the source learned of dirty pages (DirtyTracker), if it says.
	DirtyTracking string `json:"dirty_tracking,omitempty"`
	// DowntimeScaling names the parts of the downtime whose cost grows with the size of
	// memory, and why (StopWindowScaler); "none" when the source says it has none. Empty when
	// the source does not say.
	DowntimeScaling []string `json:"downtime_scaling,omitempty"`
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
	// AheadPages (source report) is how many of them the destination learnt of before the
	// pause (pure post-copy: the populated pages), so that the stop window carried only the
	// pages written since.
	AheadPages    uint64 `json:"ahead_pages"`
	PagesPushed   uint64 `json:"pages_pushed"`   // sent by the background push
	PagesDemanded uint64 `json:"pages_demanded"` // sent because the destination asked
	DemandFaults  uint64 `json:"demand_faults"`  // first accesses that had to wait for the network
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
	// FaultChannelBytes is what the fault channel carried (source report; 0 without one):
	// the pages the destination asked for, on a connection of their own.
	FaultChannelBytes int64 `json:"fault_channel_bytes,omitempty"`
	// PagesResent are requested pages sent again on the fault channel because their first copy
	// was still on its way behind the push.
	PagesResent uint64 `json:"pages_resent,omitempty"`
	// DedupFetchedAgain (destination) counts dedup references that did not check because the
	// guest had changed the page named since it arrived: those pages were requested again.
	DedupFetchedAgain uint64 `json:"dedup_fetched_again,omitempty"`

	// Guest progress (heartbeats per second): in the second before the pause on the source,
	// on the destination from start until every page is present, and in the second after.
	ProgressBefore float64 `json:"progress_rate_before"`
	ProgressDuring float64 `json:"progress_rate_during"`
	ProgressAfter  float64 `json:"progress_rate_after"`
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// HandoverReport describes a migration in which no page travelled: a memory handover
// (ModeHandover) or a migration on shared memory (ModeSharedMemory).
type HandoverReport struct {
	Files int `json:"files"` // file descriptors passed, one per region (0 on shared memory)
	// SharedMemory is the id of the memory file both hosts map (ModeSharedMemory).
	SharedMemory string `json:"shared_memory,omitempty"`
	Bytes        uint64 `json:"bytes"` // guest memory handed over
	// MappedMS (source) is when the destination had mapped the memory, from the start: the
	// source paused only then.
	MappedMS float64 `json:"mapped_ms,omitempty"`
}
