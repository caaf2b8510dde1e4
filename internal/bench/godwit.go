package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/godwit-vm/godwit/internal/certs"
	"github.com/godwit-vm/godwit/internal/control"
	"github.com/godwit-vm/godwit/internal/vmm"
	"github.com/godwit-vm/godwit/migration"
)

// godwitProc is a 'godwit run' process in a testbed host.
type godwitProc struct {
	name   string
	sock   string
	cmd    *exec.Cmd
	exited chan struct{}
	err    error
	stderr *tail
	stdout *tail
}

func (e *runEnv) startGodwit(host int, name string, args ...string) (*godwitProc, error) {
	dir := filepath.Join(e.cfg.WorkDir, fmt.Sprintf("godwit-bench-%d", os.Getpid()))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	p := &godwitProc{name: name, sock: filepath.Join(dir, fmt.Sprintf("%s-%d.sock", name, e.port)), exited: make(chan struct{}),
		stderr: &tail{max: 8 << 10, tee: prefixWriter(e.cfg.Log, name+": ")}, stdout: &tail{max: 64 << 10}}
	os.Remove(p.sock)
	p.cmd = e.tb.Host(host).Command(e.cfg.Godwit, append([]string{"run", "--json", "--name", name, "--control", p.sock}, args...)...)
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting godwit run (%s): %w", name, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.exited) }()
	deadline := time.After(60 * time.Second)
	for {
		if _, err := os.Stat(p.sock); err == nil {
			return p, nil
		}
		select {
		case <-p.exited:
			return nil, fmt.Errorf("godwit run (%s) exited at start (%v): %s", name, p.err, lastLines(p.stderr.String(), 5))
		case <-deadline:
			p.kill()
			return nil, fmt.Errorf("godwit run (%s): no control socket after 60 s", name)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// kill ends the process if it still runs and waits for it.
func (p *godwitProc) kill() {
	if p == nil {
		return
	}
	select {
	case <-p.exited:
		return
	default:
	}
	p.cmd.Process.Kill()
	<-p.exited
	os.Remove(p.sock)
}

func (p *godwitProc) stats(ctx context.Context) (vmm.Stats, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var s vmm.Stats
	err := control.Dial(p.sock).Call(ctx, http.MethodGet, "/v1/stats", nil, &s)
	return s, err
}

// waitRunning waits until the guest has sent a heartbeat.
func (p *godwitProc) waitRunning(ctx context.Context) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		s, err := p.stats(ctx)
		if err == nil && s.State == vmm.StateRunning && s.Heartbeats > 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("godwit VM %s: no heartbeat after 60 s (state %s %s, %v)", p.name, s.State, s.Error, err)
		}
		select {
		case <-p.exited:
			return fmt.Errorf("godwit run (%s) exited (%v): %s", p.name, p.err, lastLines(p.stderr.String(), 5))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// godwitRunArgs are the 'godwit run' flags of the scenario's guest.
func godwitRunArgs(s Scenario) []string {
	a := []string{"--mem", strconv.FormatUint(s.MemBytes>>20, 10) + "M", "--vcpus", strconv.Itoa(s.VCPUs),
		"--workload", s.Workload, "--content", s.Content}
	if s.Workload == "idle" {
		return append(a, "--touch", strconv.FormatFloat(s.Touch, 'g', -1, 64))
	}
	rate := "max"
	if s.Rate > 0 {
		rate = strconv.FormatUint(s.Rate, 10)
	}
	if s.Workload == "churn" {
		a = append(a, "--touch", strconv.FormatFloat(s.Touch, 'g', -1, 64), "--rate", rate)
		if s.Balloon != "" {
			a = append(a, "--balloon", s.Balloon)
		}
		return a
	}
	a = append(a, "--wss", strconv.FormatUint(s.WSSBytes>>10, 10)+"K", "--rate", rate, "--pattern", s.Pattern)
	if s.Pattern == "hotcold" {
		a = append(a, "--hot-size", strconv.FormatFloat(s.HotSize, 'g', -1, 64), "--hot-prob", strconv.FormatFloat(s.HotProb, 'g', -1, 64))
	}
	return a
}

// godwitMigrateArgs are the 'godwit migrate' flags of the scenario's technique (only those the
// technique takes: migrate refuses the others).
func godwitMigrateArgs(s Scenario, timeout time.Duration) []string {
	if memoryShared(s.Technique) {
		return []string{"--mode", s.Technique, "--timeout", timeout.String()}
	}
	// The mode always: the default depends on the address (a handover to a unix: one).
	a := []string{"--mode", s.Technique}
	if s.Technique != Precopy {
		a = append(a, "--prepage", s.Prepage)
	}
	if s.Technique == Hybrid {
		a = append(a, "--hybrid-rounds", strconv.Itoa(s.HybridRounds))
	}
	if s.Technique != Postcopy {
		a = append(a, "--downtime-limit", s.DowntimeLimit.String())
		if s.AutoConverge {
			a = append(a, "--auto-converge")
		}
	}
	if s.Technique == Precopy {
		// QEMU's pre-copy never gives up; neither does godwit's with --force.
		a = append(a, "--force")
		if s.Streams > 0 { // else the engine chooses
			a = append(a, "--streams", strconv.Itoa(s.Streams))
		}
	}
	if s.Compress == "zstd" || s.Compress == "s2" || s.Compress == "auto" {
		a = append(a, "--compress", s.Compress)
	}
	if s.FreePages == "off" {
		a = append(a, "--free-pages", "off")
	}
	if s.Delta {
		a = append(a, "--delta")
	}
	if s.Dedup {
		a = append(a, "--dedup")
	}
	if s.CapBps > 0 {
		a = append(a, "--max-bandwidth", strconv.FormatInt(s.CapBps, 10)+"bit")
	}
	return append(a, "--timeout", timeout.String())
}

// unsupported tells whether a failed migrate says that this godwit lacks the technique.
func unsupported(text string) bool {
	t := strings.ToLower(text)
	for _, w := range []string{"unknown flag --mode", "unknown flag --prepage", "unknown flag --hybrid", "does not support post-copy", "not implemented", `--mode "`} {
		if strings.Contains(t, w) {
			return true
		}
	}
	return false
}

// godwit runs the scenario with godwit: a 'godwit run' on host 0, a 'godwit run --incoming' on
// host 1, 'godwit migrate --json' between them, then 'godwit verify --json' on the destination,
// which must find no mismatch.
func (e *runEnv) godwit(ctx context.Context) error {
	s, r := e.s, e.run
	e.phase("starting VMs")
	e.memBase = hostUsed()
	srcArgs, dstArgs := godwitRunArgs(s), []string{}
	if s.Technique == SharedMemory {
		// Both hosts map one file: what disaggregated memory would give two real hosts.
		mem := fmt.Sprintf("/dev/shm/godwit-bench-%d-%d.mem", os.Getpid(), e.port)
		defer os.Remove(mem)
		srcArgs = append(srcArgs, "--memory-file", mem)
		dstArgs = append(dstArgs, "--memory-file", mem)
	}
	var migrateTLS []string
	if s.TLS {
		dir, err := os.MkdirTemp(e.cfg.WorkDir, "godwit-bench-tls-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		src, dst, err := e.tlsFlags(dir)
		if err != nil {
			return err
		}
		dstArgs, migrateTLS = append(dstArgs, dst...), src
	}
	src, err := e.startGodwit(0, "src", srcArgs...)
	if err != nil {
		return err
	}
	defer src.kill()
	to, dstHost := fmt.Sprintf("tcp:%s:%d", e.tb.Host(1).Addr(), e.port), 1
	if s.Hosts == HostsSame {
		to, dstHost = "unix:"+filepath.Join(filepath.Dir(src.sock), fmt.Sprintf("incoming-%d.sock", e.port)), 0
	}
	dst, err := e.startGodwit(dstHost, "dst", append([]string{"--incoming", to}, dstArgs...)...)
	if err != nil {
		return err
	}
	defer dst.kill()
	if err := src.waitRunning(ctx); err != nil {
		return err
	}
	e.phase("warming up")
	select {
	case <-time.After(e.warmUp()):
	case <-ctx.Done():
		return ctx.Err()
	}

	// Sample from a second before the migration: link bytes, and the guest's work on both
	// sides (its counter lives in guest memory, so the destination carries on from the
	// source's count).
	t0 := time.Now().Add(time.Second)
	sm := startSampler(100*time.Millisecond, func(now time.Time) Sample {
		sctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		units := int64(-1)
		for _, p := range []*godwitProc{src, dst} {
			if st, err := p.stats(sctx); err == nil && st.WorkUnits > 0 {
				units = max(units, int64(st.WorkUnits))
			}
		}
		return Sample{TMS: ms(now.Sub(t0)), LinkBytes: e.meter.tx(), Bytes: -1, Units: units, MemBytes: vmMemory(e.memBase)}
	})
	defer sm.stop()
	time.Sleep(time.Until(t0))
	base := e.meter.tx()

	e.phase("migrating")
	args := append([]string{"migrate", "--json", "--control", src.sock, "--to", to}, godwitMigrateArgs(s, e.cfg.Timeout)...)
	args = append(args, migrateTLS...)
	cmd := exec.CommandContext(ctx, e.cfg.Godwit, args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	runErr := cmd.Run()
	r.EndMS = ms(time.Since(t0))
	end := e.meter.tx()
	// The memory both processes hold as the migration ends, before the source lets go of
	// its copy (a handover is over within one sampling interval).
	last := Sample{TMS: r.EndMS, LinkBytes: -1, Bytes: -1, Units: -1, MemBytes: vmMemory(e.memBase)}
	samples := append(sm.stop(), last)
	relative(samples, base)
	r.Timeline = samples
	if end >= 0 && base >= 0 {
		r.LinkBytes = end - base
	}
	var rep migration.Report
	jerr := json.Unmarshal(out.Bytes(), &rep)
	if runErr != nil || jerr != nil || rep.Result != migration.ResultOK {
		text := strings.TrimSpace(rep.Error + " " + errOut.String())
		if jerr != nil {
			text = strings.TrimSpace(out.String() + " " + errOut.String())
		}
		if s.Technique != Precopy && unsupported(text) {
			return skipError{fmt.Sprintf("this godwit cannot migrate with --mode %s yet: %s", s.Technique, lastLines(text, 2))}
		}
		if text == "" {
			text = fmt.Sprint(runErr)
		}
		return fmt.Errorf("godwit migrate: %s", lastLines(text, 3))
	}
	fillFromReport(r, &rep)

	// The source releases the VM and exits; the destination's guest must find every page right.
	select {
	case <-src.exited:
	case <-time.After(30 * time.Second):
		return errors.New("the source's godwit run did not exit after migrating away")
	}
	e.phase("verifying")
	vctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	vout, verr := exec.CommandContext(vctx, e.cfg.Godwit, "verify", "--json", "--control", dst.sock).Output()
	var v vmm.VerifyReport
	if err := json.Unmarshal(vout, &v); err != nil {
		return fmt.Errorf("godwit verify on the destination: %v %v: %s", verr, err, lastLines(string(vout), 3))
	}
	r.VerifyPages = v.PagesChecked
	if v.Mismatches != 0 || v.PagesChecked == 0 {
		return fmt.Errorf("godwit verify on the destination: %d mismatches in %d pages checked", v.Mismatches, v.PagesChecked)
	}
	// Verified: end the destination at once ('godwit quit' would make the guest verify again).
	dst.kill()
	return nil
}

func fillFromReport(r *Run, rep *migration.Report) {
	r.TotalMS, r.DowntimeMS = rep.TotalMS, rep.DowntimeMS
	if rep.BlackoutMS != nil {
		r.BlackoutMS = *rep.BlackoutMS
	}
	r.BytesWire = rep.BytesWire
	r.PagesRaw, r.PagesZero, r.PagesHole = rep.Pages.Raw, rep.Pages.Zero, rep.Pages.Hole
	r.PagesCompressed, r.PagesFree, r.PagesDelta = rep.Pages.Compressed, rep.Pages.Free, rep.Pages.Delta
	r.PagesDedup = rep.Pages.Dedup
	r.Rounds, r.Converged, r.Throttle = rep.Rounds, rep.Converged, rep.ThrottleMax
	r.RoundDetails = rep.RoundDetails
	r.Extra = map[string]float64{
		"pause_to_ack_ms":      rep.PauseToAckMS,
		"expected_downtime_ms": rep.ExpectedDowntimeMS,
		"final_round_ms":       rep.Downtime.FinalRoundMS,
		"state_ms":             rep.Downtime.StateMS,
		"delivery_ms":          rep.Downtime.DeliveryMS,
		"restore_ms":           rep.Downtime.RestoreMS,
		"start_ms":             rep.Downtime.StartMS,
	}
	if rep.Postcopy != nil {
		r.Extra["arm_ms"] = rep.Downtime.ArmMS
	}
	if pc := rep.Postcopy; pc != nil {
		r.Faults = pc.DemandFaults
		r.FaultP50US, r.FaultP99US = pc.FaultLatencyP50US, pc.FaultLatencyP99US
		r.FaultLatencyUS = pc.FaultLatencyUS
		r.PostcopyMS = pc.PostcopyMS
		r.Extra["pages_pushed"] = float64(pc.PagesPushed)
		r.Extra["pages_demanded"] = float64(pc.PagesDemanded)
		r.Extra["missing_at_switch"] = float64(pc.MissingAtStart)
		r.Extra["ahead_pages"] = float64(pc.AheadPages)
		r.Extra["progress_before"] = pc.ProgressBefore
		r.Extra["progress_during"] = pc.ProgressDuring
		r.Extra["progress_after"] = pc.ProgressAfter
		r.Extra["switched_after_rounds"] = float64(pc.SwitchedAfter)
	}
}

// lastLines returns the last n non-empty lines of s, joined by " | ".
func lastLines(s string, n int) string {
	var ls []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			ls = append(ls, l)
		}
	}
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, " | ")
}

// prefixWriter writes each chunk to w with a prefix (w may be nil).
func prefixWriter(w interface{ Write([]byte) (int, error) }, prefix string) *prefixed {
	return &prefixed{w: w, prefix: prefix}
}

type prefixed struct {
	w interface {
		Write([]byte) (int, error)
	}
	prefix string
}

func (p *prefixed) Write(b []byte) (int, error) {
	if p.w == nil {
		return len(b), nil
	}
	for _, l := range strings.SplitAfter(string(b), "\n") {
		if l != "" {
			p.w.Write([]byte(p.prefix + l))
		}
	}
	return len(b), nil
}

// tlsFlags makes a test CA and certificates for the two hosts in dir, and returns the flags
// of each side: each accepts only the other.
func (e *runEnv) tlsFlags(dir string) (src, dst []string, err error) {
	hosts := []certs.Host{
		{Name: "bench-src", IPs: []net.IP{e.tb.Host(0).Addr().AsSlice()}},
		{Name: "bench-dst", IPs: []net.IP{e.tb.Host(1).Addr().AsSlice()}},
	}
	if _, err := certs.WriteDir(dir, hosts); err != nil {
		return nil, nil, err
	}
	caCert, _ := certs.Files(dir, certs.CAName)
	flags := func(me, peer string) []string {
		c, k := certs.Files(dir, me)
		return []string{"--tls-ca", caCert, "--tls-cert", c, "--tls-key", k, "--tls-peer", peer}
	}
	return flags("bench-src", "bench-dst"), flags("bench-dst", "bench-src"), nil
}
