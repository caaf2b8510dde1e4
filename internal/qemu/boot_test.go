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
	opts := guest.DefaultMultibootOptions()
	opts.HeartbeatUS = 20000
	opts.VerifyMS = 1000
	opts.ExitMS = 4000
	vm, err := Start(ctx, Config{MemMiB: 64, Guest: smallGuest(), Options: opts, TCG: true, Name: "tcg", Log: testLog(t)})
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
