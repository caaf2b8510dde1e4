package guest

import (
	"bufio"
	"bytes"
	"context"
	"embed"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// The C sources travel with the package so that a godwit binary can build the native harness
// (and tests can rebuild the image) without a source tree.
//
//go:embed src/*.c src/*.h src/*.S src/*.ld src/build.sh
var sources embed.FS

// writeSources copies the embedded sources into dir/src and returns that directory.
func writeSources(dir string) (string, error) {
	err := fs.WalkDir(sources, "src", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		dst := filepath.Join(dir, filepath.FromSlash(path))
		if d.IsDir() {
			return os.MkdirAll(dst, 0o755)
		}
		b, err := sources.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, b, 0o644)
	})
	if err != nil {
		return "", fmt.Errorf("guest: write sources to %s: %w", dir, err)
	}
	return filepath.Join(dir, "src"), nil
}

// runBuild runs src/build.sh with args in a copy of the embedded sources under dir.
func runBuild(ctx context.Context, dir string, args ...string) error {
	cc := os.Getenv("CC")
	if cc == "" {
		cc = "gcc"
	}
	if _, err := exec.LookPath(cc); err != nil {
		return fmt.Errorf("guest: building the guest code needs a C compiler: %w", err)
	}
	src, err := writeSources(dir)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "sh", append([]string{filepath.Join(src, "build.sh")}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("guest: sh build.sh %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// buildImage builds the flat guest image from the embedded sources, in dir.
func buildImage(ctx context.Context, dir string) ([]byte, error) {
	out := filepath.Join(dir, "image.bin")
	if err := runBuild(ctx, dir, out); err != nil {
		return nil, err
	}
	return os.ReadFile(out)
}

// NativeHarness is the guest's workload code compiled as a host program (src/harness.c): one
// thread per vCPU runs the same page writers and verification as the guest image, with the
// VMM's side of the ports played by the harness. It tests the guest without KVM and measures the
// native write throughput that the guest under KVM is compared with.
type NativeHarness struct {
	path string
}

// BuildNativeHarness compiles the harness into dir with the host's C compiler ($CC or gcc).
func BuildNativeHarness(ctx context.Context, dir string) (*NativeHarness, error) {
	path := filepath.Join(dir, "godwit-guest-harness")
	if err := runBuild(ctx, dir, "-native", path); err != nil {
		return nil, err
	}
	return &NativeHarness{path: path}, nil
}

// TSCKHz measures the host's TSC frequency in kHz (over 50 ms), the figure a VMM gets from
// KVM, for the Params of a native run with a rate.
func (h *NativeHarness) TSCKHz(ctx context.Context) (uint64, error) {
	out, err := exec.CommandContext(ctx, h.path, "-t").Output()
	if err != nil {
		return 0, fmt.Errorf("guest: %s -t: %w", h.path, err)
	}
	v, ok := strings.CutPrefix(strings.TrimSpace(string(out)), "tsc_khz=")
	khz, err := strconv.ParseUint(v, 10, 64)
	if !ok || err != nil || khz == 0 {
		return 0, fmt.Errorf("guest: %s -t printed %q, want tsc_khz=N", h.path, out)
	}
	return khz, nil
}

// NativeRun is one run of the harness.
type NativeRun struct {
	Params   *Params
	MemBytes uint64
	// Units is the heartbeat at which each vCPU is told CmdExit (at least 1): it then verifies
	// its slice once more and exits.
	Units uint64
	// VerifyAt, if not 0, is the heartbeat at which each vCPU is told CmdVerify.
	VerifyAt uint64
	// ReportAt, if not 0, is the heartbeat at which each vCPU is told CmdReportFree; the
	// harness checks every page reported then and afterwards (NativeResult.Free).
	ReportAt uint64
	// Balloon, if set, gives each vCPU CmdBalloon at its first heartbeat with BalloonTarget;
	// the harness checks and zeroes every page inflated (NativeResult.Free).
	Balloon       bool
	BalloonTarget uint32
	// ListAt, if not 0, is the heartbeat at which each vCPU is told CmdBalloonList; the
	// harness checks and zeroes every page named again (NativeFree.Relisted).
	ListAt uint64
	// Corrupt flips the byte at CorruptGPA right before vCPU CorruptVCPU's VerifyAt verify, and
	// restores it when that report is in.
	Corrupt     bool
	CorruptVCPU int
	CorruptGPA  uint64
	// DumpPath, if set, receives all guest memory after the run.
	DumpPath string
	// RealSleep makes PortSleep sleep; otherwise sleeps are only counted.
	RealSleep bool
	// Prefault faults all memory in before the vCPUs start, so that WriteThroughput measures
	// the write loop and not the host's first-touch page faults.
	Prefault bool
}

// NativeVerify is one verify report of a native run. Its Report has the verify fields of the
// mailbox (not WorkUnits and PagesWritten).
type NativeVerify struct {
	VCPU     int
	Report   Mailbox
	Duration time.Duration // from the command to the report
}

// NativeExit is how one vCPU of a native run ended.
type NativeExit struct {
	VCPU         int
	Status       uint32
	WorkUnits    uint64
	PagesWritten uint64
	WriteTime    time.Duration // from the vCPU's start to its last heartbeat: excludes the final verify
	WriteCPUTime time.Duration // the vCPU thread's CPU time over the same span
	SleptUS      uint64
}

// NativeFree is what one vCPU of a native run reported of its free pages (NativeRun.ReportAt).
type NativeFree struct {
	VCPU      int
	Done      uint64 // PortFreeDone answers
	Supported bool   // the last answer said the workload reports
	Reported  uint64 // pages reported
	NotFree   uint64 // of them (and of the inflated), pages not flagged free (or outside the slice)
	Inflated  uint64 // pages put into the balloon
	Balloon   uint64 // pages in the balloon at exit
	Relisted  uint64 // pages named again on CmdBalloonList
	Deflated  uint64 // pages taken out of the balloon (the mailbox's count at exit)
	Demand    uint64 // of them, pages taken out on demand
}

// NativeConsole is one console message.
type NativeConsole struct {
	VCPU int
	Text string
}

// NativeResult is what a native run reported.
type NativeResult struct {
	TSCKHz   uint64
	Console  []NativeConsole
	Verifies []NativeVerify
	Exits    []NativeExit
	Free     []NativeFree
}

// WriteThroughput is the bytes of pages written per second by all vCPUs together, over the
// longest vCPU's write time.
func (r *NativeResult) WriteThroughput() float64 {
	var pages uint64
	var longest time.Duration
	for _, e := range r.Exits {
		pages += e.PagesWritten
		longest = max(longest, e.WriteTime)
	}
	if longest <= 0 {
		return 0
	}
	return float64(pages*PageSize) / longest.Seconds()
}

// WriteCPUThroughput is the bytes of pages written per second of CPU time, summed over the
// vCPUs. Unlike WriteThroughput it does not drop when other processes share the CPUs, so it is
// the steadier figure of what the write loop itself costs.
func (r *NativeResult) WriteCPUThroughput() float64 {
	var total float64
	for _, e := range r.Exits {
		if e.WriteCPUTime > 0 {
			total += float64(e.PagesWritten*PageSize) / e.WriteCPUTime.Seconds()
		}
	}
	return total
}

// Run runs the harness once and returns its reports. A guest panic, a vCPU that exits with a
// non-zero status, or a harness failure is an error.
func (h *NativeHarness) Run(ctx context.Context, r NativeRun) (*NativeResult, error) {
	params, err := EncodeParams(r.Params)
	if err != nil {
		return nil, err
	}
	if r.Units == 0 {
		return nil, fmt.Errorf("guest: native run of 0 units: want at least 1")
	}
	f, err := os.CreateTemp("", "godwit-params-*")
	if err != nil {
		return nil, fmt.Errorf("guest: params file for the native harness: %w", err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(params); err != nil {
		f.Close()
		return nil, fmt.Errorf("guest: write %s: %w", f.Name(), err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("guest: write %s: %w", f.Name(), err)
	}

	args := []string{"-p", f.Name(), "-m", strconv.FormatUint(r.MemBytes, 10), "-u", strconv.FormatUint(r.Units, 10)}
	if r.VerifyAt != 0 {
		args = append(args, "-v", strconv.FormatUint(r.VerifyAt, 10))
	}
	if r.ReportAt != 0 {
		args = append(args, "-r", strconv.FormatUint(r.ReportAt, 10))
	}
	if r.Balloon {
		args = append(args, "-b", strconv.FormatUint(uint64(r.BalloonTarget), 10))
	}
	if r.ListAt != 0 {
		args = append(args, "-l", strconv.FormatUint(r.ListAt, 10))
	}
	if r.Corrupt {
		args = append(args, "-c", fmt.Sprintf("%d:0x%x", r.CorruptVCPU, r.CorruptGPA))
	}
	if r.DumpPath != "" {
		args = append(args, "-d", r.DumpPath)
	}
	if r.RealSleep {
		args = append(args, "-s")
	}
	if r.Prefault {
		args = append(args, "-P")
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, h.path, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	runErr := cmd.Run()
	res, panics, parseErr := parseHarnessOutput(stdout.Bytes())
	switch {
	case len(panics) > 0:
		return res, fmt.Errorf("guest: native run: guest panic: %s", strings.Join(panics, "; "))
	case runErr != nil:
		return res, fmt.Errorf("guest: native run %s: %w: %s", strings.Join(args, " "), runErr, strings.TrimSpace(stderr.String()))
	case parseErr != nil:
		return res, parseErr
	}
	for _, e := range res.Exits {
		if e.Status != 0 {
			return res, fmt.Errorf("guest: native run: vCPU %d exited with status %d", e.VCPU, e.Status)
		}
	}
	if len(res.Exits) != len(r.Params.VCPUs) {
		return res, fmt.Errorf("guest: native run: %d of %d vCPUs exited", len(res.Exits), len(r.Params.VCPUs))
	}
	return res, nil
}

// parseHarnessOutput reads the harness's event lines (see src/harness.c).
func parseHarnessOutput(out []byte) (*NativeResult, []string, error) {
	res := &NativeResult{}
	var panics []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		kind, rest, _ := strings.Cut(line, " ")
		if kind == "console" || kind == "panic" {
			head, text, _ := strings.Cut(rest, " text=")
			fields := keyValues(head)
			text = strings.ReplaceAll(text, `\n`, "\n")
			if kind == "panic" {
				panics = append(panics, fmt.Sprintf("vCPU %s: %s", fields["vcpu"], text))
				continue
			}
			res.Console = append(res.Console, NativeConsole{VCPU: int(parseNum(fields["vcpu"])), Text: text})
			continue
		}
		f := keyValues(rest)
		n := func(k string) uint64 { return parseNum(f[k]) }
		switch kind {
		case "start":
			res.TSCKHz = n("tsc_khz")
		case "verified":
			res.Verifies = append(res.Verifies, NativeVerify{
				VCPU: int(n("vcpu")),
				Report: Mailbox{
					VerifySeq:      n("seq"),
					PagesChecked:   n("checked"),
					Mismatches:     n("mismatches"),
					FirstBadPage:   n("first_bad_page"),
					FirstBadOffset: n("first_bad_offset"),
					Expected:       n("expected"),
					Found:          n("found"),
					PagesVersioned: n("versioned"),
					PagesFree:      n("free"),
				},
				Duration: time.Duration(n("ns")),
			})
		case "exit":
			res.Exits = append(res.Exits, NativeExit{
				VCPU:         int(n("vcpu")),
				Status:       uint32(n("status")),
				WorkUnits:    n("units"),
				PagesWritten: n("pages"),
				WriteTime:    time.Duration(n("write_ns")),
				WriteCPUTime: time.Duration(n("write_cpu_ns")),
				SleptUS:      n("slept_us"),
			})
		case "free":
			res.Free = append(res.Free, NativeFree{
				VCPU: int(n("vcpu")), Done: n("done"), Supported: n("supported") == 1,
				Reported: n("reported"), NotFree: n("notfree"), Inflated: n("inflated"), Balloon: n("balloon"),
				Relisted: n("relisted"), Deflated: n("deflated"), Demand: n("demand"),
			})
		default:
			return res, panics, fmt.Errorf("guest: native harness: unknown output line %q", line)
		}
	}
	return res, panics, sc.Err()
}

func keyValues(s string) map[string]string {
	m := map[string]string{}
	for _, kv := range strings.Fields(s) {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}

// parseNum reads the harness's decimal and 0x-prefixed numbers; garbage reads as 0, which the
// tests' expectations then catch.
func parseNum(s string) uint64 {
	v, _ := strconv.ParseUint(s, 0, 64)
	return v
}

// MeasureNativeWriteThroughput builds the native harness in a scratch directory, runs p's
// workload for units heartbeats per vCPU on memBytes of memory, and returns the page write
// throughput of all vCPUs together in bytes per second. The VMM's benchmark compares the same
// params run as a guest against this figure. With prefault, memory is faulted in before the
// run (see NativeRun.Prefault).
func MeasureNativeWriteThroughput(ctx context.Context, p *Params, memBytes, units uint64, prefault bool) (float64, error) {
	dir, err := os.MkdirTemp("", "godwit-native-*")
	if err != nil {
		return 0, fmt.Errorf("guest: scratch directory for the native harness: %w", err)
	}
	defer os.RemoveAll(dir)
	h, err := BuildNativeHarness(ctx, dir)
	if err != nil {
		return 0, err
	}
	if p.Rate != 0 && p.TSCKHz == 0 {
		// Params from a VMM carry KVM's TSC frequency; natively, measure it.
		q := *p
		if q.TSCKHz, err = h.TSCKHz(ctx); err != nil {
			return 0, err
		}
		p = &q
	}
	res, err := h.Run(ctx, NativeRun{Params: p, MemBytes: memBytes, Units: units, Prefault: prefault})
	if err != nil {
		return 0, err
	}
	return res.WriteThroughput(), nil
}
