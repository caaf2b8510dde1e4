package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/alecthomas/kong"
	"golang.org/x/sys/unix"

	"github.com/godwit-vm/godwit/internal/transport"
	"github.com/godwit-vm/godwit/migration"
)

// MigrateCmd is 'godwit migrate'.
type MigrateCmd struct {
	ControlFlag
	To   string `required:"" placeholder:"tcp:HOST:PORT|unix:PATH|agent:HOST:PORT" help:"The destination: a 'godwit run --incoming' waiting there (unix:PATH: on this host), or with --agent, the agent listening there (agent:HOST:PORT), which starts the VM process that receives it. With --resume: where that destination now listens (its old or a new address)."`
	Mode string `placeholder:"MODE" help:"precopy: copy memory while the VM runs here, then stop it and copy the rest (until the very end the VM can run here again, and does on any failure). postcopy: move the vCPUs at once; the destination runs the VM and fetches each page it touches from here while the rest is pushed (short downtime; from the switch on the VM needs both hosts until every page has arrived). hybrid: pre-copy rounds, then switch to post-copy (see --hybrid-rounds, --hybrid-after). handover (unix:PATH only, a process on this host, e.g. a new godwit binary): copy no memory at all; the destination maps this VM's memory files, passed over the socket, and only vCPU and device state is copied (any failure before the destination has the state leaves the VM running here). shared-memory: see --shared-memory. Default: handover to unix:PATH, precopy to tcp:HOST:PORT."`
	// Post-copy and hybrid.
	Prepage         string        `default:"sequential" placeholder:"POLICY" help:"postcopy, hybrid: the order in which the pages the destination has not asked for are pushed after the switch (pages it asks for always go first): sequential (ascending addresses), bubble (outward from the latest demand faults), hot (the pages most written before and most faulted after the switch first), none (push nothing: every page comes by demand). Default ${default}."`
	HybridRounds    int           `name:"hybrid-rounds" default:"2" placeholder:"N" help:"hybrid: switch to post-copy after this many pre-copy rounds (at least 1), or sooner if pre-copy stops converging; if pre-copy converges first, it stops and copies as in precopy. Default ${default}."`
	SampleBefore    time.Duration `name:"sample-before" default:"0" placeholder:"DURATION" help:"postcopy: watch the running guest this long before the switch: its writes rank pages for --prepage hot, and its progress rate is the report's progress_rate_before. 0 = the default: 500ms with --prepage hot, else no wait (the rate then covers only the handshake)."`
	HybridAfter     time.Duration `name:"hybrid-after" default:"0" placeholder:"DURATION" help:"hybrid: switch to post-copy once pre-copy has run this long; 0 = no time bound."`
	LinkTimeout     time.Duration `name:"link-timeout" default:"3s" placeholder:"DURATION" help:"postcopy, hybrid: after the switch, a link on which nothing arrives for this long (both sides send keepalives) is broken, and recovery begins (see --reconnect-window). Default ${default}."`
	ReconnectWindow time.Duration `name:"reconnect-window" default:"30s" placeholder:"DURATION" help:"postcopy, hybrid: when the link breaks after the switch, redial the destination at the same address for this long. Past it the migration is interrupted: the VM stays paused here with its memory and waits for 'godwit migrate --resume'. 0 = do not redial. Default ${default}."`
	FaultChannel    bool          `name:"fault-channel" default:"true" negatable:"" help:"postcopy, hybrid: send the pages the destination asks for on a TCP connection of their own, so that they never wait behind pushed pages in the main connection's buffers (--no-fault-channel: one connection for both, to compare). Default ${default}."`
	SharedMemory    bool          `name:"shared-memory" help:"Move a VM whose memory is in a memory file on shared memory ('run --memory-file') to a destination host that maps the same memory ('run --incoming ... --memory-file' naming it there): no page is copied, only vCPU and device state (the same as --mode shared-memory). In the testbed the namespace hosts share one kernel, so both map one file: that models disaggregated memory (a CXL pool, a memory server), which a real deployment would need. Any failure before the destination has the state leaves the VM running here."`
	Resume          bool          `help:"Finish this VM's interrupted post-copy migration: connect to the same destination at --to (its old or a new address) and carry on where the link broke. Takes no other option than --to (and --json); the migration keeps the ones it started with."`
	// Pre-copy.
	DowntimeLimit time.Duration `default:"300ms" placeholder:"DURATION" help:"precopy, hybrid: stop and copy once the expected downtime is within this. Default ${default}."`
	MaxBandwidth  Bandwidth     `default:"0" placeholder:"RATE" help:"Cap on migration traffic: bytes/s with K, M, G suffixes (125M) or bits/s (1gbit); 0 = no cap. In post-copy it caps the push; pages the destination asks for go first."`
	AutoConverge  bool          `help:"precopy, hybrid: throttle the vCPUs when the guest dirties memory faster than the link carries it."`
	Force         bool          `help:"precopy: if pre-copy does not converge, stop and copy anyway (longer downtime) instead of failing. (hybrid switches to post-copy instead.)"`
	Streams       int           `default:"0" placeholder:"N" help:"carry the pages (pre-copy rounds, the post-copy push) on this many connections to the destination (1..64; the fault channel is one more), each read, checksummed and written by its own worker on both sides. Pays where one connection or one core is the limit; on a host whose cores are all busy with the migration already it gains nothing. 0 = for precopy chosen from this host's CPUs (2..8) and --max-bandwidth (1 under 256 MiB/s), for postcopy and hybrid 1; the report says what was chosen and lists each connection's share. Default ${default}."`
	// Encodings.
	Compress      string        `default:"none" placeholder:"none|zstd|s2|auto" help:"How pages that hold data travel: none (raw); zstd (each page that shrinks by an eighth or more goes as a zstd frame of its own; the others raw); s2 (the same as S2 blocks: about a quarter of zstd's CPU, pages a third larger); auto (zstd for the batches the bandwidth cap would hold back, raw for the others, so that the CPU compresses only while the link is the limit; without --max-bandwidth, raw). zstd pays where the link, not the CPU, is the limit: it costs 20 to 40 µs per page of text on one core here, so over a fast link it can make the migration slower. A destination that cannot decode it gets raw pages, and the report says so. Default ${default}."`
	CompressLevel string        `name:"compress-level" default:"fastest" placeholder:"LEVEL" help:"--compress zstd or auto: fastest, default, better or best (slower, a few per cent smaller). Default ${default}."`
	Delta         bool          `help:"precopy, hybrid: send a page that changed little since the copy sent before in an earlier round as its change (the words that differ), while that copy is in a cache of --delta-cache at the source; the destination applies it to the page it holds. Pays for guests that rewrite pages with small changes; costs a copy of each page sent into the cache. A destination that cannot do it gets whole pages, and the report says so."`
	Gang          string        `placeholder:"VM,VM,..." help:"Migrate these VMs of this host together, as one migration to a 'godwit gang receive', or with --to agent:HOST:PORT to the agent there, which starts the VM processes that take them (their control sockets, comma-separated; with --agent, the agent's VM names): one session, one dedup index across them (with --dedup, a page one VM holds that another sent travels as a reference to it), paused together at the end of pre-copy and started together there. Pre-copy only."`
	Flatten       bool          `help:"For a VM cloned from a template: send its whole memory, the template's pages too, to a destination that does not hold the template (it arrives as a VM of its own). Without it a clone sends only the pages it changed, and a destination without its template refuses it."`
	Dedup         bool          `help:"Send a page whose content a page sent before holds at the destination as a reference to that page (28 bytes), checked there by SHA-256 before it is copied; after a post-copy switch a reference to a page the running guest has changed since is fetched again. Pays for guests with many identical pages; costs a hash of each page sent and an index of about 50 bytes per distinct page at the source. A destination that cannot do it gets whole pages, and the report says so."`
	DeltaCache    Size          `name:"delta-cache" default:"64M" placeholder:"SIZE" help:"--delta: the source's cache of pages sent (a page that is not in it goes whole). Default ${default}."`
	FreePages     string        `name:"free-pages" enum:"on,off" default:"on" help:"on: a guest that reports its free pages (workload churn) has none of them sent (pre-copy skips them and drops them from later rounds; post-copy never fetches them: they read as zero at the destination); off: send them like any other page, to compare. The report says whether the guest reported (${enum}). Default ${default}."`
	Timeout       time.Duration `default:"0" placeholder:"DURATION" help:"Give up after this long; 0 = no limit. Before a switch to post-copy the VM keeps running here; after it, the VM stays paused here with its memory, since it ran at the destination (see the README on recovery)."`
	TLSFlags
}

// validate checks the flags for contradictions. set tells whether a flag was given on the
// command line (by its name without dashes).
func (c *MigrateCmd) validate(set func(string) bool) error {
	if _, err := transport.Parse(c.To); err != nil {
		return fmt.Errorf("--to: %w", err)
	}
	addr, _ := transport.Parse(c.To)
	if addr.Network == transport.Routed {
		return fmt.Errorf("--to %s: a routed: socket takes the connections an agent passes on; migrate to the agent (agent:HOST:PORT)", c.To)
	}
	if err := c.TLSFlags.check(addr); err != nil {
		return err
	}
	if err := c.TLSFlags.absolute(); err != nil {
		return err
	}
	if c.Resume {
		var extra []string
		for _, f := range []string{"mode", "prepage", "sample-before", "hybrid-rounds", "hybrid-after", "link-timeout", "reconnect-window", "fault-channel",
			"downtime-limit", "max-bandwidth", "auto-converge", "force", "timeout", "streams", "compress", "compress-level",
			"delta", "delta-cache", "free-pages"} {
			if set(f) {
				extra = append(extra, "--"+f)
			}
		}
		if len(extra) > 0 {
			return fmt.Errorf("--resume continues the interrupted migration with the options it started with; it takes only --to, not %s", strings.Join(extra, ", "))
		}
		if c.TLSFlags.given() {
			return errors.New("--resume keeps the migration's mutual TLS: it takes no --tls-* flag")
		}
		return nil
	}
	if c.SharedMemory {
		if c.Mode != "" && c.Mode != migration.ModeSharedMemory {
			return fmt.Errorf("--shared-memory is --mode shared-memory, not --mode %s", c.Mode)
		}
		c.Mode = migration.ModeSharedMemory
	}
	if c.Mode == "" {
		c.Mode = defaultMode(addr)
	}
	switch c.Mode {
	case migration.ModePrecopy, migration.ModePostcopy, migration.ModeHybrid:
	case migration.ModeHandover, migration.ModeSharedMemory:
		if c.Mode == migration.ModeHandover && addr.Network != transport.Unix {
			return fmt.Errorf("--mode handover passes the memory's files to a process on this host: it needs --to unix:PATH, not %s (between hosts use precopy, postcopy or hybrid, or --shared-memory)", c.To)
		}
		var pages []string
		for _, f := range []string{"prepage", "sample-before", "hybrid-rounds", "hybrid-after", "link-timeout", "reconnect-window", "fault-channel",
			"downtime-limit", "max-bandwidth", "auto-converge", "force", "streams", "compress", "compress-level", "delta", "delta-cache", "dedup", "free-pages"} {
			if set(f) {
				pages = append(pages, "--"+f)
			}
		}
		if len(pages) > 0 {
			return fmt.Errorf("--mode %s copies no pages: %s do not apply (to copy memory, use --mode precopy)", c.Mode, strings.Join(pages, ", "))
		}
	default:
		return fmt.Errorf("--mode %q: want precopy, postcopy, hybrid, handover or shared-memory", c.Mode)
	}
	switch c.Prepage {
	case migration.PrepageSequential, migration.PrepageBubble, migration.PrepageHot, migration.PrepageNone:
	default:
		return fmt.Errorf("--prepage %q: want sequential, bubble, hot or none", c.Prepage)
	}
	only := func(flag string, modes ...string) error {
		if !set(flag) || slices.Contains(modes, c.Mode) {
			return nil
		}
		return fmt.Errorf("--%s applies to --mode %s, not to --mode %s", flag, strings.Join(modes, " or "), c.Mode)
	}
	for _, f := range []struct {
		flag  string
		modes []string
	}{
		{"prepage", []string{"postcopy", "hybrid"}},
		{"sample-before", []string{"postcopy"}},
		{"link-timeout", []string{"postcopy", "hybrid"}},
		{"reconnect-window", []string{"postcopy", "hybrid"}},
		{"hybrid-rounds", []string{"hybrid"}},
		{"hybrid-after", []string{"hybrid"}},
		{"downtime-limit", []string{"precopy", "hybrid"}},
		{"auto-converge", []string{"precopy", "hybrid"}},
		{"force", []string{"precopy"}},
		{"delta", []string{"precopy", "hybrid"}},
		{"delta-cache", []string{"precopy", "hybrid"}},
	} {
		if err := only(f.flag, f.modes...); err != nil {
			return err
		}
	}
	if c.HybridRounds < 1 {
		return fmt.Errorf("--hybrid-rounds %d: want at least 1 pre-copy round before the switch", c.HybridRounds)
	}
	if c.SampleBefore < 0 {
		return fmt.Errorf("--sample-before %v: want a duration of 0 (the default) or more", c.SampleBefore)
	}
	if c.HybridAfter < 0 {
		return fmt.Errorf("--hybrid-after %v: want a duration of 0 (no time bound) or more", c.HybridAfter)
	}
	if c.LinkTimeout <= 0 {
		return fmt.Errorf("--link-timeout %v: want a positive duration", c.LinkTimeout)
	}
	if c.ReconnectWindow < 0 {
		return fmt.Errorf("--reconnect-window %v: want a duration of 0 (do not redial) or more", c.ReconnectWindow)
	}
	if c.DowntimeLimit <= 0 {
		return fmt.Errorf("--downtime-limit %v: want a positive duration", c.DowntimeLimit)
	}
	if c.Streams < 0 || c.Streams > 64 {
		return fmt.Errorf("--streams %d: want 1..64 connections, or 0 to choose from the CPUs", c.Streams)
	}
	if c.Streams == 64 && c.Mode != migration.ModePrecopy && c.FaultChannel {
		return fmt.Errorf("--streams 64: the fault channel of --mode %s is a connection too: want 1..63, or --no-fault-channel", c.Mode)
	}
	if c.Timeout < 0 {
		return fmt.Errorf("--timeout %v: want a duration of 0 (no limit) or more", c.Timeout)
	}
	if c.DeltaCache < 4096 {
		return fmt.Errorf("--delta-cache %d bytes: want one page (4K) at least", c.DeltaCache)
	}
	if set("delta-cache") && !c.Delta {
		return fmt.Errorf("--delta-cache applies with --delta")
	}
	if set("compress-level") && (c.Compress == migration.CompressNone || c.Compress == migration.CompressS2) {
		return fmt.Errorf("--compress-level applies to --compress zstd or auto, not to --compress %s", c.Compress)
	}
	level := c.CompressLevel
	if c.Compress == migration.CompressS2 {
		level = ""
	}
	if err := migration.CheckCompress(c.Compress, level); err != nil {
		return fmt.Errorf("--compress %s --compress-level %s: %w", c.Compress, c.CompressLevel, err)
	}
	return nil
}

// setFlags returns the flags given on the command line, by name.
func setFlags(kctx *kong.Context) func(string) bool {
	set := map[string]bool{}
	if kctx != nil {
		for _, p := range kctx.Path {
			if p.Flag != nil && !p.Resolved {
				set[p.Flag.Name] = true
			}
		}
	}
	return func(name string) bool { return set[name] }
}

// Bandwidth is bytes per second.
type Bandwidth int64

func (b *Bandwidth) UnmarshalText(t []byte) error {
	s := strings.ToLower(strings.TrimSpace(string(t)))
	bits := false
	for _, suf := range []string{"bit/s", "bps", "bit"} {
		if strings.HasSuffix(s, suf) {
			s, bits = strings.TrimSuffix(s, suf), true
			break
		}
	}
	s = strings.TrimSuffix(strings.TrimSuffix(s, "/s"), "b")
	mult := 1.0
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'k':
			mult, s = 1e3, s[:n-1]
		case 'm':
			mult, s = 1e6, s[:n-1]
		case 'g':
			mult, s = 1e9, s[:n-1]
		}
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f < 0 {
		return fmt.Errorf("bandwidth %q: want bytes/s such as 125M or bits/s such as 1gbit", string(t))
	}
	if bits {
		f /= 8
	}
	*b = Bandwidth(f * mult)
	return nil
}

func (c *MigrateCmd) Run(g *Globals, ctx context.Context, kctx *kong.Context) error {
	to := c.To
	if dst, ok := strings.CutPrefix(c.To, "agent:"); ok {
		// The agent starts the destination VM there and has the VM migrate to it over the
		// agents' mutual TLS; the flags are checked as for any migration between hosts.
		if g.Agent == "" {
			return errors.New("--to agent:HOST:PORT is a migration from agent to agent: give --agent SOCK (this VM's agent)")
		}
		if c.TLSFlags.given() {
			return errors.New("--to agent:HOST:PORT takes the agents' TLS: leave out the --tls-* flags")
		}
		c.To = "tcp:" + dst
	}
	if err := c.validate(setFlags(kctx)); err != nil {
		return err
	}
	c.To = to
	req := MigrateRequest{To: c.To, Resume: c.Resume}
	req.TLSCA, req.TLSCert, req.TLSKey, req.TLSPeers = c.TLSCA, c.TLSCert, c.TLSKey, c.TLSPeers
	if !c.Resume {
		req.DowntimeLimitMS = c.DowntimeLimit.Milliseconds()
		req.MaxBandwidth = int64(c.MaxBandwidth)
		req.AutoConverge, req.Force = c.AutoConverge, c.Force
		req.TimeoutMS = c.Timeout.Milliseconds()
		req.Mode = c.Mode
		req.Streams = c.Streams
		switch c.Compress {
		case migration.CompressNone:
		case migration.CompressS2:
			req.Compress = c.Compress
		default:
			req.Compress, req.CompressLevel = c.Compress, c.CompressLevel
		}
		req.IgnoreFreePages = c.FreePages == "off"
		if c.Delta {
			req.Delta, req.DeltaCacheBytes = true, uint64(c.DeltaCache)
		}
		req.Dedup = c.Dedup
		req.Flatten = c.Flatten
		if c.Mode == migration.ModePostcopy || c.Mode == migration.ModeHybrid {
			req.Prepage = c.Prepage
			req.SampleBeforeMS = c.SampleBefore.Milliseconds()
			req.LinkTimeoutMS = c.LinkTimeout.Milliseconds()
			req.ReconnectWindowMS = c.ReconnectWindow.Milliseconds()
			req.NoFaultChannel = !c.FaultChannel
		}
		if c.Mode == migration.ModeHybrid {
			req.HybridRounds = c.HybridRounds
			req.HybridAfterMS = c.HybridAfter.Milliseconds()
		}
	}
	if c.Gang != "" {
		return c.runGang(g, ctx, req)
	}
	cl, err := c.client(g)
	if err != nil {
		return err
	}
	tty := !g.JSON && isTerminal(os.Stdout)
	// Interrupting asks the VM process to cancel, then waits for its final report: the stream
	// itself is not cut, so the report of the cancelled migration still arrives. After a switch
	// to post-copy the VM process refuses (the VM runs at the destination now and needs this
	// host's memory until the end): then this command detaches and the migration goes on.
	sctx, detach := context.WithCancel(context.Background())
	defer detach()
	detached := make(chan error, 1)
	go func() {
		select {
		case <-ctx.Done():
		case <-sctx.Done():
			return
		}
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := cl.Call(cctx, http.MethodDelete, "/v1/migrate", nil, nil); err != nil {
			detached <- err
			detach()
		}
	}()
	var rep migration.Report
	err = cl.Stream(sctx, http.MethodPost, "/v1/migrate", req, func(raw json.RawMessage) {
		if !tty {
			return
		}
		var p migration.Progress
		if json.Unmarshal(raw, &p) == nil {
			fmt.Printf("\r\033[K%s", progressLine(p))
		}
	}, &rep)
	if tty {
		fmt.Print("\r\033[K")
	}
	select {
	case derr := <-detached:
		msg := fmt.Sprintf("not cancelled: %v; the migration goes on in the VM process (follow it with 'godwit stats --control %s')", derr, c.Control)
		if g.JSON {
			printJSON(map[string]string{"result": "detached", "error": msg})
		} else {
			fmt.Fprintf(os.Stderr, "godwit: %s\n", msg)
		}
		return exitError{1}
	default:
	}
	if rep.Result == "" {
		rep.Result = "failed"
		if err != nil {
			rep.Error = err.Error()
		}
	}
	if g.JSON {
		printJSON(rep)
	} else {
		printReport(rep)
	}
	if err != nil || rep.Result != "ok" {
		if g.JSON {
			return exitError{1}
		}
		if err != nil {
			return err
		}
		return exitError{1}
	}
	return nil
}

func progressLine(p migration.Progress) string {
	if p.Stage != migration.StageLive || p.PagesPushed+p.PagesDemanded > 0 {
		s := fmt.Sprintf("post-copy  %s sent  pushed %d  demanded %d pages (%d requested)  remaining %d pages",
			formatBytes(uint64(p.BytesWire)), p.PagesPushed, p.PagesDemanded, p.Requested, p.PagesRemaining)
		if p.Reconnects > 0 {
			s += fmt.Sprintf("  reconnects %d", p.Reconnects)
		}
		return s + fmt.Sprintf("  (%s)", p.Phase)
	}
	return fmt.Sprintf("round %d  %s sent  dirty %.0f pages/s  remaining %d pages  expected downtime %v  throttle %d%%  (%s)",
		p.Round, formatBytes(uint64(p.BytesWire)), p.DirtyRate, p.PagesRemaining, p.ExpectedDowntime.Round(100*time.Microsecond), p.Throttle, p.Phase)
}

func printReport(r migration.Report) {
	fmt.Printf("result       %s", r.Result)
	if r.Error != "" {
		fmt.Printf(" (%s)", r.Error)
	}
	fmt.Println()
	if r.Mode == "" {
		return
	}
	fmt.Printf("godwit       %s\n", versionLine())
	switch h := r.Handover; {
	case h != nil && h.SharedMemory != "":
		fmt.Printf("mode         shared memory: %s of memory in memory file %s, which both hosts map; no page copied", formatBytes(h.Bytes), h.SharedMemory)
		if h.MappedMS > 0 {
			fmt.Printf("; mapped by the destination %.2f ms after the start, the VM paused only then", h.MappedMS)
		}
	case h != nil:
		fmt.Printf("mode         handover: %s of memory in %d file(s) handed over, no page copied", formatBytes(h.Bytes), h.Files)
		if h.MappedMS > 0 {
			fmt.Printf("; mapped by the destination %.2f ms after the start, the VM paused only then", h.MappedMS)
		}
	case r.Mode == migration.ModePostcopy:
		fmt.Printf("mode         %s, %d rounds", r.Mode, r.Rounds)
	default:
		fmt.Printf("mode         %s, %d rounds, converged %v", r.Mode, r.Rounds, r.Converged)
		if r.Reason != "" {
			fmt.Printf(" (%s)", r.Reason)
		}
	}
	fmt.Println()
	fmt.Printf("total        %.1f ms\n", r.TotalMS)
	d := r.Downtime
	fmt.Printf("downtime     %.2f ms = final round %.2f + state %.2f + delivery %.2f", r.DowntimeMS, d.FinalRoundMS, d.StateMS, d.DeliveryMS)
	if r.Postcopy != nil {
		fmt.Printf(" + post-copy arm %.2f", d.ArmMS)
	}
	// Not a part: it also counts Resumed's way back, after the destination already ran.
	fmt.Printf(" + restore %.2f + start %.2f (acknowledged %.2f ms after the pause)\n", d.RestoreMS, d.StartMS, r.PauseToAckMS)
	for _, s := range r.DowntimeScaling {
		if s != "none" {
			fmt.Printf("             grows with memory size: %s\n", s)
		}
	}
	if r.BlackoutMS != nil {
		fmt.Printf("blackout     %.2f ms (largest gap in guest heartbeats)\n", *r.BlackoutMS)
	}
	mbps := 0.0
	if r.TotalMS > 0 {
		mbps = float64(r.BytesWire) * 8 / (r.TotalMS / 1000) / 1e6
	}
	fmt.Printf("wire         %s (%.0f Mbit/s over the total time)\n", formatBytes(uint64(r.BytesWire)), mbps)
	fmt.Printf("pages        raw %d, zero %d, holes skipped %d", r.Pages.Raw, r.Pages.Zero, r.Pages.Hole)
	if r.Pages.Free > 0 {
		fmt.Printf(", free skipped %d", r.Pages.Free)
	}
	if r.Pages.Base > 0 {
		fmt.Printf(", template's skipped %d", r.Pages.Base)
	}
	if r.Pages.Dedup > 0 {
		fmt.Printf(", dedup %d (%s saved)", r.Pages.Dedup, formatBytes(r.Saved.Dedup))
	}
	if r.Pages.Delta > 0 {
		fmt.Printf(", delta %d (%s saved)", r.Pages.Delta, formatBytes(r.Saved.Delta))
	}
	if r.Pages.Compressed > 0 {
		fmt.Printf(", compressed %d (%s saved)", r.Pages.Compressed, formatBytes(r.Saved.Compressed))
	}
	fmt.Println()
	if r.Compression != "" {
		fmt.Printf("encoding     %s\n", r.Compression)
	}
	if r.Delta != "" {
		fmt.Printf("delta        %s\n", r.Delta)
	}
	if r.Dedup != "" {
		fmt.Printf("dedup        %s\n", r.Dedup)
	}
	if r.FreePages != "" {
		fmt.Printf("free pages   %s", r.FreePages)
		if r.FreePagesReported > 0 {
			fmt.Printf(" (%d reported)", r.FreePagesReported)
		}
		fmt.Println()
	}
	if r.DirtyTracking != "" {
		fmt.Printf("dirty log    %s\n", r.DirtyTracking)
	}
	if r.StreamsChosen != "" && len(r.Streams) == 0 {
		fmt.Printf("streams      %s\n", r.StreamsChosen)
	}
	if len(r.Streams) > 0 {
		how := fmt.Sprintf("%d connections", len(r.Streams))
		if r.StreamsChosen != "" {
			how = r.StreamsChosen
		}
		fmt.Printf("streams      %s:", how)
		for _, st := range r.Streams {
			fmt.Printf(" #%d %s in %.0f ms busy", st.Index, formatBytes(uint64(st.Bytes)), st.BusyMS)
			if st.Index < len(r.Streams)-1 {
				fmt.Print(",")
			}
		}
		fmt.Println()
	}
	if r.ThrottleMax > 0 {
		fmt.Printf("throttle     up to %d%%\n", r.ThrottleMax)
	}
	if pc := r.Postcopy; pc != nil {
		fmt.Print(postcopyLines(pc))
	}
	for _, w := range r.Warnings {
		fmt.Printf("warning      %s\n", w)
	}
}

// postcopyLines are printReport's lines for the post-copy phase.
func postcopyLines(pc *migration.PostcopyReport) string {
	var b strings.Builder
	fmt.Fprintf(&b, "post-copy    prepage %s, switched after %d pre-copy rounds", pc.Prepage, pc.SwitchedAfter)
	if pc.SwitchReason != "" {
		fmt.Fprintf(&b, " (%s)", pc.SwitchReason)
	}
	fmt.Fprintf(&b, "; %.1f ms until every page was at the destination\n", pc.PostcopyMS)
	fmt.Fprintf(&b, "  pages      %d missing at the switch: %d pushed, %d demanded\n", pc.MissingAtStart, pc.PagesPushed, pc.PagesDemanded)
	if pc.AheadPages > 0 {
		fmt.Fprintf(&b, "  set        %d of them sent ahead of the pause, %d added in the stop window\n", pc.AheadPages, pc.MissingAtStart-min(pc.AheadPages, pc.MissingAtStart))
	}
	fmt.Fprintf(&b, "  faults     %d demand faults, service latency p50 %.0f us, p99 %.0f us, max %.0f us\n",
		pc.DemandFaults, pc.FaultLatencyP50US, pc.FaultLatencyP99US, pc.FaultLatencyMaxUS)
	fmt.Fprintf(&b, "  progress   %.0f heartbeats/s before the switch, %.0f during post-copy, %.0f after\n",
		pc.ProgressBefore, pc.ProgressDuring, pc.ProgressAfter)
	if pc.Reconnects > 0 {
		fmt.Fprintf(&b, "  reconnects %d (the link broke and was recovered)\n", pc.Reconnects)
	}
	if pc.MigrationID != "" {
		fmt.Fprintf(&b, "  id         %s\n", pc.MigrationID)
	}
	return b.String()
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
