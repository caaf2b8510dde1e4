package vmm

import (
	"context"
	"errors"
	"fmt"

	"strings"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/kvm"
)

// requireKVM fails, never skips: a machine without KVM must not pass the suite silently.
func requireKVM(t testing.TB) {
	t.Helper()
	if err := kvm.Available(""); err != nil {
		t.Fatalf("these tests need KVM: %v", err)
	}
}

type workload struct {
	kind, content, pattern string
	wssMiB, rate           uint64 // rate: pages/s over all vCPUs, 0 = max
	touch                  float64
	peak                   float64 // churn: the allocated share swings from touch to peak
	private, near          float64 // image: the VM's own pages and near-duplicates
	streams                int     // migration tests: connections for the pages
	tracking               string  // Config.DirtyTracking
	ringBytes              int     // Config.DirtyRingBytes
}

func newMachine(t testing.TB, memMiB uint64, vcpus int, w workload) *Machine {
	t.Helper()
	requireKVM(t)
	params, err := testParams(memMiB<<20, vcpus, w)
	if err != nil {
		t.Fatal(err)
	}
	var console []string
	m, err := New(Config{
		Name: t.Name(), MemBytes: memMiB << 20, VCPUs: vcpus, Image: guest.Image, Params: params,
		Console:       func(id int, s string) { console = append(console, fmt.Sprintf("%d: %s", id, s)) },
		DirtyTracking: w.tracking, DirtyRingBytes: w.ringBytes,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func waitHeartbeats(t testing.TB, m *Machine, n uint64) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		s := m.Stats()
		if s.State != StateRunning {
			t.Fatalf("machine %s: %s", s.State, s.Error)
		}
		if s.Heartbeats >= n {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("fewer than %d heartbeats after 60 s: %+v", n, m.Stats())
}

func verifyClean(t testing.TB, m *Machine) VerifyReport {
	t.Helper()
	// The guest reads every page, and reading a hole allocates it: on a host that gives fresh
	// memory slowly, a large idle VM takes minutes.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute+time.Duration(m.mem.Size>>30)*15*time.Second)
	defer cancel()
	r, err := m.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Mismatches != 0 || r.PagesChecked == 0 {
		t.Fatalf("verify: %+v", r)
	}
	return r
}

func TestWorkloadsBootHeartbeatAndVerify(t *testing.T) {
	cases := []workload{
		{kind: "idle", content: "text", touch: 0.5},
		{kind: "dirty", content: "text", pattern: "sequential", wssMiB: 16},
		{kind: "dirty", content: "random", pattern: "random", wssMiB: 16},
		{kind: "dirty", content: "image", pattern: "hotcold", wssMiB: 16},
		{kind: "dirty", content: "image", pattern: "random", wssMiB: 16, private: 0.2, near: 0.1},
		{kind: "dirty", content: "zero", pattern: "random", wssMiB: 16, rate: 20000},
	}
	for _, w := range cases {
		t.Run(fmt.Sprintf("%s-%s-%s", w.kind, w.content, w.pattern), func(t *testing.T) {
			m := newMachine(t, 64, 2, w)
			if err := m.Start(); err != nil {
				t.Fatal(err)
			}
			waitHeartbeats(t, m, 20)
			r := verifyClean(t, m)
			if w.kind == "dirty" && m.Stats().PagesWritten == 0 {
				t.Fatalf("dirty workload wrote no pages: %+v", m.Stats())
			}
			if r.PagesVersioned == 0 {
				t.Fatalf("no page carries a version: %+v", r)
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			final, err := m.Quit(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if final.Mismatches != 0 {
				t.Fatalf("final verify: %+v", final)
			}
		})
	}
}

// The oracle must be able to fail: a page changed by the VMM behind the guest's back is reported.
func TestVerifyCatchesCorruption(t *testing.T) {
	m := newMachine(t, 64, 2, workload{kind: "idle", content: "random", touch: 1})
	if err := m.Start(); err != nil {
		t.Fatal(err)
	}
	waitHeartbeats(t, m, 10)
	verifyClean(t, m)
	// One byte in a data page of vCPU 1's slice (written by the guest), one in a page of
	// vCPU 0's slice that the guest never wrote would be the same check; use a written one.
	gpa := uint64(guest.DataGPA) + (64<<20-guest.DataGPA)/2 + 64*guest.PageSize + 123
	if err := m.WriteGuest(gpa, []byte{0x5a}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := m.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Mismatches != 1 || r.FirstBadGPA == nil || *r.FirstBadGPA != gpa&^(guest.PageSize-1) {
		t.Fatalf("after corrupting 0x%x: %+v (first bad %v)", gpa, r, r.FirstBadGPA)
	}
}

func TestPauseResumeStopsHeartbeats(t *testing.T) {
	m := newMachine(t, 32, 1, workload{kind: "dirty", content: "text", pattern: "random", wssMiB: 8})
	if err := m.Start(); err != nil {
		t.Fatal(err)
	}
	waitHeartbeats(t, m, 10)
	if err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	a := m.Stats().Heartbeats
	time.Sleep(100 * time.Millisecond)
	if b := m.Stats().Heartbeats; b != a {
		t.Fatalf("heartbeats went on while paused: %d -> %d", a, b)
	}
	if err := m.Resume(); err != nil {
		t.Fatal(err)
	}
	waitHeartbeats(t, m, a+10)
	verifyClean(t, m)
}

// Save a running machine's state and memory into a second machine built without an image; the
// second one continues the guest, which then verifies every page.
func TestSaveRestoreIntoNewMachine(t *testing.T) {
	w := workload{kind: "dirty", content: "text", pattern: "random", wssMiB: 16}
	src := newMachine(t, 64, 2, w)
	if err := src.Start(); err != nil {
		t.Fatal(err)
	}
	waitHeartbeats(t, src, 50)
	if err := src.Pause(); err != nil {
		t.Fatal(err)
	}
	before := src.Stats()
	sections, err := src.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	dst, err := New(Config{Name: "restored", MemBytes: 64 << 20, VCPUs: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	buf := make([]byte, 64<<20)
	if _, err := src.Memory().ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	copy(dst.Memory().Mem, buf)
	if err := dst.RestoreState(sections); err != nil {
		t.Fatal(err)
	}
	src.Close()
	if err := dst.Start(); err != nil {
		t.Fatal(err)
	}
	waitHeartbeats(t, dst, before.Heartbeats+20)
	r := verifyClean(t, dst)
	if dst.Stats().PagesWritten <= before.PagesWritten {
		t.Fatalf("restored guest made no progress: %d -> %d pages", before.PagesWritten, dst.Stats().PagesWritten)
	}
	t.Logf("restored guest verified %d pages; heartbeat gap across the move %.2f ms", r.PagesChecked, dst.Stats().MigrationGapMS)
}

func TestRestoreRejectsBadState(t *testing.T) {
	requireKVM(t)
	m, err := New(Config{Name: "bad", MemBytes: 32 << 20, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for _, c := range []struct {
		sections []Section
		want     string
	}{
		{[]Section{{ID: "vcpu.0", Version: 99}}, "version 99"},
		{[]Section{{ID: "gpu", Version: 1}}, "unknown section"},
		{[]Section{{ID: "vcpu.0", Version: 1, Data: []byte{1, 2, 3}}}, "vCPU 0"},
		{[]Section{{ID: "vcpu.7", Version: 1}}, "names no vCPU"},
	} {
		err := m.RestoreState(c.sections)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("restore %v: %v, want error with %q", c.sections[0].ID, err, c.want)
		}
	}
}

func TestMissingKVMDeviceIsAClearError(t *testing.T) {
	_, err := New(Config{Name: "x", MemBytes: 32 << 20, VCPUs: 1, KVMDevice: "/nonexistent/kvm"})
	if !errors.Is(err, kvm.ErrNoKVM) || !strings.Contains(err.Error(), "/nonexistent/kvm") {
		t.Fatalf("error %v, want ErrNoKVM naming the path", err)
	}
}

func TestBadConfigIsAClearError(t *testing.T) {
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{MemBytes: 32 << 20, VCPUs: 0}, "vCPUs"},
		{Config{MemBytes: 1 << 20, VCPUs: 1}, "memory"},
		{Config{MemBytes: 33 << 20, VCPUs: 1}, "2 MiB"},
	} {
		if _, err := New(c.cfg); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("New(%+v) = %v, want error with %q", c.cfg, err, c.want)
		}
	}
}
