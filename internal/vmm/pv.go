package vmm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/kvm"
)

// VerifyReport is the guest's own check of its memory, combined over all vCPUs.
type VerifyReport struct {
	PagesChecked   uint64 `json:"pages_checked"`
	Mismatches     uint64 `json:"mismatches"`
	PagesVersioned uint64 `json:"pages_versioned"`
	PagesFree      uint64 `json:"pages_free"` // churn: free pages, whose content is not checked
	// FirstBadGPA is the guest physical address of the first mismatching page found (by the
	// lowest vCPU that found one), with the word expected and found there.
	FirstBadGPA    *uint64 `json:"first_bad_gpa,omitempty"`
	FirstBadOffset uint64  `json:"first_bad_offset,omitempty"`
	Expected       uint64  `json:"expected,omitempty"`
	Found          uint64  `json:"found,omitempty"`
	VCPUs          int     `json:"vcpus"`
	DurationMS     float64 `json:"duration_ms"`
}

// verifyOp is one outstanding verification request.
type verifyOp struct {
	start   time.Time
	waiting map[int]bool
	reports map[int]vcpuReport
	done    chan struct{}
}

type vcpuReport struct {
	seq, checked, mismatches, firstBadPFN, firstBadOff, expected, found, versioned, free uint64
}

const consoleKeep = 200 // lines of console text kept for stats

// pvDevice is the paravirtual port device: console, heartbeats, sleep, verification, exit.
type pvDevice struct {
	m      *Machine
	tscKHz uint32
	cmd    []atomic.Uint32 // pending guest.Command per vCPU, answered at its next heartbeat
	// reportFree asks a vCPU for CmdReportFree at its next heartbeat that has no other
	// command to give.
	reportFree []atomic.Bool
	// balloonCmd asks a vCPU for CmdBalloon, after the others; it then reads balloonTarget.
	balloonCmd    []atomic.Bool
	balloonTarget []atomic.Uint32
	// balloonList asks a vCPU for CmdBalloonList, after the others (releaseKept).
	balloonList []atomic.Bool
	// diverge asks a vCPU for CmdDiverge, after the others; it then reads divergeArgs, one
	// word per read of PortDiverge (divergeRead counts them).
	diverge     []atomic.Bool
	divergeArgs [2]uint32
	divergeRead []int
	// diverging counts the vCPUs asked for CmdDiverge that have not heartbeaten since they
	// read its arguments (the heartbeat after it says the rewrite is done).
	diverging atomic.Int32

	mu          sync.Mutex
	startedAt   time.Time // when the vCPUs started (or, after a migration, resumed here)
	firstHB     time.Time
	lastHB      time.Time
	lastHBWall  int64 // wall clock of the last heartbeat (UnixNano), carried across migration
	maxGap      time.Duration
	heartbeats  uint64
	perVCPU     []uint64
	exited      []bool
	console     []string
	op          *verifyOp
	lastVerify  *VerifyReport
	gapAtResume time.Duration // heartbeat gap across the last migration, measured here
	rate        rateWindow
}

func newPVDevice(m *Machine, n int) *pvDevice {
	return &pvDevice{
		m: m, cmd: make([]atomic.Uint32, n), reportFree: make([]atomic.Bool, n),
		balloonCmd: make([]atomic.Bool, n), balloonTarget: make([]atomic.Uint32, n), balloonList: make([]atomic.Bool, n),
		diverge: make([]atomic.Bool, n), divergeRead: make([]int, n),
		perVCPU: make([]uint64, n), exited: make([]bool, n),
	}
}

func (p *pvDevice) start(now time.Time) {
	p.mu.Lock()
	p.startedAt = now
	p.mu.Unlock()
}

// handle serves one port I/O exit of vCPU v. done reports that the vCPU has finished.
func (p *pvDevice) handle(v *vcpu) (done bool, err error) {
	io, data := v.kvm.IO()
	var val uint32
	switch len(data) {
	case 1:
		val = uint32(data[0])
	case 2:
		val = uint32(binary.LittleEndian.Uint16(data))
	case 4:
		val = binary.LittleEndian.Uint32(data)
	}
	if io.Count != 1 {
		return false, fmt.Errorf("vmm: vCPU %d: string port I/O on port 0x%x (count %d) is not supported", v.id, io.Port, io.Count)
	}
	if io.Direction == kvm.IOIn {
		var reply uint32 = 0xffffffff
		switch io.Port {
		case guest.PortHeartbeat:
			reply = uint32(p.heartbeat(v))
			v.throttle()
		case guest.PortBalloonTarget:
			reply = p.balloonTarget[v.id].Load()
		case guest.PortDiverge:
			p.mu.Lock()
			reply = p.divergeArgs[p.divergeRead[v.id]%2]
			p.divergeRead[v.id]++
			p.mu.Unlock()
		}
		for i := range data {
			data[i] = byte(reply >> (8 * i))
		}
		return false, nil
	}
	switch io.Port {
	case guest.PortConsole:
		p.consoleText(v.id, val)
	case guest.PortSleep:
		us := time.Duration(val) * time.Microsecond
		if us > time.Second { // keep pauses and stops prompt whatever the guest asks
			us = time.Second
		}
		v.sleep(us)
	case guest.PortVerified:
		if err := p.verified(v.id); err != nil {
			return false, err
		}
	case guest.PortFreePages:
		if err := p.m.freePagesReported(v.id, val); err != nil {
			return true, err
		}
	case guest.PortFreeDone:
		p.m.freeDone(v.id, val)
	case guest.PortBalloonInflate, guest.PortBalloonHeld:
		if err := p.m.balloonListed(v.id, val, io.Port == guest.PortBalloonInflate); err != nil {
			return true, err
		}
	case guest.PortExit:
		p.mu.Lock()
		p.exited[v.id] = true
		p.mu.Unlock()
		if val != 0 {
			return true, fmt.Errorf("vmm: vCPU %d: guest exited with status %d", v.id, val)
		}
		return true, nil
	case guest.PortPanic:
		text, _ := p.readConsole(v.id, guest.MbConsoleMax)
		return true, fmt.Errorf("vmm: vCPU %d: guest panic: %s", v.id, text)
	case guest.PortFault:
		return true, fmt.Errorf("vmm: guest crashed: %w", p.m.faultReport(v))
	default:
		return false, fmt.Errorf("vmm: vCPU %d: write of 0x%x to unknown port 0x%x", v.id, val, io.Port)
	}
	return false, nil
}

func (p *pvDevice) heartbeat(v *vcpu) guest.Command {
	now := time.Now()
	p.mu.Lock()
	if p.firstHB.IsZero() {
		p.firstHB = now
	}
	if !p.lastHB.IsZero() {
		if gap := now.Sub(p.lastHB); gap > p.maxGap {
			p.maxGap = gap
		}
	} else if p.lastHBWall != 0 {
		// The first heartbeat after a migration: the gap since the source's last one, by the
		// wall clock (both hosts' clocks are assumed synchronised).
		gap := time.Duration(now.UnixNano() - p.lastHBWall)
		p.gapAtResume = gap
		if gap > p.maxGap {
			p.maxGap = gap
		}
	}
	p.lastHB = now
	p.lastHBWall = now.UnixNano()
	if p.divergeRead[v.id] >= 2 {
		p.divergeRead[v.id] = 0
		p.diverging.Add(-1)
	}
	p.heartbeats++
	p.perVCPU[v.id]++
	p.rate.add(now, 1)
	p.mu.Unlock()
	if cmd := guest.Command(p.cmd[v.id].Swap(uint32(guest.CmdContinue))); cmd != guest.CmdContinue {
		return cmd
	}
	if p.reportFree[v.id].CompareAndSwap(true, false) {
		return guest.CmdReportFree
	}
	if p.balloonCmd[v.id].CompareAndSwap(true, false) {
		return guest.CmdBalloon
	}
	if p.balloonList[v.id].CompareAndSwap(true, false) {
		return guest.CmdBalloonList
	}
	if p.diverge[v.id].CompareAndSwap(true, false) {
		p.mu.Lock()
		p.divergeRead[v.id] = 0
		p.mu.Unlock()
		return guest.CmdDiverge
	}
	return guest.CmdContinue
}

// exitedVCPUs says which vCPUs have finished.
func (p *pvDevice) exitedVCPUs() []bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]bool(nil), p.exited...)
}

// readMailbox reads n bytes at off of vCPU id's mailbox page, once the page is present (on a
// post-copy destination it may still be on its way; ctx bounds the wait).
func (p *pvDevice) readMailbox(ctx context.Context, id int, off, n int) ([]byte, error) {
	b := make([]byte, n)
	if err := p.m.readPresent(ctx, mailboxGPA(id)+uint64(off), b); err != nil {
		return nil, err
	}
	return b, nil
}

func (p *pvDevice) readConsole(id int, n uint32) (string, error) {
	if n > guest.MbConsoleMax {
		n = guest.MbConsoleMax
	}
	b, err := p.readMailbox(context.Background(), id, guest.MbConsole, int(n))
	if err != nil {
		return "", err
	}
	return string(b), nil
}

func (p *pvDevice) consoleText(id int, n uint32) {
	text, err := p.readConsole(id, n)
	if err != nil {
		text = fmt.Sprintf("<console read failed: %v>", err)
	}
	p.mu.Lock()
	p.console = append(p.console, text)
	if len(p.console) > consoleKeep {
		p.console = p.console[len(p.console)-consoleKeep:]
	}
	p.mu.Unlock()
	if p.m.cfg.Console != nil {
		p.m.cfg.Console(id, text)
	}
}

func (p *pvDevice) verified(id int) error {
	b, err := p.readMailbox(context.Background(), id, guest.MbVerifySeq, guest.MbPagesFree+8-guest.MbVerifySeq)
	if err != nil {
		return fmt.Errorf("vmm: vCPU %d: reading verify report: %w", id, err)
	}
	w := func(off int) uint64 { return binary.LittleEndian.Uint64(b[off-guest.MbVerifySeq:]) }
	r := vcpuReport{
		seq: w(guest.MbVerifySeq), checked: w(guest.MbPagesChecked), mismatches: w(guest.MbMismatches),
		firstBadPFN: w(guest.MbFirstBadPage), firstBadOff: w(guest.MbFirstBadOffset),
		expected: w(guest.MbExpected), found: w(guest.MbFound), versioned: w(guest.MbPagesVersioned),
		free: w(guest.MbPagesFree),
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	op := p.op
	if op == nil || !op.waiting[id] {
		return nil // a pass started before a migration and finished here: nobody asked
	}
	delete(op.waiting, id)
	op.reports[id] = r
	if len(op.waiting) == 0 {
		rep := combine(op, len(p.exited))
		p.lastVerify = &rep
		p.op = nil
		close(op.done)
	}
	return nil
}

func combine(op *verifyOp, n int) VerifyReport {
	var rep VerifyReport
	for id := 0; id < n; id++ {
		r, ok := op.reports[id]
		if !ok {
			continue
		}
		rep.VCPUs++
		rep.PagesChecked += r.checked
		rep.Mismatches += r.mismatches
		rep.PagesVersioned += r.versioned
		rep.PagesFree += r.free
		if r.mismatches > 0 && rep.FirstBadGPA == nil {
			gpa := r.firstBadPFN * guest.PageSize
			rep.FirstBadGPA = &gpa
			rep.FirstBadOffset, rep.Expected, rep.Found = r.firstBadOff, r.expected, r.found
		}
	}
	rep.DurationMS = float64(time.Since(op.start).Microseconds()) / 1000
	return rep
}

// verify asks every vCPU still running to check its slice (cmd CmdVerify or CmdExit) and waits
// for all reports.
func (p *pvDevice) verify(ctx context.Context, cmd guest.Command) (VerifyReport, error) {
	p.mu.Lock()
	if p.op != nil {
		op := p.op
		p.mu.Unlock()
		// Join the pass in flight rather than start a second one.
		select {
		case <-op.done:
			p.mu.Lock()
			defer p.mu.Unlock()
			return *p.lastVerify, nil
		case <-ctx.Done():
			return VerifyReport{}, fmt.Errorf("vmm: verify: %w", ctx.Err())
		}
	}
	op := &verifyOp{start: time.Now(), waiting: map[int]bool{}, reports: map[int]vcpuReport{}, done: make(chan struct{})}
	for id, ex := range p.exited {
		if !ex {
			op.waiting[id] = true
		}
	}
	if len(op.waiting) == 0 {
		p.mu.Unlock()
		return VerifyReport{}, errors.New("vmm: verify: every vCPU has exited")
	}
	p.op = op
	for id := range op.waiting {
		p.cmd[id].Store(uint32(cmd))
	}
	p.mu.Unlock()
	select {
	case <-op.done:
		p.mu.Lock()
		defer p.mu.Unlock()
		return *p.lastVerify, nil
	case <-p.m.done:
		return VerifyReport{}, p.failedErr("verify")
	case <-ctx.Done():
		p.mu.Lock()
		if p.op == op {
			p.op = nil
		}
		p.mu.Unlock()
		return VerifyReport{}, fmt.Errorf("vmm: verify: no report from vCPUs %v: %w", keys(op.waiting), ctx.Err())
	}
}

func (p *pvDevice) failedErr(what string) error {
	st, err := p.m.State()
	if err != nil {
		return fmt.Errorf("vmm: %s: machine %s: %w", what, st, err)
	}
	return fmt.Errorf("vmm: %s: machine %s before the guest reported", what, st)
}

func keys(m map[int]bool) []int {
	var out []int
	for k := range m {
		out = append(out, k)
	}
	return out
}

// rateWindow counts events over the last second in 100 ms buckets.
type rateWindow struct {
	buckets [10]uint64
	stamp   [10]int64 // bucket index (unix time / 100 ms) each bucket holds
}

func (r *rateWindow) add(now time.Time, n uint64) {
	idx := now.UnixMilli() / 100
	b := idx % 10
	if r.stamp[b] != idx {
		r.stamp[b] = idx
		r.buckets[b] = 0
	}
	r.buckets[b] += n
}

// perSecond is the count over the last full second.
func (r *rateWindow) perSecond(now time.Time) float64 {
	idx := now.UnixMilli() / 100
	var sum uint64
	for b := 0; b < 10; b++ {
		if r.stamp[b] > idx-10 && r.stamp[b] < idx {
			sum += r.buckets[b]
		}
	}
	return float64(sum) / 0.9
}
