package guest

import (
	"encoding/binary"
	"fmt"
	"math"
)

// Default settings of the built-in guest (see DefaultConfig).
const (
	DefaultBatchPages      = 64
	DefaultIdleIntervalUS  = 1000
	DefaultHotPermille     = 100
	DefaultHotProbPermille = 900
	DefaultImagePoolPages  = 256
	DefaultTouchPermille   = 1000
	DefaultSeed            = 1
)

// Limits the guest enforces too (it panics through PortPanic on values beyond them).
const (
	maxBatchPages = 1 << 24
	maxDataPages  = 1 << 24 // a slice never has more: MaxMemory is 2^24 pages
	maxPoolPages  = math.MaxUint32
	maxRate       = 1 << 32 // pages per second per vCPU
	maxTSCKHz     = 1 << 24 // 16.7 GHz; keeps the guest's pacing arithmetic within 64 bits
)

// Config is a guest workload as a user picks it. NewParams turns it into the params of a VM of
// a given size. Start from DefaultConfig: the zero Config is not valid (its batch is 0).
type Config struct {
	Workload uint64 // WorkloadIdle, WorkloadDirty or WorkloadChurn
	Content  uint64 // ContentZero, ContentText, ContentRandom or ContentImage
	Pattern  uint64 // dirty: PatternSequential, PatternRandom or PatternHotCold
	Seed     uint64 // page contents are a function of (Seed, kind, page frame, version)

	// Rate is the dirty workload's page writes (churn: allocations, each with a free) per
	// second per vCPU; 0 writes as fast as the vCPU can. Pacing uses the TSC, so a non-zero rate needs Params.TSCKHz.
	Rate uint64
	// BatchPages is how many pages one unit of dirty work writes; each unit ends in a
	// heartbeat, which is also when the guest takes commands.
	BatchPages uint64
	// WSSPages is the dirty working set per vCPU, in pages from the start of its slice's data;
	// 0 means all data pages of the slice.
	WSSPages uint64

	// TouchPermille is the per mille of each slice's data pages that the idle workload writes
	// once (the lowest ones), before it only sleeps and heartbeats. The default, 1000, models
	// an idle VM whose memory is all in use; lower values leave never-touched pages. Under
	// churn it is the share of pages allocated: the others were written once and freed.
	TouchPermille uint64
	// PeakPermille, under churn and above TouchPermille, makes the allocated share swing
	// between the two (growing a batch of pages per unit of work, then shrinking): memory the
	// guest needs again, which it takes out of its balloon. 0 (or not above touch): no swing.
	PeakPermille uint64
	// IdleIntervalUS is how long the idle workload sleeps per unit of work.
	IdleIntervalUS uint64

	// HotPermille is the hot part of the working set (its lowest pages), and HotProbPermille
	// the share of writes that go there, for PatternHotCold.
	HotPermille     uint64
	HotProbPermille uint64

	// ImagePoolPages is the number of distinct pages ContentImage draws from.
	ImagePoolPages uint64
	// ContentImage beside the pool, as VMs cloned from one image hold pages of their own:
	// PrivatePermille of the pages are the VM's own (random, from PrivateSeed), and
	// NearPermille are near-duplicates, a pool page with a few words changed (where and to what
	// from PrivateSeed). VMs of one Seed and different PrivateSeeds share the rest.
	PrivatePermille uint64
	NearPermille    uint64
	PrivateSeed     uint64
}

// DefaultConfig is a dirty workload of text pages written at random over each whole slice as
// fast as possible, with the documented defaults for everything else.
func DefaultConfig() Config {
	return Config{
		Workload:        WorkloadDirty,
		Content:         ContentText,
		Pattern:         PatternRandom,
		Seed:            DefaultSeed,
		BatchPages:      DefaultBatchPages,
		TouchPermille:   DefaultTouchPermille,
		IdleIntervalUS:  DefaultIdleIntervalUS,
		HotPermille:     DefaultHotPermille,
		HotProbPermille: DefaultHotProbPermille,
		ImagePoolPages:  DefaultImagePoolPages,
	}
}

// Validate checks the settings that do not depend on the VM's size.
func (c Config) Validate() error {
	if _, ok := workloadNames[c.Workload]; !ok {
		return fmt.Errorf("guest: unknown workload %d", c.Workload)
	}
	if _, ok := contentNames[c.Content]; !ok {
		return fmt.Errorf("guest: unknown content kind %d", c.Content)
	}
	if _, ok := patternNames[c.Pattern]; !ok {
		return fmt.Errorf("guest: unknown write pattern %d", c.Pattern)
	}
	if c.Rate > maxRate {
		return fmt.Errorf("guest: rate of %d pages/s per vCPU is above %d", c.Rate, uint64(maxRate))
	}
	if c.BatchPages == 0 || c.BatchPages > maxBatchPages {
		return fmt.Errorf("guest: batch of %d pages: want 1..%d", c.BatchPages, maxBatchPages)
	}
	for _, f := range []struct {
		name string
		v    uint64
	}{
		{"touch per mille", c.TouchPermille},
		{"peak per mille", c.PeakPermille},
		{"hot per mille", c.HotPermille},
		{"hot probability per mille", c.HotProbPermille},
	} {
		if f.v > 1000 {
			return fmt.Errorf("guest: %s %d is above 1000", f.name, f.v)
		}
	}
	if c.PrivatePermille+c.NearPermille > 1000 {
		return fmt.Errorf("guest: private %d and near-duplicate %d per mille: more than 1000 together", c.PrivatePermille, c.NearPermille)
	}
	if c.Content == ContentImage && (c.ImagePoolPages == 0 || c.ImagePoolPages > maxPoolPages) {
		return fmt.Errorf("guest: image pool of %d pages: want 1..%d", c.ImagePoolPages, uint64(maxPoolPages))
	}
	return nil
}

// Slice is one vCPU's part of the data area: a version table (one uint32 per data page) at its
// start, then the data pages. Pages of the slice past the data, if any, are never used.
type Slice struct {
	GPA               uint64 // start of the slice
	Size              uint64 // bytes of the slice
	VersionTableGPA   uint64
	VersionTablePages uint64
	DataGPA           uint64
	DataPages         uint64
}

// Layout splits [DataGPA, memBytes) evenly between vcpus slices of whole pages (the remainder at
// the top of memory stays unused) and lays out each slice: ceil(dataPages*4/4096) version table
// pages, then as many data pages as fit.
func Layout(memBytes uint64, vcpus int) ([]Slice, error) {
	if err := checkMachine(memBytes, vcpus); err != nil {
		return nil, err
	}
	slicePages := (memBytes - DataGPA) / uint64(vcpus) / PageSize
	// The largest d with d + ceil(d/1024) <= slicePages (a table page holds 1024 versions).
	dataPages := slicePages - (slicePages+1024)/1025
	tablePages := (dataPages + 1023) / 1024
	if dataPages == 0 {
		return nil, fmt.Errorf("guest: %d bytes of memory leave no data page for each of %d vCPUs", memBytes, vcpus)
	}
	slices := make([]Slice, vcpus)
	for i := range slices {
		gpa := DataGPA + uint64(i)*slicePages*PageSize
		slices[i] = Slice{
			GPA:               gpa,
			Size:              slicePages * PageSize,
			VersionTableGPA:   gpa,
			VersionTablePages: tablePages,
			DataGPA:           gpa + tablePages*PageSize,
			DataPages:         dataPages,
		}
	}
	return slices, nil
}

func checkMachine(memBytes uint64, vcpus int) error {
	switch {
	case memBytes < MinMemory:
		return fmt.Errorf("guest: %d bytes of memory is below the minimum %d", memBytes, MinMemory)
	case memBytes > MaxMemory:
		return fmt.Errorf("guest: %d bytes of memory is above the maximum %d", memBytes, uint64(MaxMemory))
	case memBytes%PageSize != 0:
		return fmt.Errorf("guest: %d bytes of memory is not a whole number of pages", memBytes)
	case vcpus < 1 || vcpus > MaxVCPUs:
		return fmt.Errorf("guest: %d vCPUs: want 1..%d", vcpus, MaxVCPUs)
	}
	return nil
}

// VCPUParams is one vCPU's record in the params page.
type VCPUParams struct {
	VersionTableGPA uint64
	DataGPA         uint64
	DataPages       uint64
	WSSPages        uint64
	MailboxGPA      uint64
	StackTop        uint64
}

// Params is the content of the params page: the workload, the TSC frequency the guest paces
// with, and one record per vCPU.
type Params struct {
	Config
	TSCKHz uint64
	VCPUs  []VCPUParams
}

// NewParams lays out a VM of memBytes and vcpus for cfg. Config.WSSPages 0 becomes each slice's
// data page count. tscKHz may be 0 unless cfg has a rate.
func NewParams(cfg Config, memBytes uint64, vcpus int, tscKHz uint64) (*Params, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	slices, err := Layout(memBytes, vcpus)
	if err != nil {
		return nil, err
	}
	wss := cfg.WSSPages
	if wss == 0 {
		wss = slices[0].DataPages
	}
	if wss > slices[0].DataPages {
		return nil, fmt.Errorf("guest: working set of %d pages per vCPU is larger than a slice's %d data pages (%d bytes, %d vCPUs)",
			wss, slices[0].DataPages, memBytes, vcpus)
	}
	p := &Params{Config: cfg, TSCKHz: tscKHz, VCPUs: make([]VCPUParams, vcpus)}
	for i, s := range slices {
		p.VCPUs[i] = VCPUParams{
			VersionTableGPA: s.VersionTableGPA,
			DataGPA:         s.DataGPA,
			DataPages:       s.DataPages,
			WSSPages:        wss,
			MailboxGPA:      MailboxGPA + uint64(i)*PageSize,
			StackTop:        StackGPA + uint64(i+1)*StackSize,
		}
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return p, nil
}

// ParamsBuilder lays the VM out now, so that size errors show before KVM is touched, and
// returns the function the VMM calls for the params page once it knows the guest's TSC
// frequency (vmm.Config.Params).
func ParamsBuilder(cfg Config, memBytes uint64, vcpus int) (func(tscKHz uint32) ([]byte, error), error) {
	if _, err := NewParams(cfg, memBytes, vcpus, 1); err != nil {
		return nil, err
	}
	return func(tscKHz uint32) ([]byte, error) {
		p, err := NewParams(cfg, memBytes, vcpus, uint64(tscKHz))
		if err != nil {
			return nil, err
		}
		return EncodeParams(p)
	}, nil
}

// Validate checks everything the guest checks before it runs, so that a bad params page is
// refused by the VMM with an error instead of by the guest with a panic.
func (p *Params) Validate() error {
	if err := p.Config.Validate(); err != nil {
		return err
	}
	if n := len(p.VCPUs); n < 1 || n > MaxVCPUs {
		return fmt.Errorf("guest: %d vCPU records: want 1..%d", n, MaxVCPUs)
	}
	if p.Rate != 0 && p.TSCKHz == 0 {
		return fmt.Errorf("guest: a rate of %d pages/s needs the TSC frequency, and TSCKHz is 0", p.Rate)
	}
	if p.TSCKHz > maxTSCKHz {
		return fmt.Errorf("guest: TSC frequency of %d kHz is above %d", p.TSCKHz, maxTSCKHz)
	}
	for i, v := range p.VCPUs {
		switch {
		case v.DataGPA%PageSize != 0 || v.DataGPA < DataGPA:
			return fmt.Errorf("guest: vCPU %d: data at 0x%x is not a page in the data area", i, v.DataGPA)
		case v.VersionTableGPA%4 != 0 || v.VersionTableGPA < DataGPA:
			return fmt.Errorf("guest: vCPU %d: version table at 0x%x is not aligned in the data area", i, v.VersionTableGPA)
		case v.DataPages == 0 || v.DataPages > maxDataPages:
			return fmt.Errorf("guest: vCPU %d: %d data pages: want 1..%d", i, v.DataPages, maxDataPages)
		case p.Workload == WorkloadDirty && (v.WSSPages == 0 || v.WSSPages > v.DataPages):
			return fmt.Errorf("guest: vCPU %d: working set of %d pages: want 1..%d (its data pages)", i, v.WSSPages, v.DataPages)
		case v.MailboxGPA%PageSize != 0 || v.MailboxGPA < MailboxGPA || v.MailboxGPA >= MailboxGPA+MaxVCPUs*PageSize:
			return fmt.Errorf("guest: vCPU %d: mailbox at 0x%x is not a page of the mailbox area", i, v.MailboxGPA)
		}
	}
	return nil
}

// Header fields of the params page in their ABI order, so that encoding and decoding cannot
// disagree on which field goes where.
func (p *Params) headerFields() []struct {
	off uint64
	v   *uint64
} {
	return []struct {
		off uint64
		v   *uint64
	}{
		{ParTSCKHz, &p.TSCKHz},
		{ParWorkload, &p.Workload},
		{ParContent, &p.Content},
		{ParPattern, &p.Pattern},
		{ParSeed, &p.Seed},
		{ParRate, &p.Rate},
		{ParBatchPages, &p.BatchPages},
		{ParTouchPermille, &p.TouchPermille},
		{ParIdleIntervalUS, &p.IdleIntervalUS},
		{ParHotPermille, &p.HotPermille},
		{ParHotProbPermille, &p.HotProbPermille},
		{ParImagePoolPages, &p.ImagePoolPages},
		{ParPeakPermille, &p.PeakPermille},
		{ParPrivatePermille, &p.PrivatePermille},
		{ParNearPermille, &p.NearPermille},
		{ParPrivateSeed, &p.PrivateSeed},
	}
}

func (v *VCPUParams) recordFields() []struct {
	off uint64
	v   *uint64
} {
	return []struct {
		off uint64
		v   *uint64
	}{
		{VCPUVersionTableGPA, &v.VersionTableGPA},
		{VCPUDataGPA, &v.DataGPA},
		{VCPUDataPages, &v.DataPages},
		{VCPUWSSPages, &v.WSSPages},
		{VCPUMailboxGPA, &v.MailboxGPA},
		{VCPUStackTop, &v.StackTop},
	}
}

// EncodeParams validates p and returns the params page (ParamsSize bytes) the VMM writes at
// ParamsGPA. Config.WSSPages is not encoded: the records carry each vCPU's working set.
func EncodeParams(p *Params) ([]byte, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	b := make([]byte, ParamsSize)
	le := binary.LittleEndian
	le.PutUint64(b[ParMagic:], ParamsMagic)
	le.PutUint64(b[ParABIVersion:], ABIVersion)
	le.PutUint64(b[ParNrVCPUs:], uint64(len(p.VCPUs)))
	for _, f := range p.headerFields() {
		le.PutUint64(b[f.off:], *f.v)
	}
	for i := range p.VCPUs {
		rec := b[ParamsVCPUOffset+i*ParamsVCPURecord:]
		for _, f := range p.VCPUs[i].recordFields() {
			le.PutUint64(rec[f.off:], *f.v)
		}
	}
	return b, nil
}

// DecodeParams reads a params page back (for instance from a migrated VM's memory) and
// validates it. The Config.WSSPages of the result is vCPU 0's working set.
func DecodeParams(b []byte) (*Params, error) {
	if len(b) < ParamsSize {
		return nil, fmt.Errorf("guest: params page of %d bytes, want %d", len(b), ParamsSize)
	}
	le := binary.LittleEndian
	if m := le.Uint64(b[ParMagic:]); m != ParamsMagic {
		return nil, fmt.Errorf("guest: params magic 0x%x, want 0x%x", m, uint64(ParamsMagic))
	}
	if v := le.Uint64(b[ParABIVersion:]); v != ABIVersion {
		return nil, fmt.Errorf("guest: params ABI version %d, this godwit knows %d", v, ABIVersion)
	}
	n := le.Uint64(b[ParNrVCPUs:])
	if n < 1 || n > MaxVCPUs {
		return nil, fmt.Errorf("guest: params name %d vCPUs: want 1..%d", n, MaxVCPUs)
	}
	p := &Params{VCPUs: make([]VCPUParams, n)}
	for _, f := range p.headerFields() {
		*f.v = le.Uint64(b[f.off:])
	}
	for i := range p.VCPUs {
		rec := b[ParamsVCPUOffset+i*ParamsVCPURecord:]
		for _, f := range p.VCPUs[i].recordFields() {
			*f.v = le.Uint64(rec[f.off:])
		}
	}
	p.WSSPages = p.VCPUs[0].WSSPages
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return p, nil
}
