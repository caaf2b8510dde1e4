package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/control"
	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/kvm"
	"github.com/godwit-vm/godwit/internal/testbed/kvmhost"
	"github.com/godwit-vm/godwit/internal/version"
	"github.com/godwit-vm/godwit/internal/vmm"
)

// The test binary doubles as the godwit binary: with GODWIT_AS_MAIN set it runs main().
func TestMain(m *testing.M) {
	if os.Getenv("GODWIT_AS_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func godwit(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "GODWIT_AS_MAIN=1")
	return cmd
}

// emulated says whether the tests run in a nested KVM host (tools/kvmhost), where guests and
// the VMM run emulated, many times slower: tests that move much memory move less there.
func emulated() bool { return os.Getenv(kvmhost.GuestEnv) == "1" }

func requireKVM(t testing.TB) {
	t.Helper()
	if err := kvm.Available(""); err != nil {
		t.Fatalf("this test needs KVM: %v", err)
	}
}

func runJSON(t testing.TB, out any, args ...string) {
	t.Helper()
	b, err := godwit(args...).Output()
	if err != nil {
		t.Fatalf("godwit %s: %v\n%s", strings.Join(args, " "), err, b)
	}
	if err := json.Unmarshal(b, out); err != nil {
		t.Fatalf("godwit %s printed %q: %v", strings.Join(args, " "), b, err)
	}
}

// startRun starts 'godwit run' with args and waits for its control socket.
func startRun(t *testing.T, sock string, args ...string) (cmd *exec.Cmd, exited <-chan error, stdout, stderr *bytes.Buffer) {
	t.Helper()
	stdout, stderr = new(bytes.Buffer), new(bytes.Buffer)
	cmd = godwit(append([]string{"run", "--control", sock}, args...)...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(sock); err == nil {
			return cmd, done, stdout, stderr
		}
		select {
		case err := <-done:
			t.Fatalf("godwit run exited (%v): %s", err, stderr)
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Fatalf("no control socket at %s after 60 s: %s", sock, stderr)
	return
}

// A VM run from the command line serves stats, verify, pause, resume, quit; a page corrupted
// through the VMM makes verify fail, and the run ends reporting it.
func TestRunStatsVerifyPauseResumeQuit(t *testing.T) {
	requireKVM(t)
	sock := filepath.Join(t.TempDir(), "vm.sock")
	_, exited, stdout, _ := startRun(t, sock, "--json", "--name", "cli", "--mem", "64M", "--vcpus", "2", "--workload", "dirty",
		"--wss", "16M", "--rate", "50k", "--pattern", "hotcold", "--content", "text")

	var s vmm.Stats
	deadline := time.Now().Add(30 * time.Second)
	for s.Heartbeats < 20 && time.Now().Before(deadline) {
		runJSON(t, &s, "stats", "--json", "--control", sock)
		time.Sleep(20 * time.Millisecond)
	}
	if s.Heartbeats < 20 || s.State != vmm.StateRunning || s.Workload["pattern"] != "hotcold" {
		t.Fatalf("stats: %+v", s)
	}
	var ver struct {
		Version string `json:"godwit_version"`
	}
	runJSON(t, &ver, "stats", "--json", "--control", sock)
	if ver.Version != version.String() {
		t.Fatalf("stats --json: godwit_version %q, want %q", ver.Version, version.String())
	}
	var r vmm.VerifyReport
	runJSON(t, &r, "verify", "--json", "--control", sock)
	if r.Mismatches != 0 || r.PagesChecked == 0 {
		t.Fatalf("verify: %+v", r)
	}
	if out, err := godwit("pause", "--control", sock).CombinedOutput(); err != nil {
		t.Fatalf("pause: %v %s", err, out)
	}
	runJSON(t, &s, "stats", "--json", "--control", sock)
	if s.State != vmm.StatePaused {
		t.Fatalf("after pause: state %s", s.State)
	}
	if out, err := godwit("verify", "--control", sock).CombinedOutput(); err == nil || !strings.Contains(string(out), "paused") {
		t.Fatalf("verify while paused: %v %s", err, out)
	}
	if out, err := godwit("resume", "--control", sock).CombinedOutput(); err != nil {
		t.Fatalf("resume: %v %s", err, out)
	}

	// Corrupt a page outside the working set (never written, so it must read as zero).
	gpa := uint64(64<<20 - 3*guest.PageSize)
	cl := control.Dial(sock)
	err := cl.Call(context.Background(), http.MethodPost, "/v1/debug/write", map[string]any{"gpa": gpa, "data": base64.StdEncoding.EncodeToString([]byte{1})}, nil)
	if err != nil {
		t.Fatal(err)
	}
	cmd := godwit("verify", "--json", "--control", sock)
	out, err := cmd.Output()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("verify after corruption: %v, want exit status 1; %s", err, out)
	}
	json.Unmarshal(out, &r)
	if r.Mismatches != 1 || r.FirstBadGPA == nil || *r.FirstBadGPA != gpa {
		t.Fatalf("verify after corruption: %+v", r)
	}

	if out, err := godwit("quit", "--control", sock).CombinedOutput(); err == nil {
		t.Fatalf("quit of a corrupt VM exited 0: %s", out)
	}
	if err := <-exited; err == nil {
		t.Fatalf("godwit run of a corrupt VM exited 0")
	}
	var sum runSummary
	if err := json.Unmarshal(stdout.Bytes(), &sum); err != nil {
		t.Fatalf("run summary %q: %v", stdout.String(), err)
	}
	if sum.Result != "corrupt" || sum.Verify == nil || sum.Verify.Mismatches != 1 {
		t.Fatalf("run summary: %+v", sum)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("control socket left behind: %v", err)
	}
}

// Bad flags and a missing KVM device give one clear line and a non-zero status, before any VM
// is built.
func TestBadInputIsAClearError(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "--vcpus", "0"}, "--vcpus 0"},
		{[]string{"run", "--mem", "lots"}, "size"},
		{[]string{"run", "--workload", "busy"}, "idle"},
		{[]string{"run", "--workload", "dirty", "--wss", "2G", "--mem", "1G"}, "larger than --mem"},
		{[]string{"run", "--touch", "2"}, "--touch"},
		{[]string{"run", "--workload", "churn", "--touch", "0.5", "--peak", "0.4"}, "above --touch"},
		{[]string{"run", "--workload", "dirty", "--peak", "0.8"}, "only the churn workload"},
		{[]string{"run", "--rate", "fast"}, "rate"},
		{[]string{"run", "--balloon", "auto:2"}, "auto:SHARE"},
		{[]string{"balloon", "--control", "/nonexistent/vm.sock", "lots"}, "balloon target"},
		{[]string{"run", "--kvm-device", "/nonexistent/kvm", "--mem", "64M"}, "/nonexistent/kvm"},
		{[]string{"stats", "--control", "/nonexistent/vm.sock"}, "no VM at /nonexistent/vm.sock"},
		{[]string{"frobnicate"}, "unexpected argument"},
		{[]string{"run", "--incoming-timeout", "1s"}, "with --incoming"},
		{[]string{"run", "--private", "0.1"}, "need --content image"},
		{[]string{"run", "--content", "image", "--private", "0.6", "--near", "0.5"}, "more than all pages"},
		{[]string{"run", "--content", "image", "--near", "1.5"}, "--near 1.5"},
		{[]string{"migrate", "--control", "/nonexistent/vm.sock", "--to", "routed:/run/x.sock"}, "migrate to the agent"},
		// A destination that nobody migrates to ends when its wait is over.
		{[]string{"run", "--incoming", "tcp:127.0.0.1:0", "--incoming-timeout", "200ms", "--control", filepath.Join(t.TempDir(), "in.sock")}, "no migration connected within --incoming-timeout 200ms"},
	} {
		out, err := godwit(c.args...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("godwit %s: %v, output %q; want failure mentioning %q", strings.Join(c.args, " "), err, out, c.want)
		}
	}
}

// TestFirstContact: godwit with no arguments prints its help on standard error and exits 2 (a
// usage error, like a bad flag); --help prints the same on standard output and exits 0;
// --version prints the version line.
func TestFirstContact(t *testing.T) {
	var stdout, stderr bytes.Buffer
	cmd := godwit()
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || stdout.Len() != 0 ||
		!strings.HasPrefix(stderr.String(), "Usage: godwit <command>") || !strings.Contains(stderr.String(), "migrate") {
		t.Fatalf("godwit with no arguments: %v, stdout %q, stderr %q; want status 2 and the help on stderr", err, &stdout, &stderr)
	}
	help, err := godwit("--help").Output()
	if err != nil || string(help) != stderr.String() {
		t.Fatalf("godwit --help: %v, %q; want status 0 and the help on stdout", err, help)
	}
	out, err := godwit("--version").Output()
	if want := version.String() + "\n"; err != nil || string(out) != want {
		t.Fatalf("godwit --version: %v, %q; want %q", err, out, want)
	}
	if !strings.Contains(string(out), ", protocol v") {
		t.Fatalf("godwit --version %q does not name the migration protocol", out)
	}
}

// TestJSONFailureNamesVersion: a failed command's --json object says which godwit failed.
func TestJSONFailureNamesVersion(t *testing.T) {
	b, err := godwit("stats", "--json", "--control", "/nonexistent/vm.sock").Output()
	var r struct {
		Version string `json:"godwit_version"`
		Result  string `json:"result"`
		Error   string `json:"error"`
	}
	if err == nil || json.Unmarshal(b, &r) != nil || r.Result != "failed" || r.Version != version.String() || r.Error == "" {
		t.Fatalf("godwit stats --json on a missing socket: %v, %q; want a failed result with godwit_version %q", err, b, version.String())
	}
}
