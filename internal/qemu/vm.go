package qemu

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
	"sync"
	"syscall"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/kvm"
)

// DefaultBinary is the QEMU the launcher runs unless Config.Binary says otherwise (Debian's
// qemu-system-x86 package).
const DefaultBinary = "qemu-system-x86_64"

// CPU is the -cpu model under KVM: the host's, without what this project's hosts cannot
// provide (plain "host" aborts here setting MSR 0x10a).
const CPU = "host,-arch-capabilities,-la57"

// MaxMemMiB is the largest guest the multiboot image supports: what godwit's guest supports.
// Its page tables join the RAM QEMU's pc machine puts above 4 GiB to the RAM below its PCI
// hole, so that the workload sees one contiguous slice as under godwit.
const MaxMemMiB = guest.MaxMemory >> 20

// Config describes one QEMU process running the built-in guest.
type Config struct {
	// Binary is the QEMU to run; empty means DefaultBinary from PATH.
	Binary string
	// Netns is the network namespace (a name under /run/netns) to run QEMU in, through
	// `ip netns exec`; empty runs it in this process's namespace.
	Netns string
	// MemMiB is the guest's memory; 0 means 256.
	MemMiB uint64
	// Guest is the workload and Options the multiboot image's own settings. Options.TSCKHz
	// 0 asks KVM (or, with TCG, measures the TSC).
	Guest   guest.Config
	Options guest.MultibootOptions
	// Incoming starts a migration destination: `-incoming defer`, the guest waits for
	// Migrate (or migrate-incoming).
	Incoming bool
	// TCG runs the guest under QEMU's emulation instead of KVM (-accel tcg -cpu max), for
	// machines without /dev/kvm. Migration figures from TCG are not KVM's.
	TCG bool
	// Dir holds the image copy and the QMP socket; empty makes a temporary directory that
	// Close removes. Unix sockets need a directory that allows them (not a 9p share).
	Dir string
	// Name names the VM in QEMU (-name) and in errors; empty means "godwit-guest".
	Name string
	// MemoryFile, when set, puts guest RAM in this file, mapped shared
	// (memory-backend-file,share=on): two QEMUs of one host that name the same file share the
	// memory, which a migration with MigrateConfig.IgnoreShared then does not copy.
	MemoryFile string
	// Args are extra QEMU arguments, appended.
	Args []string
	// Log, if set, receives QEMU's stderr and the guest's lines other than heartbeats, as
	// they arrive.
	Log io.Writer
}

// VM is a running QEMU process.
type VM struct {
	Name    string
	QMP     *Client
	Console *Console
	// Started is when the QEMU process was started; Argv its command line; Cmdline the
	// guest's (multiboot) command line; TSCKHz the TSC frequency the guest was given.
	Started time.Time
	Argv    []string
	Cmdline string
	TSCKHz  uint64

	cmd    *exec.Cmd
	dir    string
	ownDir bool
	stderr *tail

	done     chan struct{}
	waitErr  error
	exitCode int
	closing  sync.Once
}

// FindBinary returns the path of QEMU (name, or DefaultBinary if empty), or an error saying how
// to install it.
func FindBinary(name string) (string, error) {
	if name == "" {
		name = DefaultBinary
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("qemu: %s not found (on Debian: apt-get install qemu-system-x86): %w", name, err)
	}
	return p, nil
}

// HostTSCKHz is the TSC frequency KVM gives its guests (KVM_GET_TSC_KHZ on a scratch vCPU).
func HostTSCKHz() (uint64, error) {
	sys, err := kvm.Open("/dev/kvm")
	if err != nil {
		return 0, err
	}
	defer sys.Close()
	vm, err := sys.CreateVM()
	if err != nil {
		return 0, err
	}
	defer vm.Close()
	vcpu, err := vm.CreateVCPU(0)
	if err != nil {
		return 0, err
	}
	defer vcpu.Close()
	khz, err := vcpu.TSCKHz()
	if err != nil {
		return 0, err
	}
	if khz == 0 {
		return 0, errors.New("qemu: KVM reports a TSC frequency of 0")
	}
	return uint64(khz), nil
}

// MeasureTSCKHz measures this CPU's TSC against the monotonic clock over d: what a TCG guest's
// TSC runs at (QEMU's TCG reads the host's).
func MeasureTSCKHz(d time.Duration) uint64 {
	t0, c0 := time.Now(), rdtsc()
	time.Sleep(d)
	t1, c1 := time.Now(), rdtsc()
	return (c1 - c0) * 1000 / uint64(max(t1.Sub(t0).Microseconds(), 1))
}

// Start writes the multiboot image into the working directory and starts QEMU running it. It
// returns once the QMP connection is up; the guest may still be in the firmware (see
// VM.WaitBoot). ctx bounds the start only: the VM runs until Close, or until the guest exits.
func Start(ctx context.Context, cfg Config) (*VM, error) {
	bin, err := FindBinary(cfg.Binary)
	if err != nil {
		return nil, err
	}
	if cfg.MemMiB == 0 {
		cfg.MemMiB = 256
	}
	if cfg.MemMiB < guest.MinMemory>>20 || cfg.MemMiB > MaxMemMiB {
		return nil, fmt.Errorf("qemu: %d MiB of guest memory: want %d..%d", cfg.MemMiB, guest.MinMemory>>20, MaxMemMiB)
	}
	if cfg.Name == "" {
		cfg.Name = "godwit-guest"
	}
	opts := cfg.Options
	if opts.TSCKHz == 0 {
		if cfg.TCG {
			opts.TSCKHz = MeasureTSCKHz(100 * time.Millisecond)
		} else if opts.TSCKHz, err = HostTSCKHz(); err != nil {
			return nil, fmt.Errorf("qemu: the guest needs the TSC frequency: %w", err)
		}
	}
	cmdline, err := guest.MultibootCmdline(cfg.Guest, opts)
	if err != nil {
		return nil, err
	}

	v := &VM{Name: cfg.Name, Cmdline: cmdline, TSCKHz: opts.TSCKHz, dir: cfg.Dir, done: make(chan struct{}),
		stderr: &tail{max: 8 << 10}}
	if v.dir == "" {
		if v.dir, err = os.MkdirTemp("", "godwit-qemu-"); err != nil {
			return nil, fmt.Errorf("qemu: %w", err)
		}
		v.ownDir = true
	}
	fail := func(err error) (*VM, error) {
		v.Close()
		return nil, err
	}
	image := filepath.Join(v.dir, cfg.Name+".mb")
	if err := os.WriteFile(image, guest.Multiboot, 0o644); err != nil {
		return fail(fmt.Errorf("qemu: %w", err))
	}
	sock := filepath.Join(v.dir, cfg.Name+".qmp")
	os.Remove(sock)

	accel := []string{"-accel", "kvm", "-cpu", CPU}
	if cfg.TCG {
		accel = []string{"-accel", "tcg", "-cpu", "max"}
	}
	machine := "pc"
	if cfg.MemoryFile != "" {
		machine += ",memory-backend=ram0"
	}
	argv := []string{bin, "-name", "guest=" + cfg.Name, "-machine", machine}
	argv = append(argv, accel...)
	if cfg.MemoryFile != "" {
		argv = append(argv, "-object", fmt.Sprintf("memory-backend-file,id=ram0,size=%dM,mem-path=%s,share=on", cfg.MemMiB, cfg.MemoryFile))
	}
	argv = append(argv,
		"-m", strconv.FormatUint(cfg.MemMiB, 10), "-smp", "1",
		"-display", "none", "-nodefaults", "-no-user-config",
		"-kernel", image, "-append", cmdline,
		"-chardev", "stdio,id=dbg,signal=off",
		"-device", fmt.Sprintf("isa-debugcon,iobase=0x%x,chardev=dbg", guest.PortDebugcon),
		"-device", fmt.Sprintf("isa-debug-exit,iobase=0x%x,iosize=4", guest.PortDebugExit),
		"-qmp", "unix:"+sock+",server=on,wait=off")
	if cfg.Incoming {
		argv = append(argv, "-incoming", "defer")
	}
	argv = append(argv, cfg.Args...)
	if cfg.Netns != "" {
		argv = append([]string{"ip", "netns", "exec", cfg.Netns}, argv...)
	}
	v.Argv = argv

	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return fail(fmt.Errorf("qemu: %w", err))
	}
	if cfg.Log != nil {
		cmd.Stderr = io.MultiWriter(v.stderr, cfg.Log)
	} else {
		cmd.Stderr = v.stderr
	}
	v.Console = newConsole(cfg.Log)
	v.Started = time.Now()
	if err := cmd.Start(); err != nil {
		return fail(fmt.Errorf("qemu: starting %s: %w", argv[0], err))
	}
	v.cmd = cmd
	consoleDone := make(chan struct{})
	go func() {
		v.Console.read(stdout)
		close(consoleDone)
	}()
	go func() {
		<-consoleDone // Wait closes the pipe: read it to its end first
		err := cmd.Wait()
		v.exitCode = cmd.ProcessState.ExitCode()
		if err != nil {
			v.waitErr = fmt.Errorf("qemu %s: %w; stderr: %s", cfg.Name, err, bytes.TrimSpace(v.stderr.Bytes()))
		}
		close(v.done)
	}()

	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	go func() {
		select {
		case <-v.done:
			cancel()
		case <-dctx.Done():
		}
	}()
	if v.QMP, err = Dial(dctx, sock); err != nil {
		select {
		case <-v.done:
			err = fmt.Errorf("qemu %s exited at start (status %d): %s", cfg.Name, v.exitCode, bytes.TrimSpace(v.stderr.Bytes()))
		default:
		}
		return fail(err)
	}
	return v, nil
}

// WaitBoot waits until the guest's CPL3 code runs (its boot line) and returns how long that
// took from the QEMU process's start: mostly QEMU's firmware, which is emulated in a nested
// KVM host.
func (v *VM) WaitBoot(ctx context.Context) (time.Duration, error) {
	l, _, err := v.Console.Wait(ctx, 0, func(l Line) bool { return l.Kind == KindBoot || l.Kind == KindPanic })
	if err != nil {
		return 0, v.explain(fmt.Errorf("qemu %s: waiting for the guest to boot: %w", v.Name, err))
	}
	if l.Kind == KindPanic {
		return 0, fmt.Errorf("qemu %s: guest: %s", v.Name, l.Text)
	}
	return l.Time.Sub(v.Started), nil
}

// explain adds QEMU's exit status and stderr to err if QEMU has exited.
func (v *VM) explain(err error) error {
	select {
	case <-v.done:
		return fmt.Errorf("%w (QEMU exited with status %d: %s)", err, v.exitCode, bytes.TrimSpace(v.stderr.Bytes()))
	default:
		return err
	}
}

// Done is closed when QEMU has exited.
func (v *VM) Done() <-chan struct{} { return v.done }

// ExitCode is QEMU's exit status once Done is closed (see guest.MultibootExitOK and friends).
func (v *VM) ExitCode() int {
	<-v.done
	return v.exitCode
}

// Wait waits for QEMU to exit and returns nil if it exited with status 0, else the status and
// the end of its stderr. The guest's own clean exit is status guest.MultibootExitOK.
func (v *VM) Wait() error {
	<-v.done
	return v.waitErr
}

// Stderr is the end of what QEMU wrote to its stderr.
func (v *VM) Stderr() string { return string(v.stderr.Bytes()) }

// Close ends QEMU (QMP quit, then SIGKILL if it has not exited within 5 s) and removes the
// temporary directory.
func (v *VM) Close() error {
	v.closing.Do(func() {
		if v.cmd != nil {
			select {
			case <-v.done:
			default:
				if v.QMP != nil {
					ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
					v.QMP.Execute(ctx, "quit", nil, nil)
					cancel()
				}
				select {
				case <-v.done:
				case <-time.After(5 * time.Second):
					v.cmd.Process.Kill()
					<-v.done
				}
			}
		}
		if v.QMP != nil {
			v.QMP.Close()
		}
		if v.ownDir {
			os.RemoveAll(v.dir)
		}
	})
	return nil
}

// tail keeps the last max bytes written to it.
type tail struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append([]byte(nil), t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tail) Bytes() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]byte(nil), t.b...)
}
