package guest

import (
	"bytes"
	"compress/flate"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// The native harness is built once per test binary (gcc takes a second or two).
var (
	harnessOnce sync.Once
	harnessDir  string
	harness     *NativeHarness
	harnessErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if harnessDir != "" {
		os.RemoveAll(harnessDir)
	}
	os.Exit(code)
}

// nativeHarness fails the test (never skips it) when the harness cannot be built: gcc is a
// requirement of this package's tests.
func nativeHarness(tb testing.TB) *NativeHarness {
	harnessOnce.Do(func() {
		harnessDir, harnessErr = os.MkdirTemp("", "godwit-guest-test-*")
		if harnessErr == nil {
			harness, harnessErr = BuildNativeHarness(context.Background(), harnessDir)
		}
	})
	if harnessErr != nil {
		tb.Fatalf("build the native harness: %v", harnessErr)
	}
	return harness
}

// run is one native run with a memory dump to inspect afterwards.
type run struct {
	t      *testing.T
	params *Params
	mem    uint64
	res    *NativeResult
	dump   []byte
}

func runNative(t *testing.T, cfg Config, mem uint64, vcpus int, nr NativeRun) *run {
	t.Helper()
	var tsc uint64
	if cfg.Rate != 0 {
		var err error
		if tsc, err = nativeHarness(t).TSCKHz(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	p, err := NewParams(cfg, mem, vcpus, tsc)
	if err != nil {
		t.Fatal(err)
	}
	nr.Params, nr.MemBytes = p, mem
	nr.DumpPath = filepath.Join(t.TempDir(), "mem.dump")
	res, err := nativeHarness(t).Run(context.Background(), nr)
	if err != nil {
		t.Fatal(err)
	}
	dump, err := os.ReadFile(nr.DumpPath)
	if err != nil {
		t.Fatal(err)
	}
	if uint64(len(dump)) != mem {
		t.Fatalf("dump of %d bytes, want %d", len(dump), mem)
	}
	return &run{t: t, params: p, mem: mem, res: res, dump: dump}
}

func (r *run) version(vcpu int, idx uint64) uint32 {
	return binary.LittleEndian.Uint32(r.dump[r.params.VCPUs[vcpu].VersionTableGPA+4*idx:])
}

func (r *run) page(vcpu int, idx uint64) []byte {
	gpa := r.params.VCPUs[vcpu].DataGPA + idx*PageSize
	return r.dump[gpa : gpa+PageSize]
}

func (r *run) mailbox(vcpu int) Mailbox {
	m, err := DecodeMailbox(r.dump[r.params.VCPUs[vcpu].MailboxGPA:][:PageSize])
	if err != nil {
		r.t.Fatal(err)
	}
	return m
}

// verifies returns the reports of one vCPU in order.
func (r *run) verifies(vcpu int) []Mailbox {
	var out []Mailbox
	for _, v := range r.res.Verifies {
		if v.VCPU == vcpu {
			out = append(out, v.Report)
		}
	}
	return out
}

// requireClean checks that every verify of every vCPU found no mismatch over its whole slice.
func (r *run) requireClean() {
	r.t.Helper()
	for i, v := range r.params.VCPUs {
		reps := r.verifies(i)
		if len(reps) == 0 {
			r.t.Errorf("vCPU %d made no verify report", i)
		}
		for _, rep := range reps {
			if rep.Mismatches != 0 || rep.FirstBadPage != NoBadPage || rep.PagesChecked != v.DataPages {
				r.t.Errorf("vCPU %d verify %d: %+v, want 0 mismatches over %d pages", i, rep.VerifySeq, rep, v.DataPages)
			}
		}
	}
}

var allContents = []uint64{ContentZero, ContentText, ContentRandom, ContentImage, ContentPatch}
var allPatterns = []uint64{PatternSequential, PatternRandom, PatternHotCold}

// TestVerifyClean runs every content kind with every pattern (and the idle workload) and
// requires both verifies, one in the middle and one at exit, to find no mismatch. It also
// checks the mailbox counters against what the harness saw, and that no write left the working
// set.
func TestVerifyClean(t *testing.T) {
	const mem, vcpus, units, batch = 32 << 20, 2, 60, 32
	for _, content := range allContents {
		for _, pattern := range allPatterns {
			t.Run(ContentName(content)+"/"+PatternName(pattern), func(t *testing.T) {
				t.Parallel()
				cfg := DefaultConfig()
				cfg.Content, cfg.Pattern, cfg.BatchPages, cfg.WSSPages = content, pattern, batch, 1000
				cfg.Seed = 7
				r := runNative(t, cfg, mem, vcpus, NativeRun{Units: units, VerifyAt: units / 2})
				r.requireClean()
				for i, v := range r.params.VCPUs {
					m := r.mailbox(i)
					if m.WorkUnits != units || m.PagesWritten != units*batch || m.VerifySeq != 2 {
						t.Errorf("vCPU %d mailbox %+v: want %d units, %d pages, 2 verifies", i, m, units, units*batch)
					}
					var writes, versioned uint64
					for idx := uint64(0); idx < v.DataPages; idx++ {
						ver := uint64(r.version(i, idx))
						if idx >= v.WSSPages && ver != 0 {
							t.Fatalf("vCPU %d page %d beyond the working set of %d has version %d", i, idx, v.WSSPages, ver)
						}
						writes += ver
						if ver != 0 {
							versioned++
						}
					}
					if writes != units*batch || m.PagesVersioned != versioned {
						t.Errorf("vCPU %d: versions add up to %d writes and %d versioned pages, want %d and mailbox %d",
							i, writes, versioned, units*batch, m.PagesVersioned)
					}
				}
			})
		}
		t.Run(ContentName(content)+"/idle", func(t *testing.T) {
			t.Parallel()
			cfg := DefaultConfig()
			cfg.Workload, cfg.Content, cfg.TouchPermille = WorkloadIdle, content, 300
			r := runNative(t, cfg, mem, vcpus, NativeRun{Units: 20, VerifyAt: 10})
			r.requireClean()
			for i, v := range r.params.VCPUs {
				touched := v.DataPages * 300 / 1000
				m := r.mailbox(i)
				if m.PagesWritten != touched || m.PagesVersioned != touched || m.WorkUnits != 20 {
					t.Errorf("vCPU %d mailbox %+v: want %d pages written and versioned, 20 units", i, m, touched)
				}
				for idx := uint64(0); idx < v.DataPages; idx++ {
					want := uint32(0)
					if idx < touched {
						want = 1
					}
					if got := r.version(i, idx); got != want {
						t.Fatalf("vCPU %d page %d: version %d, want %d (the first %d pages touched once)", i, idx, got, want, touched)
					}
				}
			}
			for _, e := range r.res.Exits {
				if e.SleptUS != 20*DefaultIdleIntervalUS {
					t.Errorf("vCPU %d slept %d us, want %d (20 units of %d)", e.VCPU, e.SleptUS, 20*DefaultIdleIntervalUS, DefaultIdleIntervalUS)
				}
			}
		})
	}
}

// TestSequentialVersions checks the sequential pattern exactly: writes wrap around the working
// set, so page i of a working set of w pages written n times in all has version
// floor((n-1-i)/w)+1 when i < n.
func TestSequentialVersions(t *testing.T) {
	const units, batch, wss = 25, 64, 500
	cfg := DefaultConfig()
	cfg.Pattern, cfg.BatchPages, cfg.WSSPages = PatternSequential, batch, wss
	r := runNative(t, cfg, 16<<20, 1, NativeRun{Units: units})
	r.requireClean()
	n := uint64(units * batch)
	for i := uint64(0); i < wss; i++ {
		want := uint32(0)
		if i < n {
			want = uint32((n-1-i)/wss + 1)
		}
		if got := r.version(0, i); got != want {
			t.Fatalf("page %d: version %d, want %d", i, got, want)
		}
	}
}

// TestHotColdShare checks that the hot part (the first HotPermille of the working set) gets
// HotProbPermille of the writes, and that the random pattern spreads writes evenly.
func TestHotColdShare(t *testing.T) {
	const units, batch, wss = 200, 100, 2000
	for _, pattern := range []uint64{PatternHotCold, PatternRandom} {
		cfg := DefaultConfig()
		cfg.Pattern, cfg.BatchPages, cfg.WSSPages = pattern, batch, wss
		cfg.HotPermille, cfg.HotProbPermille = 200, 800
		r := runNative(t, cfg, 16<<20, 1, NativeRun{Units: units})
		var hot, all uint64
		for i := uint64(0); i < wss; i++ {
			v := uint64(r.version(0, i))
			all += v
			if i < wss*200/1000 {
				hot += v
			}
		}
		share := float64(hot) / float64(all)
		want := 0.8
		if pattern == PatternRandom {
			want = 0.2
		}
		if all != units*batch || share < want-0.02 || share > want+0.02 {
			t.Errorf("%s: %d of %d writes (%.3f) went to the first 20%% of the working set, want %.2f",
				PatternName(pattern), hot, all, share, want)
		}
	}
}

// TestCorruptionDetected flips one byte somewhere in a slice right before a verify and requires
// exactly one mismatch, at the right page frame, offset and bits; the byte is restored after
// that report, so the verify at exit must be clean again.
func TestCorruptionDetected(t *testing.T) {
	const mem, vcpus = 32 << 20, 2
	p, err := NewParams(DefaultConfig(), mem, vcpus, 0)
	if err != nil {
		t.Fatal(err)
	}
	v1 := p.VCPUs[1]
	// The idle workload with touch 500 writes the lower half of each slice once: page 10 of
	// vCPU 1's data is written, its last data page is not.
	written := v1.DataGPA + 10*PageSize + 1234
	untouched := v1.DataGPA + (v1.DataPages-1)*PageSize + 4095
	versionEntry := v1.VersionTableGPA + 4*10

	type tc struct {
		name     string
		content  uint64
		gpa      uint64
		pageGPA  uint64
		exactBit bool // the flipped byte itself is the first difference
	}
	var cases []tc
	for _, content := range allContents {
		cn := ContentName(content)
		cases = append(cases,
			tc{cn + "/written", content, written, v1.DataGPA + 10*PageSize, true},
			tc{cn + "/untouched", content, untouched, v1.DataGPA + (v1.DataPages-1)*PageSize, true})
		if content != ContentZero {
			// A wrong version makes the whole page stale.
			cases = append(cases, tc{cn + "/version", content, versionEntry, v1.DataGPA + 10*PageSize, false})
		}
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			cfg := DefaultConfig()
			cfg.Workload, cfg.Content, cfg.TouchPermille = WorkloadIdle, c.content, 500
			r := runNative(t, cfg, mem, vcpus, NativeRun{Units: 6, VerifyAt: 3, Corrupt: true, CorruptVCPU: 1, CorruptGPA: c.gpa})
			for _, rep := range r.verifies(0) {
				if rep.Mismatches != 0 {
					t.Errorf("vCPU 0 (not corrupted) verify %d: %+v", rep.VerifySeq, rep)
				}
			}
			reps := r.verifies(1)
			if len(reps) != 2 {
				t.Fatalf("vCPU 1 made %d verify reports, want 2", len(reps))
			}
			bad, after := reps[0], reps[1]
			if bad.Mismatches != 1 || bad.FirstBadPage != c.pageGPA/PageSize || bad.PagesChecked != v1.DataPages {
				t.Errorf("verify with the flipped byte: %+v, want 1 mismatch at pfn 0x%x", bad, c.pageGPA/PageSize)
			}
			if c.exactBit {
				off := c.gpa - c.pageGPA
				if bad.FirstBadOffset != off&^7 || bad.Expected^bad.Found != 0xff<<(8*(off&7)) {
					t.Errorf("verify with the flipped byte at offset %d: %+v, want the word at %d with byte %d flipped",
						off, bad, off&^7, off&7)
				}
			}
			if after.Mismatches != 0 || after.VerifySeq != 2 {
				t.Errorf("verify after the byte was restored: %+v, want clean, seq 2", after)
			}
		})
	}
}

func flateRatio(t *testing.T, b []byte) float64 {
	var out bytes.Buffer
	w, err := flate.NewWriter(&out, flate.DefaultCompression)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return float64(len(b)) / float64(out.Len())
}

// TestContentCompressibility checks what each content kind is for: text compresses about 3x a
// page on its own (more over many pages), random and image pages do not compress at all. It
// also checks that text pages name their page frame and version.
func TestContentCompressibility(t *testing.T) {
	const pages = 400
	for _, tc := range []struct {
		content          uint64
		minPage, maxPage float64 // bounds on the mean per-page ratio
		minWorstPage     float64
		minStream        float64
		maxStream        float64
	}{
		{ContentText, 3.0, 100, 2.8, 3.5, 100},
		{ContentRandom, 0, 1.0, 0, 0, 1.0},
		{ContentImage, 0, 1.0, 0, 0, 100},
	} {
		t.Run(ContentName(tc.content), func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.Content, cfg.Pattern, cfg.BatchPages, cfg.WSSPages = tc.content, PatternSequential, pages/4, pages
			r := runNative(t, cfg, 16<<20, 1, NativeRun{Units: 4})
			r.requireClean()
			var sum, worst float64 = 0, 1e9
			for i := uint64(0); i < pages; i++ {
				ratio := flateRatio(t, r.page(0, i))
				sum += ratio
				worst = min(worst, ratio)
			}
			mean := sum / pages
			gpa := r.params.VCPUs[0].DataGPA
			stream := flateRatio(t, r.dump[gpa:gpa+pages*PageSize])
			t.Logf("%s: per-page ratio mean %.2f, worst %.2f; %d pages together %.2f", ContentName(tc.content), mean, worst, pages, stream)
			if mean < tc.minPage || mean > tc.maxPage || worst < tc.minWorstPage {
				t.Errorf("per-page compression ratio mean %.2f (worst %.2f), want %.2f..%.2f (worst at least %.2f)",
					mean, worst, tc.minPage, tc.maxPage, tc.minWorstPage)
			}
			if stream < tc.minStream || stream > tc.maxStream {
				t.Errorf("%d pages together compress %.2fx, want %.2f..%.2f", pages, stream, tc.minStream, tc.maxStream)
			}
			if tc.content == ContentText {
				pfn := r.params.VCPUs[0].DataGPA/PageSize + 5
				want := fmt.Sprintf("[godwit page 0x%010x version 0x%08x]\n", pfn, 1)
				if got := string(r.page(0, 5)[:len(want)]); got != want {
					t.Errorf("text page 5 starts %q, want %q", got, want)
				}
				if p := r.page(0, 5); p[PageSize-1] != '\n' || bytes.IndexByte(p, 0) >= 0 {
					t.Errorf("text page 5 does not end in a newline or holds NUL bytes")
				}
			}
		})
	}
}

// imagePages returns the hashes of all written data pages of a run's slices, with counts.
func imagePages(r *run) map[[32]byte]int {
	seen := map[[32]byte]int{}
	for i, v := range r.params.VCPUs {
		for idx := uint64(0); idx < v.DataPages; idx++ {
			if r.version(i, idx) != 0 {
				seen[sha256.Sum256(r.page(i, idx))]++
			}
		}
	}
	return seen
}

// TestImagePagesRepeat checks that image pages come from a pool that depends only on the seed:
// a VM holds at most ImagePoolPages distinct pages, two VMs of different shapes with the same
// seed share their pages, and a different seed shares none.
func TestImagePagesRepeat(t *testing.T) {
	const pool = 64
	mk := func(seed uint64) Config {
		cfg := DefaultConfig()
		cfg.Content, cfg.ImagePoolPages, cfg.Seed = ContentImage, pool, seed
		cfg.Pattern, cfg.WSSPages = PatternRandom, 1500
		return cfg
	}
	a := runNative(t, mk(42), 16<<20, 1, NativeRun{Units: 40})
	b := runNative(t, mk(42), 32<<20, 2, NativeRun{Units: 40})
	c := runNative(t, mk(43), 16<<20, 1, NativeRun{Units: 40})
	for _, r := range []*run{a, b, c} {
		r.requireClean()
	}
	pa, pb, pc := imagePages(a), imagePages(b), imagePages(c)
	total := 0
	for _, n := range pa {
		total += n
	}
	if len(pa) > pool || len(pb) > pool || len(pa) < pool*9/10 || total < 10*pool {
		t.Errorf("distinct pages: %d and %d (of %d written), want at most the pool of %d and nearly all of it", len(pa), len(pb), total, pool)
	}
	shared := 0
	for h := range pa {
		if pb[h] > 0 {
			shared++
		}
		if pc[h] > 0 {
			t.Fatalf("a page of seed 42 appears with seed 43")
		}
	}
	if shared < len(pa)*9/10 {
		t.Errorf("two VMs with the same seed share %d of %d distinct pages, want nearly all", shared, len(pa))
	}
	for h := range pa {
		if h == sha256.Sum256(make([]byte, PageSize)) {
			t.Errorf("an image pool page is all zero")
		}
	}
}

// TestDeterministic runs the same params twice: data areas and mailboxes must be identical,
// for every content kind: page contents are a function of the params alone.
func TestDeterministic(t *testing.T) {
	for _, content := range allContents {
		cfg := DefaultConfig()
		cfg.Content, cfg.Pattern, cfg.WSSPages = content, PatternHotCold, 1000
		a := runNative(t, cfg, 32<<20, 2, NativeRun{Units: 30})
		b := runNative(t, cfg, 32<<20, 2, NativeRun{Units: 30})
		if !bytes.Equal(a.dump[DataGPA:], b.dump[DataGPA:]) {
			t.Errorf("%s: two runs of the same params left different data", ContentName(content))
		}
		for i := range a.params.VCPUs {
			if a.mailbox(i) != b.mailbox(i) {
				t.Errorf("%s: vCPU %d mailboxes differ: %+v and %+v", ContentName(content), i, a.mailbox(i), b.mailbox(i))
			}
		}
	}
}

// TestRatePacing checks that a rate holds the vCPU back: 20 units of 50 pages at 2500 pages/s
// take 0.4 s at least, and the guest asked for sleeps to get there.
func TestRatePacing(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Rate, cfg.BatchPages, cfg.WSSPages = 2500, 50, 1000
	r := runNative(t, cfg, 16<<20, 1, NativeRun{Units: 20, RealSleep: true})
	e := r.res.Exits[0]
	want := 400 * time.Millisecond
	if e.WriteTime < want*95/100 || e.WriteTime > 4*want || e.SleptUS < 200_000 {
		t.Errorf("20 units of 50 pages at 2500 pages/s took %v with %d us of sleep, want about %v, mostly asleep", e.WriteTime, e.SleptUS, want)
	}
	if r.res.TSCKHz < 100_000 {
		t.Errorf("harness measured a TSC of %d kHz", r.res.TSCKHz)
	}
}

// TestStartMessage checks vCPU 0's one console line (and that no other vCPU prints).
func TestStartMessage(t *testing.T) {
	cfg := DefaultConfig()
	r := runNative(t, cfg, 16<<20, 2, NativeRun{Units: 1})
	if len(r.res.Console) != 1 || r.res.Console[0].VCPU != 0 ||
		!strings.HasPrefix(r.res.Console[0].Text, "godwit guest: 2 vcpus, workload dirty, content text, pattern random") {
		t.Errorf("console: %+v", r.res.Console)
	}
}

// TestGuestPanics feeds the guest params it must refuse and checks it panics with a reason.
func TestGuestPanics(t *testing.T) {
	h := nativeHarness(t)
	p, err := NewParams(DefaultConfig(), 16<<20, 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	good, err := EncodeParams(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		off  int
		val  uint64
		want string
	}{
		{"magic", ParMagic, 0x1234, "bad params magic 0x1234"},
		{"version", ParABIVersion, 9, "params ABI version is not 1: 0x9"},
		{"content", ParContent, 5, "unknown content kind 0x5"},
		{"wss", ParamsVCPUOffset + VCPUWSSPages, 0, "bad working set size (pages) 0x0"},
		{"rate", ParRate, 100, "a rate needs the TSC frequency; tsc_khz is 0x0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := bytes.Clone(good)
			binary.LittleEndian.PutUint64(b[tc.off:], tc.val)
			path := filepath.Join(t.TempDir(), "params")
			if err := os.WriteFile(path, b, 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(h.path, "-p", path, "-m", fmt.Sprint(16<<20), "-u", "3").Output()
			if err == nil || !strings.Contains(err.Error(), "exit status 3") {
				t.Fatalf("harness: %v, want exit status 3 (guest panic)\n%s", err, out)
			}
			if !strings.Contains(string(out), "panic vcpu=0 text=godwit guest: vcpu 0: "+tc.want) {
				t.Errorf("output %q does not show the panic %q", out, tc.want)
			}
		})
	}
}

// BenchmarkNativeWriteLoop measures the guest's page write loop run natively: the same C
// functions as in the image, one vCPU thread writing 4096 units of 64 pages (1 GiB) over a
// 256 MiB working set that is faulted in beforehand. An op is one such run; MB/s is the write
// throughput the harness timed, which the VMM's benchmark compares with the same params run as a
// guest; cpu-MB/s is per second of the thread's CPU time, steadier on a busy machine.
// verify-MB/s is the final verify over the whole slice.
func BenchmarkNativeWriteLoop(b *testing.B) {
	const mem, units = 256<<20 + DataGPA, 4096
	for _, content := range allContents {
		for _, pattern := range []uint64{PatternSequential, PatternRandom} {
			b.Run(ContentName(content)+"/"+PatternName(pattern), func(b *testing.B) {
				cfg := DefaultConfig()
				cfg.Content, cfg.Pattern = content, pattern
				p, err := NewParams(cfg, mem, 1, 0)
				if err != nil {
					b.Fatal(err)
				}
				h := nativeHarness(b)
				var write, cpu, verify float64
				n := 0
				for b.Loop() {
					res, err := h.Run(context.Background(), NativeRun{Params: p, MemBytes: mem, Units: units, Prefault: true})
					if err != nil {
						b.Fatal(err)
					}
					write += res.WriteThroughput()
					cpu += res.WriteCPUThroughput()
					if v := res.Verifies; len(v) > 0 && v[len(v)-1].Duration > 0 {
						verify += float64(p.VCPUs[0].DataPages*PageSize) / v[len(v)-1].Duration.Seconds()
					}
					n++
				}
				b.ReportMetric(write/float64(n)/1e6, "MB/s")
				b.ReportMetric(cpu/float64(n)/1e6, "cpu-MB/s")
				b.ReportMetric(verify/float64(n)/1e6, "verify-MB/s")
			})
		}
	}
}

// TestImageGang: beside the pool, image pages are the VM's own (private) or near-duplicates of
// a pool page, in the shares asked for; a near-duplicate differs from its pool page in 1 to 4
// words; two VMs of one seed and different private seeds share the pool pages and nothing else;
// and every VM verifies clean.
func TestImageGang(t *testing.T) {
	const pool = 64
	mk := func(private, near, privateSeed uint64) Config {
		cfg := DefaultConfig()
		cfg.Content, cfg.ImagePoolPages, cfg.Seed = ContentImage, pool, 42
		cfg.Pattern, cfg.WSSPages = PatternRandom, 1500
		cfg.PrivatePermille, cfg.NearPermille, cfg.PrivateSeed = private, near, privateSeed
		return cfg
	}
	base := runNative(t, mk(0, 0, 0), 16<<20, 1, NativeRun{Units: 40})
	a := runNative(t, mk(200, 100, 7), 16<<20, 1, NativeRun{Units: 40})
	b := runNative(t, mk(200, 100, 8), 16<<20, 1, NativeRun{Units: 40})
	for _, r := range []*run{base, a, b} {
		r.requireClean()
	}
	poolPages := map[[32]byte][]byte{}
	for i, v := range base.params.VCPUs {
		for idx := uint64(0); idx < v.DataPages; idx++ {
			if base.version(i, idx) != 0 {
				poolPages[sha256.Sum256(base.page(i, idx))] = base.page(i, idx)
			}
		}
	}
	if len(poolPages) < pool*9/10 || len(poolPages) > pool {
		t.Fatalf("the pool: %d distinct pages, want nearly %d", len(poolPages), pool)
	}
	// wordsOff is the fewest 8-byte words in which p differs from a pool page.
	wordsOff := func(p []byte) int {
		best := PageSize / 8
		for _, q := range poolPages {
			n := 0
			for w := 0; w < PageSize && n < best; w += 8 {
				if !bytes.Equal(p[w:w+8], q[w:w+8]) {
					n++
				}
			}
			best = min(best, n)
		}
		return best
	}
	own := func(r *run) (map[[32]byte]bool, [3]int) {
		var kinds [3]int // pool, near-duplicate, private
		mine := map[[32]byte]bool{}
		for i, v := range r.params.VCPUs {
			for idx := uint64(0); idx < v.DataPages; idx++ {
				if r.version(i, idx) == 0 {
					continue
				}
				p := r.page(i, idx)
				h := sha256.Sum256(p)
				if poolPages[h] != nil {
					kinds[0]++
					continue
				}
				mine[h] = true
				switch off := wordsOff(p); {
				case off >= 1 && off <= 4:
					kinds[1]++
				case off > 400:
					kinds[2]++
				default:
					t.Fatalf("a page %d words off the nearest pool page: neither a near-duplicate nor the VM's own", off)
				}
			}
		}
		return mine, kinds
	}
	ownA, kinds := own(a)
	ownB, _ := own(b)
	total := float64(kinds[0] + kinds[1] + kinds[2])
	share := func(k int) float64 { return float64(kinds[k]) / total }
	if math.Abs(share(2)-0.2) > 0.05 || math.Abs(share(1)-0.1) > 0.04 {
		t.Errorf("of %.0f pages: %d pool, %d near-duplicates, %d private; want shares near 0.7, 0.1, 0.2", total, kinds[0], kinds[1], kinds[2])
	}
	for h := range ownA {
		if ownB[h] {
			t.Fatal("two VMs of different private seeds share a page outside the pool")
		}
	}
	t.Logf("of %.0f pages: %d pool, %d near-duplicates, %d private; %d and %d pages of their own", total, kinds[0], kinds[1], kinds[2], len(ownA), len(ownB))
}
