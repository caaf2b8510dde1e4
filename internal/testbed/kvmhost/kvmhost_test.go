package kvmhost

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// helperEnv makes the test binary, started again inside a VM, act as a helper program instead
// of running tests.
const helperEnv = "GODWIT_KVMHOST_TEST_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "probe":
		p, err := ProbeKVM(300 * time.Millisecond)
		if err != nil {
			fmt.Fprintln(os.Stderr, "probe:", err)
			os.Exit(1)
		}
		fmt.Println(p)
	case "unixsocket":
		// What godwit's control sockets need: bind, accept and dial in TMPDIR.
		dir, err := os.MkdirTemp("", "sock")
		if err == nil {
			err = unixRoundTrip(filepath.Join(dir, "s"))
			os.RemoveAll(dir)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "unix socket:", err)
			os.Exit(1)
		}
		fmt.Println("unix socket ok")
	default:
		fmt.Fprintln(os.Stderr, "unknown helper", os.Getenv(helperEnv))
		os.Exit(2)
	}
	os.Exit(0)
}

func unixRoundTrip(path string) error {
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	defer l.Close()
	go func() {
		if c, err := l.Accept(); err == nil {
			c.Write([]byte("pong"))
			c.Close()
		}
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 4)
	if _, err := c.Read(buf); err != nil || string(buf) != "pong" {
		return fmt.Errorf("read %q, %v", buf, err)
	}
	return nil
}

func TestShellQuoteRoundTrip(t *testing.T) {
	if _, err := os.Stat(busyboxPath); err != nil {
		t.Skipf("no %s to run the script with: %v", busyboxPath, err)
	}
	dir := t.TempDir()
	weird := "a b'c\"d$e`f\\g\nh\ti*?[x]~!#;&|<>(){}é\x01"
	env := []string{"PATH=/usr/bin:/bin", "WEIRD=" + weird, "EMPTY=", "TMPDIR=/host/tmp", GuestEnv + "=stale"}
	argv := []string{"/bin/sh", "-c", `printf '%s\0' "$@"; printf 'WEIRD=%s\0' "$WEIRD"; env | sort >env.txt`, "sh", weird, "", "-x"}
	script, err := runScript(dir, env, argv, false)
	if err != nil {
		t.Fatal(err)
	}
	// Inside the VM init copies busybox to /run/kvmhost; here the host's copy does.
	script = strings.ReplaceAll(script, "/run/kvmhost/busybox", busyboxPath)
	out, err := exec.Command(busyboxPath, "sh", "-c", script).Output()
	if err != nil {
		t.Fatalf("running the script: %v\n%s", err, script)
	}
	want := weird + "\x00\x00-x\x00WEIRD=" + weird + "\x00"
	if string(out) != want {
		t.Errorf("output %q, want %q", out, want)
	}
	envOut, err := os.ReadFile(filepath.Join(dir, "env.txt"))
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"EMPTY=\n", "TMPDIR=" + VMTmpDir + "\n", HostTmpDirEnv + "=/host/tmp\n", GuestEnv + "=1\n"} {
		if !strings.Contains(string(envOut), w) {
			t.Errorf("environment lacks %q:\n%s", w, envOut)
		}
	}
	if _, err := runScript(dir, env, []string{"/bin/a=b"}, false); err == nil {
		t.Error("a command path with '=' was accepted")
	}
}

func TestCPIOReadableByBusybox(t *testing.T) {
	if _, err := os.Stat(busyboxPath); err != nil {
		t.Skipf("no %s to unpack with: %v", busyboxPath, err)
	}
	var buf bytes.Buffer
	c := &cpioWriter{w: &buf}
	c.Dir("d")
	c.File("d/f", 0o644, []byte("hello"))
	c.File("d/odd", 0o755, []byte("123"))
	c.File("empty", 0o600, nil)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cmd := exec.Command(busyboxPath, "cpio", "-i", "-d")
	cmd.Dir, cmd.Stdin = dir, &buf
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("busybox cpio -i: %v: %s", err, out)
	}
	for name, want := range map[string]string{"d/f": "hello", "d/odd": "123", "empty": ""} {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || string(got) != want {
			t.Errorf("%s: %q, %v; want %q", name, got, err, want)
		}
	}
	if st, err := os.Stat(filepath.Join(dir, "d/odd")); err != nil || st.Mode().Perm() != 0o755 {
		t.Errorf("d/odd mode: %v, %v", st.Mode(), err)
	}
}

func TestParseKernelPackages(t *testing.T) {
	names := []string{"linux-image-6.1.0-9-amd64", "linux-image-6.1.0-56-amd64", "linux-image-6.1.0-10-amd64", "linux-image-5.10.0-30-amd64"}
	slices.SortFunc(names, func(a, b string) int {
		if kernelPkgLess(a, b) {
			return -1
		}
		if kernelPkgLess(b, a) {
			return 1
		}
		return 0
	})
	want := []string{"linux-image-5.10.0-30-amd64", "linux-image-6.1.0-9-amd64", "linux-image-6.1.0-10-amd64", "linux-image-6.1.0-56-amd64"}
	if !slices.Equal(names, want) {
		t.Errorf("sorted %v, want %v", names, want)
	}
}

// The tests below boot VMs. They run where commands would otherwise lack KVM, that is on hosts
// without a usable /dev/kvm; inside a kvmhost VM (which has one) they would emulate a VM within
// an emulated VM, which is too slow to be useful.

var (
	prepareOnce sync.Once
	prepared    *Image
	prepareErr  error
)

// vmConfig returns a Config for test runs, preparing the image once. Tests fail (not skip) when
// the VM machinery is unavailable: on a host without KVM it is the only way to run KVM tests.
func vmConfig(t *testing.T) Config {
	t.Helper()
	if os.Getenv(GuestEnv) == "1" {
		t.Skip("already inside a kvmhost VM; a VM in it would be emulated twice over")
	}
	if os.Geteuid() != 0 {
		t.Fatal("kvmhost VM tests need root (QEMU's 9p passthrough, apt-get for missing packages)")
	}
	prepareOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		prepared, prepareErr = Prepare(ctx, Config{Logf: t.Logf})
	})
	if prepareErr != nil {
		t.Fatalf("preparing the VM image: %v", prepareErr)
	}
	return Config{Mode: Always, MemMiB: 1024, BootTimeout: 2 * time.Minute, Timeout: 5 * time.Minute}
}

func runCapture(t *testing.T, cfg Config, argv ...string) (Result, string, string, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cfg.Stdout, cfg.Stderr = &stdout, &stderr
	var console bytes.Buffer
	cfg.Console = &syncWriter{w: &console}
	res, err := Run(context.Background(), cfg, argv)
	t.Logf("%v: exit %d, boot to command %v, total %v", argv, res.ExitCode, res.BootToCommand, res.Total)
	if err != nil && !errors.Is(err, ErrTimeout) {
		t.Logf("console:\n%s", console.String())
	}
	return res, stdout.String(), stderr.String(), err
}

type syncWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// TestVMRunsCommand checks in one boot: byte-exact output on both streams (all 256 byte values,
// a lone \n that a tty would turn into \r\n, 2 MiB of random data), the working directory, the
// environment, files written on either side being visible on the other while the command runs,
// the mounts and devices the VM promises, and the exit status.
func TestVMRunsCommand(t *testing.T) {
	cfg := vmConfig(t)
	dir := t.TempDir()
	blob := make([]byte, 2<<20)
	r := rand.NewChaCha8([32]byte{1})
	r.Read(blob)
	if err := os.WriteFile(filepath.Join(dir, "blob"), blob, 0o644); err != nil {
		t.Fatal(err)
	}
	var all [256]byte
	for i := range all {
		all[i] = byte(i)
	}
	if err := os.WriteFile(filepath.Join(dir, "all"), all[:], 0o644); err != nil {
		t.Fatal(err)
	}
	script := `
set -e
cat all blob
printf 'err\n' >&2
cat all >&2
echo "pwd=$(pwd)" >info
echo "weird=$KVMHOST_TEST_WEIRD" >>info
test -c /dev/kvm && test -c /dev/userfaultfd && test -c /dev/net/tun && echo devices >>info
grep -q ' /run tmpfs ' /proc/mounts && grep -q ' /dev/shm tmpfs ' /proc/mounts && grep -q ' /proc proc ' /proc/mounts && echo mounts >>info
ip netns add kvmhost-test && ip netns exec kvmhost-test ip link set lo up && ip netns del kvmhost-test && echo netns >>info
ip link add kvt0 type veth peer name kvt1 && tc qdisc add dev kvt0 root tbf rate 1gbit burst 256kb latency 50ms && ip link del kvt0 && echo tbf >>info
ip -o link show lo | grep -q 'UP' && echo lo-up >>info
echo ready >ready
# Wait for the host to answer: proves that output and files flow both ways while we run.
i=0; while [ ! -e answer ]; do sleep 0.05; i=$((i+1)); [ $i -lt 1200 ] || exit 99; done
cat answer >>info
exit 7
`
	cfg.Dir = dir
	cfg.Env = append(os.Environ(), "KVMHOST_TEST_WEIRD=x 'y' \"z\"\n$HOME")
	go func() {
		for range 1200 {
			if _, err := os.Stat(filepath.Join(dir, "ready")); err == nil {
				os.WriteFile(filepath.Join(dir, "answer"), []byte("answered\n"), 0o644)
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	res, stdout, stderr, err := runCapture(t, cfg, "/bin/sh", "-c", script)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 7 {
		t.Errorf("exit status %d, want 7; stderr:\n%s", res.ExitCode, stderr)
	}
	if want := string(all[:]) + string(blob); stdout != want {
		t.Errorf("stdout differs: %d bytes, want %d (first difference at %d)", len(stdout), len(want), firstDiff(stdout, want))
	}
	if want := "err\n" + string(all[:]); stderr != want {
		t.Errorf("stderr %q, want %q", stderr, want)
	}
	info, _ := os.ReadFile(filepath.Join(dir, "info"))
	want := "pwd=" + dir + "\nweird=x 'y' \"z\"\n$HOME\ndevices\nmounts\nnetns\ntbf\nlo-up\nanswered\n"
	if string(info) != want {
		t.Errorf("info file:\n%s\nwant:\n%s", info, want)
	}
	if res.BootToCommand <= 0 || res.BootToCommand > res.Total {
		t.Errorf("boot to command %v, total %v", res.BootToCommand, res.Total)
	}
}

func firstDiff(a, b string) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestVMKVMWorks runs this test binary inside the VM as a KVM guest driver and, in the same VM,
// binds a unix socket in TMPDIR.
func TestVMKVMWorks(t *testing.T) {
	cfg := vmConfig(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cfg.Env = append(os.Environ(), helperEnv+"=probe")
	res, stdout, stderr, err := runCapture(t, cfg, self)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 || !strings.HasPrefix(stdout, "KVM API 12:") {
		t.Fatalf("probe in the VM: exit %d\nstdout: %s\nstderr: %s", res.ExitCode, stdout, stderr)
	}
	t.Logf("nested KVM: %s", strings.TrimSpace(stdout))

	cfg.Env = append(os.Environ(), helperEnv+"=unixsocket")
	res, stdout, stderr, err = runCapture(t, cfg, self)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		t.Errorf("unix socket in the VM's TMPDIR: exit %d: %s%s", res.ExitCode, stdout, stderr)
	}
}

func TestVMSignalStatus(t *testing.T) {
	cfg := vmConfig(t)
	res, _, _, err := runCapture(t, cfg, "/bin/sh", "-c", "kill -KILL $$")
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 128+9 {
		t.Errorf("exit status %d, want %d", res.ExitCode, 128+9)
	}
}

// TestVMFailures checks that the machinery's failures are errors that say what happened.
func TestVMFailures(t *testing.T) {
	cfg := vmConfig(t)

	_, _, _, err := runCapture(t, cfg, "kvmhost-no-such-command")
	if !errors.Is(err, ErrNotFound) {
		t.Errorf("missing command: %v, want ErrNotFound", err)
	}

	// The VM powers off under the command: no exit status.
	_, _, _, err = runCapture(t, cfg, "/bin/sh", "-c", "echo o >/proc/sysrq-trigger; sleep 30")
	var ke *Error
	if !errors.As(err, &ke) || !strings.Contains(ke.Step, "without reporting") {
		t.Errorf("VM powered off under the command: %v, want an Error about the missing exit status", err)
	} else {
		os.RemoveAll(ke.RunDir)
	}

	cfg.Timeout = 15 * time.Second
	start := time.Now()
	_, _, _, err = runCapture(t, cfg, "sleep", "600")
	if !errors.Is(err, ErrTimeout) {
		t.Errorf("timeout: %v, want ErrTimeout", err)
	}
	if d := time.Since(start); d > time.Minute {
		t.Errorf("timeout of 15 s took %v", d)
	}
}

func TestPrepareRejectsUnknownModule(t *testing.T) {
	vmConfig(t)
	_, err := Prepare(context.Background(), Config{ExtraModules: []string{"kvmhost_no_such_module"}})
	if err == nil || !strings.Contains(err.Error(), "kvmhost_no_such_module") {
		t.Errorf("Prepare with an unknown module: %v", err)
	}
}

func TestModuleOrder(t *testing.T) {
	vmConfig(t)
	pos := map[string]int{}
	for i, m := range prepared.Modules {
		pos[m] = i
	}
	for _, p := range [][2]string{
		{"virtio", "virtio_pci"}, {"virtio_ring", "virtio_pci"}, {"9pnet", "9pnet_virtio"},
		{"netfs", "9p"}, {"irqbypass", "kvm"}, {"kvm", "kvm_amd"}, {"ccp", "kvm_amd"},
	} {
		a, oka := pos[p[0]]
		b, okb := pos[p[1]]
		if !oka || !okb || a >= b {
			t.Errorf("module %s must load before %s: order %v", p[0], p[1], prepared.Modules)
		}
	}
	if prepared.RootCount == 0 || pos["9p"] >= prepared.RootCount || pos["kvm"] < prepared.RootCount {
		t.Errorf("root modules: first %d of %v", prepared.RootCount, prepared.Modules)
	}
}
