package vmm

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
)

// Self-ballooning. The churn guest keeps a balloon of free pages at a target the VMM sets
// (CmdBalloon, answered through PortBalloonTarget): a number of pages, or a share of its free
// pages that it keeps in the balloon as they come and go. It names the pages it puts in
// (PortBalloonInflate) and the VMM punches them out of the memfd: the host gets the memory
// back, and a migration never sees them (they are holes). A page the guest takes back
// (deflate) reads as zero and gets fresh memory when it is written; the guest only tells
// through its mailbox counts. While this machine is itself still receiving by post-copy the
// VMM punches nothing: a punched page would read as missing again to the demand pager. Since
// deflates name no pages, the VMM cannot tell afterwards which of the pages it kept are still
// in the balloon: once post-copy is over it asks the guest to name its balloon again
// (CmdBalloonList, answered through PortBalloonHeld) and releases what it names.

// Balloon is a balloon target: Bytes of guest memory, or, with Auto, Share (0..1) of the
// guest's free memory. The zero Balloon is none.
type Balloon struct {
	Bytes uint64  `json:"bytes,omitempty"`
	Auto  bool    `json:"auto,omitempty"`
	Share float64 `json:"share,omitempty"`
}

// ParseBalloon reads a target as flags give it: a size ("512M", "1G", "0" for none) or
// "auto" or "auto:SHARE" (a fraction of the free memory; auto alone is 0.9).
func ParseBalloon(s string, parseSize func(string) (uint64, error)) (Balloon, error) {
	if rest, ok := strings.CutPrefix(s, "auto"); ok {
		b := Balloon{Auto: true, Share: 0.9}
		if rest == "" {
			return b, nil
		}
		v, ok := strings.CutPrefix(rest, ":")
		f, err := strconv.ParseFloat(v, 64)
		if !ok || err != nil || f <= 0 || f > 1 {
			return Balloon{}, fmt.Errorf("balloon target %q: want auto:SHARE with a share in (0, 1]", s)
		}
		b.Share = f
		return b, nil
	}
	n, err := parseSize(s)
	if err != nil {
		return Balloon{}, fmt.Errorf("balloon target %q: want a size (512M), 0 or auto[:SHARE]: %w", s, err)
	}
	return Balloon{Bytes: n}, nil
}

func (b Balloon) String() string {
	switch {
	case b.Auto:
		return fmt.Sprintf("auto (%.0f%% of free memory)", b.Share*100)
	case b.Bytes == 0:
		return "none"
	}
	return fmt.Sprintf("%d MiB", b.Bytes>>20)
}

// word is the target as one vCPU reads it from PortBalloonTarget.
func (b Balloon) word(vcpus int) (uint32, error) {
	if b.Auto {
		if b.Share <= 0 || b.Share > 1 {
			return 0, fmt.Errorf("vmm: balloon share %g: want (0, 1]", b.Share)
		}
		return guest.BalloonAuto | uint32(math.Round(b.Share*1000)), nil
	}
	pages := (b.Bytes/guest.PageSize + uint64(vcpus) - 1) / uint64(vcpus)
	if pages >= guest.BalloonAuto {
		return 0, fmt.Errorf("vmm: balloon of %d bytes is too large", b.Bytes)
	}
	return uint32(pages), nil
}

// balloonCounts are the machine's balloon figures over its life.
type balloonCounts struct {
	target   atomic.Pointer[Balloon]
	inflated atomic.Uint64 // pages the guest put into the balloon
	released atomic.Uint64 // pages punched out of memory (named again: counted again)
	// kept says that pages went into the balloon while post-copy was armed, unreleased.
	kept atomic.Bool
}

// SetBalloon gives the guest a new balloon target; every vCPU takes it at its next heartbeat.
// Only the churn workload has a balloon; the others ignore it.
func (m *Machine) SetBalloon(b Balloon) error {
	w, err := b.word(len(m.vcpus))
	if err != nil {
		return err
	}
	m.balloon.target.Store(&b)
	for i := range m.pv.balloonCmd {
		m.pv.balloonTarget[i].Store(w)
		m.pv.balloonCmd[i].Store(true)
	}
	return nil
}

// balloonListed takes vCPU id's list of n pages in the balloon (inflated: new ones, from
// PortBalloonInflate; otherwise named again, from PortBalloonHeld) and releases their memory.
func (m *Machine) balloonListed(id int, n uint32, inflated bool) error {
	if n == 0 {
		return nil
	}
	pfns, err := m.readPageList(id, n, "balloon list")
	if err != nil {
		return err
	}
	if inflated {
		m.balloon.inflated.Add(uint64(n))
	}
	if m.pc.Load() != nil {
		// Flag first, then look again: either disarmPostcopy sees the flag and asks for the
		// list, or this sees it disarmed and releases the pages itself.
		m.balloon.kept.Store(true)
		if m.pc.Load() != nil {
			return nil
		}
	}
	slices.Sort(pfns)
	for i := 0; i < len(pfns); {
		j := i + 1
		for j < len(pfns) && pfns[j] == pfns[j-1]+1 {
			j++
		}
		if err := m.mem.PunchPages(pfns[i], uint64(j-i)); err != nil {
			return fmt.Errorf("vmm: vCPU %d: releasing balloon pages %d+%d: %w", id, pfns[i], j-i, err)
		}
		i = j
	}
	m.balloon.released.Add(uint64(n))
	return nil
}

// releaseKept asks the guest to name its balloon again if pages went into it unreleased
// (while post-copy was armed); called once post-copy is disarmed.
func (m *Machine) releaseKept() {
	if !m.balloon.kept.Swap(false) {
		return
	}
	for i := range m.pv.balloonList {
		m.pv.balloonList[i].Store(true)
	}
}

// guestBalloon is the guest's own count of its balloon (the mailboxes), which migrates with it.
type guestBalloon struct {
	pages, deflated, onDemand uint64
}

// guestBalloon sums the mailboxes' balloon counts. It gives up on a mailbox still on its way
// by post-copy.
func (m *Machine) guestBalloon() guestBalloon {
	var g guestBalloon
	for id := range m.vcpus {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
		b, err := m.pv.readMailbox(ctx, id, guest.MbBalloonPages, 24)
		cancel()
		if err == nil {
			g.pages += binary.LittleEndian.Uint64(b)
			g.deflated += binary.LittleEndian.Uint64(b[8:])
			g.onDemand += binary.LittleEndian.Uint64(b[16:])
		}
	}
	return g
}
