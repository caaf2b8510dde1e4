package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/agent"
	"github.com/godwit-vm/godwit/internal/vmm"
	"github.com/godwit-vm/godwit/migration"
)

// saveTemplateOf starts a VM in host 0 with args, waits for its workload, pauses it, saves it
// as a template in store and ends it; it returns the template's id.
func saveTemplateOf(t testing.TB, p *vmProc, store string) string {
	t.Helper()
	p.waitHeartbeats(t, 20)
	if out, err := godwit("pause", "--control", p.sock).CombinedOutput(); err != nil {
		t.Fatalf("pause: %v %s", err, out)
	}
	var saved templateSaved
	runJSON(t, &saved, "template", "save", "--json", "--control", p.sock, "--templates", store)
	t.Logf("template %s saved in %.0f ms", saved.ID[:12], saved.DurationMS)
	if out, err := godwit("quit", "--control", p.sock).CombinedOutput(); err != nil {
		t.Fatalf("quit the template's VM: %v %s", err, out)
	}
	return saved.ID
}

// waitDiverged waits until a clone has written what 'run --diverge' asked for (a clone's
// heartbeat count comes from its template, so waiting for heartbeats says nothing).
func waitDiverged(t testing.TB, stats func() vmm.Stats) vmm.Stats {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; {
		s := stats()
		if !s.Diverging && s.State == vmm.StateRunning {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still diverging after a minute: %+v", s.Name, s)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestTemplateClones saves a VM as a template, clones three VMs from it that each write private
// data (one keeps writing), and migrates them between the namespace hosts: to a host without
// the template the migration is refused and the clone runs on; once the template is pushed
// there, a clone sends only the pages it changed; with --flatten it goes whole to a host
// without the template. Every VM verifies its memory, and a clone's host holds only the pages
// it wrote.
func TestTemplateClones(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, 0)
	dir := t.TempDir()
	storeA, storeB, storeC := filepath.Join(dir, "a"), filepath.Join(dir, "b"), filepath.Join(dir, "c")
	mem, wss := "256M", "32M"
	if emulated() {
		mem, wss = "64M", "8M"
	}
	idle := saveTemplateOf(t, startVM(t, tb.Host(0), "idle-base", "--mem", mem, "--content", "random", "--touch", "0.5"), storeA)
	writer := saveTemplateOf(t, startVM(t, tb.Host(0), "writer-base", "--mem", mem, "--workload", "dirty", "--wss", wss, "--rate", "4k", "--content", "random"), storeA)

	var ls []map[string]any
	runJSON(t, &ls, "template", "ls", "--json", "--templates", storeA)
	if len(ls) != 2 {
		t.Fatalf("template ls lists %d templates, want 2: %v", len(ls), ls)
	}

	clone := func(name, id string, args ...string) *vmProc {
		p := startVM(t, tb.Host(0), name, append([]string{"--template", id[:12], "--templates", storeA}, args...)...)
		s := waitDiverged(t, func() vmm.Stats { return p.stats(t) })
		if s.CloneOf != id {
			t.Fatalf("%s: stats say clone of %q, want %s", name, s.CloneOf, id)
		}
		return p
	}
	c1 := clone("c1", idle, "--diverge", "0.1")
	c2 := clone("c2", idle, "--diverge", "0.1")
	c3 := clone("c3", writer)
	for _, c := range []*vmProc{c1, c2, c3} {
		c.verifyClean(t)
	}
	s1 := c1.stats(t)
	if s1.ResidentBytes > s1.MemBytes/5 {
		t.Errorf("c1 holds %d bytes of its own, more than a fifth of its %d: the template's pages are not shared", s1.ResidentBytes, s1.MemBytes)
	}
	t.Logf("c1 holds %d KiB of its own of %d MiB", s1.ResidentBytes>>10, s1.MemBytes>>20)

	to := func(port int) string { return fmt.Sprintf("tcp:%s:%d", tb.Host(1).Addr(), port) }

	// A clone moves by pre-copy only, and says so before it dials.
	if rep, err := migrate(t, c2, to(7630), "--mode", "postcopy"); err == nil || !strings.Contains(rep.Error, "pre-copy") {
		t.Errorf("post-copy of a clone: %v %+v", err, rep)
	}

	// The destination's store lacks the template: both sides say so, the clone runs on.
	refusing := startVM(t, tb.Host(1), "refusing", "--incoming", to(7600), "--templates", storeB)
	rep, err := migrate(t, c1, to(7600))
	if err == nil || rep.Result == "ok" || !strings.Contains(rep.Error, "template") {
		t.Fatalf("migration of a clone to a host without its template: %v %+v", err, rep)
	}
	if err := <-refusing.exited; err == nil || !strings.Contains(refusing.stdout.String()+refusing.stderr.String(), "template") {
		t.Errorf("the destination without the template: exit %v, said %s %s", err, refusing.stdout, refusing.stderr)
	}
	c1.verifyClean(t)

	var p pushed
	runJSON(t, &p, "template", "push", "--json", "--templates", storeA, "--to", storeB, idle[:8])
	if p.Existed || p.Bytes < int64(s1.MemBytes/4) {
		t.Fatalf("push: %+v", p)
	}
	t.Logf("template pushed: %d bytes in %.0f ms (sparse: only its data pages are read)", p.Bytes, p.DurationMS)
	runJSON(t, &p, "template", "push", "--json", "--templates", storeA, "--to", storeB, idle[:8])
	if !p.Existed {
		t.Fatalf("second push copied the template again: %+v", p)
	}
	runJSON(t, &p, "template", "push", "--json", "--templates", storeA, "--to", storeB, writer[:8])

	pages := s1.MemBytes / 4096
	for i, c := range []struct {
		src  *vmProc
		args []string
	}{{c1, nil}, {c3, []string{"--auto-converge"}}} {
		dst := startVM(t, tb.Host(1), fmt.Sprintf("dst%d", i), "--incoming", to(7610+i), "--templates", storeB)
		before := c.src.stats(t)
		rep, err := migrate(t, c.src, to(7610+i), c.args...)
		logReport(t, before.Name, rep)
		if err != nil || rep.Result != "ok" {
			t.Fatalf("migrate %s: %v %+v", before.Name, err, rep)
		}
		sent := rep.Pages.Raw + rep.Pages.Zero
		t.Logf("%s: %d pages sent, %d of the template's skipped, of %d", before.Name, sent, rep.Pages.Base, pages)
		if rep.Pages.Base < pages/2 || sent > pages/4 {
			t.Errorf("%s sent %d pages and skipped %d of the template's: the template's pages travelled", before.Name, sent, rep.Pages.Base)
		}
		dst.verifyClean(t)
		ds := dst.stats(t)
		if ds.CloneOf != before.CloneOf || ds.ResidentBytes > before.ResidentBytes*11/10+4<<20 {
			t.Errorf("%s at the destination: clone of %q (want %s), holds %d bytes of its own (the source %d)", before.Name, ds.CloneOf, before.CloneOf, ds.ResidentBytes, before.ResidentBytes)
		}
	}

	// --flatten: the whole clone, to a host without the template, as a VM of its own.
	flat := startVM(t, tb.Host(1), "flat", "--incoming", to(7620), "--templates", storeC)
	rep, err = migrate(t, c2, to(7620), "--flatten")
	logReport(t, "flatten", rep)
	// Half of memory was written (more where the clone diverged on untouched pages); where
	// the store's file system shows no holes (the nested host's), the rest goes as zero pages.
	if err != nil || rep.Result != "ok" || rep.Pages.Base != 0 || rep.Pages.Raw < pages/3 {
		t.Fatalf("migrate --flatten: %v %+v", err, rep)
	}
	flat.verifyClean(t)
	if s := flat.stats(t); s.CloneOf != "" || s.State != vmm.StateRunning {
		t.Errorf("the flattened clone at the destination: %+v", s)
	}
}

// TestAgentTemplates migrates two clones of one template between agents over mutual TLS: the
// first migration pushes the template to the destination agent, which lacked it, and the
// second finds it there; each clone sends only the pages it changed and verifies there.
func TestAgentTemplates(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, gbit)
	dir := t.TempDir()
	storeA, storeB := filepath.Join(dir, "store-a"), filepath.Join(dir, "store-b")
	a, b, listen := agentPair(t, tb, 7720, []string{"--templates", storeA}, []string{"--templates", storeB})
	mem := "256M"
	if emulated() {
		mem = "64M"
	}
	ga := func(args ...string) []byte {
		t.Helper()
		out, err := godwit(append([]string{"--agent", a.sock}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("godwit %v: %v %s", args, err, out)
		}
		return out
	}
	ga("run", "--name", "base", "--mem", mem, "--content", "random", "--touch", "0.5")
	time.Sleep(500 * time.Millisecond)
	ga("pause", "--vm", "base")
	var saved templateSaved
	runJSON(t, &saved, "--agent", a.sock, "template", "save", "--json", "--vm", "base", "--templates", storeA)
	ga("quit", "--vm", "base")
	for _, n := range []string{"c1", "c2"} {
		ga("run", "--name", n, "--template", saved.ID[:12], "--diverge", "0.05")
	}
	for i, n := range []string{"c1", "c2"} {
		a.waitState(t, n, agent.Running)
		waitDiverged(t, func() vmm.Stats {
			var s vmm.Stats
			runJSON(t, &s, "--agent", a.sock, "stats", "--json", "--vm", n)
			return s
		})
		out, err := godwit("--agent", a.sock, "migrate", "--json", "--vm", n, "--to", "agent:"+listen).Output()
		var rep migration.Report
		if jerr := json.Unmarshal(out, &rep); jerr != nil || err != nil || rep.Result != migration.ResultOK {
			t.Fatalf("migrate %s: %v %v %s\nsource agent: %s\ndestination agent: %s", n, err, jerr, out, a.stderr, b.stderr)
		}
		logReport(t, n, rep)
		if rep.Pages.Base == 0 || rep.Pages.Raw > rep.Pages.Base/4 {
			t.Errorf("%s: %d pages sent raw, %d of the template's skipped", n, rep.Pages.Raw, rep.Pages.Base)
		}
		if pushes := strings.Count(a.stderr.String(), "template pushed"); pushes != 1 {
			t.Errorf("after migration %d the source agent logged %d template pushes, want 1", i+1, pushes)
		}
		b.waitState(t, n, agent.Running)
		var r vmm.VerifyReport
		runJSON(t, &r, "--agent", b.sock, "verify", "--json", "--vm", n)
		if r.Mismatches != 0 || r.PagesChecked == 0 {
			t.Fatalf("verify %s at the destination: %+v", n, r)
		}
	}
	var p agent.TemplatePush
	runJSON(t, &p, "--agent", a.sock, "template", "push", "--json", saved.ID[:12], "--to", "agent:"+listen)
	if !p.Existed || p.Bytes != 0 {
		t.Errorf("push of a template the destination holds: %+v", p)
	}
}
