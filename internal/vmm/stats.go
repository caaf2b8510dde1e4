package vmm

import (
	"context"
	"encoding/binary"
	"fmt"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
)

// Stats is a snapshot of the machine's figures, as `godwit stats` prints them.
type Stats struct {
	Name  string `json:"name"`
	State State  `json:"state"`
	Error string `json:"error,omitempty"`
	// Incoming is the address a process that waits for an incoming migration listens on
	// (state "incoming"; the machine does not exist yet).
	Incoming string         `json:"incoming,omitempty"`
	VCPUs    int            `json:"vcpus"`
	MemBytes uint64         `json:"mem_bytes"`
	Workload map[string]any `json:"workload,omitempty"`
	// ResidentBytes is the guest memory the host really holds (memfd pages that are not holes;
	// for a clone, the pages it wrote: the template's others are shared by all its clones).
	ResidentBytes uint64 `json:"resident_bytes"`
	// CloneOf is the template the VM's memory is cloned from (its id), if it is a clone.
	CloneOf string `json:"clone_of,omitempty"`
	// Diverging: the guest is still rewriting the share of its pages 'run --diverge' asked for.
	Diverging bool `json:"diverging,omitempty"`
	// MemoryFile is the memory file on shared memory that guest memory is in ('run
	// --memory-file'); empty for memory of the VM's own. Localized says how it moved out of
	// one into its own memory, once it did; Localizing is true while it moves.
	MemoryFile string          `json:"memory_file,omitempty"`
	Localizing bool            `json:"localizing,omitempty"`
	Localized  *LocalizeReport `json:"localized,omitempty"`
	UptimeMS   int64           `json:"uptime_ms"`
	// FirstHeartbeatMS is the time from the machine's creation to the guest's first heartbeat.
	FirstHeartbeatMS *float64 `json:"first_heartbeat_ms,omitempty"`
	Heartbeats       uint64   `json:"heartbeats"`
	HeartbeatsPerSec float64  `json:"heartbeats_per_sec"`
	// LastHeartbeatAgoMS is how long ago the last heartbeat arrived.
	LastHeartbeatAgoMS *float64 `json:"last_heartbeat_ago_ms,omitempty"`
	// MaxHeartbeatGapMS is the largest gap between consecutive heartbeats on this host,
	// including the gap across the migration that brought the machine here.
	MaxHeartbeatGapMS float64 `json:"max_heartbeat_gap_ms"`
	// MigrationGapMS is the heartbeat gap across the incoming migration (0 if none).
	MigrationGapMS float64 `json:"migration_gap_ms,omitempty"`
	PagesWritten   uint64  `json:"pages_written"`
	WorkUnits      uint64  `json:"work_units"`
	ThrottlePct    int     `json:"throttle_pct"`
	DirtyLogging   bool    `json:"dirty_logging"`
	DirtyTracking  string  `json:"dirty_tracking"`
	// With the dirty ring: entries harvested and ring-full exits since the machine started.
	DirtyRingHarvested uint64 `json:"dirty_ring_harvested,omitempty"`
	DirtyRingFullExits uint64 `json:"dirty_ring_full_exits,omitempty"`
	// FreePagesReported counts the pages the guest reported free to a migration away from
	// here (the churn workload), over the machine's life.
	FreePagesReported uint64 `json:"free_pages_reported,omitempty"`
	// The balloon (churn workload): its target; the memory in it now and the pages the guest
	// took back out of it, in all and on demand (the guest's own counts, which migrate with
	// it); the pages put in and released here over the machine's life (after an incoming
	// post-copy the guest names its balloon again, and those pages count as released again).
	BalloonTarget   string        `json:"balloon_target,omitempty"`
	BalloonBytes    uint64        `json:"balloon_bytes"`
	BalloonDeflated uint64        `json:"balloon_deflated_pages,omitempty"`
	BalloonOnDemand uint64        `json:"balloon_deflated_on_demand_pages,omitempty"`
	BalloonInflated uint64        `json:"balloon_inflated_pages,omitempty"`
	BalloonReleased uint64        `json:"balloon_released_pages,omitempty"`
	LastVerify      *VerifyReport `json:"last_verify,omitempty"`
	// Postcopy holds the figures of the machine's demand paging (the incoming post-copy),
	// while it runs and after.
	Postcopy *PostcopyStats `json:"postcopy,omitempty"`
	Console  []string       `json:"console,omitempty"`
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Stats reads the machine's current figures. Guest counters come from the mailboxes by pread.
func (m *Machine) Stats() Stats {
	now := time.Now()
	st, failure := m.State()
	s := Stats{
		Name: m.cfg.Name, State: st, VCPUs: m.cfg.VCPUs, MemBytes: m.cfg.MemBytes,
		Workload: m.cfg.Workload, UptimeMS: now.Sub(m.created).Milliseconds(), ThrottlePct: m.Throttle(),
	}
	if failure != nil {
		s.Error = failure.Error()
	}
	m.mu.Lock()
	s.MemoryFile, s.Localizing, s.Localized = m.cfg.MemoryFile, m.localizing, m.localized
	if c := m.cfg.Clone; c != nil {
		s.CloneOf = fmt.Sprintf("%x", c.ID)
	}
	s.Diverging = m.pv.diverging.Load() > 0
	m.mu.Unlock()
	m.life.RLock()
	if !m.released {
		s.ResidentBytes, _ = m.mem.ResidentBytes()
		// On a post-copy destination a mailbox page may still be on its way: wait a little
		// for it (asking for it first), else leave its counters out.
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		for id := 0; id < s.VCPUs; id++ {
			if b, err := m.pv.readMailbox(ctx, id, guest.MbWorkUnits, 16); err == nil {
				s.WorkUnits += binary.LittleEndian.Uint64(b)
				s.PagesWritten += binary.LittleEndian.Uint64(b[8:])
			}
		}
		cancel()
	} else {
		s.State = StateReleased
	}
	m.life.RUnlock()
	p := m.pv
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.firstHB.IsZero() {
		v := ms(p.firstHB.Sub(m.created))
		s.FirstHeartbeatMS = &v
	}
	if !p.lastHB.IsZero() {
		v := ms(now.Sub(p.lastHB))
		s.LastHeartbeatAgoMS = &v
	}
	s.Heartbeats = p.heartbeats
	s.HeartbeatsPerSec = p.rate.perSecond(now)
	s.MaxHeartbeatGapMS = ms(p.maxGap)
	s.MigrationGapMS = ms(p.gapAtResume)
	s.LastVerify = p.lastVerify
	if pcs, ok := m.PostcopyStats(); ok {
		s.Postcopy = &pcs
	}
	s.Console = append([]string(nil), p.console...)
	m.mu.Lock()
	s.DirtyLogging = m.logDirty
	s.DirtyTracking = m.DirtyTracking()
	if m.ring != nil {
		s.DirtyRingHarvested, s.DirtyRingFullExits = m.ring.harvested.Load(), m.ring.fullExits.Load()
	}
	m.mu.Unlock()
	s.FreePagesReported = m.free.reported.Load()
	if b := m.balloon.target.Load(); b != nil {
		s.BalloonTarget = b.String()
	}
	s.BalloonInflated, s.BalloonReleased = m.balloon.inflated.Load(), m.balloon.released.Load()
	g := m.guestBalloon()
	s.BalloonBytes, s.BalloonDeflated, s.BalloonOnDemand = g.pages*guest.PageSize, g.deflated, g.onDemand
	return s
}

// ResetHeartbeatGap forgets the largest heartbeat gap seen so far, so that a measurement
// (a migration, say) starts clean.
func (m *Machine) ResetHeartbeatGap() {
	m.pv.mu.Lock()
	m.pv.maxGap = 0
	m.pv.mu.Unlock()
}

// LastHeartbeat is the host time of the guest's last heartbeat (zero if none yet).
func (m *Machine) LastHeartbeat() time.Time {
	m.pv.mu.Lock()
	defer m.pv.mu.Unlock()
	return m.pv.lastHB
}

// WaitFirstHeartbeat waits for the guest's first heartbeat on this machine (after boot, or after
// the migration that brought it here) and returns its host time.
func (m *Machine) WaitFirstHeartbeat(ctx context.Context) (time.Time, error) {
	tick := time.NewTicker(200 * time.Microsecond)
	defer tick.Stop()
	for {
		m.pv.mu.Lock()
		first := m.pv.firstHB
		m.pv.mu.Unlock()
		if !first.IsZero() {
			return first, nil
		}
		select {
		case <-ctx.Done():
			return time.Time{}, fmt.Errorf("vmm: no heartbeat yet: %w", ctx.Err())
		case <-m.done:
			return time.Time{}, m.pv.failedErr("wait for heartbeat")
		case <-tick.C:
		}
	}
}
