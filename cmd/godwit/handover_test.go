package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/version"
	"github.com/godwit-vm/godwit/migration"
)

// otherVersion is the version string of the binary a handover test hands a VM over to.
const otherVersion = "0.0.0-handover-test"

// otherBinary is a godwit built from this tree with another version string: the one
// GODWIT_TEST_OTHER_BINARY names (.ci/run builds it ahead, so that no test compiles inside a
// slow nested host), else one built here.
func otherBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("GODWIT_TEST_OTHER_BINARY"); p != "" {
		return p
	}
	out := filepath.Join(t.TempDir(), "godwit-other")
	cmd := exec.Command("go", "build", "-o", out, "-ldflags", "-X github.com/godwit-vm/godwit/internal/version.Version="+otherVersion, ".")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building the other godwit: %v\n%s", err, b)
	}
	return out
}

// TestHandoverToAnotherBinary hands a heavy writer over to a godwit process of another build
// (a VMM upgrade under a running VM): no page is copied, the source process ends, the new one
// says which godwit it is, and the guest verifies its memory there.
func TestHandoverToAnotherBinary(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, 0)
	to := "unix:" + filepath.Join(t.TempDir(), "handover.sock")
	src := startVM(t, tb.Host(0), "src", "--mem", "256M", "--vcpus", "2", "--workload", "dirty", "--wss", "128M", "--rate", "max", "--pattern", "random", "--content", "random")
	dst := startVMWith(t, tb.Host(0), otherBinary(t), nil, "dst", "--incoming", to)
	src.waitHeartbeats(t, 100)
	rep, err := migrate(t, src, to) // the default to a unix: address
	logReport(t, "handover", rep)
	if err != nil || rep.Result != "ok" || rep.Mode != migration.ModeHandover || rep.Handover == nil || rep.Handover.Bytes != 256<<20 {
		t.Fatalf("migrate: %v, report %+v (handover %+v)", err, rep, rep.Handover)
	}
	if rep.Pages != (migration.PageCounts{}) || rep.BytesWire > 64<<10 {
		t.Fatalf("a handover copied pages %+v, %d bytes on the wire", rep.Pages, rep.BytesWire)
	}
	if err := migration.CheckDowntimeParts(rep); err != nil {
		t.Error(err)
	}
	if err := <-src.exited; err != nil {
		t.Fatalf("source process after the handover: %v %s", err, src.stderr)
	}
	dst.verifyClean(t)
	if !strings.Contains(dst.stderr.String(), otherVersion) || strings.Contains(dst.stderr.String(), version.Version+" ") {
		t.Errorf("the destination does not say it is the other build (%s): %s", otherVersion, dst.stderr)
	}
}

// TestHandoverDestinationDies: the destination process dies once it has mapped the memory and
// before it runs the VM: the source runs on, and its guest verifies its memory.
func TestHandoverDestinationDies(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, 0)
	to := "unix:" + filepath.Join(t.TempDir(), "handover.sock")
	src := startVM(t, tb.Host(0), "src", "--mem", "128M", "--workload", "dirty", "--wss", "64M", "--rate", "max", "--pattern", "random", "--content", "random")
	dst := startVMWith(t, tb.Host(0), os.Args[0], []string{faultEnv + "=" + faultExitAfterAdopt}, "dst", "--incoming", to)
	src.waitHeartbeats(t, 50)
	rep, err := migrate(t, src, to)
	logReport(t, "handover to a dying destination", rep)
	if err == nil || rep.Result == "ok" || strings.Contains(rep.Error, "undecided") {
		t.Fatalf("handover to a destination that died: %v, report %+v", err, rep)
	}
	if werr := <-dst.exited; werr == nil {
		t.Fatalf("the destination did not die: %s", dst.stderr)
	}
	t.Logf("source: %s", rep.Error)
	s := src.waitHeartbeats(t, src.stats(t).Heartbeats+50)
	src.verifyClean(t)
	t.Logf("source runs on: %d heartbeats", s.Heartbeats)
}

// TestHandoverRefusals: what a handover cannot do is refused before anything moves.
func TestHandoverRefusals(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--to", "tcp:127.0.0.1:7999", "--mode", "handover"}, "needs --to unix:PATH"},
		{[]string{"--to", "unix:/tmp/x.sock", "--streams", "2"}, "--streams do not apply"},
		{[]string{"--to", "unix:/tmp/x.sock", "--mode", "handover", "--compress", "zstd", "--dedup"}, "--compress, --dedup do not apply"},
	} {
		out, err := godwit(append([]string{"migrate", "--control", filepath.Join(t.TempDir(), "none.sock")}, c.args...)...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("migrate %s: %v %s; want %q", strings.Join(c.args, " "), err, out, c.want)
		}
	}
}

// memoryFile is a path for a memory file on shared memory, removed after the test.
func memoryFile(t *testing.T, name string) string {
	p := filepath.Join("/dev/shm", fmt.Sprintf("godwit-test-%d-%s", os.Getpid(), name))
	t.Cleanup(func() { os.Remove(p) })
	return p
}

// TestSharedMemoryAcrossHosts moves a heavy writer whose memory is in a memory file on shared
// memory to the other namespace host, which maps the same file: no page crosses the link. The
// destination (run --localize) then moves the memory into its own while the guest runs, and
// the guest verifies its memory there. Then the refusals: a destination without the memory
// file, and a VM whose memory is not on shared memory, fail before anything moves, and the
// source runs on.
func TestSharedMemoryAcrossHosts(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, gbit)
	mem := memoryFile(t, "shared")
	src := startVM(t, tb.Host(0), "src", "--mem", "256M", "--workload", "dirty", "--wss", "128M", "--rate", "max", "--pattern", "random", "--content", "random", "--memory-file", mem)
	src.waitHeartbeats(t, 100)

	// A destination that maps no memory file: refused, the source runs on.
	bare := fmt.Sprintf("tcp:%s:7640", tb.Host(1).Addr())
	startVM(t, tb.Host(1), "bare", "--incoming", bare)
	rep, err := migrate(t, src, bare, "--shared-memory")
	if err == nil || rep.Result == "ok" || !strings.Contains(rep.Error, "maps no memory file") {
		t.Fatalf("--shared-memory to a destination without the memory file: %v, %+v", err, rep)
	}
	t.Logf("refused: %s", rep.Error)
	src.waitHeartbeats(t, src.stats(t).Heartbeats+50)

	addr := fmt.Sprintf("tcp:%s:7641", tb.Host(1).Addr())
	dst := startVM(t, tb.Host(1), "dst", "--incoming", addr, "--memory-file", mem, "--localize")
	rep, err = migrate(t, src, addr, "--shared-memory")
	logReport(t, "shared memory", rep)
	if err != nil || rep.Result != "ok" || rep.Mode != migration.ModeSharedMemory || rep.Handover == nil || rep.Handover.SharedMemory == "" {
		t.Fatalf("migrate --shared-memory: %v, report %+v (%+v)", err, rep, rep.Handover)
	}
	if rep.Pages != (migration.PageCounts{}) || rep.BytesWire > 64<<10 {
		t.Fatalf("a migration on shared memory copied pages %+v, %d bytes on the wire", rep.Pages, rep.BytesWire)
	}
	if err := <-src.exited; err != nil {
		t.Fatalf("source process: %v %s", err, src.stderr)
	}
	deadline := time.Now().Add(time.Minute)
	s := dst.stats(t)
	for ; s.Localized == nil && time.Now().Before(deadline); s = dst.stats(t) {
		time.Sleep(20 * time.Millisecond)
	}
	if s.Localized == nil || s.MemoryFile != "" || s.Localized.Pages == 0 || s.Localized.From != mem {
		t.Fatalf("the destination did not localize: memory file %q, localizing %v, %+v; stderr %s", s.MemoryFile, s.Localizing, s.Localized, dst.stderr)
	}
	t.Logf("localized: %+v", *s.Localized)
	dst.verifyClean(t)

	// A VM whose memory is not on shared memory cannot go that way.
	plain := startVM(t, tb.Host(0), "plain", "--mem", "64M")
	plain.waitHeartbeats(t, 10)
	rep, err = migrate(t, plain, fmt.Sprintf("tcp:%s:7642", tb.Host(1).Addr()), "--shared-memory")
	if err == nil || !strings.Contains(rep.Error, "not in a memory file") {
		t.Fatalf("--shared-memory of a VM without a memory file: %v, %+v", err, rep)
	}
	plain.waitHeartbeats(t, plain.stats(t).Heartbeats+10)
}

// TestMemoryFileRefusals: a memory file that is not on shared memory, or that exists, is
// refused when the VM starts, and so is --localize for a VM that does not arrive in one.
func TestMemoryFileRefusals(t *testing.T) {
	requireKVM(t)
	wd, _ := os.Getwd() // the source tree: a disk file system, not memory
	disk := filepath.Join(wd, fmt.Sprintf("godwit-test-%d.mem", os.Getpid()))
	defer os.Remove(disk)
	taken := memoryFile(t, "taken")
	os.WriteFile(taken, []byte("another VM"), 0o600)
	for _, c := range []struct{ path, want string }{
		{disk, "not on shared memory"},
		{taken, "exists already"},
	} {
		out, err := godwit("run", "--mem", "64M", "--control", filepath.Join(t.TempDir(), "vm.sock"), "--memory-file", c.path).CombinedOutput()
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("run --memory-file %s: %v %s; want %q", c.path, err, out, c.want)
		}
	}
	// Only a VM that arrives in a memory file can move out of it.
	out, err := godwit("run", "--mem", "64M", "--control", filepath.Join(t.TempDir(), "vm.sock"), "--localize").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "needs --incoming and --memory-file") {
		t.Errorf("run --localize without --incoming: %v %s", err, out)
	}
}
