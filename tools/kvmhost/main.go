// Command kvmhost runs a command on a host that has /dev/kvm: this one if its /dev/kvm runs
// godwit's real built-in guest (it boots one, waits for heartbeats and has it verify its
// memory), otherwise a QEMU TCG virtual machine that emulates one, sharing this host's
// filesystem (see package internal/testbed/kvmhost). It says on stderr which route it took and
// why.
//
//	kvmhost [flags] -- CMD [ARGS...]
//	go test -exec "$(go env GOPATH)/bin/kvmhost --" ./internal/vmm/...
//
// The command runs in the current directory with the current environment, its stdout and
// stderr arrive unchanged, and kvmhost exits with the command's exit status. Exit statuses of
// kvmhost itself: 125 when the VM machinery fails (with the reason and the VM console's last
// lines on stderr), 124 on --timeout, 127 when the command does not exist, 128+N when stopped by
// signal N.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/godwit-vm/godwit/internal/testbed/kvmhost"
	"github.com/godwit-vm/godwit/internal/vmm"
)

func main() {
	os.Exit(run())
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: kvmhost [flags] -- CMD [ARGS...]\n\n")
	flag.PrintDefaults()
}

func run() int {
	var (
		mem         = flag.String("mem", "6G", "guest RAM (M or G suffix; plain numbers are MiB)")
		cpus        = flag.Int("cpus", 0, "guest vCPUs (default: the host's CPU count)")
		tcgThread   = flag.String("tcg-thread", "", "QEMU TCG threading, single or multi (default: single below 4 host CPUs, else multi)")
		cacheDir    = flag.String("kernel-cache", kvmhost.DefaultCacheDir(), "directory for downloaded kernels and built initramfs images")
		kernelPkg   = flag.String("kernel-package", "", "Debian kernel package to boot, e.g. linux-image-6.1.0-56-amd64 (default: newest cached, else newest available)")
		modules     = flag.String("modules", "", "comma-separated extra kernel modules to load in the VM")
		kernelArgs  = flag.String("append", "", "extra kernel command line arguments (space-separated)")
		qemu        = flag.String("qemu", "", "qemu-system-x86_64 binary (default: from PATH, installed if missing)")
		nested      = flag.String("nested", "auto", "auto: use a VM only if godwit's built-in guest cannot run on /dev/kvm here; always; never")
		direct      = flag.Bool("direct", false, "run the command directly, never in a VM (same as --nested=never)")
		timeout     = flag.Duration("timeout", 0, "kill the VM after this long (0: no limit)")
		bootTimeout = flag.Duration("boot-timeout", 3*time.Minute, "fail if the command has not started in the VM after this long")
		verbose     = flag.Bool("verbose", false, "show preparation steps, the VM console and timings on stderr")
		hostTmp     = flag.Bool("host-tmpdir", false, "keep the caller's TMPDIR in the VM (default: a tmpfs in the VM, as unix sockets cannot be bound on the shared root)")
		keep        = flag.Bool("keep", false, "keep the run directory (run script, output, console log)")
		prepare     = flag.Bool("prepare", false, "only prepare (install packages, fetch the kernel, build the initramfs) and exit")
		selfTest    = flag.Bool("self-test", false, "check that KVM works where commands would run (runs --kvm-check there) and report its speed")
		kvmCheck    = flag.Bool("kvm-check", false, "run godwit's built-in guest on /dev/kvm here, then a tiny guest that measures KVM's speed")
		quiet       = flag.Bool("quiet", false, "do not say which route the command takes")
	)
	flag.Usage = usage
	flag.Parse()
	argv := flag.Args()
	if *kvmCheck {
		r, err := vmm.SelfCheck(context.Background(), "")
		if err != nil {
			fmt.Fprintf(os.Stderr, "kvmhost: KVM check failed: %v\n", err)
			return 1
		}
		fmt.Println(r)
		p, err := kvmhost.ProbeKVM(time.Second)
		if err != nil {
			fmt.Fprintf(os.Stderr, "kvmhost: KVM check failed: %v\n", err)
			return 1
		}
		fmt.Println(p)
		return 0
	}
	if *selfTest {
		self, err := os.Executable()
		if err != nil {
			fmt.Fprintf(os.Stderr, "kvmhost: %v\n", err)
			return 125
		}
		argv = []string{self, "--kvm-check"}
	}
	if len(argv) == 0 && !*prepare {
		usage()
		return 2
	}

	cfg := kvmhost.Config{
		Mode:          kvmhost.Mode(*nested),
		CPUs:          *cpus,
		TCGThread:     *tcgThread,
		CacheDir:      *cacheDir,
		KernelPackage: *kernelPkg,
		QEMU:          *qemu,
		Timeout:       *timeout,
		BootTimeout:   *bootTimeout,
		Verbose:       *verbose,
		KeepRunDir:    *keep,
		HostTmpDir:    *hostTmp,
		// Preparation can take a minute on a fresh machine; say what is happening.
		Logf: func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) },
	}
	switch cfg.Mode {
	case kvmhost.Auto, kvmhost.Always, kvmhost.Never:
	default:
		fmt.Fprintf(os.Stderr, "kvmhost: --nested must be auto, always or never, not %q\n", *nested)
		return 2
	}
	switch cfg.TCGThread {
	case "", "single", "multi":
	default:
		fmt.Fprintf(os.Stderr, "kvmhost: --tcg-thread must be single or multi, not %q\n", *tcgThread)
		return 2
	}
	if *direct {
		cfg.Mode = kvmhost.Never
	}
	var err error
	if cfg.MemMiB, err = parseMiB(*mem); err != nil {
		fmt.Fprintf(os.Stderr, "kvmhost: --mem: %v\n", err)
		return 2
	}
	if *modules != "" {
		cfg.ExtraModules = strings.Split(*modules, ",")
	}
	cfg.KernelArgs = strings.Fields(*kernelArgs)
	if *verbose {
		cfg.Console = os.Stderr
	}

	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT)
	var gotSig atomic.Int32
	go func() {
		s := (<-sigc).(syscall.Signal)
		gotSig.Store(int32(s))
		cancel(fmt.Errorf("got signal %v", s))
	}()

	if *prepare {
		img, err := kvmhost.Prepare(ctx, cfg)
		if err != nil {
			fmt.Fprintf(os.Stderr, "kvmhost: %v\n", err)
			return 125
		}
		fmt.Printf("kernel %s (%s), initramfs %s\n", img.Kernel, img.Package, img.Initrd)
		return 0
	}

	// Decide once, here, so that the check runs once and the run below just follows it.
	cfg.DirectCheck = func() error {
		_, err := vmm.SelfCheck(ctx, "")
		return err
	}
	inVM, why := kvmhost.Route(cfg)
	if !*quiet {
		route := "directly on this host's /dev/kvm"
		if inVM {
			route = "in a nested KVM host (QEMU TCG VM with emulated SVM)"
		}
		fmt.Fprintf(os.Stderr, "kvmhost: running %s: %s\n", route, why)
	}
	cfg.Mode = kvmhost.Never
	if inVM {
		cfg.Mode = kvmhost.Always
	}
	if !inVM {
		// No VM: become the command, so that signals, stdin and the exit status are exactly
		// its own.
		path, err := exec.LookPath(argv[0])
		if err != nil {
			fmt.Fprintf(os.Stderr, "kvmhost: %v\n", err)
			return 127
		}
		err = syscall.Exec(path, argv, os.Environ())
		fmt.Fprintf(os.Stderr, "kvmhost: exec %s: %v\n", path, err)
		return 126
	}

	res, err := kvmhost.Run(ctx, cfg, argv)
	if *verbose && res.InVM {
		fmt.Fprintf(os.Stderr, "kvmhost: kernel %s, boot to command %.2fs, total %.2fs, exit status %d\n",
			res.Kernel, res.BootToCommand.Seconds(), res.Total.Seconds(), res.ExitCode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		switch {
		case errors.Is(err, kvmhost.ErrNotFound):
			return 127
		case gotSig.Load() != 0:
			return 128 + int(gotSig.Load())
		case errors.Is(err, kvmhost.ErrTimeout):
			return 124
		}
		return 125
	}
	return res.ExitCode
}

// parseMiB parses sizes like 6G, 6144M, 6144 (MiB).
func parseMiB(s string) (int, error) {
	mult := 1
	switch {
	case strings.HasSuffix(s, "G"), strings.HasSuffix(s, "g"):
		mult, s = 1024, s[:len(s)-1]
	case strings.HasSuffix(s, "M"), strings.HasSuffix(s, "m"):
		s = s[:len(s)-1]
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("bad size %q (want e.g. 6G or 2048M)", s)
	}
	return n * mult, nil
}
