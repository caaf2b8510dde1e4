// Package kvmhost runs a command inside a QEMU TCG virtual machine that has /dev/kvm, with the
// same filesystem view as the calling host.
//
// The machines godwit is developed and tested on have no usable /dev/kvm of their own, but QEMU's
// TCG emulates AMD SVM with nested paging, so a Debian kernel booted under TCG can load kvm_amd
// and become a (slow, but complete) KVM host. kvmhost boots such a VM and runs one command in it:
//
//   - the host's root filesystem is exported read-write with 9p (virtio-9p-pci, mount tag
//     "hostroot") and the VM's init chroots into it after mounting its own /proc, /sys, /dev,
//     /dev/pts, /dev/shm, /run and /sys/fs/cgroup on top; the command runs in the caller's
//     working directory with the caller's environment, so paths, testdata and /tmp look the
//     same inside and out;
//   - the command's stdout and stderr are files in a per-run directory on the host, written
//     synchronously through 9p and streamed to the caller while the command runs, so the output
//     arrives byte for byte (no tty line discipline, no kernel messages: the serial console goes
//     to its own log file);
//   - the exit status comes back in a file of the same directory; a VM that ends without
//     writing it is an error carrying the console's last lines.
//
// The guest is a Debian kernel fetched with apt-get download (never installed on the host) and
// an initramfs of busybox-static, the needed modules and init.sh, cached by kernel version in
// [DefaultCacheDir]. Missing Debian packages are installed on first use.
//
// Inside the VM the command finds GODWIT_KVMHOST_GUEST=1 in its environment.
//
// # Costs and limits
//
// Boot to command takes about 3.5-5 s (the Debian kernel is booted as an uncompressed vmlinux
// through its PVH entry, which skips seconds of XZ decompression under TCG). Code in the VM is
// emulated: CPU-bound work runs 10-30 times slower than on the host, and starting a dynamically
// linked program from the shared root takes about 50 ms (every file access is a 9p round trip:
// the root is mounted with cache=mmap so that files the host changes are seen at once; booting
// with kvmhost.cache=loose in Config.KernelArgs trades that for speed). Nested KVM guests run at
// TCG speed too. Traffic between network namespaces inside reaches about 0.7-1 Gbit/s.
//
// The command's stdin is /dev/null. Unix sockets cannot be bound on the shared root, which is
// why TMPDIR defaults to a tmpfs in the VM (Config.HostTmpDir). Signals sent to the caller are
// not forwarded: cancelling the context stops the whole VM. With a host thread per vCPU, TCG's
// cross-vCPU synchronization makes process creation and small I/O several times slower on a
// 2-core host than single-threaded TCG, which is therefore the default there
// (Config.TCGThread).
package kvmhost

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Mode chooses between running the command directly and in a VM.
type Mode string

const (
	// Auto runs the command directly when the host's /dev/kvm can be opened and passes
	// Config.DirectCheck, else in a VM.
	Auto Mode = "auto"
	// Always runs the command in a VM even when the host has /dev/kvm.
	Always Mode = "always"
	// Never runs the command directly (it then fails wherever it needs /dev/kvm).
	Never Mode = "never"
)

// GuestEnv is set to "1" in the command's environment inside the VM.
const GuestEnv = "GODWIT_KVMHOST_GUEST"

// VMTmpDir is the command's TMPDIR inside the VM unless Config.HostTmpDir is set: a directory on
// the VM's own /run tmpfs, so it uses guest RAM.
const VMTmpDir = "/run/kvmhost/tmp"

// HostTmpDirEnv carries the caller's TMPDIR (possibly empty) when the VM's TMPDIR replaced it.
const HostTmpDirEnv = "GODWIT_KVMHOST_HOST_TMPDIR"

// Config configures a run. The zero value is usable.
type Config struct {
	Mode Mode // default Auto
	// DirectCheck, in Auto mode, decides whether this host's /dev/kvm is good enough to run
	// the command directly: nil means it is whenever it can be opened. Callers pass a check
	// that runs the guests they will run (a host's KVM can start a vCPU and still kill the
	// guest that matters, as PVM did with port I/O at CPL3).
	DirectCheck func() error

	QEMU   string // qemu-system-x86_64 binary; default: from PATH, installed if missing
	MemMiB int    // guest RAM; default 6144 (nested guests use memfd RAM out of it)
	CPUs   int    // vCPUs; default: the host's CPU count
	// TCGThread is QEMU's TCG threading: "multi" runs each vCPU on a host thread of its own
	// (MTTCG), "single" runs all vCPUs round-robin on one. Default: "single" on hosts with
	// fewer than 4 CPUs, else "multi". On the 2-core machines this was measured on, MTTCG's
	// cross-vCPU synchronization cost more than its parallelism gained: process creation was
	// 4-10x slower, a KVM-heavy test suite took 223-242 s against 186 s, a compile-heavy one
	// 352 s against 143 s.
	TCGThread string
	CacheDir  string // default DefaultCacheDir()
	// KernelPackage is the Debian kernel package to boot, e.g. linux-image-6.1.0-56-amd64.
	// Default: the newest one already in the cache, else the newest apt knows.
	KernelPackage string
	ExtraModules  []string // more kernel modules to load after BaseModules
	KernelArgs    []string // more kernel command line arguments

	// Timeout bounds the whole run, boot included; 0 means none. BootTimeout bounds the time
	// until the command starts (default 3 minutes) so a VM stuck in boot fails with its console.
	Timeout     time.Duration
	BootTimeout time.Duration

	// HostTmpDir keeps the caller's TMPDIR for the command. By default TMPDIR is
	// VMTmpDir, a tmpfs inside the VM, because unix sockets cannot be bound on the 9p-shared
	// host root (bind fails with ENXIO) and temporary files are faster there; the caller's
	// TMPDIR is then passed as GODWIT_KVMHOST_HOST_TMPDIR. /tmp itself is always the host's.
	HostTmpDir bool

	Dir    string   // working directory of the command; default: the current one
	Env    []string // environment of the command; default os.Environ()
	Stdout io.Writer
	Stderr io.Writer // default os.Stdout and os.Stderr

	// Console, if set, receives the VM's serial console (kernel messages and init's progress)
	// as it is written. Verbose also makes init report each step with the guest's uptime.
	Console io.Writer
	Verbose bool
	// Logf receives progress messages (package installation, downloads, timings). Default: none.
	Logf func(format string, args ...any)
	// KeepRunDir leaves the per-run directory (run.sh, output, console.log) in place.
	KeepRunDir bool
}

func (c *Config) setDefaults() {
	if c.Mode == "" {
		c.Mode = Auto
	}
	if c.MemMiB == 0 {
		c.MemMiB = 6144
	}
	if c.CPUs == 0 {
		c.CPUs = runtime.NumCPU()
	}
	if c.TCGThread == "" {
		c.TCGThread = "multi"
		if runtime.NumCPU() < 4 {
			c.TCGThread = "single"
		}
	}
	if c.CacheDir == "" {
		c.CacheDir = DefaultCacheDir()
	}
	if c.BootTimeout == 0 {
		c.BootTimeout = 3 * time.Minute
	}
	if c.Env == nil {
		c.Env = os.Environ()
	}
	if c.Stdout == nil {
		c.Stdout = os.Stdout
	}
	if c.Stderr == nil {
		c.Stderr = os.Stderr
	}
	if c.Logf == nil {
		c.Logf = func(string, ...any) {}
	}
}

func (c *Config) logf(format string, args ...any) { c.Logf(format, args...) }

// HostHasKVM reports whether /dev/kvm on this host can be opened for use.
func HostHasKVM() bool { return openKVM() == nil }

func openKVM() error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return err
	}
	return f.Close()
}

// Route says whether a run with cfg boots a VM on this host, and why: the mode, the host's
// /dev/kvm, or the outcome of cfg.DirectCheck.
func Route(cfg Config) (vm bool, why string) {
	switch cfg.Mode {
	case Always:
		return true, "--nested always"
	case Never:
		return false, "--nested never"
	}
	if err := openKVM(); err != nil {
		return true, fmt.Sprintf("this host has no usable /dev/kvm (%v)", err)
	}
	if cfg.DirectCheck == nil {
		return false, "/dev/kvm opens here"
	}
	if err := cfg.DirectCheck(); err != nil {
		return true, fmt.Sprintf("/dev/kvm opens here but fails the direct check: %v", err)
	}
	return false, "/dev/kvm passes the direct check here"
}

// Result describes a finished run.
type Result struct {
	ExitCode int  // the command's exit status (128+N if it died of signal N)
	InVM     bool // the command ran in a VM
	Kernel   string
	// BootToCommand is the time from starting QEMU to the command starting in the VM.
	BootToCommand time.Duration
	Total         time.Duration // QEMU start to QEMU exit
}

// Error is a failure of the VM machinery (not of the command): the VM could not be started, did
// not reach the command, or ended without reporting an exit status.
type Error struct {
	Step    string   // what failed
	Err     error    // underlying error, if any
	Console []string // last lines of the VM's serial console
	QEMU    string   // QEMU's own stderr
	RunDir  string   // the run directory, if kept
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "kvmhost: %s", e.Step)
	if e.Err != nil {
		fmt.Fprintf(&b, ": %v", e.Err)
	}
	if q := strings.TrimSpace(e.QEMU); q != "" {
		fmt.Fprintf(&b, "\nQEMU said:\n%s", indent(q))
	}
	if len(e.Console) > 0 {
		fmt.Fprintf(&b, "\nlast lines of the VM console:\n%s", indent(strings.Join(e.Console, "\n")))
	}
	if e.RunDir != "" {
		fmt.Fprintf(&b, "\nrun directory kept: %s", e.RunDir)
	}
	return b.String()
}

func (e *Error) Unwrap() error { return e.Err }

func indent(s string) string { return "    " + strings.ReplaceAll(s, "\n", "\n    ") }

// Run runs argv with cfg and returns its exit status. The error is non-nil only when the command
// could not be run to completion (machinery failure, timeout, cancellation); a command exiting
// non-zero is not an error.
func Run(ctx context.Context, cfg Config, argv []string) (Result, error) {
	cfg.setDefaults()
	if len(argv) == 0 {
		return Result{}, errors.New("kvmhost: no command given")
	}
	if cfg.Dir == "" {
		wd, err := os.Getwd()
		if err != nil {
			return Result{}, fmt.Errorf("kvmhost: current directory: %w", err)
		}
		cfg.Dir = wd
	}
	if vm, _ := Route(cfg); !vm {
		return runDirect(ctx, cfg, argv)
	}
	// Before preparing, which may take minutes on a fresh machine.
	cmdPath, err := resolveCommand(argv, cfg.Dir, cfg.Env)
	if err != nil {
		return Result{}, fmt.Errorf("kvmhost: %w: %w", ErrNotFound, err)
	}
	argv = append([]string{cmdPath}, argv[1:]...)
	img, err := Prepare(ctx, cfg)
	if err != nil {
		return Result{}, &Error{Step: "preparing the VM image", Err: err}
	}
	return runVM(ctx, cfg, img, argv)
}

func runDirect(ctx context.Context, cfg Config, argv []string) (Result, error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir, cmd.Env, cmd.Stdin, cmd.Stdout, cmd.Stderr = cfg.Dir, cfg.Env, os.Stdin, cfg.Stdout, cfg.Stderr
	if cfg.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, cfg.Timeout, fmt.Errorf("%w after %v", ErrTimeout, cfg.Timeout))
		defer cancel()
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return Result{}, fmt.Errorf("kvmhost: starting %s: %w", argv[0], err)
	}
	stop := context.AfterFunc(ctx, func() { cmd.Process.Kill() })
	err := cmd.Wait()
	stop()
	res := Result{Total: time.Since(start), ExitCode: exitCode(cmd.ProcessState)}
	if ctx.Err() != nil {
		return res, fmt.Errorf("kvmhost: %s killed: %w", argv[0], context.Cause(ctx))
	}
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		return res, fmt.Errorf("kvmhost: running %s: %w", argv[0], err)
	}
	return res, nil
}

func exitCode(ps *os.ProcessState) int {
	if ps == nil {
		return -1
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ps.ExitCode()
}

// safePathRE is what a run directory path may contain: it travels on the kernel command line,
// which is split at spaces and has no quoting.
var safePathRE = regexp.MustCompile(`^[A-Za-z0-9/._+-]+$`)

func makeRunDir() (string, error) {
	base := os.TempDir()
	if !safePathRE.MatchString(base) {
		base = "/tmp"
	}
	return os.MkdirTemp(base, "kvmhost-")
}

// resolveCommand makes argv[0] an absolute path, looked up in the host's PATH like exec would
// (the VM sees the same files). Absolute paths also keep busybox's env from preferring one of
// its own applets over a host program of the same name.
func resolveCommand(argv []string, dir string, env []string) (string, error) {
	name := argv[0]
	if !strings.Contains(name, "/") {
		path := ""
		for _, kv := range env {
			if v, ok := strings.CutPrefix(kv, "PATH="); ok {
				path = v
			}
		}
		for _, d := range filepath.SplitList(path) {
			if d == "" {
				d = "."
			}
			p := filepath.Join(d, name)
			if !filepath.IsAbs(p) {
				p = filepath.Join(dir, p)
			}
			if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
				return p, nil
			}
		}
		return "", fmt.Errorf("%s: not found in PATH", name)
	}
	if !filepath.IsAbs(name) {
		name = filepath.Join(dir, name)
	}
	if _, err := os.Stat(name); err != nil {
		return "", err
	}
	return name, nil
}

// shellQuote quotes s for a POSIX shell: single quotes, with embedded ones closed and escaped.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// runScript is RUNDIR/run.sh, run by the VM's init chrooted into the host root with busybox sh:
// enter the working directory, then replace itself with the command under exactly the given
// environment (env -i).
func runScript(dir string, env []string, argv []string, hostTmp bool) (string, error) {
	if strings.Contains(argv[0], "=") {
		// env would take it for a variable assignment.
		return "", fmt.Errorf("command path %q contains '=', which env(1) cannot run", argv[0])
	}
	var b strings.Builder
	b.WriteString("# generated by kvmhost: run inside the VM, chrooted into the host root\n")
	fmt.Fprintf(&b, "cd %s || { echo \"kvmhost: cannot enter \"%s\" inside the VM\" >&2; exit 125; }\n",
		shellQuote(dir), shellQuote(dir))
	b.WriteString("exec /run/kvmhost/busybox env -i \\\n")
	var extra []string
	hostTmpDir := ""
	for _, kv := range env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" || k == GuestEnv || k == HostTmpDirEnv {
			continue
		}
		if k == "TMPDIR" {
			hostTmpDir = v
			if !hostTmp {
				continue
			}
		}
		fmt.Fprintf(&b, "\t%s \\\n", shellQuote(kv))
	}
	if !hostTmp {
		extra = append(extra, "TMPDIR="+VMTmpDir, HostTmpDirEnv+"="+hostTmpDir)
	}
	extra = append(extra, GuestEnv+"=1")
	for _, kv := range extra {
		fmt.Fprintf(&b, "\t%s \\\n", shellQuote(kv))
	}
	for i, a := range argv {
		sep := " \\\n"
		if i == len(argv)-1 {
			sep = "\n"
		}
		fmt.Fprintf(&b, "\t%s%s", shellQuote(a), sep)
	}
	return b.String(), nil
}

// consoleTail returns the last n lines of a console log, without the terminal control
// sequences SeaBIOS and the kernel emit.
func consoleTail(path string, n int) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(ansiRE.ReplaceAllString(sc.Text(), ""), "\r")
		if strings.TrimSpace(line) == "" {
			continue
		}
		lines = append(lines, line)
		if len(lines) > 4*n {
			lines = append(lines[:0], lines[len(lines)-n:]...)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return lines
}

var ansiRE = regexp.MustCompile(`\x1b\[[0-9;?]*[A-Za-z]|\x1bc`)

// readStatus parses RUNDIR/status, written by init after the command exits.
func readStatus(path string) (int, bool, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	code, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, false, fmt.Errorf("malformed exit status %q in %s", b, path)
	}
	return code, true, nil
}
