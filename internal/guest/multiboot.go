package guest

import (
	_ "embed"
	"fmt"
	"strconv"
	"strings"
)

// Multiboot is the same workload guest as Image, built for QEMU (src/mb.S, src/qemu.c, src/mb.ld:
// `sh src/build.sh -multiboot`): a flat multiboot (v1) image that `qemu-system-x86_64 -kernel`
// loads at EntryGPA. Its 32-bit entry, the only code that runs at CPL0, sets up the machine
// godwit's VMM sets up (GDT with DPL3 descriptors, identity page tables with the user bit, long
// mode) and irets to CPL3 with IOPL 3; the CPL3 code then writes the params page from the
// multiboot command line (MultibootCmdline) and runs the workload, which under QEMU reports
// through isa-debugcon (port 0xe9) and ends through isa-debug-exit (port 0xf4): see
// src/qemu.c for the lines it prints. One vCPU only.
//
//go:embed multiboot.bin
var Multiboot []byte

// Ports and exit statuses of the multiboot image under QEMU.
const (
	PortDebugcon  = 0xe9 // isa-debugcon: the guest's text, one line per event
	PortDebugExit = 0xf4 // isa-debug-exit: QEMU exits with status (value << 1) | 1

	// QEMU's exit status after the guest's clean exit, its panic, and an exit with a
	// non-zero status.
	MultibootExitOK     = 1
	MultibootExitPanic  = 3
	MultibootExitFailed = 5
)

// MultibootOptions are the settings of the multiboot image that godwit's VMM provides by other
// means.
type MultibootOptions struct {
	// TSCKHz is the guest's TSC frequency; required (QEMU gives the guest no way to learn it).
	TSCKHz uint64
	// HeartbeatUS is the least time between two heartbeat lines, in microseconds of guest
	// time; 0 prints one per unit of work. Lines are printed while the guest verifies or
	// sleeps too, so a gap longer than this means the vCPU did not run.
	HeartbeatUS uint64
	// VerifyMS is the time between the end of one verification pass and the start of the
	// next; 0 never verifies.
	VerifyMS uint64
	// ExitMS makes the guest verify and exit this long after it started; 0 never.
	ExitMS uint64
}

// DefaultMultibootOptions are a heartbeat line per millisecond at most and a verification
// every 3 seconds; TSCKHz must still be set.
func DefaultMultibootOptions() MultibootOptions {
	return MultibootOptions{HeartbeatUS: 1000, VerifyMS: 3000}
}

// MultibootCmdline is the command line (QEMU's -append) that runs cfg in the multiboot image.
// The image lays out its single slice from the memory size QEMU reports, exactly as Layout
// does for one vCPU; cfg.WSSPages 0 means the whole slice.
func MultibootCmdline(cfg Config, opts MultibootOptions) (string, error) {
	if err := cfg.Validate(); err != nil {
		return "", err
	}
	if opts.TSCKHz == 0 || opts.TSCKHz > maxTSCKHz {
		return "", fmt.Errorf("guest: multiboot image needs the TSC frequency: %d kHz, want 1..%d", opts.TSCKHz, uint64(maxTSCKHz))
	}
	// The image computes hb_us * tsc_khz / 1000 and ms * tsc_khz in 64 bits.
	const maxMS = 1 << 38
	if opts.HeartbeatUS > maxMS || opts.VerifyMS > maxMS || opts.ExitMS > maxMS {
		return "", fmt.Errorf("guest: multiboot heartbeat, verify or exit time too large")
	}
	kv := []struct {
		k string
		v uint64
	}{
		{"workload", cfg.Workload}, {"content", cfg.Content}, {"pattern", cfg.Pattern},
		{"seed", cfg.Seed}, {"rate", cfg.Rate}, {"batch", cfg.BatchPages}, {"wss", cfg.WSSPages},
		{"touch", cfg.TouchPermille}, {"idle_us", cfg.IdleIntervalUS}, {"hot", cfg.HotPermille},
		{"hot_prob", cfg.HotProbPermille}, {"pool", cfg.ImagePoolPages}, {"peak", cfg.PeakPermille},
		{"private", cfg.PrivatePermille}, {"near", cfg.NearPermille}, {"private_seed", cfg.PrivateSeed},
		{"tsc_khz", opts.TSCKHz}, {"vcpus", 1}, {"hb_us", opts.HeartbeatUS},
		{"verify_ms", opts.VerifyMS}, {"exit_ms", opts.ExitMS},
	}
	words := make([]string, len(kv))
	for i, f := range kv {
		words[i] = f.k + "=" + strconv.FormatUint(f.v, 10)
	}
	return strings.Join(words, " "), nil
}
