package vmm

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/godwit-vm/godwit/internal/kvm"
)

// Section is one component's saved state. Each component versions its own encoding, so one
// component's format can change without touching the others.
type Section struct {
	ID      string
	Version uint32
	Data    []byte
}

// Component ids and the versions this VMM writes and reads.
const (
	sectionMachine     = "machine"
	sectionPV          = "dev.pv"
	sectionClock       = "vm.clock"
	sectionVCPUPrefix  = "vcpu."
	versionMachine     = 1
	versionPV          = 1
	versionClock       = 1
	versionVCPU        = 1
	maxSavedMSRs       = 64
	vcpuFlagXSave      = 1 << 0
	vcpuFlagXCRs       = 1 << 1
	vcpuFlagEvents     = 1 << 2
	vcpuFlagsSupported = vcpuFlagXSave | vcpuFlagXCRs | vcpuFlagEvents
)

// savedMSRs are the MSRs a 64-bit guest can depend on. The TSC is among them, so the guest's
// clock continues from where it stopped instead of jumping.
var savedMSRs = []uint32{
	kvm.MSRSysenterCS, kvm.MSRSysenterESP, kvm.MSRSysenterEIP, kvm.MSRPAT, kvm.MSRMiscEnable,
	kvm.MSRStar, kvm.MSRLStar, kvm.MSRCStar, kvm.MSRSyscallMask, kvm.MSRKernelGSBase,
	kvm.MSRTSCAux, kvm.MSRTSCAdjust, kvm.MSRTSC,
}

// vcpuFixed is the fixed-size part of a vCPU section (version 1), little endian.
type vcpuFixed struct {
	Flags   uint32
	TSCKHz  uint32
	Regs    kvm.Regs
	Sregs   kvm.Sregs
	FPU     kvm.FPU
	XSave   kvm.XSave
	XCRs    kvm.XCRs
	Events  kvm.VCPUEvents
	MPState kvm.MPState
	NMSRs   uint32
}

type machineState struct {
	Name     string         `json:"name"`
	MemBytes uint64         `json:"mem_bytes"`
	VCPUs    int            `json:"vcpus"`
	Workload map[string]any `json:"workload,omitempty"`
}

type pvState struct {
	TSCKHz     uint32   `json:"tsc_khz"`
	Heartbeats uint64   `json:"heartbeats"`
	PerVCPU    []uint64 `json:"per_vcpu"`
	Exited     []bool   `json:"exited"`
	LastHBWall int64    `json:"last_heartbeat_unix_ns"`
	Console    []string `json:"console,omitempty"`
	// The balloon's target as last set, and per vCPU the commands it has not taken yet: a
	// target set moments before the pause, or a list asked for, still reaches the guest.
	BalloonTarget  *Balloon `json:"balloon_target,omitempty"`
	BalloonPending []bool   `json:"balloon_pending,omitempty"`
	BalloonWords   []uint32 `json:"balloon_words,omitempty"`
	BalloonList    []bool   `json:"balloon_list,omitempty"`
}

func (m *Machine) msrList() ([]uint32, error) {
	supported, err := m.sys.MSRIndexList()
	if err != nil {
		return nil, err
	}
	have := map[uint32]bool{}
	for _, i := range supported {
		have[i] = true
	}
	var out []uint32
	for _, i := range savedMSRs {
		if have[i] {
			out = append(out, i)
		}
	}
	return out, nil
}

// SaveState captures the whole machine: vCPUs, VM clock, devices. Only while paused.
func (m *Machine) SaveState() ([]Section, error) {
	if st, _ := m.State(); st != StatePaused {
		return nil, fmt.Errorf("vmm: save state: machine is %s, want paused", st)
	}
	var out []Section
	ms, _ := json.Marshal(machineState{Name: m.cfg.Name, MemBytes: m.cfg.MemBytes, VCPUs: len(m.vcpus), Workload: m.cfg.Workload})
	out = append(out, Section{ID: sectionMachine, Version: versionMachine, Data: ms})
	msrs, err := m.msrList()
	if err != nil {
		return nil, err
	}
	for _, v := range m.vcpus {
		data, err := m.saveVCPU(v.kvm, msrs)
		if err != nil {
			return nil, err
		}
		out = append(out, Section{ID: sectionVCPUPrefix + strconv.Itoa(v.id), Version: versionVCPU, Data: data})
	}
	if m.caps.adjustClock {
		c, err := m.vm.Clock()
		if err != nil {
			return nil, err
		}
		var b bytes.Buffer
		binary.Write(&b, binary.LittleEndian, c)
		out = append(out, Section{ID: sectionClock, Version: versionClock, Data: b.Bytes()})
	}
	p := m.pv
	p.mu.Lock()
	ps := pvState{TSCKHz: p.tscKHz, Heartbeats: p.heartbeats, PerVCPU: p.perVCPU, Exited: p.exited, LastHBWall: p.lastHBWall, Console: p.console}
	if b := m.balloon.target.Load(); b != nil {
		ps.BalloonTarget = b
		for i := range p.balloonCmd {
			ps.BalloonPending = append(ps.BalloonPending, p.balloonCmd[i].Load())
			ps.BalloonWords = append(ps.BalloonWords, p.balloonTarget[i].Load())
		}
	}
	list := make([]bool, len(p.balloonList))
	for i := range p.balloonList {
		list[i] = p.balloonList[i].Load()
	}
	if slices.Contains(list, true) {
		ps.BalloonList = list
	}
	pd, err := json.Marshal(ps)
	p.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("vmm: save device pv: %w", err)
	}
	out = append(out, Section{ID: sectionPV, Version: versionPV, Data: pd})
	return out, nil
}

func (m *Machine) saveVCPU(c *kvm.VCPU, msrs []uint32) ([]byte, error) {
	var f vcpuFixed
	var err error
	if f.Regs, err = c.Regs(); err != nil {
		return nil, err
	}
	if f.Sregs, err = c.Sregs(); err != nil {
		return nil, err
	}
	if m.caps.xsave {
		x, err := c.XSave()
		if err != nil {
			return nil, err
		}
		f.XSave = *x
		f.Flags |= vcpuFlagXSave
	} else if f.FPU, err = c.FPU(); err != nil {
		return nil, err
	}
	if m.caps.xcrs {
		if f.XCRs, err = c.XCRs(); err != nil {
			return nil, err
		}
		f.Flags |= vcpuFlagXCRs
	}
	if m.caps.vcpuEvents {
		if f.Events, err = c.Events(); err != nil {
			return nil, err
		}
		f.Flags |= vcpuFlagEvents
	}
	if f.MPState, err = c.MPState(); err != nil {
		return nil, err
	}
	if khz, err := c.TSCKHz(); err == nil {
		f.TSCKHz = khz
	}
	entries, err := c.MSRs(msrs)
	if err != nil {
		return nil, err
	}
	f.NMSRs = uint32(len(entries))
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, &f)
	for _, e := range entries {
		binary.Write(&b, binary.LittleEndian, e)
	}
	return b.Bytes(), nil
}

// RestoreState loads sections saved by SaveState into a machine built without an image and
// not yet started. Sections of unknown components or versions are refused, not skipped: a
// machine missing part of its state must not run.
func (m *Machine) RestoreState(sections []Section) error {
	if st, _ := m.State(); st != StateCreated {
		return fmt.Errorf("vmm: restore state: machine is %s, want created", st)
	}
	seen := map[string]bool{}
	for _, s := range sections {
		if seen[s.ID] {
			return fmt.Errorf("vmm: restore state: section %q twice", s.ID)
		}
		seen[s.ID] = true
		if err := m.restoreSection(s); err != nil {
			return err
		}
	}
	for _, v := range m.vcpus {
		if id := sectionVCPUPrefix + strconv.Itoa(v.id); !seen[id] {
			return fmt.Errorf("vmm: restore state: no section %q", id)
		}
	}
	if !seen[sectionPV] || !seen[sectionMachine] {
		return fmt.Errorf("vmm: restore state: sections %q and %q are required", sectionMachine, sectionPV)
	}
	return nil
}

func (m *Machine) restoreSection(s Section) error {
	switch {
	case s.ID == sectionMachine:
		if s.Version != versionMachine {
			return versionErr(s, versionMachine)
		}
		var ms machineState
		if err := json.Unmarshal(s.Data, &ms); err != nil {
			return fmt.Errorf("vmm: restore %q: %w", s.ID, err)
		}
		if ms.MemBytes != m.cfg.MemBytes || ms.VCPUs != len(m.vcpus) {
			return fmt.Errorf("vmm: restore %q: source has %d bytes and %d vCPUs, this machine %d and %d", s.ID, ms.MemBytes, ms.VCPUs, m.cfg.MemBytes, len(m.vcpus))
		}
		if m.cfg.Name == "" {
			m.cfg.Name = ms.Name
		}
		m.cfg.Workload = ms.Workload
	case s.ID == sectionPV:
		if s.Version != versionPV {
			return versionErr(s, versionPV)
		}
		var ps pvState
		if err := json.Unmarshal(s.Data, &ps); err != nil {
			return fmt.Errorf("vmm: restore %q: %w", s.ID, err)
		}
		if len(ps.PerVCPU) != len(m.vcpus) || len(ps.Exited) != len(m.vcpus) {
			return fmt.Errorf("vmm: restore %q: state for %d vCPUs, machine has %d", s.ID, len(ps.PerVCPU), len(m.vcpus))
		}
		for _, l := range []int{len(ps.BalloonPending), len(ps.BalloonWords), len(ps.BalloonList)} {
			if l != 0 && l != len(m.vcpus) {
				return fmt.Errorf("vmm: restore %q: balloon state for %d vCPUs, machine has %d", s.ID, l, len(m.vcpus))
			}
		}
		if (ps.BalloonTarget == nil) != (len(ps.BalloonPending) == 0) || len(ps.BalloonPending) != len(ps.BalloonWords) {
			return fmt.Errorf("vmm: restore %q: balloon target %v with %d pending commands and %d targets", s.ID, ps.BalloonTarget, len(ps.BalloonPending), len(ps.BalloonWords))
		}
		if ps.BalloonTarget != nil {
			m.balloon.target.Store(ps.BalloonTarget)
		}
		for i := range ps.BalloonPending {
			m.pv.balloonTarget[i].Store(ps.BalloonWords[i])
			m.pv.balloonCmd[i].Store(ps.BalloonPending[i])
		}
		for i, l := range ps.BalloonList {
			m.pv.balloonList[i].Store(l)
		}
		p := m.pv
		p.mu.Lock()
		p.tscKHz, p.heartbeats, p.perVCPU, p.exited = ps.TSCKHz, ps.Heartbeats, ps.PerVCPU, ps.Exited
		p.lastHBWall, p.console = ps.LastHBWall, ps.Console
		p.mu.Unlock()
	case s.ID == sectionClock:
		if s.Version != versionClock {
			return versionErr(s, versionClock)
		}
		var c kvm.ClockData
		if err := binary.Read(bytes.NewReader(s.Data), binary.LittleEndian, &c); err != nil {
			return fmt.Errorf("vmm: restore %q: %w", s.ID, err)
		}
		return m.vm.SetClock(c)
	case strings.HasPrefix(s.ID, sectionVCPUPrefix):
		if s.Version != versionVCPU {
			return versionErr(s, versionVCPU)
		}
		id, err := strconv.Atoi(strings.TrimPrefix(s.ID, sectionVCPUPrefix))
		if err != nil || id < 0 || id >= len(m.vcpus) {
			return fmt.Errorf("vmm: restore: section %q names no vCPU of this machine (%d vCPUs)", s.ID, len(m.vcpus))
		}
		return m.restoreVCPU(m.vcpus[id].kvm, s.Data)
	default:
		return fmt.Errorf("vmm: restore: unknown section %q version %d", s.ID, s.Version)
	}
	return nil
}

func versionErr(s Section, want uint32) error {
	return fmt.Errorf("vmm: restore: section %q has version %d, this VMM reads version %d", s.ID, s.Version, want)
}

func (m *Machine) restoreVCPU(c *kvm.VCPU, data []byte) error {
	r := bytes.NewReader(data)
	var f vcpuFixed
	if err := binary.Read(r, binary.LittleEndian, &f); err != nil {
		return fmt.Errorf("vmm: restore vCPU %d: %d bytes: %w", c.ID(), len(data), err)
	}
	if f.Flags&^vcpuFlagsSupported != 0 {
		return fmt.Errorf("vmm: restore vCPU %d: unknown flags 0x%x", c.ID(), f.Flags)
	}
	if f.NMSRs > maxSavedMSRs || r.Len() != int(f.NMSRs)*16 {
		return fmt.Errorf("vmm: restore vCPU %d: %d MSRs in %d bytes", c.ID(), f.NMSRs, r.Len())
	}
	msrs := make([]kvm.MSREntry, f.NMSRs)
	if err := binary.Read(r, binary.LittleEndian, msrs); err != nil {
		return fmt.Errorf("vmm: restore vCPU %d MSRs: %w", c.ID(), err)
	}
	if f.TSCKHz != 0 {
		if cur, err := c.TSCKHz(); err == nil && cur != f.TSCKHz {
			if err := c.SetTSCKHz(f.TSCKHz); err != nil {
				return fmt.Errorf("vmm: restore vCPU %d: the source's TSC runs at %d kHz, this host's at %d kHz and cannot be scaled: %w", c.ID(), f.TSCKHz, cur, err)
			}
		}
	}
	if err := c.SetSregs(f.Sregs); err != nil {
		return err
	}
	if err := c.SetRegs(f.Regs); err != nil {
		return err
	}
	if f.Flags&vcpuFlagXCRs != 0 {
		if err := c.SetXCRs(f.XCRs); err != nil {
			return err
		}
	}
	if f.Flags&vcpuFlagXSave != 0 {
		if err := c.SetXSave(&f.XSave); err != nil {
			return err
		}
	} else if err := c.SetFPU(f.FPU); err != nil {
		return err
	}
	if err := c.SetMSRs(msrs); err != nil {
		return err
	}
	if f.Flags&vcpuFlagEvents != 0 {
		if err := c.SetEvents(f.Events); err != nil {
			return err
		}
	}
	return c.SetMPState(f.MPState)
}

// Uptime since the machine was created in this process.
func (m *Machine) Uptime() time.Duration { return time.Since(m.created) }
