package migration

import (
	"fmt"
	"math"
	"time"
)

// Action is what the pre-copy policy tells the driver to do next.
type Action int

const (
	SendRound   Action = iota // send the pages dirtied during the last round, as a new live round
	StopAndCopy               // pause, send the last dirty set and the state, complete
	GiveUp                    // stop migrating; the source keeps running
	// SwitchToPostcopy (hybrid only): pause and switch; the pages not sent yet follow after
	// the destination has started. SwitchReason says why.
	SwitchToPostcopy
)

func (a Action) String() string {
	switch a {
	case SendRound:
		return "send round"
	case StopAndCopy:
		return "stop and copy"
	case GiveUp:
		return "give up"
	case SwitchToPostcopy:
		return "switch to post-copy"
	}
	return fmt.Sprintf("action %d", int(a))
}

// PolicyConfig configures a PrecopyPolicy.
type PolicyConfig struct {
	PageSize      uint64
	DowntimeLimit time.Duration // stop when the expected downtime is within this
	MaxRounds     int           // live rounds before giving up (or forcing)
	AutoConverge  bool          // throttle the guest when it dirties faster than the link sends
	Force         bool          // at non-convergence, stop and copy anyway instead of giving up
	// StateBytes is the expected size of the device state sent while paused. The engine
	// cannot save state before it pauses, so this is an estimate (see SendOptions).
	StateBytes uint64
	// SwitchCost is the paused time that does not depend on the link: saving state on the
	// source, restoring it and starting on the destination. 0 counts none.
	SwitchCost time.Duration
	// Hybrid switches to post-copy where pre-copy would not stop now: when it would give up or
	// force a stop, after HybridRounds live rounds, or once it has run for HybridAfter (0: no
	// time bound). It never gives up.
	Hybrid       bool
	HybridRounds int
	HybridAfter  time.Duration
}

// Observation is what the driver saw during the live round it just finished.
type Observation struct {
	Round int    // the round just sent: 1, 2, ...
	Pages uint64 // pages sent in it (zero pages included, holes not)
	Bytes uint64 // bytes written for it
	// Elapsed runs from the round's first write until the destination acknowledged that it
	// had placed the round's last page: the time the link and the destination needed to
	// absorb it, not just the time to hand it to the socket.
	Elapsed time.Duration
	Dirty   uint64 // pages dirtied meanwhile: the set the next round would send
	// DirtyTime is how long the guest had to dirty those pages (between the two fetches of
	// the dirty log); 0 means Elapsed.
	DirtyTime time.Duration
	// Lag is how long before this decision Dirty was fetched (the driver fetches while it
	// waits for the acknowledgement). The guest kept dirtying pages meanwhile, and the
	// final round will carry those too.
	Lag time.Duration
	// RTT is the shortest round trip to the destination measured so far (0 if unknown).
	RTT time.Duration
	// Since is how long pre-copy has run, for HybridAfter.
	Since time.Duration
}

// Decision is the policy's answer to an Observation, with the estimates behind it.
type Decision struct {
	Action   Action
	Throttle int // throttle percentage to apply before the next round
	// ExpectedDowntime is the pause if the driver stopped now: the projected final round
	// and the state at the measured bandwidth, plus RTT and the switch cost.
	ExpectedDowntime time.Duration
	FixedCost        time.Duration // the part of ExpectedDowntime that no further round reduces
	Bandwidth        float64       // bytes/s the destination absorbed, over all rounds so far (+Inf before any time passed)
	DirtyRate        float64       // pages/s dirtied during the last round
	LinkRate         float64       // pages/s the link carries at Bandwidth
	Converged        bool          // StopAndCopy because the expected downtime fits the limit
	Reason           string        // for GiveUp, or for a forced StopAndCopy: why it did not converge
	SwitchReason     string        // for SwitchToPostcopy: why hybrid switches now
}

// stallRounds is how many consecutive rounds the dirty set may fail to shrink, with no throttle
// left to raise, before the policy declares non-convergence. One round is noise; three are a
// trend that more rounds will not change.
const stallRounds = 3

// Throttle steps of auto-converge.
const (
	throttleInitial = 20
	throttleStep    = 10
	throttleMax     = 99
)

// PrecopyPolicy decides, round by round, when pre-copy stops. It is a deterministic state
// machine with no I/O and no clock: the driver feeds it one Observation per finished live round
// and carries out the Decision. Identical observations give identical decisions, so tests
// script whole migrations against it.
//
// The model: the bandwidth is the bytes of all rounds over the time from their first writes to
// their acknowledgements, which is what the destination absorbed, backlog included. The final
// round would carry the dirty set plus what the guest dirtied in the Lag since it was fetched
// (at the last round's dirty rate; conservatively a full page each: dirtied pages are rarely
// zero). The expected downtime is that round and the state at the bandwidth, plus a fixed
// cost: one round trip (Complete out, Resumed back) and the configured switch cost. When it
// fits the limit, stop and copy.
//
// Otherwise the guest is outrunning the link when it dirtied pages at more than half the rate
// the link sent them (the round left more than half of its own size dirty again). The dirty
// rate counts distinct pages, so it saturates at the working set: a guest rewriting all of its
// memory shows a dirty rate equal to the link rate, never above. With auto-converge the policy
// then raises the throttle (20%, then +10% per round, up to 99%). Without it, or at 99%,
// rounds in which the dirty set did not shrink by a tenth below its best are stalled, and after
// stallRounds of them, or after MaxRounds, pre-copy has not converged: GiveUp, or StopAndCopy
// with Converged false when Force is set. Reason says why in numbers.
type PrecopyPolicy struct {
	cfg      PolicyConfig
	throttle int
	stalled  int
	best     uint64 // smallest dirty set seen
	bytes    uint64
	elapsed  time.Duration
}

// NewPrecopyPolicy returns a policy; zero fields of cfg take the engine's defaults.
func NewPrecopyPolicy(cfg PolicyConfig) *PrecopyPolicy {
	if cfg.DowntimeLimit <= 0 {
		cfg.DowntimeLimit = DefaultDowntimeLimit
	}
	if cfg.MaxRounds <= 0 {
		cfg.MaxRounds = DefaultMaxRounds
	}
	return &PrecopyPolicy{cfg: cfg, best: math.MaxUint64}
}

// Throttle is the throttle percentage the policy last asked for.
func (p *PrecopyPolicy) Throttle() int { return p.throttle }

// Step takes the observation of a finished live round and decides what comes next.
func (p *PrecopyPolicy) Step(o Observation) Decision {
	d := p.precopy(o)
	if !p.cfg.Hybrid || d.Converged {
		return d
	}
	switch {
	case d.Action != SendRound:
		d.SwitchReason = "not converging: " + d.Reason
	case o.Round >= max(p.cfg.HybridRounds, 1):
		d.SwitchReason = fmt.Sprintf("after %d live rounds", o.Round)
	case p.cfg.HybridAfter > 0 && o.Since >= p.cfg.HybridAfter:
		d.SwitchReason = fmt.Sprintf("pre-copy ran for %v (limit %v)", o.Since.Round(time.Millisecond), p.cfg.HybridAfter)
	default:
		return d
	}
	d.Action = SwitchToPostcopy
	return d
}

// precopy is Step's pre-copy decision.
func (p *PrecopyPolicy) precopy(o Observation) Decision {
	p.bytes += o.Bytes
	p.elapsed += o.Elapsed
	d := Decision{Action: SendRound, Throttle: p.throttle}
	d.Bandwidth = math.Inf(1)
	if p.elapsed > 0 {
		d.Bandwidth = float64(p.bytes) / p.elapsed.Seconds()
	}
	d.LinkRate = d.Bandwidth / float64(p.cfg.PageSize)
	window := o.DirtyTime
	if window <= 0 {
		window = o.Elapsed
	}
	switch {
	case window > 0:
		d.DirtyRate = float64(o.Dirty) / window.Seconds()
	case o.Dirty > 0:
		d.DirtyRate = math.Inf(1)
	}
	// In floating point: pages x page size can overflow 64 bits, and so can the conversion
	// of a huge estimate to a Duration, which would then look tiny.
	final := float64(o.Dirty)
	if o.Lag > 0 && d.DirtyRate > 0 {
		final += d.DirtyRate * o.Lag.Seconds()
	}
	fixed := (o.RTT + p.cfg.SwitchCost).Seconds()
	var transfer float64
	if !math.IsInf(d.Bandwidth, 1) {
		fixed += float64(p.cfg.StateBytes) / d.Bandwidth
		transfer = final * float64(p.cfg.PageSize) / d.Bandwidth
	}
	d.FixedCost = seconds(fixed)
	d.ExpectedDowntime = seconds(fixed + transfer)
	if d.ExpectedDowntime <= p.cfg.DowntimeLimit {
		d.Action, d.Converged = StopAndCopy, true
		return d
	}

	shrunk := float64(o.Dirty) < 0.9*float64(p.best)
	p.best = min(p.best, o.Dirty)
	switch {
	case d.DirtyRate > d.LinkRate/2 && p.cfg.AutoConverge && p.throttle < throttleMax:
		if p.throttle == 0 {
			p.throttle = throttleInitial
		} else {
			p.throttle = min(p.throttle+throttleStep, throttleMax)
		}
		d.Throttle = p.throttle
		p.stalled = 0
	case shrunk:
		p.stalled = 0
	default:
		p.stalled++
	}

	switch {
	case p.stalled >= stallRounds:
		how := "auto-converge off"
		if p.cfg.AutoConverge {
			how = fmt.Sprintf("throttle reached %d%%", p.throttle)
		}
		if d.FixedCost > p.cfg.DowntimeLimit {
			// No round and no throttle can help: say what the fixed part is made of.
			d.Reason = fmt.Sprintf("the fixed part of the downtime alone, %v (state %d bytes at %.0f bytes/s, round trip %v, switch cost %v), exceeds the limit %v",
				d.FixedCost.Round(time.Millisecond), p.cfg.StateBytes, d.Bandwidth, o.RTT, p.cfg.SwitchCost, p.cfg.DowntimeLimit)
		} else if d.DirtyRate > d.LinkRate {
			d.Reason = fmt.Sprintf("dirty rate %.0f pages/s exceeds link %.0f pages/s; %s", d.DirtyRate, d.LinkRate, how)
		} else {
			d.Reason = fmt.Sprintf("dirty rate %.0f pages/s keeps up with link %.0f pages/s (dirty set stuck at %d pages, expected downtime %v > limit %v); %s",
				d.DirtyRate, d.LinkRate, o.Dirty, d.ExpectedDowntime.Round(time.Millisecond), p.cfg.DowntimeLimit, how)
		}
	case o.Round >= p.cfg.MaxRounds:
		d.Reason = fmt.Sprintf("after %d rounds %d pages remain: expected downtime %v exceeds the limit %v (dirty rate %.0f pages/s, link %.0f pages/s, throttle %d%%)",
			o.Round, o.Dirty, d.ExpectedDowntime.Round(time.Millisecond), p.cfg.DowntimeLimit, d.DirtyRate, d.LinkRate, p.throttle)
	default:
		return d
	}
	d.Action = GiveUp
	if p.cfg.Force {
		d.Action = StopAndCopy
	}
	return d
}

// seconds converts to a Duration, saturating where the estimate no longer fits one.
func seconds(s float64) time.Duration {
	if !(s < 9e9) { // ~285 years, MaxInt64 ns being ~292; also catches NaN
		return time.Duration(math.MaxInt64)
	}
	return time.Duration(s * 1e9)
}
