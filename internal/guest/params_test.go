package guest

import (
	"bytes"
	"encoding/binary"
	"reflect"
	"strings"
	"testing"
)

func TestLayout(t *testing.T) {
	for _, tc := range []struct {
		mem   uint64
		vcpus int
	}{
		{MinMemory, 1}, {MinMemory, 64}, {MinMemory + PageSize, 3}, {1 << 30, 2}, {1<<30 + 12345*PageSize, 7},
		{MaxMemory, 1}, {MaxMemory, 64}, {(8 << 20) + 1025*4096*5, 5},
	} {
		slices, err := Layout(tc.mem, tc.vcpus)
		if err != nil {
			t.Fatalf("Layout(%d, %d): %v", tc.mem, tc.vcpus, err)
		}
		if len(slices) != tc.vcpus {
			t.Fatalf("Layout(%d, %d): %d slices", tc.mem, tc.vcpus, len(slices))
		}
		next := uint64(DataGPA)
		for i, s := range slices {
			if s.GPA != next || s.GPA%PageSize != 0 || s.Size != slices[0].Size {
				t.Errorf("Layout(%d, %d) slice %d: %+v: not the next equal slice at 0x%x", tc.mem, tc.vcpus, i, s, next)
			}
			next = s.GPA + s.Size
			if s.VersionTableGPA != s.GPA || s.VersionTablePages != (s.DataPages*4+PageSize-1)/PageSize {
				t.Errorf("Layout(%d, %d) slice %d: %+v: version table is not ceil(data*4/4096) pages at the start", tc.mem, tc.vcpus, i, s)
			}
			if s.DataGPA != s.GPA+s.VersionTablePages*PageSize {
				t.Errorf("Layout(%d, %d) slice %d: %+v: data does not follow the table", tc.mem, tc.vcpus, i, s)
			}
			used := s.VersionTablePages + s.DataPages
			if used*PageSize > s.Size {
				t.Errorf("Layout(%d, %d) slice %d: %+v: table and data overflow the slice", tc.mem, tc.vcpus, i, s)
			}
			// One more data page must not fit: the layout uses the slice fully.
			more := s.DataPages + 1
			if (more+(more*4+PageSize-1)/PageSize)*PageSize <= s.Size {
				t.Errorf("Layout(%d, %d) slice %d: %+v: room for another data page", tc.mem, tc.vcpus, i, s)
			}
		}
		if next > tc.mem || tc.mem-next >= uint64(tc.vcpus)*PageSize {
			t.Errorf("Layout(%d, %d): slices end at 0x%x: not an even split of all pages", tc.mem, tc.vcpus, next)
		}
	}
}

func TestLayoutErrors(t *testing.T) {
	for _, tc := range []struct {
		mem   uint64
		vcpus int
		want  string
	}{
		{MinMemory - PageSize, 1, "below the minimum"},
		{MaxMemory + PageSize, 1, "above the maximum"},
		{MinMemory + 100, 1, "whole number of pages"},
		{MinMemory, 0, "0 vCPUs"},
		{MinMemory, MaxVCPUs + 1, "65 vCPUs"},
	} {
		_, err := Layout(tc.mem, tc.vcpus)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Layout(%d, %d) = %v, want an error with %q", tc.mem, tc.vcpus, err, tc.want)
		}
	}
}

func TestEncodeParams(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Seed = 0x1234
	cfg.Rate = 5000
	cfg.WSSPages = 100
	p, err := NewParams(cfg, 64<<20, 3, 2_500_000)
	if err != nil {
		t.Fatal(err)
	}
	b, err := EncodeParams(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != ParamsSize {
		t.Fatalf("params page of %d bytes, want %d", len(b), ParamsSize)
	}
	u := func(off int) uint64 { return binary.LittleEndian.Uint64(b[off:]) }
	for _, f := range []struct {
		name string
		off  int
		want uint64
	}{
		{"magic", ParMagic, ParamsMagic}, {"abi", ParABIVersion, ABIVersion}, {"vcpus", ParNrVCPUs, 3},
		{"tsc", ParTSCKHz, 2_500_000}, {"workload", ParWorkload, WorkloadDirty}, {"content", ParContent, ContentText},
		{"pattern", ParPattern, PatternRandom}, {"seed", ParSeed, 0x1234}, {"rate", ParRate, 5000},
		{"batch", ParBatchPages, DefaultBatchPages}, {"touch", ParTouchPermille, DefaultTouchPermille},
		{"idle", ParIdleIntervalUS, DefaultIdleIntervalUS}, {"hot", ParHotPermille, DefaultHotPermille},
		{"hotprob", ParHotProbPermille, DefaultHotProbPermille}, {"pool", ParImagePoolPages, DefaultImagePoolPages},
	} {
		if got := u(f.off); got != f.want {
			t.Errorf("%s at 0x%x = 0x%x, want 0x%x", f.name, f.off, got, f.want)
		}
	}
	slices, _ := Layout(64<<20, 3)
	for i, s := range slices {
		rec := ParamsVCPUOffset + i*ParamsVCPURecord
		want := []uint64{s.VersionTableGPA, s.DataGPA, s.DataPages, 100, MailboxGPA + uint64(i)*PageSize, StackGPA + uint64(i+1)*StackSize}
		for j, off := range []int{VCPUVersionTableGPA, VCPUDataGPA, VCPUDataPages, VCPUWSSPages, VCPUMailboxGPA, VCPUStackTop} {
			if got := u(rec + off); got != want[j] {
				t.Errorf("vCPU %d record field at 0x%x = 0x%x, want 0x%x", i, off, got, want[j])
			}
		}
	}
	// Nothing past the last record.
	if !bytes.Equal(b[ParamsVCPUOffset+3*ParamsVCPURecord:], make([]byte, ParamsSize-ParamsVCPUOffset-3*ParamsVCPURecord)) {
		t.Errorf("bytes after the last vCPU record are not zero")
	}

	back, err := DecodeParams(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, p) {
		t.Errorf("DecodeParams(EncodeParams(p)) = %+v, want %+v", back, p)
	}
}

func TestNewParamsDefaultsWSSToSlice(t *testing.T) {
	p, err := NewParams(DefaultConfig(), 32<<20, 2, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i, v := range p.VCPUs {
		if v.WSSPages != v.DataPages {
			t.Errorf("vCPU %d: WSS %d, want all %d data pages", i, v.WSSPages, v.DataPages)
		}
	}
}

func TestParamsErrors(t *testing.T) {
	mod := func(f func(*Config)) Config {
		c := DefaultConfig()
		f(&c)
		return c
	}
	for _, tc := range []struct {
		cfg   Config
		mem   uint64
		vcpus int
		tsc   uint64
		want  string
	}{
		{mod(func(c *Config) { c.Workload = 3 }), 32 << 20, 1, 0, "unknown workload 3"},
		{mod(func(c *Config) { c.Content = 5 }), 32 << 20, 1, 0, "unknown content kind 5"},
		{mod(func(c *Config) { c.Pattern = 3 }), 32 << 20, 1, 0, "unknown write pattern 3"},
		{Config{}, 32 << 20, 1, 0, "batch of 0 pages"},
		{mod(func(c *Config) { c.BatchPages = 1<<24 + 1 }), 32 << 20, 1, 0, "batch of 16777217 pages"},
		{mod(func(c *Config) { c.TouchPermille = 1001 }), 32 << 20, 1, 0, "touch per mille 1001"},
		{mod(func(c *Config) { c.HotPermille = 1001 }), 32 << 20, 1, 0, "hot per mille 1001"},
		{mod(func(c *Config) { c.HotProbPermille = 2000 }), 32 << 20, 1, 0, "hot probability per mille 2000"},
		{mod(func(c *Config) { c.Content, c.ImagePoolPages = ContentImage, 0 }), 32 << 20, 1, 0, "image pool of 0 pages"},
		{mod(func(c *Config) { c.Rate = 100 }), 32 << 20, 1, 0, "needs the TSC frequency"},
		{mod(func(c *Config) { c.Rate = 1<<32 + 1 }), 32 << 20, 1, 2_000_000, "rate of 4294967297 pages/s"},
		{mod(func(c *Config) { c.Rate = 100 }), 32 << 20, 1, 1 << 30, "TSC frequency of 1073741824 kHz"},
		{mod(func(c *Config) { c.WSSPages = 1 << 20 }), 32 << 20, 2, 0, "working set of 1048576 pages per vCPU is larger"},
		{DefaultConfig(), 1 << 20, 1, 0, "below the minimum"},
		{DefaultConfig(), 32 << 20, 100, 0, "100 vCPUs"},
	} {
		_, err := NewParams(tc.cfg, tc.mem, tc.vcpus, tc.tsc)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewParams(%+v, %d, %d, %d) = %v, want an error with %q", tc.cfg, tc.mem, tc.vcpus, tc.tsc, err, tc.want)
		}
	}

	// A hand-made Params is checked by EncodeParams too.
	p, err := NewParams(DefaultConfig(), 32<<20, 2, 0)
	if err != nil {
		t.Fatal(err)
	}
	p.VCPUs[1].MailboxGPA = EntryGPA
	if _, err := EncodeParams(p); err == nil || !strings.Contains(err.Error(), "vCPU 1: mailbox at 0x100000") {
		t.Errorf("EncodeParams with a mailbox outside the mailbox area: %v", err)
	}
	p.VCPUs[1].MailboxGPA = MailboxGPA + PageSize
	p.VCPUs[0].WSSPages = p.VCPUs[0].DataPages + 1
	if _, err := EncodeParams(p); err == nil || !strings.Contains(err.Error(), "vCPU 0: working set") {
		t.Errorf("EncodeParams with a working set beyond the data: %v", err)
	}
}

func TestDecodeParamsErrors(t *testing.T) {
	p, err := NewParams(DefaultConfig(), 32<<20, 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	good, err := EncodeParams(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		edit func([]byte) []byte
		want string
	}{
		{"short", func(b []byte) []byte { return b[:100] }, "100 bytes"},
		{"magic", func(b []byte) []byte { b[0] ^= 1; return b }, "params magic"},
		{"version", func(b []byte) []byte { b[ParABIVersion] = 2; return b }, "ABI version 2"},
		{"vcpus", func(b []byte) []byte { b[ParNrVCPUs] = 0; return b }, "0 vCPUs"},
		{"content", func(b []byte) []byte { b[ParContent] = 9; return b }, "content kind 9"},
	} {
		b := tc.edit(bytes.Clone(good))
		if _, err := DecodeParams(b); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: DecodeParams = %v, want an error with %q", tc.name, err, tc.want)
		}
	}
}

func TestNames(t *testing.T) {
	for _, tc := range []struct {
		name  func(uint64) string
		parse func(string) (uint64, error)
		max   uint64
	}{
		{WorkloadName, ParseWorkload, WorkloadDirty},
		{ContentName, ParseContent, ContentImage},
		{PatternName, ParsePattern, PatternHotCold},
	} {
		for v := uint64(0); v <= tc.max; v++ {
			back, err := tc.parse(tc.name(v))
			if err != nil || back != v {
				t.Errorf("parse(name(%d)) = %d, %v", v, back, err)
			}
		}
		if _, err := tc.parse("bogus"); err == nil || !strings.Contains(err.Error(), "known:") {
			t.Errorf("parse(bogus) = %v, want an error listing the known names", err)
		}
	}
	if got := ContentName(7); got != "unknown(7)" {
		t.Errorf("ContentName(7) = %q", got)
	}
}

func TestDecodeMailbox(t *testing.T) {
	page := make([]byte, PageSize)
	for i, off := range []int{MbWorkUnits, MbPagesWritten, MbVerifySeq, MbPagesChecked, MbMismatches,
		MbFirstBadPage, MbFirstBadOffset, MbExpected, MbFound, MbPagesVersioned, MbPagesFree} {
		binary.LittleEndian.PutUint64(page[off:], uint64(i+1))
	}
	copy(page[MbConsole:], "hello, console")
	m, err := DecodeMailbox(page)
	if err != nil {
		t.Fatal(err)
	}
	want := Mailbox{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}
	if m != want {
		t.Errorf("DecodeMailbox = %+v, want %+v", m, want)
	}
	if got := ConsoleText(page, 5); got != "hello" {
		t.Errorf("ConsoleText(5) = %q", got)
	}
	if got := ConsoleText(page, 1<<20); len(got) != MbConsoleMax {
		t.Errorf("ConsoleText(huge) has %d bytes, want it clamped to %d", len(got), MbConsoleMax)
	}
	if _, err := DecodeMailbox(page[:16]); err == nil {
		t.Errorf("DecodeMailbox of 16 bytes: no error")
	}
}
