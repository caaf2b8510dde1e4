package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"time"
)

// Mode is a migration technique as QEMU does it.
type Mode string

const (
	Precopy  Mode = "precopy"  // iterative pre-copy, then stop and copy the rest
	Postcopy Mode = "postcopy" // switch to post-copy at once: the destination runs and pulls pages
	Hybrid   Mode = "hybrid"   // pre-copy passes first, then post-copy
)

// MigrateConfig is one QEMU migration.
type MigrateConfig struct {
	Mode Mode
	// URI is where the destination listens and the source connects, "tcp:ADDR:PORT" with the
	// destination host's address.
	URI string
	// MaxBandwidth caps the pre-copy stream, in bytes per second; 0 leaves QEMU's default
	// (128 MiB/s). DowntimeLimit is the pre-copy downtime target; 0 leaves QEMU's (300 ms); the
	// Postcopy mode sets it to zero (see Migrate).
	// MaxPostcopyBandwidth caps the post-copy background stream; 0 leaves QEMU's (no cap).
	MaxBandwidth         int64
	DowntimeLimit        time.Duration
	MaxPostcopyBandwidth int64
	// Hybrid: switch to post-copy once QEMU has synchronised the dirty bitmap this many
	// times (each sync starts a pre-copy pass; default 2: after the first full pass), or
	// after PostcopyAfter if that is set and comes first.
	PostcopyAfterPasses int
	PostcopyAfter       time.Duration
	// MultifdChannels above 1 turns on multifd (pre-copy) with that many channels.
	// MultifdCompression (zstd, zlib) turns it on too and compresses each channel's pages.
	MultifdChannels    int
	MultifdCompression string
	// XBZRLECache above 0 turns on XBZRLE (pre-copy pages sent as their change to a cached
	// copy) with a cache of that many bytes at the source.
	XBZRLECache int64
	// IgnoreShared (x-ignore-shared) sends no page of RAM that both sides map shared from the
	// same file (Config.MemoryFile): a handover on one host.
	IgnoreShared bool
	// Poll is the query-migrate interval (default 20 ms); Timeout bounds the migration
	// (default 5 minutes) and VerifyTimeout the destination guest's verification after it
	// (default 2 minutes).
	Poll          time.Duration
	Timeout       time.Duration
	VerifyTimeout time.Duration
}

// RAMStats is query-migrate's "ram" member (the fields godwit reports).
type RAMStats struct {
	Transferred      int64   `json:"transferred"`
	Remaining        int64   `json:"remaining"`
	Total            int64   `json:"total"`
	Duplicate        int64   `json:"duplicate"` // zero pages
	Skipped          int64   `json:"skipped"`
	Normal           int64   `json:"normal"`
	NormalBytes      int64   `json:"normal-bytes"`
	DirtyPagesRate   int64   `json:"dirty-pages-rate"`
	Mbps             float64 `json:"mbps"`
	DirtySyncCount   int64   `json:"dirty-sync-count"`
	PostcopyRequests int64   `json:"postcopy-requests"`
	PageSize         int64   `json:"page-size"`
	PagesPerSecond   int64   `json:"pages-per-second"`
	PrecopyBytes     int64   `json:"precopy-bytes"`
	DowntimeBytes    int64   `json:"downtime-bytes"`
	PostcopyBytes    int64   `json:"postcopy-bytes"`
}

// MigrationInfo is query-migrate's answer (the fields godwit reads). Times are milliseconds.
type MigrationInfo struct {
	Status           string    `json:"status"`
	TotalTime        int64     `json:"total-time"`
	Downtime         int64     `json:"downtime"`
	ExpectedDowntime int64     `json:"expected-downtime"`
	SetupTime        int64     `json:"setup-time"`
	RAM              *RAMStats `json:"ram"`
	XBZRLE           *XBZRLE   `json:"xbzrle-cache"`
	ErrorDesc        string    `json:"error-desc"`
}

// XBZRLE is query-migrate's "xbzrle-cache" member, present while XBZRLE is on.
type XBZRLE struct {
	CacheSize int64 `json:"cache-size"`
	Bytes     int64 `json:"bytes"` // sent as XBZRLE
	Pages     int64 `json:"pages"`
	CacheMiss int64 `json:"cache-miss"`
	Overflow  int64 `json:"overflow"` // pages whose encoding was too long: sent whole
}

// Result is what a migration did, by QEMU's account and by the guest's.
type Result struct {
	Mode Mode `json:"mode"`

	// By the host: Total from `migrate` issued to the source reporting completed.
	// Stop is the source's STOP event and Resume the destination's RESUME event (QMP
	// timestamps; the testbed's hosts share one clock); StopToResume between them.
	// PostcopyStarted is when migrate-start-postcopy was issued (zero for pre-copy).
	Total           time.Duration `json:"total"`
	Stop            time.Time     `json:"stop"`
	Resume          time.Time     `json:"resume"`
	StopToResume    time.Duration `json:"stop_to_resume"`
	PostcopyStarted time.Time     `json:"postcopy_started"`
	Polls           int           `json:"polls"`

	// By QEMU: the source's last query-migrate, and the source's MIGRATION (status
	// changes) and MIGRATION_PASS (a new pre-copy pass) events.
	QEMU     MigrationInfo `json:"qemu"`
	Statuses []StatusAt    `json:"statuses"`
	Passes   []time.Time   `json:"passes"`

	// By the guest: Blackout is the largest gap between consecutive lines of the guest,
	// timestamped on arrival by the host, across source and destination, from one second
	// before the migration to the end of Verify; BlackoutEnd when that gap ended.
	// BaselineGap is the largest gap on the source during the second before the migration
	// (the heartbeat interval plus noise). Verify is the destination guest's first
	// verification that began after the migration completed.
	Blackout    time.Duration `json:"blackout"`
	BlackoutEnd time.Time     `json:"blackout_end"`
	// LastSourceLine and FirstDestLine bracket the switch-over as the guest saw it: its last
	// line from the source after the migration began, and its first from the destination;
	// SwitchoverGap is the time between them. Blackout can be larger than SwitchoverGap
	// when the guest stalled on the source during the migration (QEMU's big lock, dirty
	// logging) or, in post-copy, on the destination while it waited for pages.
	LastSourceLine time.Time     `json:"last_source_line"`
	FirstDestLine  time.Time     `json:"first_dest_line"`
	SwitchoverGap  time.Duration `json:"switchover_gap"`
	BaselineGap    time.Duration `json:"baseline_gap"`
	Verify         Verify        `json:"verify"`
}

// StatusAt is a migration status change (a MIGRATION event) and when it happened.
type StatusAt struct {
	Status string    `json:"status"`
	Time   time.Time `json:"time"`
}

// Downtime is QEMU's own downtime figure.
func (r *Result) Downtime() time.Duration { return time.Duration(r.QEMU.Downtime) * time.Millisecond }

// ErrMismatch is returned (wrapped) when the destination guest finds its memory wrong.
var ErrMismatch = errors.New("the destination guest found mismatching pages")

type capability struct {
	Capability string `json:"capability"`
	State      bool   `json:"state"`
}

func setCapabilities(ctx context.Context, vm *VM, caps map[string]bool) error {
	var list []capability
	for name, on := range caps {
		list = append(list, capability{name, on})
	}
	err := vm.QMP.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list}, nil)
	if err != nil {
		return fmt.Errorf("qemu %s: %w", vm.Name, err)
	}
	return nil
}

// QueryMigrate runs query-migrate.
func QueryMigrate(ctx context.Context, vm *VM) (MigrationInfo, error) {
	var info MigrationInfo
	if err := vm.QMP.Execute(ctx, "query-migrate", nil, &info); err != nil {
		return info, fmt.Errorf("qemu %s: %w", vm.Name, err)
	}
	return info, nil
}

// Migrate migrates the guest of src into dst (started with Config.Incoming), waits for the
// destination guest to verify its memory after the migration, and returns the figures. The
// result is returned with the error when the migration ran but went wrong (failed, or the
// guest found mismatches: errors.Is(err, ErrMismatch)).
func Migrate(ctx context.Context, src, dst *VM, cfg MigrateConfig) (*Result, error) {
	switch cfg.Mode {
	case Precopy, Postcopy, Hybrid:
	case "":
		cfg.Mode = Precopy
	default:
		return nil, fmt.Errorf("qemu: unknown migration mode %q", cfg.Mode)
	}
	if cfg.URI == "" {
		return nil, errors.New("qemu: migration without a URI")
	}
	if cfg.Poll <= 0 {
		cfg.Poll = 20 * time.Millisecond
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Minute
	}
	if cfg.VerifyTimeout <= 0 {
		cfg.VerifyTimeout = 2 * time.Minute
	}
	if cfg.PostcopyAfterPasses <= 0 {
		cfg.PostcopyAfterPasses = 2
	}
	mctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()

	post := cfg.Mode != Precopy
	caps := map[string]bool{"postcopy-ram": post, "events": true}
	multifd := cfg.MultifdChannels > 1 || cfg.MultifdCompression != ""
	if multifd {
		if post {
			return nil, errors.New("qemu: multifd is for pre-copy here")
		}
		caps["multifd"] = true
	}
	if cfg.XBZRLECache > 0 {
		caps["xbzrle"] = true
	}
	if cfg.IgnoreShared {
		caps["x-ignore-shared"] = true
	}
	if err := setCapabilities(mctx, dst, caps); err != nil {
		return nil, err
	}
	if err := setCapabilities(mctx, src, caps); err != nil {
		return nil, err
	}
	params := map[string]any{}
	if cfg.MaxBandwidth > 0 {
		params["max-bandwidth"] = cfg.MaxBandwidth
	}
	if cfg.DowntimeLimit > 0 {
		params["downtime-limit"] = cfg.DowntimeLimit.Milliseconds()
	}
	if cfg.Mode == Postcopy {
		// migrate-start-postcopy can only follow migrate, and QEMU completes in pre-copy as
		// soon as what is left fits the downtime limit: a small, lightly written guest on a
		// fast link can get there in its first pass before the command is seen. A limit of
		// zero leaves QEMU nothing to complete with but the switch (the limit does not bound
		// the post-copy switch itself).
		params["downtime-limit"] = 0
	}
	if cfg.MaxPostcopyBandwidth > 0 {
		params["max-postcopy-bandwidth"] = cfg.MaxPostcopyBandwidth
	}
	if cfg.XBZRLECache > 0 {
		params["xbzrle-cache-size"] = cfg.XBZRLECache
	}
	if multifd {
		// Both ends must agree on the channel count and the compression.
		both := map[string]any{"multifd-channels": max(cfg.MultifdChannels, 1)}
		if cfg.MultifdCompression != "" {
			both["multifd-compression"] = cfg.MultifdCompression
		}
		maps.Copy(params, both)
		if err := dst.QMP.Execute(mctx, "migrate-set-parameters", both, nil); err != nil {
			return nil, fmt.Errorf("qemu %s: %w", dst.Name, err)
		}
	}
	if len(params) > 0 {
		if err := src.QMP.Execute(mctx, "migrate-set-parameters", params, nil); err != nil {
			return nil, fmt.Errorf("qemu %s: %w", src.Name, err)
		}
	}
	if err := dst.QMP.Execute(mctx, "migrate-incoming", map[string]any{"uri": cfg.URI}, nil); err != nil {
		return nil, fmt.Errorf("qemu %s: %w", dst.Name, err)
	}

	res := &Result{Mode: cfg.Mode}
	srcEvents, dstEvents := len(src.QMP.Events()), len(dst.QMP.Events())
	t0 := time.Now()
	// migrate-incoming returns once the destination listens, so the source can connect.
	if err := src.QMP.Execute(mctx, "migrate", map[string]any{"uri": cfg.URI}, nil); err != nil {
		return nil, fmt.Errorf("qemu %s: %w", src.Name, err)
	}
	startPostcopy := func() error {
		res.PostcopyStarted = time.Now()
		if err := src.QMP.Execute(mctx, "migrate-start-postcopy", nil, nil); err != nil {
			return fmt.Errorf("qemu %s: %w", src.Name, err)
		}
		return nil
	}
	if cfg.Mode == Postcopy {
		if err := startPostcopy(); err != nil {
			return res, err
		}
	}

	var info MigrationInfo
	for {
		var err error
		if info, err = QueryMigrate(mctx, src); err != nil {
			return res, err
		}
		res.Polls++
		res.QEMU = info
		if info.Status == "completed" {
			res.Total = time.Since(t0)
			// QEMU sets the status before it computes its totals: ask again until they
			// are in.
			for i := 0; i < 50 && info.TotalTime == 0; i++ {
				time.Sleep(10 * time.Millisecond)
				if info, err = QueryMigrate(mctx, src); err != nil {
					return res, err
				}
			}
			res.QEMU = info
			break
		}
		if info.Status == "failed" || info.Status == "cancelled" {
			return res, fmt.Errorf("qemu %s: migration %s: %s", src.Name, info.Status, info.ErrorDesc)
		}
		if cfg.Mode == Hybrid && res.PostcopyStarted.IsZero() && info.Status == "active" && info.RAM != nil &&
			(info.RAM.DirtySyncCount >= int64(cfg.PostcopyAfterPasses) ||
				(cfg.PostcopyAfter > 0 && time.Since(t0) >= cfg.PostcopyAfter)) {
			if err := startPostcopy(); err != nil {
				return res, err
			}
		}
		select {
		case <-mctx.Done():
			src.QMP.Execute(context.Background(), "migrate_cancel", nil, nil)
			return res, fmt.Errorf("qemu: migration not completed after %v (status %s): %w", cfg.Timeout, info.Status, mctx.Err())
		case <-dst.Done():
			return res, dst.explain(fmt.Errorf("qemu %s: the destination exited during the migration", dst.Name))
		case <-time.After(cfg.Poll):
		}
	}
	completed := time.Now()

	stop, _, err := src.QMP.WaitEvent(mctx, "STOP", srcEvents)
	if err != nil {
		return res, fmt.Errorf("qemu %s: %w", src.Name, err)
	}
	resume, _, err := dst.QMP.WaitEvent(mctx, "RESUME", dstEvents)
	if err != nil {
		return res, fmt.Errorf("qemu %s: %w", dst.Name, err)
	}
	res.Stop, res.Resume = stop.Time, resume.Time
	for _, ev := range src.QMP.Events()[srcEvents:] {
		switch ev.Name {
		case "MIGRATION":
			var d struct {
				Status string `json:"status"`
			}
			if json.Unmarshal(ev.Data, &d) == nil {
				res.Statuses = append(res.Statuses, StatusAt{d.Status, ev.Time})
			}
		case "MIGRATION_PASS":
			res.Passes = append(res.Passes, ev.Time)
		}
	}
	res.StopToResume = resume.Time.Sub(stop.Time)

	// The destination may still be receiving (post-copy) when the source says completed.
	for {
		di, err := QueryMigrate(mctx, dst)
		if err != nil {
			return res, err
		}
		if di.Status == "completed" {
			break
		}
		if di.Status == "failed" || di.Status == "cancelled" {
			return res, fmt.Errorf("qemu %s: incoming migration %s: %s", dst.Name, di.Status, di.ErrorDesc)
		}
		select {
		case <-mctx.Done():
			return res, fmt.Errorf("qemu %s: incoming migration still %s: %w", dst.Name, di.Status, mctx.Err())
		case <-time.After(cfg.Poll):
		}
	}

	// Trust the guest, not QEMU: the first verification that began on the destination
	// after completion must find every page right.
	vctx, vcancel := context.WithTimeout(ctx, cfg.VerifyTimeout)
	defer vcancel()
	from := 0
	for i, l := range dst.Console.Lines() {
		if l.Time.After(completed) {
			from = i
			break
		}
		from = i + 1
	}
	v, err := dst.Console.NextVerify(vctx, from)
	if err != nil {
		return res, dst.explain(fmt.Errorf("qemu %s: after the migration: %w", dst.Name, err))
	}
	res.Verify = v

	res.BaselineGap, _ = MaxGap(src.Console.Heartbeats(t0.Add(-time.Second), t0))
	res.Blackout, res.BlackoutEnd = MaxGap(src.Console.Heartbeats(t0.Add(-time.Second), time.Time{}),
		dst.Console.Heartbeats(time.Time{}, v.End))
	if hb := src.Console.Heartbeats(t0, time.Time{}); len(hb) > 0 {
		res.LastSourceLine = hb[len(hb)-1]
	}
	if hb := dst.Console.Heartbeats(time.Time{}, time.Time{}); len(hb) > 0 {
		res.FirstDestLine = hb[0]
	}
	if !res.LastSourceLine.IsZero() && !res.FirstDestLine.IsZero() {
		res.SwitchoverGap = res.FirstDestLine.Sub(res.LastSourceLine)
	}
	if v.Mismatches != 0 {
		return res, fmt.Errorf("qemu %s: verification %d after the migration: %d of %d pages wrong, first at page frame 0x%x: %w",
			dst.Name, v.Seq, v.Mismatches, v.Pages, v.FirstBadPFN, ErrMismatch)
	}
	return res, nil
}
