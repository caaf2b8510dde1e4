package migration

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/godwit-vm/godwit/migration/wire"
)

// precopyDriver runs pre-copy on the sender's session: the live rounds, each judged by the
// policy when the destination has acknowledged it, and the stop-and-copy. In hybrid it runs
// the rounds until the policy says to switch, and hands over to the post-copy driver.
type precopyDriver struct {
	*sender
	policy *PrecopyPolicy
	round  int
	last   Decision // the policy's latest estimates, for progress

	// Timing of the live rounds, for the policy.
	roundAt time.Time // the last round's first write
	endAt   time.Time // when the last round's end marker was about to be written
	fetchAt time.Time // the last fetch of the dirty log (or the start of logging)

	ended atomic.Uint32 // the last live round whose end marker is (being) written
}

func newPrecopyDriver(s *sender) *precopyDriver {
	_, throttles := s.src.(Throttler)
	return &precopyDriver{sender: s, policy: NewPrecopyPolicy(PolicyConfig{
		PageSize:      uint64(s.ps),
		DowntimeLimit: s.opts.DowntimeLimit,
		MaxRounds:     s.opts.MaxRounds,
		AutoConverge:  s.opts.AutoConverge && throttles,
		Force:         s.opts.Force,
		StateBytes:    uint64(len(s.desc.Devices)) * stateBytesPerComponent,
		SwitchCost:    s.opts.SwitchCost,
		Hybrid:        s.opts.Mode == ModeHybrid,
		HybridRounds:  s.opts.HybridRounds,
		HybridAfter:   s.opts.HybridAfter,
	})}
}

// endedRound is the last live round whose end marker is (being) written, for the reader
// goroutine's check of the acknowledgements; 0 without rounds.
func (d *precopyDriver) endedRound() uint32 {
	if d == nil {
		return 0
	}
	return d.ended.Load()
}

// progress fills in the rounds' part of a progress report.
func (d *precopyDriver) progress(p *Progress) {
	p.Round = d.round
	p.DirtyRate, p.ExpectedDowntime = d.last.DirtyRate, d.last.ExpectedDowntime
	if n := len(d.rep.RoundDetails); n > 0 {
		p.PagesRemaining = d.rep.RoundDetails[n-1].DirtyPages
	}
}

// run sends the rounds and, once the policy stops them, the stop-and-copy or the switch.
func (d *precopyDriver) run(ctx *switchCtx) error {
	d.phase = "round 1"
	if err := d.startLogging(); err != nil {
		return err
	}
	d.fetchAt = d.clock.Now()
	set, err := d.populated()
	if err != nil {
		return err
	}
	if err := d.sendRound(1, d.plan(set), false); err != nil {
		return err
	}

	// Each live round ends with a marker that the destination acknowledges once it has placed
	// the round's last page. The source fetches the dirty log and reads the next round's first
	// batch while the acknowledgement is on its way, then decides with the round's time from
	// first write to acknowledgement: what the destination absorbed, not what the socket
	// took. It never pauses, nor starts the next round, before the acknowledgement, so the
	// paused window holds no backlog of earlier rounds. The cost is the link's idle time
	// between an acknowledgement and the next round's first batch: about one round trip per
	// round.
	var dec Decision
	for {
		dirty, err := d.fetchDirty()
		if err != nil {
			return err
		}
		if d.post != nil {
			d.post.noteDirty(dirty)
		}
		fetchAt := d.clock.Now()
		dirtyTime := fetchAt.Sub(d.fetchAt)
		d.fetchAt = fetchAt
		rr := &d.rep.RoundDetails[len(d.rep.RoundDetails)-1]
		rr.DirtyPages = d.count(dirty)
		next := d.plan(dirty)
		if err := d.fill(next); err != nil {
			return err
		}
		ackAt, err := d.awaitRoundAck(rr)
		if err != nil {
			return err
		}
		dec = d.policy.Step(Observation{
			Round: d.round, Pages: rr.Pages, Bytes: rr.Bytes, Elapsed: ackAt.Sub(d.roundAt),
			Dirty: rr.DirtyPages, DirtyTime: dirtyTime, Lag: d.clock.Now().Sub(fetchAt), RTT: d.rtt,
			Since: d.clock.Now().Sub(d.start),
		})
		d.last = dec
		d.report(true)
		if dec.Action == SwitchToPostcopy {
			d.rep.Reason = dec.Reason
			d.rep.ExpectedDowntimeMS = ms(dec.ExpectedDowntime)
			d.discard()
			return d.post.switchover(ctx, dirty, dec.SwitchReason)
		}
		if dec.Action == GiveUp {
			d.rep.Reason = dec.Reason
			return fmt.Errorf("%w: %s", ErrNotConverged, dec.Reason)
		}
		if dec.Action == StopAndCopy {
			d.rep.Converged, d.rep.Reason = dec.Converged, dec.Reason
			d.rep.ExpectedDowntimeMS = ms(dec.ExpectedDowntime)
			// The pages read ahead are in the final set anyway; it reads them afresh.
			d.discard()
			set = dirty
			break
		}
		if dec.Throttle != d.throttle {
			if err := d.vmm(fmt.Sprintf("SetThrottle(%d)", dec.Throttle), d.src.(Throttler).SetThrottle(dec.Throttle)); err != nil {
				return err
			}
			d.throttle = dec.Throttle
			d.rep.ThrottleMax = max(d.rep.ThrottleMax, d.throttle)
		}
		d.phase = fmt.Sprintf("round %d", d.round+1)
		if err := d.sendRound(d.round+1, next, false); err != nil {
			return err
		}
	}

	// Stop and copy. The set the policy judged is still unsent; add what was dirtied since.
	d.phase = "stop-and-copy"
	if err := d.live(); err != nil {
		return err
	}
	// Marked paused before the call: after a failed Pause the VM may be partly stopped, and
	// Resume on a running VM is harmless.
	d.paused = true
	if err := d.vmm("Pause", d.src.Pause()); err != nil {
		return err
	}
	d.stopped = true
	ctx.pauseAt = d.clock.Now()
	if ctx.heartbeats {
		ctx.lastBeat = ctx.pc.LastProgress()
	}
	last, err := d.fetchDirty()
	if err != nil {
		return err
	}
	set = d.dropFree(union(set, last))
	// Logging stays on until the destination runs the VM (stopLogging): ending it costs the
	// VMM work that follows the memory's size, and a paused VM dirties nothing.
	if err := d.sendRound(d.round+1, d.plan(set), true); err != nil {
		return err
	}
	ctx.finalAt = d.clock.Now()
	return d.complete(ctx)
}

// sendRound sends the pages of p as round n; a live round ends with its end marker.
func (d *precopyDriver) sendRound(n int, p *roundPlan, final bool) error {
	d.round = n
	if d.dedup != nil {
		set := p.set
		d.dedup.StartRound(uint32(n), func(r int, pg uint64) bool { return set[r].Has(pg) })
	}
	if err := d.link.w.WriteRound(&wire.Round{N: uint32(n), Final: final, Pages: p.pages}); err != nil {
		return err
	}
	t0, b0, sent0 := d.clock.Now(), d.written(), d.sent
	for d.lanes == nil {
		if err := d.fill(p); err != nil {
			return err
		}
		if d.used == 0 {
			break
		}
		if err := d.flush(); err != nil {
			return err
		}
	}
	if d.lanes != nil {
		if err := d.sendLanes(p); err != nil {
			return err
		}
	}
	end := d.clock.Now()
	if !final {
		// Stamped before the write: on a full socket the write itself waits for the
		// backlog, and that wait belongs to the acknowledgement, not to sending. Marked
		// before it too: the acknowledgement may arrive before the write returns.
		d.ended.Store(uint32(n))
		if err := d.link.w.WriteRoundEnd(&wire.RoundEnd{N: uint32(n), Pages: d.sent - sent0}); err != nil {
			return err
		}
	}
	d.roundAt, d.endAt = t0, end
	d.rep.Rounds = n
	d.rep.RoundDetails = append(d.rep.RoundDetails, RoundReport{
		Round: n, Final: final, Pages: p.pages, Bytes: uint64(d.written() - b0),
		DurationMS: ms(end.Sub(t0)), Throttle: d.throttle,
	})
	return nil
}

// fill reads the plan's next pages into the empty batch buffer: up to a buffer's worth, all of
// one region, since a batch names one region. It does nothing if the buffer still holds pages
// (read ahead while an acknowledgement was awaited), and leaves it empty at the plan's end.
func (d *precopyDriver) fill(p *roundPlan) error {
	if d.used > 0 {
		return nil
	}
	return d.readInto(p, &d.pageBuf)
}

// awaitRoundAck waits for the destination's acknowledgement of the live round rr, for at most
// AckTimeout from the round's end marker, records the wait in rr and returns when the
// acknowledgement arrived.
func (d *precopyDriver) awaitRoundAck(rr *RoundReport) (time.Time, error) {
	phase := d.phase
	d.phase = fmt.Sprintf("waiting for round %d ack", rr.Round)
	d.report(false)
	t := time.NewTimer(max(0, d.opts.AckTimeout-d.clock.Now().Sub(d.endAt)))
	defer t.Stop()
	var in inbound
	select {
	case in = <-d.link.inbox:
	case <-t.C:
		return time.Time{}, fmt.Errorf("%w: the destination did not acknowledge round %d (%d pages) within %v of its end", ErrTimeout, rr.Round, rr.Pages, d.opts.AckTimeout)
	case <-d.ctx.Done():
		return time.Time{}, context.Cause(d.ctx)
	}
	if in.err != nil {
		return time.Time{}, in.err
	}
	ack, ok := in.msg.(*wire.RoundAck)
	if !ok {
		return time.Time{}, unexpected(in.msg, fmt.Sprintf("round ack %d", rr.Round))
	}
	if ack.N != uint32(rr.Round) || ack.Pages != rr.Pages {
		return time.Time{}, fmt.Errorf("%w: the destination acknowledged round %d with %d pages placed; the source sent %d in round %d", ErrProtocol, ack.N, ack.Pages, rr.Pages, rr.Round)
	}
	// The end marker went out after endAt and the acknowledgement cannot precede it; the
	// clamp only guards against a clock that is not monotonic.
	at := in.at
	if at.Before(d.endAt) {
		at = d.endAt
	}
	wait := at.Sub(d.endAt)
	rr.AckWaitMS = ms(wait)
	d.rtt = min(d.rtt, wait)
	d.phase = phase
	return at, nil
}
