package guest

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestImageUpToDate rebuilds the image from the sources and requires the committed image.bin to
// be byte for byte the same: the build is deterministic, so any difference means the sources
// changed without `go generate ./internal/guest`.
func TestImageUpToDate(t *testing.T) {
	dir := t.TempDir()
	fresh, err := buildImage(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	again, err := buildImage(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(fresh, again) {
		t.Fatalf("two builds of the image differ (%d and %d bytes): the build is not deterministic", len(fresh), len(again))
	}
	if !bytes.Equal(fresh, Image) {
		out, _ := exec.Command("gcc", "--version").Output()
		first, _, _ := strings.Cut(string(out), "\n")
		t.Fatalf("image.bin (%d bytes) differs from a fresh build (%d bytes, %s): run `go generate ./internal/guest`",
			len(Image), len(fresh), first)
	}
}

func TestImageFits(t *testing.T) {
	if len(Image) == 0 || len(Image) > ImageMax {
		t.Fatalf("image is %d bytes, want 1..%d", len(Image), ImageMax)
	}
	// The entry point is the first byte: entry.S's jmp to guest_main (e9 rel32).
	if Image[0] != 0xe9 {
		t.Fatalf("image starts with 0x%02x, want the jmp (0xe9) of entry.S", Image[0])
	}
}

// TestImageUsesOnlyCPL3Instructions disassembles the guest's code and looks for instructions a
// CPL3 guest must not execute (they fault, or under PVM are emulated or fail) and for AVX in
// any encoding (VEX or EVEX, on xmm registers too), which needs CR4.OSXSAVE and XCR0: the VMM
// sets neither, and only PVM hosts, whose own CR4 and XCR0 are in force, would run it.
func TestImageUsesOnlyCPL3Instructions(t *testing.T) {
	if _, err := exec.LookPath("objdump"); err != nil {
		t.Fatalf("objdump (binutils, needed to build the image anyway): %v", err)
	}
	dir := t.TempDir()
	elf := filepath.Join(dir, "guest.elf")
	t.Setenv("GODWIT_GUEST_ELF", elf)
	if _, err := buildImage(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("objdump", "-d", "--no-show-raw-insn", "-j", ".text", elf).Output()
	if err != nil {
		t.Fatalf("objdump -d %s: %v", elf, err)
	}
	forbidden := regexp.MustCompile(`\t(hlt|cli|sti|lgdt|lidt|ltr|lldt|wrmsr|rdmsr|xsave\w*|xrstor\w*|xsetbv|invlpg|wbinvd|iretq?|sysret|syscall|sysenter|int3?|swapgs|mov\s+%cr\d|mov\s+\S+,%cr\d|mov\s+%dr\d|vmcall|vmmcall)\b|\tv[a-z0-9]+\s.*%xmm|%ymm|%zmm|%k\d`)
	lines := strings.Split(string(out), "\n")
	instructions := 0
	for _, l := range lines {
		if !strings.Contains(l, ":\t") {
			continue
		}
		instructions++
		if m := forbidden.FindString(l); m != "" {
			t.Errorf("forbidden instruction in the guest: %s", strings.TrimSpace(l))
		}
	}
	if instructions < 100 {
		t.Fatalf("objdump showed %d instructions: the disassembly went wrong\n%s", instructions, out)
	}
	// The image must also hold nothing but what the ELF loads: no stray sections.
	hdr, err := exec.Command("objdump", "-h", elf).Output()
	if err != nil {
		t.Fatalf("objdump -h %s: %v", elf, err)
	}
	for _, l := range strings.Split(string(hdr), "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 && regexp.MustCompile(`^\d+$`).MatchString(f[0]) {
			switch f[1] {
			case ".text", ".rodata", ".data", ".bss":
			default:
				t.Errorf("unexpected section %s in the guest ELF", f[1])
			}
		}
	}
}
