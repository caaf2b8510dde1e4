package kvmhost

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ErrNotFound wraps a command that does not exist on the host (and so not in the VM either).
var ErrNotFound = errors.New("command not found")

// ErrTimeout wraps a run stopped by Config.Timeout.
var ErrTimeout = errors.New("timed out")

// qemuArgs builds QEMU's command line for one run.
func qemuArgs(cfg Config, img *Image, runDir string) []string {
	cmdline := []string{
		"console=ttyS0",
		"quiet",      // warnings and worse still reach the console log, which nobody reads unless asked
		"panic=-1",   // reboot at once on panic, which -no-reboot turns into QEMU exiting
		"oops=panic", // an oops inside the VM would otherwise leave a half-dead host
		// On a busy host the emulated timer interrupt can miss the kernel's boot-time check,
		// which then panics ("IO-APIC + timer doesn't work!"); the timer is fine.
		"no_timer_check",
		// TCG's TSC follows the host clock and is stable; without this the clocksource
		// watchdog may, under load, switch to the HPET, whose every read is an emulated MMIO.
		"tsc=reliable",
		"kvmhost.dir=" + runDir,
	}
	if cfg.Verbose {
		cmdline = append(cmdline, "kvmhost.verbose=1")
	}
	cmdline = append(cmdline, cfg.KernelArgs...)
	security := "passthrough"
	if os.Geteuid() != 0 {
		// passthrough stores the guest's ownership with real chown calls, which only root may
		// make; "none" creates files as the invoking user instead.
		security = "none"
	}
	return []string{
		"-nodefaults", "-no-user-config", "-display", "none",
		// q35, not microvm: this kernel cannot find virtio-mmio devices without
		// VIRTIO_MMIO_CMDLINE_DEVICES, and virtio-pci is what the 9p device needs.
		"-machine", "q35",
		"-accel", "tcg,thread=" + cfg.TCGThread,
		// "max" includes SVM, which kvm_amd needs, and nested paging (npt), with which nested
		// guests avoid shadow page tables.
		"-cpu", "max",
		"-smp", strconv.Itoa(cfg.CPUs),
		"-m", strconv.Itoa(cfg.MemMiB) + "M",
		"-kernel", img.Kernel,
		"-initrd", img.Initrd,
		"-append", strings.Join(cmdline, " "),
		"-no-reboot",
		// A guest that resets (a triple fault, which leaves nothing on the console) is
		// otherwise indistinguishable from a clean power-off: log resets and the guest errors
		// QEMU notices, with the CPU state, for the failure report.
		"-d", "cpu_reset,guest_errors", "-D", filepath.Join(runDir, "qemu.log"),
		// The console goes to a file of its own; the command's output never passes through it.
		"-chardev", "file,id=con,path=" + filepath.Join(runDir, "console.log"),
		"-serial", "chardev:con",
		// multidevs=remap keeps inode numbers unique across the host's several filesystems
		// (the export crosses mount points), so st_dev/st_ino comparisons stay meaningful.
		"-virtfs", "local,path=/,mount_tag=hostroot,security_model=" + security + ",multidevs=remap",
	}
}

// runVM runs argv, whose argv[0] is an absolute path, in a VM booted from img.
func runVM(ctx context.Context, cfg Config, img *Image, argv []string) (Result, error) {
	res := Result{InVM: true, Kernel: img.Package}
	qemu, err := findQEMU(ctx, cfg)
	if err != nil {
		return res, &Error{Step: "finding QEMU", Err: err}
	}
	runDir, err := makeRunDir()
	if err != nil {
		return res, &Error{Step: "creating the run directory", Err: err}
	}
	keep := cfg.KeepRunDir
	defer func() {
		if !keep {
			os.RemoveAll(runDir)
		}
	}()
	script, err := runScript(cfg.Dir, cfg.Env, argv, cfg.HostTmpDir)
	if err != nil {
		return res, &Error{Step: "writing the run script", Err: err}
	}
	for name, data := range map[string]string{"run.sh": script, "stdout": "", "stderr": ""} {
		if err := os.WriteFile(filepath.Join(runDir, name), []byte(data), 0o644); err != nil {
			return res, &Error{Step: "writing the run directory", Err: err}
		}
	}

	if cfg.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, cfg.Timeout, fmt.Errorf("%w after %v", ErrTimeout, cfg.Timeout))
		defer cancel()
	}

	var qemuErr bytes.Buffer
	qemuErrW := io.Writer(&limitedBuffer{b: &qemuErr, max: 16 << 10})
	if cfg.Console != nil {
		qemuErrW = io.MultiWriter(qemuErrW, cfg.Console)
	}
	cmd := exec.Command(qemu, qemuArgs(cfg, img, runDir)...)
	cmd.Stdout, cmd.Stderr = qemuErrW, qemuErrW
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group: a terminal's Ctrl-C reaches only us, and we stop the VM.
		Setpgid: true,
		// If we die without cleaning up, so does the VM.
		Pdeathsig: syscall.SIGKILL,
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return res, &Error{Step: "starting QEMU (" + qemu + ")", Err: err}
	}
	waitc := make(chan error, 1)
	go func() { waitc <- cmd.Wait() }()

	// Stream the output files while the VM runs.
	done := make(chan struct{})
	var wg sync.WaitGroup
	follow := func(name string, w io.Writer) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			followFile(filepath.Join(runDir, name), w, done)
		}()
	}
	follow("stdout", cfg.Stdout)
	follow("stderr", cfg.Stderr)
	if cfg.Console != nil {
		follow("console.log", cfg.Console)
	}

	startedPath := filepath.Join(runDir, "started")
	bootTimer := time.NewTimer(cfg.BootTimeout)
	defer bootTimer.Stop()
	var failure *Error
	var waitErr error
wait:
	for {
		select {
		case waitErr = <-waitc:
			break wait
		case <-ctx.Done():
			failure = &Error{Step: "stopped the VM", Err: context.Cause(ctx)}
		case <-bootTimer.C:
			if _, err := os.Stat(startedPath); err != nil {
				failure = &Error{Step: fmt.Sprintf("the VM did not start the command within %v", cfg.BootTimeout)}
			}
		}
		if failure != nil {
			cmd.Process.Kill()
			waitErr = <-waitc
			break
		}
	}
	res.Total = time.Since(start)
	close(done)
	wg.Wait()

	if st, err := os.Stat(startedPath); err == nil {
		res.BootToCommand = st.ModTime().Sub(start)
	}
	fillErr := func(e *Error) *Error {
		e.Console = consoleTail(filepath.Join(runDir, "console.log"), 30)
		e.QEMU = qemuErr.String()
		if log := consoleTail(filepath.Join(runDir, "qemu.log"), 40); len(log) > 0 {
			e.QEMU += "\nqemu.log (resets, guest errors):\n" + strings.Join(log, "\n")
		}
		if cfg.KeepRunDir {
			e.RunDir = runDir
		}
		return e
	}
	if failure != nil {
		return res, fillErr(failure)
	}
	code, ok, err := readStatus(filepath.Join(runDir, "status"))
	if err != nil {
		return res, fillErr(&Error{Step: "reading the exit status", Err: err})
	}
	if !ok {
		step := "the VM ended without reporting the command's exit status"
		if _, err := os.Stat(startedPath); err != nil {
			step = "the VM ended before starting the command"
		}
		if waitErr != nil {
			step += " (QEMU: " + waitErr.Error() + ")"
		}
		if log, _ := os.ReadFile(filepath.Join(runDir, "qemu.log")); bytes.Contains(log, []byte("Triple fault")) {
			step += "; the guest kernel triple-faulted (CPU state in qemu.log below)"
		}
		for _, l := range consoleTail(filepath.Join(runDir, "console.log"), 200) {
			if i := strings.Index(l, "kvmhost-init: FAILED: "); i >= 0 {
				step += "; init failed to " + l[i+len("kvmhost-init: FAILED: "):]
			}
		}
		keep = true // worth a look
		e := fillErr(&Error{Step: step})
		e.RunDir = runDir
		return res, e
	}
	res.ExitCode = code
	return res, nil
}

// followFile copies what is appended to path to w until done is closed, then copies the rest.
// init writes the file through 9p, each write completing on the host before the guest's write
// returns, so everything the command wrote is in the file once QEMU has exited.
func followFile(path string, w io.Writer, done <-chan struct{}) {
	// QEMU creates the console log itself, shortly after starting.
	var f *os.File
	for {
		var err error
		if f, err = os.Open(path); err == nil {
			break
		}
		select {
		case <-done:
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
	defer f.Close()
	buf := make([]byte, 256<<10)
	wait := time.Millisecond
	for {
		finished := false
		select {
		case <-done:
			finished = true
		default:
		}
		got := false
		for {
			n, err := f.Read(buf)
			if n > 0 {
				got = true
				// Write errors (a closed pipe) do not stop the reading: the command's output
				// must not back up into the VM.
				w.Write(buf[:n])
			}
			if err != nil {
				break
			}
		}
		if finished {
			return
		}
		// Poll quickly while output flows, back off to 20 ms when idle.
		if got {
			wait = time.Millisecond
		} else if wait < 20*time.Millisecond {
			wait *= 2
		}
		select {
		case <-done:
		case <-time.After(wait):
		}
	}
}

// limitedBuffer keeps the first max bytes written to it and drops the rest.
type limitedBuffer struct {
	mu  sync.Mutex
	b   *bytes.Buffer
	max int
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if room := l.max - l.b.Len(); room > 0 {
		l.b.Write(p[:min(room, len(p))])
	}
	return len(p), nil
}
