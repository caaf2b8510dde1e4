package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/agent"
	"github.com/godwit-vm/godwit/internal/testbed"
	"github.com/godwit-vm/godwit/internal/vmm"
	"github.com/godwit-vm/godwit/migration"
)

// gangReceiver is a 'godwit gang receive --json' process in a host.
type gangReceiver struct {
	cmd    *exec.Cmd
	stdout *bytes.Buffer
	stderr *bytes.Buffer
	exited chan error
	dir    string
}

func startGangReceiver(t testing.TB, h *testbed.Host, to string) *gangReceiver {
	t.Helper()
	r := &gangReceiver{stdout: new(bytes.Buffer), stderr: new(bytes.Buffer), exited: make(chan error, 1), dir: t.TempDir()}
	r.cmd = h.Command(os.Args[0], "gang", "receive", "--json", "--incoming", to, "--dir", r.dir)
	r.cmd.Env = append(os.Environ(), "GODWIT_AS_MAIN=1")
	r.cmd.Stdout, r.cmd.Stderr = r.stdout, r.stderr
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { r.exited <- r.cmd.Wait() }()
	t.Cleanup(func() {
		r.cmd.Process.Kill()
		exec.Command("pkill", "-9", "-f", "--control "+r.dir+"/").Run() // VM processes it left waiting
		// The VM processes it started outlive it by design; a test's must not.
		var a gangArrival
		json.Unmarshal(r.stdout.Bytes(), &a)
		for _, v := range a.VMs {
			if v.PID > 0 {
				syscall.Kill(v.PID, syscall.SIGKILL)
			}
		}
	})
	time.Sleep(300 * time.Millisecond) // listening
	return r
}

// arrival waits for the receiver's end and its report.
func (r *gangReceiver) arrival(t testing.TB) (gangArrival, error) {
	t.Helper()
	var err error
	select {
	case err = <-r.exited:
	case <-time.After(5 * time.Minute):
		t.Fatal("gang receive did not end")
	}
	var a gangArrival
	if jerr := json.Unmarshal(r.stdout.Bytes(), &a); jerr != nil {
		t.Fatalf("gang receive printed %q (%v): %v\n%s", r.stdout, err, jerr, r.stderr)
	}
	return a, err
}

// migrateGang runs 'godwit migrate --json --gang' in host h.
func migrateGang(t testing.TB, h *testbed.Host, env []string, vms []*vmProc, to string, args ...string) (gangReport, error) {
	t.Helper()
	var socks []string
	for _, v := range vms {
		socks = append(socks, v.sock)
	}
	cmd := h.Command(os.Args[0], append([]string{"migrate", "--json", "--gang", strings.Join(socks, ","), "--to", to}, args...)...)
	cmd.Env = append(append(os.Environ(), "GODWIT_AS_MAIN=1"), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var rep gangReport
	if jerr := json.Unmarshal(out, &rep); jerr != nil {
		t.Fatalf("migrate --gang printed %q (%v): %v\n%s", out, err, jerr, stderr.String())
	}
	return rep, err
}

// TestGangMigration migrates a gang of three VMs that hold an image's pages in common beside
// data of their own (one keeps writing) as one migration with dedup across them: each arrives
// in a VM process of its own and verifies, the source processes end as migrated, and the
// pages the VMs share travel once. A gang whose dedup hash collides on every page (forced) is
// refused by the destination's check, and its VMs run on here and verify; so does a gang whose
// destination is killed mid-way.
func TestGangMigration(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, 0)
	mem, wss := "256M", "32M"
	if emulated() {
		mem, wss = "64M", "8M"
	}
	image := []string{"--mem", mem, "--content", "image", "--seed", "7", "--private", "0.05", "--near", "0.05"}
	start := func(names ...string) []*vmProc {
		var vms []*vmProc
		for i, n := range names {
			args := append([]string{"--touch", "0.5"}, image...)
			if i == len(names)-1 {
				args = append([]string{"--workload", "dirty", "--wss", wss, "--rate", "4k"}, image...)
			}
			vms = append(vms, startVM(t, tb.Host(0), n, args...))
		}
		for _, v := range vms {
			v.waitHeartbeats(t, 20)
		}
		return vms
	}
	to := func(port int) string { return fmt.Sprintf("tcp:%s:%d", tb.Host(1).Addr(), port) }

	vms := start("g1", "g2", "g3")
	recv := startGangReceiver(t, tb.Host(1), to(7800))
	rep, err := migrateGang(t, tb.Host(0), nil, vms, to(7800), "--dedup", "--auto-converge")
	logReport(t, "gang of 3", rep.Report)
	if err != nil || rep.Result != migration.ResultOK || len(rep.VMs) != 3 {
		t.Fatalf("migrate --gang: %v %+v\n%s", err, rep, recv.stderr)
	}
	arr, err := recv.arrival(t)
	if err != nil || len(arr.VMs) != 3 {
		t.Fatalf("gang receive: %v %+v\n%s", err, arr, recv.stderr)
	}
	for _, v := range vms {
		if err := <-v.exited; err != nil {
			t.Errorf("source VM process after the gang left: %v %s", err, v.stderr)
		}
	}
	for _, v := range arr.VMs {
		(&vmProc{sock: v.Control}).verifyClean(t)
	}
	sent := rep.Pages.Raw + rep.Pages.Compressed + rep.Pages.Delta
	t.Logf("gang: %d pages whole, %d as references to pages of any of the three, %d bytes on the wire", sent, rep.Pages.Dedup, rep.BytesWire)
	if rep.Pages.Dedup < 2*sent {
		t.Errorf("the gang's shared pages did not go once: %d whole, %d references", sent, rep.Pages.Dedup)
	}

	t.Run("forced-collisions", func(t *testing.T) {
		vms := start("h1", "h2")
		recv := startGangReceiver(t, tb.Host(1), to(7810))
		rep, err := migrateGang(t, tb.Host(0), []string{faultEnv + "=" + faultDedupCollide}, vms, to(7810), "--dedup")
		if err == nil || rep.Result == migration.ResultOK {
			t.Fatalf("a gang whose every page collides: %v %+v", err, rep)
		}
		t.Logf("refused: %s", rep.Error)
		if _, err := recv.arrival(t); err == nil {
			t.Error("the destination of the colliding gang ended well")
		}
		for _, v := range vms {
			v.verifyClean(t)
		}
	})
	t.Run("destination-killed", func(t *testing.T) {
		vms := start("k1", "k2")
		recv := startGangReceiver(t, tb.Host(1), to(7820))
		kill := time.AfterFunc(1500*time.Millisecond, func() { recv.cmd.Process.Kill() })
		defer kill.Stop()
		rep, err := migrateGang(t, tb.Host(0), nil, vms, to(7820), "--max-bandwidth", "20M")
		if err == nil || rep.Result == migration.ResultOK {
			t.Fatalf("a gang whose destination was killed: %v %+v", err, rep)
		}
		for _, v := range vms {
			v.verifyClean(t)
		}
	})
}

// TestAgentGang migrates a gang of two VMs from agent to agent over mutual TLS: the
// destination agent starts their VM processes (its records from the start) and the receiver,
// the gang goes as one migration with dedup, and each VM verifies there under that agent.
func TestAgentGang(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, gbit)
	a, b, listen := agentPair(t, tb, 7740, nil, nil)
	mem := "256M"
	if emulated() {
		mem = "32M"
	}
	for _, n := range []string{"ga", "gb"} {
		if out, err := godwit("--agent", a.sock, "run", "--name", n, "--mem", mem, "--content", "image", "--touch", "0.5").CombinedOutput(); err != nil {
			t.Fatalf("run %s: %v %s", n, err, out)
		}
	}
	time.Sleep(time.Second) // their memory written
	cmd := tb.Host(0).Command(os.Args[0], "--agent", a.sock, "migrate", "--json", "--gang", "ga,gb", "--to", "agent:"+listen, "--dedup")
	cmd.Env = append(os.Environ(), "GODWIT_AS_MAIN=1")
	out, err := cmd.Output()
	var rep gangReport
	if jerr := json.Unmarshal(out, &rep); jerr != nil || err != nil || rep.Result != migration.ResultOK {
		t.Fatalf("migrate --gang to an agent: %v %v %s\nsource agent: %s\ndestination agent: %s", err, jerr, out, a.stderr, b.stderr)
	}
	logReport(t, "gang from agent to agent", rep.Report)
	for _, n := range []string{"ga", "gb"} {
		if v := a.waitState(t, n, agent.Exited); v.Result != "migrated" {
			t.Errorf("the source's record of %s: %+v", n, v)
		}
		b.waitState(t, n, agent.Running)
		var r vmm.VerifyReport
		runJSON(t, &r, "--agent", b.sock, "verify", "--json", "--vm", n)
		if r.Mismatches != 0 || r.PagesChecked == 0 {
			t.Fatalf("verify %s at the destination: %+v", n, r)
		}
	}
}
