package vmm

import (
	"fmt"
	"io"

	"github.com/godwit-vm/godwit/internal/guest"
)

// Templates: a paused machine's memory and state saved once (package template keeps them), and
// machines cloned from them, whose memory maps the template's copy-on-write (guestmem's clone
// region). A clone is a machine like any other, except that its memory is no file of its own:
// it migrates by pre-copy to a host that holds the same template, sending the pages it wrote.

// CloneSource names the template a machine's memory is cloned from.
type CloneSource struct {
	ID         [32]byte // the template's content hash, which a migration names
	MemoryPath string   // the template's memory file
}

// WriteMemory writes guest RAM, in order, to w: what a template keeps. Only while paused (or
// before the machine started), so that the memory and a SaveState agree.
func (m *Machine) WriteMemory(w io.Writer) error {
	if st, _ := m.State(); st != StatePaused {
		return fmt.Errorf("vmm: write memory: machine is %s, want paused", st)
	}
	buf := make([]byte, 1<<20)
	for off := uint64(0); off < m.cfg.MemBytes; off += uint64(len(buf)) {
		b := buf[:min(uint64(len(buf)), m.cfg.MemBytes-off)]
		if _, err := m.mem.ReadAt(b, int64(off)); err != nil {
			return err
		}
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	return nil
}

// NewClone builds a machine from a template: cfg.Clone names its memory, secs is its state. The
// clone is created, not started; it continues where the template's VM was paused.
func NewClone(cfg Config, secs []Section) (*Machine, error) {
	if cfg.Clone == nil {
		return nil, fmt.Errorf("vmm: clone: no template named")
	}
	cfg.Image, cfg.Params = nil, nil
	m, err := New(cfg)
	if err != nil {
		return nil, err
	}
	if err := m.RestoreState(secs); err != nil {
		m.Close()
		return nil, fmt.Errorf("vmm: clone of template %x: %w", cfg.Clone.ID[:6], err)
	}
	// The template's last heartbeat is not this machine's: its gap would count the time the
	// template lay in the store.
	m.pv.mu.Lock()
	m.pv.lastHBWall = 0
	m.pv.mu.Unlock()
	return m, nil
}

// Diverge makes every vCPU rewrite permille/1000 of its data pages once, with versions of its
// own picked by salt (guest.CmdDiverge), at its next heartbeat: the private data clones of one
// template hold beside the template's. The guest must run the idle or dirty workload.
func (m *Machine) Diverge(permille, salt uint32) error {
	if permille > 1000 {
		return fmt.Errorf("vmm: diverge %d per mille: at most 1000", permille)
	}
	if w, _ := m.cfg.Workload["workload"].(string); w == guest.WorkloadName(guest.WorkloadChurn) {
		return fmt.Errorf("vmm: diverge: the guest runs the churn workload, whose pages are its allocator's; diverge an idle or dirty guest")
	}
	p := m.pv
	p.mu.Lock()
	p.divergeArgs = [2]uint32{permille, salt}
	p.mu.Unlock()
	p.diverging.Add(int32(len(p.diverge)))
	for i := range p.diverge {
		p.diverge[i].Store(true)
	}
	return nil
}
