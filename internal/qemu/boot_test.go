package qemu

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
)

// testLog is where QEMU's stderr and the guest's lines go in tests: shown with -v.
func testLog(t *testing.T) *testWriter { return &testWriter{t: t} }

type testWriter struct{ t *testing.T }

func (w *testWriter) Write(p []byte) (int, error) {
	if testing.Verbose() {
		os.Stderr.Write(p)
	}
	return len(p), nil
}

// shortRun is the image's settings for a test: a heartbeat line every 20 ms, a verification
// every verifyMS, and the exit after exitMS.
func shortRun(verifyMS, exitMS uint64) guest.MultibootOptions {
	opts := guest.DefaultMultibootOptions()
	opts.HeartbeatUS = 20000
	opts.VerifyMS = verifyMS
	opts.ExitMS = exitMS
	return opts
}

func smallGuest() guest.Config {
	cfg := guest.DefaultConfig()
	cfg.WSSPages = 2048
	return cfg
}

// TestBootTCG boots the multiboot image under QEMU's emulation (no KVM needed), sees
// heartbeats and clean verifications, and sees the guest exit on its own.
func TestBootTCG(t *testing.T) {
	if _, err := FindBinary(""); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	vm, err := Start(ctx, Config{MemMiB: 64, Guest: smallGuest(), Options: shortRun(1000, 4000), TCG: true, Name: "tcg", Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	boot, err := vm.WaitBoot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("QEMU %s (TCG), TSC %d kHz: guest at CPL3 after %v", vm.QMP.Version(), vm.TSCKHz, boot)
	v, err := vm.Console.NextVerify(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if v.Mismatches != 0 || v.Pages == 0 || v.Versioned == 0 {
		t.Fatalf("verification: %+v", v)
	}
	if code := vm.ExitCode(); code != guest.MultibootExitOK {
		t.Fatalf("QEMU exit status %d, want %d (the guest's clean exit); stderr: %s", code, guest.MultibootExitOK, vm.Stderr())
	}
	hb := 0
	for _, l := range vm.Console.Lines() {
		if l.Kind == KindHeartbeat {
			hb++
		}
	}
	if hb < 10 {
		t.Fatalf("%d heartbeat lines in 4 s", hb)
	}
	last := vm.Console.Lines()
	if l := last[len(last)-1]; l.Kind != KindExit || l.N != 0 {
		t.Fatalf("last line %q, want exit 0", l.Text)
	}
}

// TestBootAcrossThePCIHole gives QEMU's pc machine less room below 4 GiB than the guest has
// RAM (max-ram-below-4g), as a guest of 3.5 GiB or more always has, and checks that the image
// uses the RAM above 4 GiB as the end of its one slice: the boot line counts it, the workload
// writes every page, and the verification finds them all.
func TestBootAcrossThePCIHole(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cfg := guest.DefaultConfig()
	cfg.Content = guest.ContentRandom
	cfg.Pattern = guest.PatternSequential
	vm, err := Start(ctx, Config{MemMiB: 96, Guest: cfg, Options: shortRun(1000, 60000), TCG: true, Name: "hole",
		Args: []string{"-machine", "max-ram-below-4g=64M"}, Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if _, err := vm.WaitBoot(ctx); err != nil {
		t.Fatal(err)
	}
	boot, _, err := vm.Console.WaitKind(ctx, 0, KindBoot)
	if err != nil {
		t.Fatal(err)
	}
	if mem, high := boot.Fields["mem"], boot.Fields["high"]; mem != 96<<20 || high != 32<<20 {
		t.Fatalf("boot line %q: want mem=%d high=%d", boot.Text, 96<<20, 32<<20)
	}
	// The first verification that finds every page written (or any mismatch) decides; under
	// a slow emulator the writer may need a few passes.
	pages := boot.Fields["pages"]
	v, _, err := vm.Console.Wait(ctx, 0, func(l Line) bool {
		return l.Kind == KindVerify && (l.Fields["mismatches"] != 0 || l.Fields["versioned"] == pages)
	})
	if err != nil {
		t.Fatalf("no verification found all %d pages written: %v", pages, err)
	}
	if v.Fields["mismatches"] != 0 || v.Fields["pages"] != pages {
		t.Fatalf("verification %q: want all %d data pages checked, no mismatch", v.Text, pages)
	}
}
