package kvmhost

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	_ "embed"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
)

//go:embed init.sh
var initScript []byte

// RootModules carry the host's root filesystem into the VM (virtio-9p-pci): init loads them
// first, and everything else (BaseModules, Config.ExtraModules) in the background while it
// mounts the root, which saves about half a second of boot.
var RootModules = []string{"virtio_pci", "9pnet_virtio", "9p"}

// BaseModules are loaded in every VM, in this order (dependencies are added in front by
// loadOrder). irqbypass, kvm, ccp and kvm_amd give /dev/kvm (QEMU's TCG emulates SVM, not
// VMX); veth and sch_tbf are what internal/testbed needs for its namespaces and shaped links;
// tun and sch_netem are cheap and let later tests use tap devices and delay/loss emulation
// (netem is missing on the real hosts but present in this kernel).
var BaseModules = []string{
	"irqbypass", "kvm", "ccp", "kvm_amd",
	"veth", "sch_tbf", "sch_netem", "tun",
}

// busyboxPath is where Debian's busybox-static installs its binary.
const busyboxPath = "/bin/busybox"

// Image is a prepared kernel and initramfs, ready to boot.
type Image struct {
	Package string // Debian package the kernel came from, e.g. linux-image-6.1.0-56-amd64
	Release string // kernel release, e.g. 6.1.0-56-amd64
	Kernel  string // path of the kernel to pass to -kernel
	// PVH reports that Kernel is the uncompressed ELF vmlinux, booted through its PVH entry
	// point. That skips the bzImage's XZ decompression, which takes seconds under TCG.
	PVH    bool
	Initrd string
	// Modules is the insmod order inside the VM: RootModules with their dependencies, then
	// the rest. RootCount of them are RootModules.
	Modules   []string
	RootCount int
}

// DefaultCacheDir is where prepared kernels and initramfs images are kept when Config.CacheDir
// is empty: $XDG_CACHE_HOME or ~/.cache, else /var/cache.
func DefaultCacheDir() string {
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "godwit", "kvmhost")
	}
	return "/var/cache/godwit/kvmhost"
}

// Prepare makes sure QEMU, busybox-static and a Debian kernel are available and builds (or
// finds in the cache) the initramfs. It installs missing Debian packages with apt-get, which
// needs root. Concurrent callers sharing a cache directory are serialized with a lock file.
func Prepare(ctx context.Context, cfg Config) (*Image, error) {
	cfg.setDefaults()
	logf := cfg.logf
	if err := os.MkdirAll(cfg.CacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("creating kvmhost cache directory: %w", err)
	}
	unlock, err := lockFile(filepath.Join(cfg.CacheDir, ".lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()

	if _, err := findQEMU(ctx, cfg); err != nil {
		return nil, err
	}
	if err := ensureStaticBusybox(ctx, logf); err != nil {
		return nil, err
	}
	pkg := cfg.KernelPackage
	if pkg == "" {
		if pkg, err = chooseKernelPackage(ctx, cfg.CacheDir, logf); err != nil {
			return nil, err
		}
	}
	kdir, err := fetchKernel(ctx, cfg.CacheDir, pkg, logf)
	if err != nil {
		return nil, err
	}
	img, err := kernelImage(kdir, pkg)
	if err != nil {
		return nil, err
	}
	idx, err := loadModuleIndex(filepath.Join(kdir, "lib", "modules", img.Release))
	if err != nil {
		return nil, err
	}
	root, err := idx.loadOrder(RootModules)
	if err != nil {
		return nil, fmt.Errorf("resolving the VM's kernel modules: %w", err)
	}
	all, err := idx.loadOrder(append(append(append([]string{}, RootModules...), BaseModules...), cfg.ExtraModules...))
	if err != nil {
		return nil, fmt.Errorf("resolving the VM's kernel modules: %w", err)
	}
	// loadOrder visits the root modules first, so they form a prefix of the full order.
	img.Modules, img.RootCount = all, len(root)
	if img.Initrd, err = buildInitrd(cfg.CacheDir, img, idx, logf); err != nil {
		return nil, err
	}
	return img, nil
}

// lockFile takes an exclusive flock on path, creating it if needed.
func lockFile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening lock file: %w", err)
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// findQEMU returns the QEMU binary to run, installing Debian's qemu-system-x86 when the default
// binary is missing.
func findQEMU(ctx context.Context, cfg Config) (string, error) {
	if cfg.QEMU != "" {
		p, err := exec.LookPath(cfg.QEMU)
		if err != nil {
			return "", fmt.Errorf("QEMU binary %q: %w", cfg.QEMU, err)
		}
		return p, nil
	}
	if p, err := exec.LookPath("qemu-system-x86_64"); err == nil {
		return p, nil
	}
	if err := aptInstall(ctx, cfg.logf, "qemu-system-x86"); err != nil {
		return "", fmt.Errorf("qemu-system-x86_64 is not installed and installing it failed: %w", err)
	}
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return "", fmt.Errorf("qemu-system-x86_64 still not found after installing qemu-system-x86: %w", err)
	}
	return p, nil
}

// ensureStaticBusybox makes sure /bin/busybox exists and is statically linked: it is PID 1 of
// the initramfs, where no shared libraries exist. Debian's plain "busybox" package installs a
// dynamically linked one; busybox-static replaces it.
func ensureStaticBusybox(ctx context.Context, logf func(string, ...any)) error {
	static, err := isStaticELF(busyboxPath)
	if err == nil && static {
		return nil
	}
	if err := aptInstall(ctx, logf, "busybox-static"); err != nil {
		return fmt.Errorf("a statically linked %s is needed for the VM's initramfs and installing busybox-static failed: %w", busyboxPath, err)
	}
	static, err = isStaticELF(busyboxPath)
	if err != nil {
		return fmt.Errorf("after installing busybox-static: %w", err)
	}
	if !static {
		return fmt.Errorf("%s is dynamically linked even after installing busybox-static", busyboxPath)
	}
	return nil
}

func isStaticELF(path string) (bool, error) {
	f, err := elf.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false, nil
		}
	}
	return true, nil
}

// aptInstall installs Debian packages, refreshing the package lists once if the first attempt
// fails (a fresh CI image often has none).
func aptInstall(ctx context.Context, logf func(string, ...any), pkgs ...string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("installing %s needs root (run: apt-get install -y %s)", strings.Join(pkgs, " "), strings.Join(pkgs, " "))
	}
	install := func() ([]byte, error) {
		args := append([]string{"install", "-y", "--no-install-recommends"}, pkgs...)
		return aptCommand(ctx, "apt-get", args...).CombinedOutput()
	}
	logf("kvmhost: installing %s with apt-get", strings.Join(pkgs, " "))
	if _, err := install(); err == nil {
		return nil
	}
	logf("kvmhost: apt-get install failed; running apt-get update and retrying")
	if out, err := aptCommand(ctx, "apt-get", "update").CombinedOutput(); err != nil {
		return fmt.Errorf("apt-get update: %w: %s", err, lastLines(out, 10))
	}
	if out, err := install(); err != nil {
		return fmt.Errorf("apt-get install %s: %w: %s", strings.Join(pkgs, " "), err, lastLines(out, 10))
	}
	return nil
}

func aptCommand(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	return cmd
}

func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

var kernelPkgRE = regexp.MustCompile(`^linux-image-(\d+)\.(\d+)\.(\d+)-(\d+)-amd64$`)

// kernelPkgLess orders linux-image-A.B.C-N-amd64 names by (A, B, C, N).
func kernelPkgLess(a, b string) bool {
	ma, mb := kernelPkgRE.FindStringSubmatch(a), kernelPkgRE.FindStringSubmatch(b)
	for i := 1; i <= 4; i++ {
		x, _ := strconv.Atoi(ma[i])
		y, _ := strconv.Atoi(mb[i])
		if x != y {
			return x < y
		}
	}
	return false
}

// chooseKernelPackage picks the kernel to boot: the newest one already in the cache (so that
// later runs need no network and stay reproducible), otherwise the newest
// linux-image-X.Y.Z-N-amd64 apt knows about.
func chooseKernelPackage(ctx context.Context, cacheDir string, logf func(string, ...any)) (string, error) {
	var cached []string
	if ents, err := os.ReadDir(filepath.Join(cacheDir, "kernels")); err == nil {
		for _, e := range ents {
			if kernelPkgRE.MatchString(e.Name()) {
				if _, err := os.Stat(filepath.Join(cacheDir, "kernels", e.Name(), ".complete")); err == nil {
					cached = append(cached, e.Name())
				}
			}
		}
	}
	if len(cached) > 0 {
		sort.Slice(cached, func(i, j int) bool { return kernelPkgLess(cached[i], cached[j]) })
		return cached[len(cached)-1], nil
	}
	search := func() ([]string, error) {
		out, err := aptCommand(ctx, "apt-cache", "search", "--names-only", `^linux-image-[0-9.]+-[0-9]+-amd64$`).Output()
		if err != nil {
			return nil, fmt.Errorf("apt-cache search for a kernel package: %w", err)
		}
		var names []string
		for _, line := range strings.Split(string(out), "\n") {
			if name, _, _ := strings.Cut(line, " "); kernelPkgRE.MatchString(name) {
				names = append(names, name)
			}
		}
		return names, nil
	}
	names, err := search()
	if err != nil {
		return "", err
	}
	if len(names) == 0 {
		if os.Geteuid() != 0 {
			return "", errors.New("apt-cache knows no linux-image-*-amd64 package and refreshing the lists needs root (run apt-get update)")
		}
		logf("kvmhost: no kernel package known to apt; running apt-get update")
		if out, err := aptCommand(ctx, "apt-get", "update").CombinedOutput(); err != nil {
			return "", fmt.Errorf("apt-get update: %w: %s", err, lastLines(out, 10))
		}
		if names, err = search(); err != nil {
			return "", err
		}
		if len(names) == 0 {
			return "", errors.New("apt-cache knows no linux-image-X.Y.Z-N-amd64 package even after apt-get update")
		}
	}
	sort.Slice(names, func(i, j int) bool { return kernelPkgLess(names[i], names[j]) })
	return names[len(names)-1], nil
}

// fetchKernel downloads and unpacks a kernel package into CACHE/kernels/PKG (once) and returns
// that directory. The package is never installed: `apt-get download` and `dpkg-deb -x` leave
// /boot and the host's modules alone.
func fetchKernel(ctx context.Context, cacheDir, pkg string, logf func(string, ...any)) (string, error) {
	dir := filepath.Join(cacheDir, "kernels", pkg)
	if _, err := os.Stat(filepath.Join(dir, ".complete")); err == nil {
		return dir, nil
	}
	logf("kvmhost: downloading and unpacking %s (once per kernel version)", pkg)
	tmp := dir + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return "", fmt.Errorf("removing stale %s: %w", tmp, err)
	}
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return "", fmt.Errorf("creating %s: %w", tmp, err)
	}
	dl := aptCommand(ctx, "apt-get", "download", pkg)
	dl.Dir = tmp
	if out, err := dl.CombinedOutput(); err != nil {
		if os.Geteuid() != 0 {
			return "", fmt.Errorf("apt-get download %s: %w: %s", pkg, err, lastLines(out, 10))
		}
		logf("kvmhost: apt-get download failed; running apt-get update and retrying")
		if out, err := aptCommand(ctx, "apt-get", "update").CombinedOutput(); err != nil {
			return "", fmt.Errorf("apt-get update: %w: %s", err, lastLines(out, 10))
		}
		dl = aptCommand(ctx, "apt-get", "download", pkg)
		dl.Dir = tmp
		if out, err := dl.CombinedOutput(); err != nil {
			return "", fmt.Errorf("apt-get download %s: %w: %s", pkg, err, lastLines(out, 10))
		}
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("apt-get download %s left %d .deb files in %s, want 1", pkg, len(debs), tmp)
	}
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[0], tmp).CombinedOutput(); err != nil {
		return "", fmt.Errorf("dpkg-deb -x %s: %w: %s", debs[0], err, lastLines(out, 10))
	}
	if err := os.Remove(debs[0]); err != nil {
		return "", err
	}
	vmlinuz, err := findVmlinuz(tmp)
	if err != nil {
		return "", err
	}
	// A missing xz only costs boot time (the bzImage is booted instead), so it is not fatal.
	if err := extractVmlinux(ctx, vmlinuz, filepath.Join(tmp, "vmlinux"), logf); err != nil {
		logf("kvmhost: warning: %v; booting the compressed kernel instead (slower)", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, ".complete"), []byte(pkg+"\n"), 0o644); err != nil {
		return "", err
	}
	if err := os.RemoveAll(dir); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, dir); err != nil {
		return "", fmt.Errorf("moving the unpacked kernel into place: %w", err)
	}
	return dir, nil
}

func findVmlinuz(kdir string) (string, error) {
	m, _ := filepath.Glob(filepath.Join(kdir, "boot", "vmlinuz-*"))
	if len(m) != 1 {
		return "", fmt.Errorf("expected one boot/vmlinuz-* in %s, found %d", kdir, len(m))
	}
	return m[0], nil
}

// extractVmlinux decompresses the ELF kernel embedded in an XZ-compressed bzImage. The XZ stream
// starts at its magic bytes and is followed by unrelated data, hence --single-stream; the xz
// tool is used because Go's standard library has no XZ decoder (and busybox's unxz rejects the
// trailing data). The result is kept only if it has a PVH entry note that QEMU can boot.
func extractVmlinux(ctx context.Context, vmlinuz, out string, logf func(string, ...any)) error {
	data, err := os.ReadFile(vmlinuz)
	if err != nil {
		return err
	}
	off := bytes.Index(data, []byte("\xfd7zXZ\x00"))
	if off < 0 {
		return fmt.Errorf("%s has no XZ-compressed payload", vmlinuz)
	}
	if _, err := exec.LookPath("xz"); err != nil {
		if err := aptInstall(ctx, logf, "xz-utils"); err != nil {
			return fmt.Errorf("xz is needed to unpack %s: %w", vmlinuz, err)
		}
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "xz", "-dc", "--single-stream")
	cmd.Stdin = bytes.NewReader(data[off:])
	cmd.Stdout = f
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(out)
		return fmt.Errorf("xz -d of the payload of %s: %w: %s", vmlinuz, err, stderr.String())
	}
	if ok, err := hasPVHNote(out); err != nil || !ok {
		os.Remove(out)
		if err == nil {
			err = errors.New("no PVH entry note")
		}
		return fmt.Errorf("unpacked vmlinux of %s is not PVH-bootable: %w", vmlinuz, err)
	}
	return nil
}

// hasPVHNote reports whether an ELF kernel has the Xen note XEN_ELFNOTE_PHYS32_ENTRY (type 18),
// which QEMU's -kernel uses to boot an ELF vmlinux directly in 32-bit protected mode.
func hasPVHNote(path string) (bool, error) {
	f, err := elf.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		data := make([]byte, p.Filesz)
		if _, err := p.ReadAt(data, 0); err != nil {
			return false, err
		}
		for len(data) >= 12 {
			namesz := binary.LittleEndian.Uint32(data[0:])
			descsz := binary.LittleEndian.Uint32(data[4:])
			typ := binary.LittleEndian.Uint32(data[8:])
			nameEnd := 12 + (int(namesz)+3)&^3
			end := nameEnd + (int(descsz)+3)&^3
			if end > len(data) || nameEnd > len(data) {
				break
			}
			name := strings.TrimRight(string(data[12:12+int(namesz)]), "\x00")
			if name == "Xen" && typ == 18 {
				return true, nil
			}
			data = data[end:]
		}
	}
	return false, nil
}

// kernelImage describes the unpacked kernel in kdir.
func kernelImage(kdir, pkg string) (*Image, error) {
	vmlinuz, err := findVmlinuz(kdir)
	if err != nil {
		return nil, err
	}
	img := &Image{Package: pkg, Release: strings.TrimPrefix(filepath.Base(vmlinuz), "vmlinuz-"), Kernel: vmlinuz}
	if _, err := os.Stat(filepath.Join(kdir, "vmlinux")); err == nil {
		img.Kernel, img.PVH = filepath.Join(kdir, "vmlinux"), true
	}
	return img, nil
}

// buildInitrd returns CACHE/initrd/PKG-HASH.cpio, building it if needed. HASH covers
// everything that goes in (the init script, busybox, the module list), so changing any of them
// builds a new image while old ones stay valid for other checkouts sharing the cache.
func buildInitrd(cacheDir string, img *Image, idx *moduleIndex, logf func(string, ...any)) (string, error) {
	busybox, err := os.ReadFile(busyboxPath)
	if err != nil {
		return "", fmt.Errorf("reading busybox for the initramfs: %w", err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "kvmhost-initrd-v2\x00%s\x00%s\x00%d\x00", img.Package, strings.Join(img.Modules, ","), img.RootCount)
	h.Write(initScript)
	h.Write(busybox)
	sum := hex.EncodeToString(h.Sum(nil))[:16]
	// Uncompressed: the kernel would spend a few hundred ms of emulated time inflating it.
	out := filepath.Join(cacheDir, "initrd", img.Package+"-"+sum+".cpio")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	logf("kvmhost: building initramfs %s", filepath.Base(out))

	var raw bytes.Buffer
	c := &cpioWriter{w: &raw}
	for _, d := range []string{"bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"} {
		c.Dir(d)
	}
	// The kernel opens /dev/console as init's stdin/stdout/stderr before /dev is mounted.
	c.CharDev("dev/console", 0o600, 5, 1)
	c.File("bin/busybox", 0o755, busybox)
	c.File("init", 0o755, initScript)
	var order, orderBg strings.Builder
	for i, m := range img.Modules {
		data, err := os.ReadFile(idx.path[m])
		if err != nil {
			return "", fmt.Errorf("reading module %s for the initramfs: %w", m, err)
		}
		c.File("lib/modules/"+m+".ko", 0o644, data)
		if i < img.RootCount {
			order.WriteString(m + "\n")
		} else {
			orderBg.WriteString(m + "\n")
		}
	}
	c.File("lib/modules/order", 0o644, []byte(order.String()))
	c.File("lib/modules/order.bg", 0o644, []byte(orderBg.String()))
	if err := c.Close(); err != nil {
		return "", err
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", err
	}
	tmp := out + ".tmp"
	if err := os.WriteFile(tmp, raw.Bytes(), 0o644); err != nil {
		return "", fmt.Errorf("writing initramfs: %w", err)
	}
	if err := os.Rename(tmp, out); err != nil {
		return "", fmt.Errorf("writing initramfs: %w", err)
	}
	return out, nil
}
