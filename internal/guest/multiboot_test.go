package guest

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

func buildMultiboot(ctx context.Context, dir string) ([]byte, error) {
	out := filepath.Join(dir, "multiboot.bin")
	if err := runBuild(ctx, dir, "-multiboot", out); err != nil {
		return nil, err
	}
	return os.ReadFile(out)
}

// TestMultibootUpToDate is TestImageUpToDate for the multiboot image.
func TestMultibootUpToDate(t *testing.T) {
	fresh, err := buildMultiboot(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	again, err := buildMultiboot(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(fresh, again) {
		t.Fatalf("two builds of the multiboot image differ (%d and %d bytes): the build is not deterministic", len(fresh), len(again))
	}
	if !bytes.Equal(fresh, Multiboot) {
		t.Fatalf("multiboot.bin (%d bytes) differs from a fresh build (%d bytes): run `go generate ./internal/guest`", len(Multiboot), len(fresh))
	}
}

// TestMultibootHeader checks the header a multiboot loader reads: at the first byte, with the
// address fields describing exactly the flat file.
func TestMultibootHeader(t *testing.T) {
	if len(Multiboot) < 32 {
		t.Fatalf("multiboot image of %d bytes", len(Multiboot))
	}
	u := func(i int) uint32 { return binary.LittleEndian.Uint32(Multiboot[4*i:]) }
	magic, flags, sum := u(0), u(1), u(2)
	if magic != 0x1BADB002 || magic+flags+sum != 0 {
		t.Fatalf("header magic 0x%x flags 0x%x checksum 0x%x", magic, flags, sum)
	}
	if flags&0x10000 == 0 || flags&0xfff8 != 0 {
		t.Fatalf("flags 0x%x: want the address fields and no unsupported bits", flags)
	}
	hdr, load, loadEnd, bssEnd, entry := u(3), u(4), u(5), u(6), u(7)
	if hdr != EntryGPA || load != EntryGPA {
		t.Errorf("header at 0x%x, loaded at 0x%x: want both at 0x%x", hdr, load, EntryGPA)
	}
	if int(loadEnd-load) != len(Multiboot) {
		t.Errorf("load_end_addr 0x%x: %d bytes, the file has %d", loadEnd, loadEnd-load, len(Multiboot))
	}
	if bssEnd < loadEnd || bssEnd-load > ImageMax {
		t.Errorf("bss_end_addr 0x%x: want between 0x%x and 0x%x", bssEnd, loadEnd, load+ImageMax)
	}
	if entry <= hdr || entry >= loadEnd {
		t.Errorf("entry 0x%x outside the image", entry)
	}
}

// TestMultibootCPL0OnlyInEntry disassembles the multiboot image and requires every privileged
// instruction to lie in mb.S's entry (before mb_cpl0_end): all the rest runs at CPL3.
func TestMultibootCPL0OnlyInEntry(t *testing.T) {
	for _, tool := range []string{"objdump", "nm"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s (binutils, needed to build the image anyway): %v", tool, err)
		}
	}
	dir := t.TempDir()
	elf := filepath.Join(dir, "mb.elf")
	t.Setenv("GODWIT_GUEST_ELF", elf)
	if _, err := buildMultiboot(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
	syms, err := exec.Command("nm", elf).Output()
	if err != nil {
		t.Fatal(err)
	}
	var cpl0End uint64
	for _, l := range strings.Split(string(syms), "\n") {
		if f := strings.Fields(l); len(f) == 3 && f[2] == "mb_cpl0_end" {
			cpl0End, _ = strconv.ParseUint(f[0], 16, 64)
		}
	}
	if cpl0End <= EntryGPA || cpl0End > EntryGPA+0x1000 {
		t.Fatalf("mb_cpl0_end at 0x%x: want just after the entry at 0x%x", cpl0End, EntryGPA)
	}
	out, err := exec.Command("objdump", "-d", "--no-show-raw-insn", "-j", ".text", elf).Output()
	if err != nil {
		t.Fatal(err)
	}
	forbidden := regexp.MustCompile(`\t(hlt|cli|sti|lgdt|lidt|ltr|lldt|wrmsr|rdmsr|xsave\w*|xrstor\w*|xsetbv|invlpg|wbinvd|iretq?|sysret|syscall|sysenter|int3?|swapgs|mov\s+%cr\d|mov\s+\S+,%cr\d|mov\s+%dr\d|vmcall|vmmcall|l?jmp\s+\$0x\w+,)\b|%ymm|%zmm|%k\d`)
	addrRE := regexp.MustCompile(`^\s*([0-9a-f]+):\t`)
	after := 0
	for _, l := range strings.Split(string(out), "\n") {
		m := addrRE.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		addr, _ := strconv.ParseUint(m[1], 16, 64)
		if addr < cpl0End {
			continue
		}
		after++
		if forbidden.MatchString(l) {
			t.Errorf("privileged instruction outside the CPL0 entry: %s", strings.TrimSpace(l))
		}
	}
	if after < 100 {
		t.Fatalf("objdump showed %d instructions after the entry: the disassembly went wrong", after)
	}
	hdr, err := exec.Command("objdump", "-h", elf).Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(hdr), "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 && regexp.MustCompile(`^\d+$`).MatchString(f[0]) {
			switch f[1] {
			case ".text", ".rodata", ".data", ".bss":
			default:
				t.Errorf("unexpected section %s in the multiboot ELF", f[1])
			}
		}
	}
}

func TestMultibootCmdline(t *testing.T) {
	cfg := DefaultConfig()
	cfg.WSSPages = 1000
	cfg.Rate = 5000
	opts := DefaultMultibootOptions()
	opts.TSCKHz = 2_500_000
	got, err := MultibootCmdline(cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	want := "workload=1 content=1 pattern=1 seed=1 rate=5000 batch=64 wss=1000 touch=1000 idle_us=1000 hot=100 hot_prob=900 pool=256 peak=0 private=0 near=0 private_seed=0 tsc_khz=2500000 vcpus=1 hb_us=1000 verify_ms=3000 exit_ms=0"
	if got != want {
		t.Fatalf("cmdline\n got %s\nwant %s", got, want)
	}
	// Every key must be one qemu.c knows.
	src, err := sources.ReadFile("src/qemu.c")
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range strings.Fields(got) {
		k, _, _ := strings.Cut(w, "=")
		if !bytes.Contains(src, []byte(`"`+k+`"`)) {
			t.Errorf("key %q is not in qemu.c's key table", k)
		}
	}
	if _, err := MultibootCmdline(cfg, MultibootOptions{}); err == nil {
		t.Error("a command line without the TSC frequency was accepted")
	}
	bad := cfg
	bad.BatchPages = 0
	if _, err := MultibootCmdline(bad, opts); err == nil {
		t.Error("an invalid config was accepted")
	}
}
