package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/testbed"
	"github.com/godwit-vm/godwit/internal/version"
	"github.com/godwit-vm/godwit/internal/vmm"
	"github.com/godwit-vm/godwit/migration"
)

// Migration tests: the source and destination VM processes run in two network namespaces
// joined by a veth pair (optionally shaped), exactly as on two hosts. Every test ends with the
// guest that holds the VM verifying every page.

func newTestbed(t testing.TB, bps int64) *testbed.Testbed {
	t.Helper()
	tb, err := testbed.New(testbed.Config{Bandwidth: bps})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tb.Close() })
	return tb
}

type vmProc struct {
	sock   string
	cmd    *exec.Cmd
	exited chan error
	stdout *bytes.Buffer
	stderr *bytes.Buffer
}

// startVM starts 'godwit run --json ARGS' in host h.
func startVM(t testing.TB, h *testbed.Host, name string, args ...string) *vmProc {
	t.Helper()
	return startVMWith(t, h, os.Args[0], nil, name, args...)
}

// startVMWith is startVM with another godwit binary and more environment.
func startVMWith(t testing.TB, h *testbed.Host, bin string, env []string, name string, args ...string) *vmProc {
	t.Helper()
	p := &vmProc{sock: filepath.Join(t.TempDir(), name+".sock"), exited: make(chan error, 1), stdout: new(bytes.Buffer), stderr: new(bytes.Buffer)}
	p.cmd = h.Command(bin, append([]string{"run", "--json", "--name", name, "--control", p.sock}, args...)...)
	p.cmd.Env = append(append(os.Environ(), "GODWIT_AS_MAIN=1"), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.exited <- p.cmd.Wait() }()
	t.Cleanup(func() { p.cmd.Process.Kill() })
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := os.Stat(p.sock); err == nil {
			return p
		}
		select {
		case err := <-p.exited:
			t.Fatalf("%s exited early (%v): %s %s", name, err, p.stdout, p.stderr)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no control socket after 60 s", name)
		}
	}
}

func (p *vmProc) stats(t testing.TB) vmm.Stats {
	t.Helper()
	var s vmm.Stats
	runJSON(t, &s, "stats", "--json", "--control", p.sock)
	return s
}

func (p *vmProc) waitHeartbeats(t testing.TB, n uint64) vmm.Stats {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		s := p.stats(t)
		if s.Heartbeats >= n && s.State == vmm.StateRunning {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d heartbeats after 2 min, want %d (state %s %s)", s.Name, s.Heartbeats, n, s.State, s.Error)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// verifyClean asks the guest to verify and requires zero mismatches, and that the guest keeps
// making progress.
func (p *vmProc) verifyClean(t testing.TB) vmm.VerifyReport {
	t.Helper()
	before := p.stats(t)
	var r vmm.VerifyReport
	runJSON(t, &r, "verify", "--json", "--control", p.sock)
	if r.Mismatches != 0 || r.PagesChecked == 0 {
		t.Fatalf("verify on %s: %+v", before.Name, r)
	}
	p.waitHeartbeats(t, before.Heartbeats+10)
	return r
}

// migrate runs 'godwit migrate --json' and returns the report and whether it exited 0.
func migrate(t testing.TB, src *vmProc, to string, args ...string) (migration.Report, error) {
	t.Helper()
	out, err := godwit(append([]string{"migrate", "--json", "--control", src.sock, "--to", to}, args...)...).Output()
	var rep migration.Report
	if jerr := json.Unmarshal(out, &rep); jerr != nil {
		t.Fatalf("migrate printed %q (%v): %v", out, err, jerr)
	}
	var ver struct {
		Version string `json:"godwit_version"`
	}
	if json.Unmarshal(out, &ver); ver.Version != version.String() {
		t.Errorf("migrate --json: godwit_version %q, want %q", ver.Version, version.String())
	}
	return rep, err
}

func logReport(t *testing.T, what string, r migration.Report) {
	t.Helper()
	bl := -1.0
	if r.BlackoutMS != nil {
		bl = *r.BlackoutMS
	}
	t.Logf("%s: %s in %.0f ms, %d rounds, downtime %.1f ms (parts %+v), blackout %.1f ms, %d bytes, pages %+v, throttle max %d%%, converged %v %s",
		what, r.Result, r.TotalMS, r.Rounds, r.DowntimeMS, r.Downtime, bl, r.BytesWire, r.Pages, r.ThrottleMax, r.Converged, r.Reason)
}

const gbit = 1_000_000_000

func TestMigrateAcrossShapedLink(t *testing.T) {
	requireKVM(t)
	for _, c := range []struct {
		name string
		args []string
	}{
		{"idle", []string{"--mem", "512M", "--workload", "idle", "--touch", "0.5"}},
		{"heavy-writer", []string{"--mem", "512M", "--vcpus", "2", "--workload", "dirty", "--wss", "256M", "--rate", "max", "--pattern", "random", "--content", "random"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			tb := newTestbed(t, gbit)
			src := startVM(t, tb.Host(0), "src", c.args...)
			dst := startVM(t, tb.Host(1), "dst", "--incoming", fmt.Sprintf("tcp:%s:7000", tb.Host(1).Addr()))
			src.waitHeartbeats(t, 50)
			rep, err := migrate(t, src, fmt.Sprintf("tcp:%s:7000", tb.Host(1).Addr()), "--auto-converge", "--downtime-limit", "300ms")
			logReport(t, c.name, rep)
			if err != nil || rep.Result != "ok" {
				// Not converging within the limit is allowed for the writer only if the
				// report says why; the VM must then still run and verify at the source.
				if c.name == "heavy-writer" && rep.Reason != "" {
					src.verifyClean(t)
					t.Logf("did not converge: %s", rep.Reason)
					return
				}
				t.Fatalf("migrate: %v, report %+v", err, rep)
			}
			if err := migration.CheckDowntimeParts(rep); err != nil {
				t.Error(err)
			}
			if err := <-src.exited; err != nil {
				t.Fatalf("source process after migrating away: %v %s", err, src.stderr)
			}
			dst.verifyClean(t)
			s := dst.stats(t)
			if s.Workload["workload"] == nil || s.MigrationGapMS <= 0 {
				t.Fatalf("destination stats after migration: %+v", s)
			}
		})
	}
}

// TestMigrateWithStreams moves a heavy writer across the unshaped namespace link on four
// connections: every connection carries pages, the report lists them, and the destination
// verifies its memory.
func TestMigrateWithStreams(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, 0)
	to := fmt.Sprintf("tcp:%s:7000", tb.Host(1).Addr())
	src := startVM(t, tb.Host(0), "src", "--mem", "512M", "--workload", "dirty", "--wss", "128M", "--rate", "max", "--pattern", "random", "--content", "random")
	dst := startVM(t, tb.Host(1), "dst", "--incoming", to)
	src.waitHeartbeats(t, 1500) // 64 pages each: the working set written about three times
	rep, err := migrate(t, src, to, "--streams", "4", "--auto-converge")
	logReport(t, "4 streams", rep)
	if err != nil || rep.Result != "ok" {
		t.Fatalf("migrate: %v, report %+v", err, rep)
	}
	if len(rep.Streams) != 4 {
		t.Fatalf("report lists %d streams, want 4: %+v", len(rep.Streams), rep.Streams)
	}
	for _, st := range rep.Streams {
		if st.Pages == 0 || st.Bytes == 0 {
			t.Errorf("stream %d carried nothing: %+v", st.Index, rep.Streams)
		}
	}
	t.Logf("streams %+v", rep.Streams)
	if err := <-src.exited; err != nil {
		t.Fatalf("source process after migrating away: %v %s", err, src.stderr)
	}
	dst.verifyClean(t)
}

// TestMigrateOverUnixSocket moves a writer between two VM processes of one host over a Unix
// socket, copying its memory (--mode precopy: the default there is a handover), with two
// streams and --dedup (its pages repeat: content image), and the destination
// verifies its memory.
func TestMigrateOverUnixSocket(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, 0)
	to := "unix:" + filepath.Join(t.TempDir(), "incoming.sock")
	// A rate the nested host's slow link keeps up with too.
	src := startVM(t, tb.Host(0), "src", "--mem", "256M", "--workload", "dirty", "--wss", "32M", "--rate", "2k", "--pattern", "random", "--content", "image")
	dst := startVM(t, tb.Host(0), "dst", "--incoming", to)
	src.waitHeartbeats(t, 200)
	rep, err := migrate(t, src, to, "--mode", "precopy", "--streams", "2", "--auto-converge", "--dedup")
	logReport(t, "unix socket", rep)
	if err != nil || rep.Result != "ok" || len(rep.Streams) != 2 {
		t.Fatalf("migrate: %v, report %+v", err, rep)
	}
	if !strings.HasPrefix(rep.Dedup, "on") || rep.Pages.Dedup < 4096 || rep.Saved.Dedup == 0 {
		t.Errorf("--dedup: report says dedup %q, pages %+v, saved %+v", rep.Dedup, rep.Pages, rep.Saved)
	}
	if err := <-src.exited; err != nil {
		t.Fatalf("source process after migrating away: %v %s", err, src.stderr)
	}
	dst.verifyClean(t)
}

func TestMigrateThereAndBack(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, 0)
	args := []string{"--mem", "128M", "--vcpus", "2", "--workload", "dirty", "--wss", "32M", "--rate", "20k", "--content", "text"}
	a := startVM(t, tb.Host(0), "a", args...)
	a.waitHeartbeats(t, 50)
	for i, hop := range []struct{ from, to int }{{0, 1}, {1, 0}} {
		to := fmt.Sprintf("tcp:%s:%d", tb.Host(hop.to).Addr(), 7100+i)
		b := startVM(t, tb.Host(hop.to), fmt.Sprintf("hop%d", i), "--incoming", to)
		// The way back compresses its text pages with S2.
		flags := [][]string{{"--auto-converge"}, {"--auto-converge", "--compress", "s2"}}[i]
		rep, err := migrate(t, a, to, flags...)
		logReport(t, fmt.Sprintf("hop %d -> %d", hop.from, hop.to), rep)
		if err != nil || rep.Result != "ok" {
			t.Fatalf("hop %d: %v %+v", i, err, rep)
		}
		if i == 1 && (rep.Compression != "s2" || rep.Pages.Compressed == 0 || rep.Saved.Compressed == 0) {
			t.Errorf("--compress s2: compression %q, pages %+v, saved %+v", rep.Compression, rep.Pages, rep.Saved)
		}
		if n, _ := migration.AutoStreams(runtime.NumCPU(), 0); rep.StreamsChosen == "" || len(rep.Streams) != n {
			t.Errorf("hop %d: streams chosen %q, %d listed; want the engine's choice of %d", i, rep.StreamsChosen, len(rep.Streams), n)
		}
		if err := migration.CheckDowntimeParts(rep); err != nil {
			t.Error(err)
		}
		b.verifyClean(t)
		a = b
	}
}

// tamperFunc sees each chunk of a stream at offset off; it may change the bytes, or end the
// stream by returning false.
type tamperFunc func(off int64, b []byte) bool

func pass(int64, []byte) bool { return true }

// pipe copies from r to w through tamper and closes both when done.
func pipe(w, r net.Conn, tamper tamperFunc) {
	buf := make([]byte, 64<<10)
	var off int64
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if !tamper(off, buf[:n]) {
				break
			}
			if _, werr := w.Write(buf[:n]); werr != nil {
				break
			}
			off += int64(n)
		}
		if err != nil {
			break
		}
	}
	r.Close()
	w.Close()
}

// proxy forwards the connections from a listener in host h to target, passing the first
// one's bytes from the source through toDst and from the destination through toSrc; the
// others (the extra page streams) pass unchanged.
func proxy(t *testing.T, h *testbed.Host, port int, target string, toDst, toSrc tamperFunc) string {
	t.Helper()
	var ln net.Listener
	if err := h.Do(func() (err error) {
		ln, err = net.Listen("tcp", fmt.Sprintf("%s:%d", h.Addr(), port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for first := true; ; first = false {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			var d net.Conn
			h.Do(func() (err error) { d, err = net.Dial("tcp", target); return err })
			if d == nil {
				c.Close()
				continue
			}
			if !first {
				toDst, toSrc = pass, pass
			}
			go pipe(c, d, toSrc)
			go pipe(d, c, toDst)
		}
	}()
	return fmt.Sprintf("tcp:%s:%d", h.Addr(), port)
}

// A destination that dies, and streams that are corrupted, cut short or of another version:
// each gives the source a clear error, and the source VM keeps running and verifies clean.
func TestMigrationFailuresLeaveSourceRunning(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, 0)
	src := startVM(t, tb.Host(0), "src", "--mem", "128M", "--vcpus", "2", "--workload", "dirty", "--wss", "32M", "--rate", "20k", "--content", "random")
	src.waitHeartbeats(t, 50)
	dstAddr := func(port int) string { return fmt.Sprintf("%s:%d", tb.Host(1).Addr(), port) }

	t.Run("destination-killed", func(t *testing.T) {
		dst := startVM(t, tb.Host(1), "dst-killed", "--incoming", "tcp:"+dstAddr(7200))
		// Kill the destination while pages are flowing: at 20 MB/s the first round of the
		// populated memory takes several seconds.
		kill := time.AfterFunc(1500*time.Millisecond, func() { dst.cmd.Process.Kill() })
		defer kill.Stop()
		rep, err := migrate(t, src, "tcp:"+dstAddr(7200), "--max-bandwidth", "20M")
		logReport(t, "destination killed", rep)
		if err == nil || rep.Result == "ok" || rep.Error == "" {
			t.Fatalf("migration to a killed destination: %v %+v", err, rep)
		}
		src.verifyClean(t)
	})
	t.Run("cancelled", func(t *testing.T) {
		dst := startVM(t, tb.Host(1), "dst-cancel", "--incoming", "tcp:"+dstAddr(7250))
		cmd := godwit("migrate", "--json", "--control", src.sock, "--to", "tcp:"+dstAddr(7250), "--max-bandwidth", "10M")
		var out bytes.Buffer
		cmd.Stdout = &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(1500 * time.Millisecond) // pages are flowing: 10 MB/s against 30+ MB populated
		cmd.Process.Signal(os.Interrupt)
		err := cmd.Wait()
		var rep migration.Report
		if jerr := json.Unmarshal(out.Bytes(), &rep); jerr != nil {
			t.Fatalf("migrate printed %q: %v", out.String(), jerr)
		}
		logReport(t, "cancelled", rep)
		if err == nil || rep.Result != "cancelled" {
			t.Fatalf("interrupted migrate: %v, report %+v", err, rep)
		}
		select {
		case <-dst.exited:
		case <-time.After(30 * time.Second):
			t.Errorf("destination of a cancelled migration still running")
		}
		src.verifyClean(t)
	})
	otherVersion := func(off int64, b []byte) bool {
		if off == 0 && len(b) >= 16 {
			binary.LittleEndian.PutUint32(b[8:], 99)
			binary.LittleEndian.PutUint32(b[12:], 99)
		}
		return true
	}
	for _, c := range []struct {
		name         string
		toDst, toSrc tamperFunc
		want         []string // any of these in the source's error
	}{
		{"corrupted", func(off int64, b []byte) bool {
			if at := int64(1 << 20); off <= at && at < off+int64(len(b)) {
				b[at-off] ^= 0x40
			}
			return true
		}, pass, []string{"crc", "checksum"}},
		{"truncated", func(off int64, b []byte) bool { return off < 1<<20 }, pass, []string{"EOF", "reset", "closed", "broken"}},
		// A destination that speaks only version 99.
		{"other-version", pass, otherVersion, []string{"version"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			port := 7300 + int(atomic.AddInt32(&proxyPorts, 1))
			dst := startVM(t, tb.Host(1), "dst-"+c.name, "--incoming", "tcp:"+dstAddr(port))
			to := proxy(t, tb.Host(1), port+100, dstAddr(port), c.toDst, c.toSrc)
			rep, err := migrate(t, src, to)
			logReport(t, c.name, rep)
			if err == nil || rep.Result == "ok" {
				t.Fatalf("migration through a %s stream succeeded: %+v", c.name, rep)
			}
			ok := false
			for _, w := range c.want {
				ok = ok || strings.Contains(strings.ToLower(rep.Error), strings.ToLower(w))
			}
			if !ok {
				t.Errorf("error %q names none of %q", rep.Error, c.want)
			}
			select {
			case err := <-dst.exited:
				if err == nil {
					t.Errorf("destination of a %s stream exited 0: %s", c.name, dst.stdout)
				}
			case <-time.After(30 * time.Second):
				t.Errorf("destination of a %s stream still running", c.name)
			}
			src.verifyClean(t)
		})
	}
}

var proxyPorts int32

// TestMigrateChurnFreePages runs 'godwit run --workload churn' and migrates it with the
// defaults and --delta: the guest's free pages are reported and not sent, and the destination
// verifies.
// There 'godwit balloon' fills the guest's balloon and empties it again.
func TestMigrateChurnFreePages(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, 0)
	to := fmt.Sprintf("tcp:%s:7000", tb.Host(1).Addr())
	src := startVM(t, tb.Host(0), "src", "--mem", "256M", "--workload", "churn", "--touch", "0.3", "--rate", "5000", "--content", "random")
	dst := startVM(t, tb.Host(1), "dst", "--incoming", to)
	src.waitHeartbeats(t, 20)
	// Auto-converge: where the guest runs emulated (a nested host) the link is about as fast as
	// the churn, and this test is about the free pages, not about convergence.
	rep, err := migrate(t, src, to, "--delta", "--delta-cache", "32M", "--auto-converge")
	logReport(t, "churn", rep)
	if err != nil || rep.Result != "ok" {
		t.Fatalf("migrate: %v, report %+v", err, rep)
	}
	if rep.Delta != "on (a cache of 8192 pages)" {
		t.Errorf("--delta --delta-cache 32M: report says delta %q", rep.Delta)
	}
	if rep.FreePages != "reported by the guest" || rep.FreePagesReported == 0 || rep.Pages.Free < rep.Pages.Raw {
		t.Fatalf("free pages %q, %d reported, pages %+v: want most pages skipped as free", rep.FreePages, rep.FreePagesReported, rep.Pages)
	}
	dst.verifyClean(t)

	before := dst.stats(t)
	balloon := func(target string, done func(vmm.Stats) bool) vmm.Stats {
		t.Helper()
		if out, err := godwit("balloon", "--control", dst.sock, target).CombinedOutput(); err != nil {
			t.Fatalf("godwit balloon %s: %v: %s", target, err, out)
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			s := dst.stats(t)
			if done(s) {
				return s
			}
			if time.Now().After(deadline) {
				t.Fatalf("after 'godwit balloon %s': stats %+v", target, s)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	full := balloon("auto", func(s vmm.Stats) bool { return s.BalloonBytes > 100<<20 })
	t.Logf("balloon %d MiB (%s): resident %d -> %d MiB", full.BalloonBytes>>20, full.BalloonTarget, before.ResidentBytes>>20, full.ResidentBytes>>20)
	// The free pages never came here, so the balloon has nothing to give back: resident
	// memory must not grow, and the pages are released all the same.
	if full.BalloonReleased*4096 < full.BalloonBytes || full.ResidentBytes > before.ResidentBytes+8<<20 {
		t.Errorf("resident memory %d -> %d bytes with %d in the balloon, %d pages released: want all released, no growth", before.ResidentBytes, full.ResidentBytes, full.BalloonBytes, full.BalloonReleased)
	}
	balloon("0", func(s vmm.Stats) bool { return s.BalloonBytes == 0 })
	dst.verifyClean(t)
}
