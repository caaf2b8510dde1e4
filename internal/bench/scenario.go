package bench

import (
	_ "embed"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/vmm"
)

// Systems a scenario runs on.
const (
	SystemGodwit = "godwit"
	SystemQEMU   = "qemu"
)

// Techniques.
const (
	Precopy  = "precopy"
	Postcopy = "postcopy"
	Hybrid   = "hybrid"
	// Handover moves the VM to another process on the same host without copying memory:
	// godwit's memfds over a Unix socket; QEMU's x-ignore-shared on a shared memory file.
	Handover = "handover"
	// SharedMemory moves a VM whose memory both hosts map from one file in shared memory:
	// godwit run --memory-file and migrate --shared-memory; QEMU x-ignore-shared.
	SharedMemory = "shared-memory"
)

// memoryShared reports whether the technique leaves guest memory where it is.
func memoryShared(technique string) bool { return technique == Handover || technique == SharedMemory }

// Where the destination runs.
const (
	HostsTwo  = "two"  // the other namespace host, over the testbed link
	HostsSame = "same" // the source's host, over a Unix socket
)

// Scenario is one migration set-up: a guest, a link and a technique with its options. Each
// scenario runs on every system, with the same guest, link and bandwidth cap.
type Scenario struct {
	Name string `json:"name"`

	MemBytes uint64  `json:"mem_bytes"`
	VCPUs    int     `json:"vcpus"`
	Workload string  `json:"workload"` // idle, dirty or churn
	Touch    float64 `json:"touch"`    // idle: fraction written once; churn: fraction allocated
	WSSBytes uint64  `json:"wss_bytes"`
	Rate     uint64  `json:"rate"` // dirty: page writes (churn: allocations) per second; 0 = as fast as the guest can
	Pattern  string  `json:"pattern"`
	HotSize  float64 `json:"hot_size"`
	HotProb  float64 `json:"hot_prob"`
	Content  string  `json:"content"`

	// LinkBps is the link's rate in bits per second (0: unshaped). CapBps is the migration
	// bandwidth cap in bits per second (0: none).
	LinkBps int64 `json:"link_bps"`
	CapBps  int64 `json:"cap_bps"`

	// WarmUp is the least time the guest runs on the source before the migration (the
	// suite's --warm-up wins if longer; 0: just that): a big working set written at a modest
	// rate needs time to fill. It also spaces QEMU's guest's self-verifications (see
	// qemuVerifyInterval), so a scenario whose migration outlasts 4 s sets one longer than its
	// migration.
	WarmUp time.Duration `json:"warm_up,omitempty"`

	// Hosts is where the destination runs: HostsTwo (default) or HostsSame (a Unix socket on
	// the source's host; the only choice for Handover).
	Hosts string `json:"hosts,omitempty"`

	Technique     string        `json:"technique"`
	Prepage       string        `json:"prepage,omitempty"`
	HybridRounds  int           `json:"hybrid_rounds,omitempty"`
	DowntimeLimit time.Duration `json:"downtime_limit"`
	AutoConverge  bool          `json:"auto_converge"`
	// Streams is the number of connections pre-copy pages take: godwit's --streams, QEMU's
	// multifd channels (1: neither), and the raw TCP baseline's connections. 0: each
	// system's default (godwit's engine chooses, QEMU takes one connection, raw TCP one).
	Streams int `json:"streams,omitempty"`
	// Compress is the page encoding: none, zstd (godwit --compress zstd; QEMU multifd with
	// multifd-compression zstd, over Streams channels, at least one), auto (godwit
	// --compress auto; QEMU as with zstd) or s2 (godwit --compress s2; QEMU as with zstd).
	Compress string `json:"compress,omitempty"`
	// FreePages is godwit's --free-pages: on (the default) or off. QEMU has no counterpart
	// for this guest (its free page hinting needs a virtio-balloon driver).
	FreePages string `json:"free_pages,omitempty"`
	// Delta is godwit's --delta (its default cache) and QEMU's XBZRLE with a cache of the
	// same size.
	Delta bool `json:"delta,omitempty"`
	// Dedup is godwit's --dedup. QEMU has no counterpart (it finds zero pages only).
	Dedup bool `json:"dedup,omitempty"`
	// TLS puts godwit's migration on mutual TLS (run --incoming and migrate with --tls-*,
	// certificates from a test CA made for the run). QEMU's run is skipped: its TLS
	// (tls-creds-x509) is not set up here.
	TLS bool `json:"tls,omitempty"`
	// Balloon is godwit's 'run --balloon' for a churn guest (a size or auto[:SHARE]; empty:
	// none). QEMU's guest has no balloon.
	Balloon string `json:"balloon,omitempty"`

	Suites []string `json:"suites"`
}

// Link describes the link as a short text: "1 Gbit/s", "unshaped", or "same host" (a Unix
// socket).
func (s Scenario) Link() string {
	if s.Hosts == HostsSame {
		return "same host"
	}
	return bitRate(s.LinkBps, "unshaped")
}

// Cap describes the bandwidth cap.
func (s Scenario) Cap() string { return bitRate(s.CapBps, "none") }

func bitRate(bps int64, zero string) string {
	switch {
	case bps == 0:
		return zero
	case bps%1_000_000_000 == 0:
		return fmt.Sprintf("%d Gbit/s", bps/1_000_000_000)
	case bps%1_000_000 == 0:
		return fmt.Sprintf("%d Mbit/s", bps/1_000_000)
	}
	return fmt.Sprintf("%d bit/s", bps)
}

// Guest describes the guest in one line.
func (s Scenario) Guest() string {
	g := fmt.Sprintf("%s, %d vCPU", sizeText(s.MemBytes), s.VCPUs)
	if s.Workload == "idle" {
		return g + fmt.Sprintf(", idle (%.0f%% touched, %s)", s.Touch*100, s.Content)
	}
	rate := "max rate"
	if s.Rate > 0 {
		rate = fmt.Sprintf("%d pages/s", s.Rate)
	}
	if s.Workload == "churn" {
		return g + fmt.Sprintf(", churn: %.0f%% allocated, the rest freed with stale content, %s, %s pages", s.Touch*100, strings.Replace(rate, "pages", "allocations", 1), s.Content)
	}
	return g + fmt.Sprintf(", writer: %s working set, %s, %s, %s pages", sizeText(s.WSSBytes), rate, s.Pattern, s.Content)
}

// Options describes the technique and its options in one line.
func (s Scenario) Options() string {
	if memoryShared(s.Technique) {
		o := "handover on one host (godwit: its memfds over a Unix socket; QEMU: x-ignore-shared with guest memory on a shared file in /dev/shm, over a Unix socket)"
		if s.Technique == SharedMemory {
			o = "shared memory (both hosts map one file in /dev/shm: godwit run --memory-file, migrate --shared-memory; QEMU: x-ignore-shared on a shared memory-backend-file)"
		}
		if s.WarmUp > 0 {
			o += fmt.Sprintf(", warm-up at least %v", s.WarmUp)
		}
		return o
	}
	o := s.Technique
	if s.Hosts == HostsSame {
		o += " on one host over a Unix socket"
	}
	if s.Technique != Postcopy {
		o += fmt.Sprintf(", downtime limit %v", s.DowntimeLimit)
		if s.AutoConverge {
			o += ", auto-converge"
		}
	}
	if s.Technique == Hybrid {
		o += fmt.Sprintf(", switch after %d rounds", s.HybridRounds)
	}
	if s.Technique != Precopy {
		o += ", prepage " + s.Prepage
	}
	o += ", cap " + s.Cap()
	if s.Streams > 1 {
		o += fmt.Sprintf(", %d streams (QEMU: multifd with %d channels; raw TCP: %d connections)", s.Streams, s.Streams, s.Streams)
	}
	switch s.Compress {
	case "zstd":
		o += ", zstd (QEMU: multifd-compression zstd)"
	case "auto":
		o += ", godwit --compress auto (QEMU: multifd-compression zstd, which has no auto)"
	case "s2":
		o += ", godwit --compress s2 (QEMU: multifd-compression zstd, which has no s2)"
	}
	if s.FreePages == "off" {
		o += ", godwit --free-pages off"
	}
	if s.Delta {
		o += ", godwit --delta (QEMU: xbzrle), 64 MiB cache"
	}
	if s.Dedup {
		o += ", godwit --dedup (QEMU: none)"
	}
	if s.TLS {
		o += ", mutual TLS (godwit only)"
	}
	if s.Balloon != "" {
		o += ", godwit balloon " + s.Balloon + " (QEMU: none)"
	}
	if s.WarmUp > 0 {
		o += fmt.Sprintf(", warm-up at least %v", s.WarmUp)
	}
	return o
}

func sizeText(n uint64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d KiB", n>>10)
}

// InSuite reports whether the scenario belongs to the suite.
func (s Scenario) InSuite(suite string) bool { return slices.Contains(s.Suites, suite) }

//go:embed scenarios.txt
var scenarioTable string

// Scenarios returns the built-in scenario table (scenarios.txt).
func Scenarios() ([]Scenario, error) { return ParseScenarios(scenarioTable) }

// Select returns the scenarios of suite whose names match re (nil: all of the suite).
func Select(all []Scenario, suite string, re *regexp.Regexp) []Scenario {
	var out []Scenario
	for _, s := range all {
		if s.InSuite(suite) && (re == nil || re.MatchString(s.Name)) {
			out = append(out, s)
		}
	}
	return out
}

// defaultScenario holds the settings a line does not give.
func defaultScenario() Scenario {
	return Scenario{
		MemBytes: 256 << 20, VCPUs: 1, Workload: "idle", Touch: 0.25, WSSBytes: 64 << 20,
		Pattern: "random", HotSize: 0.1, HotProb: 0.9, Content: "text",
		LinkBps: 1_000_000_000, Technique: Precopy, Prepage: "sequential", HybridRounds: 2,
		DowntimeLimit: 300 * time.Millisecond, AutoConverge: true, Suites: []string{"default"},
	}
}

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]*$`)

// ParseScenarios parses a scenario table: a scenario per line, its name then key=value
// settings; '#' starts a comment. Errors name the line.
func ParseScenarios(text string) ([]Scenario, error) {
	var out []Scenario
	seen := map[string]bool{}
	for i, line := range strings.Split(text, "\n") {
		if k := strings.IndexByte(line, '#'); k >= 0 {
			line = line[:k]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		s, err := parseScenario(f)
		if err != nil {
			return nil, fmt.Errorf("scenario table line %d: %w", i+1, err)
		}
		if seen[s.Name] {
			return nil, fmt.Errorf("scenario table line %d: scenario %q defined twice", i+1, s.Name)
		}
		seen[s.Name] = true
		out = append(out, s)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("scenario table: no scenarios")
	}
	return out, nil
}

func parseScenario(f []string) (Scenario, error) {
	s := defaultScenario()
	s.Name = f[0]
	if !nameRE.MatchString(s.Name) {
		return s, fmt.Errorf("scenario name %q: want lower-case letters, digits, '.', '_' and '-'", s.Name)
	}
	capText := "link"
	for _, kv := range f[1:] {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || v == "" {
			return s, fmt.Errorf("%s: %q is not key=value", s.Name, kv)
		}
		var err error
		switch k {
		case "mem":
			s.MemBytes, err = parseSize(v)
		case "vcpus":
			s.VCPUs, err = strconv.Atoi(v)
			if err == nil && s.VCPUs < 1 {
				err = fmt.Errorf("want at least 1")
			}
		case "workload":
			s.Workload, err = oneOf(v, "idle", "dirty", "churn")
		case "touch":
			s.Touch, err = parseFraction(v)
		case "wss":
			s.WSSBytes, err = parseSize(v)
		case "rate":
			s.Rate, err = parseRate(v)
		case "pattern":
			s.Pattern, err = oneOf(v, "sequential", "random", "hotcold")
		case "hot-size":
			s.HotSize, err = parseFraction(v)
		case "hot-prob":
			s.HotProb, err = parseFraction(v)
		case "content":
			s.Content, err = oneOf(v, "zero", "text", "random", "image", "patch")
		case "link":
			if v == "unshaped" {
				s.LinkBps = 0
			} else {
				s.LinkBps, err = parseBits(v)
			}
		case "cap":
			capText = v
		case "technique":
			s.Technique, err = oneOf(v, Precopy, Postcopy, Hybrid, Handover, SharedMemory)
		case "hosts":
			s.Hosts, err = oneOf(v, HostsTwo, HostsSame)
		case "prepage":
			s.Prepage, err = oneOf(v, "sequential", "bubble", "hot", "none")
		case "hybrid-rounds":
			s.HybridRounds, err = strconv.Atoi(v)
			if err == nil && s.HybridRounds < 1 {
				err = fmt.Errorf("want at least 1")
			}
		case "downtime":
			s.DowntimeLimit, err = time.ParseDuration(v)
			if err == nil && s.DowntimeLimit <= 0 {
				err = fmt.Errorf("want a positive duration")
			}
		case "warm-up":
			s.WarmUp, err = time.ParseDuration(v)
			if err == nil && s.WarmUp <= 0 {
				err = fmt.Errorf("want a positive duration")
			}
		case "auto-converge":
			s.AutoConverge, err = strconv.ParseBool(v)
		case "streams":
			s.Streams, err = strconv.Atoi(v)
			if err == nil && (s.Streams < 1 || s.Streams > 64) {
				err = fmt.Errorf("want 1..64")
			}
		case "compress":
			s.Compress, err = oneOf(v, "none", "zstd", "s2", "auto")
		case "delta":
			s.Delta, err = strconv.ParseBool(v)
		case "dedup":
			s.Dedup, err = strconv.ParseBool(v)
		case "tls":
			s.TLS, err = strconv.ParseBool(v)
		case "free-pages":
			s.FreePages, err = oneOf(v, "on", "off")
		case "balloon":
			s.Balloon = v
			_, err = vmm.ParseBalloon(v, parseSize)
		case "suites":
			s.Suites = strings.Split(v, ",")
			for _, x := range s.Suites {
				if _, err = oneOf(x, "default", "quick", "streams", "downtime", "compress", "freepages", "delta", "dedup", "handover", "tls"); err != nil {
					break
				}
			}
		default:
			return s, fmt.Errorf("%s: unknown setting %q", s.Name, k)
		}
		if err != nil {
			return s, fmt.Errorf("%s: %s=%s: %w", s.Name, k, v, err)
		}
	}
	switch capText {
	case "link":
		s.CapBps = s.LinkBps
	case "none":
		s.CapBps = 0
	default:
		var err error
		if s.CapBps, err = parseBits(capText); err != nil {
			return s, fmt.Errorf("%s: cap=%s: %w", s.Name, capText, err)
		}
	}
	if s.Workload == "dirty" && (s.WSSBytes < 4096 || s.WSSBytes > s.MemBytes/2) {
		return s, fmt.Errorf("%s: working set %d bytes: want a page to half of the memory", s.Name, s.WSSBytes)
	}
	if s.Delta && s.Technique == Postcopy {
		return s, fmt.Errorf("%s: delta=true: delta is for pre-copy rounds", s.Name)
	}
	if s.Balloon != "" && s.Workload != "churn" {
		return s, fmt.Errorf("%s: balloon=%s: only the churn workload has a balloon", s.Name, s.Balloon)
	}
	if (s.Compress == "zstd" || s.Compress == "s2" || s.Compress == "auto") && s.Technique != Precopy {
		return s, fmt.Errorf("%s: compress=%s: the QEMU baseline compresses with multifd, for pre-copy only", s.Name, s.Compress)
	}
	if s.Streams > 1 && s.Technique != Precopy {
		return s, fmt.Errorf("%s: streams=%d: the QEMU baseline has multifd for pre-copy only", s.Name, s.Streams)
	}
	if s.MemBytes < guest.MinMemory || s.MemBytes > guest.MaxMemory {
		return s, fmt.Errorf("%s: memory %d bytes: want %d MiB to %d GiB", s.Name, s.MemBytes, guest.MinMemory>>20, guest.MaxMemory>>30)
	}
	if s.TLS && s.Hosts == HostsSame {
		return s, fmt.Errorf("%s: tls=true secures a migration between hosts: hosts=same cannot be", s.Name)
	}
	if memoryShared(s.Technique) && (s.Streams > 1 || s.Delta || s.Dedup || (s.Compress != "" && s.Compress != "none")) {
		return s, fmt.Errorf("%s: technique=%s copies no pages: streams, compress, delta and dedup do not apply", s.Name, s.Technique)
	}
	if s.Technique == Handover {
		if s.Hosts == HostsTwo {
			return s, fmt.Errorf("%s: technique=handover hands memory to a process on the same host: hosts=two cannot be", s.Name)
		}
		s.Hosts = HostsSame
	}
	if s.Hosts == HostsSame {
		s.CapBps, s.LinkBps = 0, 0 // no link between the two: a Unix socket
	}
	if s.Hosts == "" {
		s.Hosts = HostsTwo
	}
	return s, nil
}

func oneOf(v string, allowed ...string) (string, error) {
	if slices.Contains(allowed, v) {
		return v, nil
	}
	return "", fmt.Errorf("want one of %s", strings.Join(allowed, ", "))
}

func parseFraction(v string) (float64, error) {
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || f < 0 || f > 1 {
		return 0, fmt.Errorf("want a fraction between 0 and 1")
	}
	return f, nil
}

// parseSize reads 256M, 1G, 64K or a plain number of bytes.
func parseSize(v string) (uint64, error) {
	mult := uint64(1)
	switch {
	case strings.HasSuffix(v, "K"):
		mult, v = 1<<10, strings.TrimSuffix(v, "K")
	case strings.HasSuffix(v, "M"):
		mult, v = 1<<20, strings.TrimSuffix(v, "M")
	case strings.HasSuffix(v, "G"):
		mult, v = 1<<30, strings.TrimSuffix(v, "G")
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("want a size such as 256M or 1G")
	}
	return n * mult, nil
}

// parseRate reads max or pages per second (20000, 20k).
func parseRate(v string) (uint64, error) {
	if v == "max" {
		return 0, nil
	}
	mult := uint64(1)
	if strings.HasSuffix(v, "k") {
		mult, v = 1000, strings.TrimSuffix(v, "k")
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("want max or pages per second such as 20k")
	}
	return n * mult, nil
}

// parseBits reads a rate in bits per second: 1gbit, 500mbit, 100kbit.
func parseBits(v string) (int64, error) {
	t := strings.TrimSuffix(strings.ToLower(v), "bit")
	mult := int64(1)
	switch {
	case strings.HasSuffix(t, "g"):
		mult, t = 1_000_000_000, strings.TrimSuffix(t, "g")
	case strings.HasSuffix(t, "m"):
		mult, t = 1_000_000, strings.TrimSuffix(t, "m")
	case strings.HasSuffix(t, "k"):
		mult, t = 1_000, strings.TrimSuffix(t, "k")
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n <= 0 || !strings.HasSuffix(strings.ToLower(v), "bit") {
		return 0, fmt.Errorf("want a rate in bits per second such as 1gbit or 500mbit")
	}
	return n * mult, nil
}
