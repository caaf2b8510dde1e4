package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/qemu"
	"github.com/godwit-vm/godwit/migration"
)

// QEMU's guest settings: a heartbeat line per millisecond at most (godwit's guest heartbeats
// once per unit of work, or per millisecond when idle) and a verification of the whole memory
// an interval after the start and after the end of each verification (the multiboot guest
// verifies on a timer only; the destination's first verification after the migration decides
// whether the run counts). The migration starts right after the first verification, so that
// the next one comes an interval later: while it runs, the guest neither writes nor
// heartbeats, which would count against QEMU's blackout and work lost and spare it dirty pages.
// qemuVerifyMS is the least interval.
const qemuVerifyMS = 4000

// qemuVerifyInterval is the run's interval between verifications: at least qemuVerifyMS and
// at least the warm-up, which makes the first verification end the warm-up (both systems'
// guests then write for about as long before the migration) and leaves a migration shorter
// than the warm-up free of verifications.
func qemuVerifyInterval(warmUp time.Duration) time.Duration {
	return max(qemuVerifyMS*time.Millisecond, warmUp)
}

// qemuGuest is the scenario's guest for QEMU's multiboot image: the same workload, content,
// pattern and working set as godwit's, on one vCPU.
func qemuGuest(s Scenario) (guest.Config, error) {
	c := guest.DefaultConfig()
	var err error
	if c.Workload, err = guest.ParseWorkload(s.Workload); err != nil {
		return c, err
	}
	if c.Content, err = guest.ParseContent(s.Content); err != nil {
		return c, err
	}
	if c.Pattern, err = guest.ParsePattern(s.Pattern); err != nil {
		return c, err
	}
	if s.VCPUs != 1 {
		return c, fmt.Errorf("QEMU's multiboot guest has one vCPU, the scenario %d", s.VCPUs)
	}
	c.Rate = s.Rate
	c.TouchPermille = uint64(s.Touch*1000 + 0.5)
	c.HotPermille = uint64(s.HotSize*1000 + 0.5)
	c.HotProbPermille = uint64(s.HotProb*1000 + 0.5)
	if s.Workload == "dirty" {
		c.WSSPages = s.WSSBytes / guest.PageSize
	}
	return c, c.Validate()
}

// qemu runs the scenario with QEMU: the same guest (its multiboot build) on host 0 and a
// destination with -incoming defer on host 1, migrated by internal/qemu with the same cap
// (max-bandwidth, and max-postcopy-bandwidth) and downtime limit. The destination guest's
// first verification after the migration must find no mismatch.
func (e *runEnv) qemu(ctx context.Context) error {
	// QEMU's firmware runs emulated in a nested KVM host and, on a busy machine, has been seen
	// never to reach the guest: such a start is tried once more (the run records it).
	err := e.qemuOnce(ctx)
	var be bootError
	if errors.As(err, &be) && ctx.Err() == nil {
		fmt.Fprintf(e.cfg.Log, "bench: %s qemu: %v; starting again\n", e.s.Name, err)
		e.run.Timeline = nil
		err = e.qemuOnce(ctx)
		if e.run.Extra == nil {
			e.run.Extra = map[string]float64{}
		}
		e.run.Extra["boot_retries"] = 1
	}
	return err
}

// bootError is a QEMU guest that did not boot.
type bootError struct{ err error }

func (e bootError) Error() string { return e.err.Error() }

func (e *runEnv) qemuOnce(ctx context.Context) error {
	s, r := e.s, e.run
	if s.TLS {
		return skipError{"QEMU's TLS migration (tls-creds-x509) is not set up in the bench: the godwit scenario without TLS is the baseline"}
	}
	gc, err := qemuGuest(s)
	if err != nil {
		return skipError{err.Error()}
	}
	dir, err := os.MkdirTemp(e.cfg.WorkDir, "godwit-bench-qemu-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	opts := guest.DefaultMultibootOptions()
	verifyEvery := qemuVerifyInterval(e.warmUp())
	opts.HeartbeatUS, opts.VerifyMS = 1000, uint64(verifyEvery.Milliseconds())
	e.phase("starting VMs")
	e.memBase = hostUsed()
	// The start covers the wait for the first verification, an interval after the boot.
	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute+verifyEvery)
	defer cancel()
	// Both QEMUs start at once (each takes seconds in a nested KVM host). The guest's TSC
	// frequency is measured once, for both sides of this one machine.
	if opts.TSCKHz, err = qemu.HostTSCKHz(); err != nil {
		return err
	}
	var src, dst *qemu.VM
	var dstErr error
	dstHost, uri := e.tb.Host(1), fmt.Sprintf("tcp:%s:%d", e.tb.Host(1).Addr(), e.port)
	if s.Hosts == HostsSame {
		dstHost, uri = e.tb.Host(0), "unix:"+filepath.Join(dir, "incoming.sock")
	}
	// A handover: both QEMUs map guest RAM from one file in shared memory.
	var memFile string
	if memoryShared(s.Technique) {
		memFile = fmt.Sprintf("/dev/shm/godwit-bench-%d-%d.ram", os.Getpid(), e.port)
		defer os.Remove(memFile)
	}
	started := make(chan struct{})
	go func() {
		defer close(started)
		dst, dstErr = qemu.Start(sctx, qemu.Config{Netns: dstHost.Netns(), MemMiB: s.MemBytes >> 20, Guest: gc, Options: opts,
			Dir: dir, Name: "dst", Log: prefixWriter(e.cfg.Log, "qemu dst: "), Incoming: true, MemoryFile: memFile})
	}()
	src, err = qemu.Start(sctx, qemu.Config{Netns: e.tb.Host(0).Netns(), MemMiB: s.MemBytes >> 20, Guest: gc, Options: opts,
		Dir: dir, Name: "src", Log: prefixWriter(e.cfg.Log, "qemu src: "), MemoryFile: memFile})
	<-started
	if src != nil {
		defer src.Close()
	}
	if dst != nil {
		defer dst.Close()
	}
	if err != nil {
		return err
	}
	if dstErr != nil {
		return dstErr
	}
	bctx, bcancel := context.WithTimeout(sctx, time.Minute)
	boot, err := src.WaitBoot(bctx)
	bcancel()
	if err != nil {
		return bootError{err}
	}
	e.phase("warming up")
	v, err := src.Console.NextVerify(sctx, 0)
	if err != nil {
		return fmt.Errorf("qemu: the source guest's first verification: %w", err)
	}
	if v.Mismatches != 0 {
		return fmt.Errorf("qemu: the source guest found %d wrong pages before any migration", v.Mismatches)
	}
	bootedAt := src.Started.Add(boot)
	select {
	case <-time.After(time.Until(bootedAt.Add(e.warmUp()))):
	case <-ctx.Done():
		return ctx.Err()
	}
	if s.AutoConverge && (s.Technique == Precopy || s.Technique == Hybrid) {
		if err := src.QMP.Execute(sctx, "migrate-set-capabilities", map[string]any{
			"capabilities": []map[string]any{{"capability": "auto-converge", "state": true}}}, nil); err != nil {
			return fmt.Errorf("qemu: auto-converge: %w", err)
		}
	}

	capBytes := s.CapBps / 8
	mode := qemu.Mode(s.Technique)
	if memoryShared(s.Technique) {
		mode = qemu.Precopy // with x-ignore-shared: only the state and devices go
	}
	mc := qemu.MigrateConfig{
		Mode:                 mode,
		URI:                  uri,
		IgnoreShared:         memoryShared(s.Technique),
		MaxBandwidth:         capBytes,
		MaxPostcopyBandwidth: capBytes,
		DowntimeLimit:        s.DowntimeLimit,
		// godwit's hybrid switches after N rounds (the full pass and N-1 dirty passes); QEMU
		// counts dirty-bitmap syncs, one at the start and one after each pass.
		PostcopyAfterPasses: s.HybridRounds + 1,
		MultifdChannels:     s.Streams,
		MultifdCompression:  map[string]string{"zstd": "zstd", "auto": "zstd", "s2": "zstd"}[s.Compress],
		XBZRLECache:         map[bool]int64{true: migration.DefaultDeltaCache}[s.Delta],
		Poll:                20 * time.Millisecond,
		Timeout:             e.cfg.Timeout,
		VerifyTimeout:       verifyEvery + 2*time.Minute,
	}
	if capBytes == 0 {
		// QEMU caps pre-copy at 128 MiB/s by default; godwit has no cap unless asked.
		mc.MaxBandwidth = 100e9
	}

	t0 := time.Now().Add(time.Second)
	sm := startSampler(100*time.Millisecond, func(now time.Time) Sample {
		smp := Sample{TMS: ms(now.Sub(t0)), LinkBytes: e.meter.tx(), Bytes: -1, Units: -1, MemBytes: vmMemory(e.memBase)}
		if now.After(t0) {
			qctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
			defer cancel()
			if info, err := qemu.QueryMigrate(qctx, src); err == nil && info.RAM != nil {
				smp.Bytes = info.RAM.Transferred
			}
		} else {
			smp.Bytes = 0
		}
		return smp
	})
	defer sm.stop()
	time.Sleep(time.Until(t0))
	base := e.meter.tx()
	e.phase("migrating")
	issued := time.Now()
	res, merr := qemu.Migrate(ctx, src, dst, mc)
	// No sample after Migrate: it returns once the destination guest has verified its
	// memory, which faults every page in.
	samples := sm.stop()
	relative(samples, base)
	// The guest's progress comes from its heartbeat lines (hb UNITS), timestamped on arrival.
	addUnits(samples, t0, heartbeatUnits(src), heartbeatUnits(dst))
	r.Timeline = samples
	if end := e.meter.tx(); end >= 0 && base >= 0 {
		r.LinkBytes = end - base
	}
	if res == nil {
		return merr
	}
	r.TotalMS = ms(res.Total)
	r.EndMS = ms(qemuEnd(res, issued).Sub(t0))
	r.DowntimeMS = ms(res.StopToResume)
	r.BlackoutMS = ms(res.Blackout)
	r.Extra = map[string]float64{
		"qemu_downtime_ms":  float64(res.QEMU.Downtime),
		"qemu_total_ms":     float64(res.QEMU.TotalTime),
		"qemu_setup_ms":     float64(res.QEMU.SetupTime),
		"switchover_gap_ms": ms(res.SwitchoverGap),
		"baseline_gap_ms":   ms(res.BaselineGap),
		"boot_ms":           ms(boot),
	}
	if ram := res.QEMU.RAM; ram != nil {
		r.BytesWire = ram.Transferred
		if s.Compress != "" && s.Compress != "none" && r.LinkBytes > 0 {
			r.BytesWire = r.LinkBytes // QEMU 7.2 counts multifd pages before compression
		}
		r.PagesRaw, r.PagesZero = uint64(ram.Normal), uint64(ram.Duplicate)
		r.Rounds = int(ram.DirtySyncCount)
		r.Faults = uint64(ram.PostcopyRequests)
		r.Extra["precopy_bytes"] = float64(ram.PrecopyBytes)
		r.Extra["downtime_bytes"] = float64(ram.DowntimeBytes)
		r.Extra["postcopy_bytes"] = float64(ram.PostcopyBytes)
		r.Extra["normal_pages"] = float64(ram.Normal)
	}
	if !res.PostcopyStarted.IsZero() {
		r.Extra["postcopy_started_ms"] = ms(res.PostcopyStarted.Sub(t0))
		r.PostcopyMS = ms(res.Resume.Sub(res.PostcopyStarted))
	}
	// A verification on the source while it migrated pauses its writes: say so.
	for _, l := range src.Console.Lines() {
		if l.Kind == qemu.KindVerifyBegin && l.Time.After(t0) && l.Time.Before(t0.Add(res.Total)) {
			r.Extra["verify_during_migration"] = 1
		}
	}
	if x := res.QEMU.XBZRLE; x != nil {
		r.Extra["xbzrle_pages"], r.Extra["xbzrle_bytes"] = float64(x.Pages), float64(x.Bytes)
		r.Extra["xbzrle_cache_miss"], r.Extra["xbzrle_overflow"] = float64(x.CacheMiss), float64(x.Overflow)
		r.PagesDelta = uint64(x.Pages)
	}
	r.Converged = res.QEMU.Status == "completed" && res.PostcopyStarted.IsZero()
	r.VerifyPages = res.Verify.Pages
	if merr != nil {
		if errors.Is(merr, qemu.ErrMismatch) {
			return fmt.Errorf("QEMU's destination guest found %d wrong pages of %d: %w", res.Verify.Mismatches, res.Verify.Pages, merr)
		}
		return merr
	}
	return nil
}

// qemuEnd is when the migration ended for the guest: the later of the source's completion (its
// MIGRATION event, or the first poll that saw it) and the destination's RESUME. Migrate itself
// returns only after the destination guest's verification, when the guest has stopped again.
func qemuEnd(res *qemu.Result, issued time.Time) time.Time {
	end := issued.Add(res.Total)
	for _, st := range res.Statuses {
		if st.Status == "completed" {
			end = st.Time
		}
	}
	if res.Resume.After(end) {
		end = res.Resume
	}
	return end
}

type unitAt struct {
	t time.Time
	n uint64
}

// heartbeatUnits are the guest's heartbeat lines of vm, in arrival order.
func heartbeatUnits(vm *qemu.VM) []unitAt {
	var out []unitAt
	for _, l := range vm.Console.Lines() {
		if l.Kind == qemu.KindHeartbeat {
			out = append(out, unitAt{l.Time, l.N})
		}
	}
	return out
}

// addUnits sets each sample's Units to the largest count either side had reported by then.
func addUnits(samples []Sample, t0 time.Time, sides ...[]unitAt) {
	var all []unitAt
	for _, s := range sides {
		all = append(all, s...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].t.Before(all[j].t) })
	j, best := 0, int64(-1)
	for i := range samples {
		at := t0.Add(time.Duration(samples[i].TMS * float64(time.Millisecond)))
		for j < len(all) && !all[j].t.After(at) {
			best = max(best, int64(all[j].n))
			j++
		}
		samples[i].Units = best
	}
}
