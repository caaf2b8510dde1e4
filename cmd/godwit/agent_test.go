package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/agent"
	"github.com/godwit-vm/godwit/internal/testbed"
	"github.com/godwit-vm/godwit/internal/vmm"
	"github.com/godwit-vm/godwit/migration"
)

// agentProc is a 'godwit agent' process.
type agentProc struct {
	cmd    *exec.Cmd
	sock   string
	stderr *bytes.Buffer
	exited chan error
}

func startAgent(t *testing.T, state, sock, metrics string) *agentProc {
	t.Helper()
	return startAgentCmd(t, sock, godwit("agent", "--state-dir", state, "--socket", sock, "--log-level", "debug", "--metrics", metrics))
}

// startAgentIn starts an agent in a namespace host, its state in dir/name.
func startAgentIn(t *testing.T, h *testbed.Host, dir, name string, args ...string) *agentProc {
	t.Helper()
	sock := filepath.Join(dir, name+".sock")
	cmd := h.Command(os.Args[0], append([]string{"agent", "--state-dir", filepath.Join(dir, name), "--socket", sock, "--log-level", "debug"}, args...)...)
	cmd.Env = append(os.Environ(), "GODWIT_AS_MAIN=1")
	return startAgentCmd(t, sock, cmd)
}

func startAgentCmd(t *testing.T, sock string, cmd *exec.Cmd) *agentProc {
	t.Helper()
	a := &agentProc{sock: sock, stderr: new(bytes.Buffer), exited: make(chan error, 1), cmd: cmd}
	a.cmd.Stderr = a.stderr
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.exited <- a.cmd.Wait() }()
	t.Cleanup(func() {
		// An agent's VM processes outlive it by design; a test's must not.
		vms, _ := a.list() // an agent that is gone already left its VMs to the one after it
		for _, v := range vms {
			if v.State == agent.Running && v.PID > 0 {
				syscall.Kill(v.PID, syscall.SIGKILL)
			}
		}
		a.cmd.Process.Kill()
	})
	for deadline := time.Now().Add(30 * time.Second); ; {
		if _, err := os.Stat(sock); err == nil {
			return a
		}
		select {
		case err := <-a.exited:
			t.Fatalf("agent exited early (%v): %s", err, a.stderr)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent: no socket after 30 s: %s", a.stderr)
		}
	}
}

func (a *agentProc) ps(t *testing.T) map[string]agent.VM {
	t.Helper()
	m, err := a.list()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// list is 'godwit ps' of the agent, by VM name.
func (a *agentProc) list() (map[string]agent.VM, error) {
	b, err := godwit("--agent", a.sock, "ps", "--json").Output()
	if err != nil {
		return nil, fmt.Errorf("godwit ps: %v\n%s", err, b)
	}
	var out struct{ VMs []agent.VM }
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("godwit ps printed %q: %v", b, err)
	}
	m := map[string]agent.VM{}
	for _, v := range out.VMs {
		m[v.Name] = v
	}
	return m, nil
}

// waitState waits until ps shows the VM in state.
func (a *agentProc) waitState(t *testing.T, name, state string) agent.VM {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; {
		v := a.ps(t)[name]
		if v.State == state {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("VM %q is %q after a minute, want %q: %+v", name, v.State, state, v)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestAgent runs VMs under an agent: started through its API, listed, verified, one killed
// (reported as failed, not restarted), the agent stopped (its VMs run on) and started again
// (it adopts them), a VM handed over to another under the same agent and that one moved on by
// post-copy, with the migrations' progress streams passed through, their events on the event
// stream and their figures in the metrics, and the refusals. Its socket is its owner's only.
func TestAgent(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	state, sock := filepath.Join(dir, "state"), filepath.Join(dir, "agent.sock")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metrics := l.Addr().String()
	l.Close()
	ag := startAgent(t, state, sock, metrics)
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("agent socket mode %v (%v), want 0600", fi.Mode(), err)
	}
	via := func(args ...string) *exec.Cmd { return godwit(append([]string{"--agent", sock}, args...)...) }
	for _, c := range [][]string{
		{"run", "--name", "web", "--mem", "128M", "--workload", "dirty", "--wss", "32M", "--rate", "2000"},
		{"run", "--name", "spare", "--mem", "64M"},
	} {
		if out, err := via(c...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v %s", c, err, out)
		}
	}
	vms := ag.ps(t)
	if len(vms) != 2 || vms["web"].State != agent.Running || vms["web"].Stats == nil || vms["spare"].PID == 0 {
		t.Fatalf("ps: %+v", vms)
	}
	var s vmm.Stats
	runJSON(t, &s, "--agent", sock, "stats", "--json", "--vm", "web")
	if s.Name != "web" || s.MemBytes != 128<<20 {
		t.Fatalf("stats through the agent: %+v", s)
	}
	var r vmm.VerifyReport
	runJSON(t, &r, "--agent", sock, "verify", "--json", "--vm", "web")
	if r.Mismatches != 0 || r.PagesChecked == 0 {
		t.Fatalf("verify through the agent: %+v", r)
	}

	// Refusals: a name that runs, a bad name, a flag the agent sets, a VM it does not have.
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "--name", "web"}, "runs already"},
		{[]string{"run", "--name", "bad/name"}, "VM name"},
		{[]string{"run", "--name", "x", "--control", "/tmp/x.sock"}, "leave out --control"},
		{[]string{"stats", "--vm", "nosuch"}, `no VM "nosuch"`},
		{[]string{"stats"}, "give --vm NAME"},
	} {
		out, err := via(c.args...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("%v: %v %s; want %q", c.args, err, out, c.want)
		}
	}

	// A VM process that dies is reported, not restarted.
	syscall.Kill(vms["spare"].PID, syscall.SIGKILL)
	dead := ag.waitState(t, "spare", agent.Failed)
	if !strings.Contains(dead.Exit, "killed") {
		t.Errorf("the killed VM ended with %q", dead.Exit)
	}
	time.Sleep(200 * time.Millisecond)
	if v := ag.ps(t)["spare"]; v.State != agent.Failed || v.PID != dead.PID {
		t.Errorf("the killed VM after a while: %+v", v)
	}

	// The agent stops; its VM runs on, and the next agent adopts it.
	ag.cmd.Process.Signal(syscall.SIGTERM)
	if err := <-ag.exited; err != nil {
		t.Fatalf("agent after SIGTERM: %v %s", err, ag.stderr)
	}
	web := vms["web"]
	direct := &vmProc{sock: web.Control}
	before := direct.stats(t).Heartbeats
	direct.waitHeartbeats(t, before+20)
	ag = startAgent(t, state, sock, metrics)
	vms = ag.ps(t)
	if v := vms["web"]; v.State != agent.Running || !v.Adopted || v.PID != web.PID {
		t.Fatalf("after the restart: %+v; agent log: %s", v, ag.stderr)
	}
	runJSON(t, &r, "--agent", sock, "verify", "--json", "--vm", "web")
	if r.Mismatches != 0 {
		t.Fatalf("verify of the adopted VM: %+v", r)
	}

	events := subscribe(t, sock)

	// A handover to another VM of the same agent, the progress stream through the agent.
	to := "unix:" + filepath.Join(dir, "web2-in.sock")
	if out, err := via("run", "--name", "web2", "--incoming", to).CombinedOutput(); err != nil {
		t.Fatalf("run --incoming under the agent: %v %s", err, out)
	}
	out, err := via("migrate", "--json", "--vm", "web", "--to", to).Output()
	var rep migration.Report
	if jerr := json.Unmarshal(out, &rep); jerr != nil || err != nil || rep.Result != migration.ResultOK {
		t.Fatalf("migrate through the agent: %v %v %s", err, jerr, out)
	}
	gone := ag.waitState(t, "web", agent.Exited)
	if gone.Result != "migrated" {
		t.Errorf("the migrated VM's record: %+v", gone)
	}
	ag.waitState(t, "web2", agent.Running)
	// And on by post-copy over a Unix socket: pages travel, the guest faults on them.
	to = "unix:" + filepath.Join(dir, "web3-in.sock")
	if out, err := via("run", "--name", "web3", "--incoming", to).CombinedOutput(); err != nil {
		t.Fatalf("run --incoming under the agent: %v %s", err, out)
	}
	out, err = via("migrate", "--json", "--vm", "web2", "--to", to, "--mode", "postcopy").Output()
	var pc migration.Report
	if jerr := json.Unmarshal(out, &pc); jerr != nil || err != nil || pc.Result != migration.ResultOK || pc.Postcopy == nil {
		t.Fatalf("post-copy through the agent: %v %v %s", err, jerr, out)
	}
	ag.waitState(t, "web3", agent.Running)
	runJSON(t, &r, "--agent", sock, "quit", "--json", "--vm", "web3")
	if r.Mismatches != 0 || r.PagesChecked == 0 {
		t.Fatalf("quit of the VM that arrived: %+v", r)
	}
	if v := ag.waitState(t, "web3", agent.Exited); v.Result != "ok" {
		t.Errorf("the VM that quit: %+v", v)
	}

	// The event stream saw both migrations from setup to completion.
	var seen []string
	for len(seen) < 100 {
		e, ok := events.next(10 * time.Second)
		if !ok {
			break
		}
		seen = append(seen, e.VM+":"+e.Event)
		if e.VM == "web2" && (e.Event == "completed" || e.Event == "failed") {
			break
		}
	}
	got := strings.Join(seen, " ")
	for _, want := range []string{"web:setup", "web:completed", "web2:setup", "web2:switch", "web2:completed"} {
		if !strings.Contains(got, want) {
			t.Errorf("events %s: no %s", got, want)
		}
	}
	// The metrics agree with the reports.
	m := scrape(t, metrics)
	for name, want := range map[string]float64{
		`godwit_migrations_total{mode="handover",result="ok"}`:     1,
		`godwit_migrations_total{mode="postcopy",result="ok"}`:     1,
		`godwit_migration_bytes_total{mode="handover"}`:            float64(rep.BytesWire),
		`godwit_migration_bytes_total{mode="postcopy"}`:            float64(pc.BytesWire),
		`godwit_postcopy_demand_faults_total`:                      float64(pc.Postcopy.DemandFaults),
		`godwit_migration_downtime_seconds_count{mode="postcopy"}`: 1,
		`godwit_vms{state="failed"}`:                               1,
		`godwit_vms{state="exited"}`:                               3,
	} {
		if got, ok := m[name]; !ok || got != want {
			t.Errorf("metric %s = %v (present %v), want %v", name, got, ok, want)
		}
	}
	// ps shows every VM, the ended ones with how they ended.
	if out, err := via("ps").CombinedOutput(); err != nil || !strings.Contains(string(out), "spare") {
		t.Fatalf("ps: %v %s", err, out)
	} else {
		t.Logf("ps:\n%s", out)
	}
}

// eventStream is a subscription to the agent's server-sent events.
type eventStream struct{ c chan agent.Event }

func subscribe(t *testing.T, sock string) *eventStream {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent/v1/events", nil)
	resp, err := hc.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("GET /v1/events: %v %v", err, resp)
	}
	es := &eventStream{c: make(chan agent.Event, 1000)}
	go func() {
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 64<<10), 16<<20)
		for sc.Scan() {
			if data, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
				var e agent.Event
				if json.Unmarshal([]byte(data), &e) == nil {
					es.c <- e
				}
			}
		}
	}()
	return es
}

func (es *eventStream) next(wait time.Duration) (agent.Event, bool) {
	select {
	case e := <-es.c:
		return e, true
	case <-time.After(wait):
		return agent.Event{}, false
	}
}

// scrape reads the agent's metrics: each sample by its name and labels, as exposed.
func scrape(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, " ")
		if f, err := strconv.ParseFloat(v, 64); ok && err == nil {
			m[k] = f
		}
	}
	return m
}

// TestAgentToAgent migrates a heavy writer from one agent to another across the namespace
// hosts: the destination agent starts the VM process that receives it, every connection is
// mutual TLS with the agents' certificates, and the guest verifies its memory there. Agents
// with another CA's certificate, or with a name the destination does not accept, are refused
// before anything moves: no VM is started there, and their VMs run on.
func TestAgentToAgent(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, gbit)
	dir, rogue := t.TempDir(), t.TempDir()
	for _, c := range [][]string{
		{"cert", "--dir", dir, "host-a=" + tb.Host(0).Addr().String(), "host-b=" + tb.Host(1).Addr().String(), "host-c=" + tb.Host(0).Addr().String()},
		{"cert", "--dir", rogue, "host-a=" + tb.Host(0).Addr().String()},
	} {
		if out, err := godwit(c...).CombinedOutput(); err != nil {
			t.Fatalf("godwit %v: %v %s", c, err, out)
		}
	}
	tlsOf := func(dir, name string, peers ...string) []string {
		f := []string{"--tls-ca", filepath.Join(dir, "ca.crt"), "--tls-cert", filepath.Join(dir, name+".crt"), "--tls-key", filepath.Join(dir, name+".key")}
		for _, p := range peers {
			f = append(f, "--tls-peer", p)
		}
		return f
	}
	listen := tb.Host(1).Addr().String() + ":7700"
	b := startAgentIn(t, tb.Host(1), dir, "b", append([]string{"--listen", listen}, tlsOf(dir, "host-b", "host-a")...)...)
	a := startAgentIn(t, tb.Host(0), dir, "a", tlsOf(dir, "host-a", "host-b")...)
	wrongName := startAgentIn(t, tb.Host(0), dir, "c", tlsOf(dir, "host-c", "host-b")...)
	// It trusts the right CA but shows a certificate another CA signed.
	wrongCA := startAgentIn(t, tb.Host(0), dir, "r", "--tls-ca", filepath.Join(dir, "ca.crt"), "--tls-cert", filepath.Join(rogue, "host-a.crt"), "--tls-key", filepath.Join(rogue, "host-a.key"))

	for _, ag := range []*agentProc{wrongName, wrongCA} {
		if out, err := godwit("--agent", ag.sock, "run", "--name", "small", "--mem", "64M").CombinedOutput(); err != nil {
			t.Fatalf("run: %v %s", err, out)
		}
		out, err := godwit("--agent", ag.sock, "migrate", "--json", "--vm", "small", "--to", "agent:"+listen).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "certificate") {
			t.Fatalf("a migration from an agent the destination must refuse: %v %s", err, out)
		}
		t.Logf("refused: %s", out)
		if vms := b.ps(t); len(vms) != 0 {
			t.Fatalf("the destination agent started VMs for a refused peer: %+v", vms)
		}
		if v := ag.ps(t)["small"]; v.State != agent.Running {
			t.Fatalf("the refused agent's VM: %+v", v)
		}
	}

	if out, err := godwit("--agent", a.sock, "run", "--name", "web", "--mem", "256M", "--workload", "dirty", "--wss", "128M", "--rate", "max", "--pattern", "random", "--content", "random").CombinedOutput(); err != nil {
		t.Fatalf("run: %v %s", err, out)
	}
	time.Sleep(time.Second) // let it write
	out, err := godwit("--agent", a.sock, "migrate", "--json", "--vm", "web", "--to", "agent:"+listen, "--mode", "hybrid", "--streams", "2").Output()
	var rep migration.Report
	if jerr := json.Unmarshal(out, &rep); jerr != nil || err != nil || rep.Result != migration.ResultOK {
		t.Fatalf("migrate from agent to agent: %v %v %s\nsource agent: %s\ndestination agent: %s", err, jerr, out, a.stderr, b.stderr)
	}
	logReport(t, "agent to agent over mutual TLS", rep)
	if v := a.waitState(t, "web", agent.Exited); v.Result != "migrated" {
		t.Errorf("the source's record: %+v", v)
	}
	b.waitState(t, "web", agent.Running)
	var r vmm.VerifyReport
	runJSON(t, &r, "--agent", b.sock, "verify", "--json", "--vm", "web")
	if r.Mismatches != 0 || r.PagesChecked == 0 {
		t.Fatalf("verify at the destination: %+v", r)
	}
	if !strings.Contains(b.stderr.String(), "refused an agent") {
		t.Errorf("the destination agent logged no refusal: %s", b.stderr)
	}

	// The source agent stopped during a migration's pre-copy: the migration fails, the VM
	// runs on, and the agent started again adopts it.
	if out, err := godwit("--agent", a.sock, "run", "--name", "slow", "--mem", "256M", "--workload", "dirty", "--wss", "64M", "--rate", "max", "--content", "random").CombinedOutput(); err != nil {
		t.Fatalf("run: %v %s", err, out)
	}
	time.Sleep(time.Second) // its working set written: pre-copy takes seconds at 8 MB/s
	mig := godwit("--agent", a.sock, "migrate", "--json", "--vm", "slow", "--to", "agent:"+listen, "--max-bandwidth", "8M")
	var migOut bytes.Buffer
	mig.Stdout = &migOut
	if err := mig.Start(); err != nil {
		t.Fatal(err)
	}
	// Its receiving VM process is there, and pre-copy runs through the agent's one port.
	if v := b.waitState(t, "slow", agent.Running); !strings.Contains(strings.Join(v.Args, " "), "--incoming routed:") {
		t.Errorf("the receiving VM process does not take its connections from the agent: %+v", v)
	}
	time.Sleep(500 * time.Millisecond)
	a.cmd.Process.Signal(syscall.SIGTERM)
	if err := <-a.exited; err != nil {
		t.Fatalf("the source agent after SIGTERM: %v %s", err, a.stderr)
	}
	if err := mig.Wait(); err == nil {
		t.Fatalf("a migration whose agent stopped during pre-copy: succeeded: %s", migOut.String())
	}
	a = startAgentIn(t, tb.Host(0), dir, "a", tlsOf(dir, "host-a", "host-b")...)
	if v := a.ps(t)["slow"]; v.State != agent.Running || !v.Adopted {
		t.Fatalf("after the restart: %+v\n%s", v, a.stderr)
	}
	runJSON(t, &r, "--agent", a.sock, "verify", "--json", "--vm", "slow")
	if r.Mismatches != 0 || r.PagesChecked == 0 {
		t.Fatalf("verify of the VM whose migration was cut: %+v", r)
	}
	if v := b.waitState(t, "slow", agent.Failed); v.Result != "failed" {
		t.Errorf("the destination's record of the migration that never finished: %+v", v)
	}
}

// agentPair makes certificates for the two namespace hosts and starts an agent in each over
// mutual TLS: b in host 1 listens on port for a in host 0. Each takes its extra flags too.
func agentPair(t *testing.T, tb *testbed.Testbed, port int, aArgs, bArgs []string) (a, b *agentProc, listen string) {
	t.Helper()
	dir := t.TempDir()
	if out, err := godwit("cert", "--dir", dir, "host-a="+tb.Host(0).Addr().String(), "host-b="+tb.Host(1).Addr().String()).CombinedOutput(); err != nil {
		t.Fatalf("godwit cert: %v %s", err, out)
	}
	tlsOf := func(name, peer string) []string {
		return []string{"--tls-ca", filepath.Join(dir, "ca.crt"), "--tls-cert", filepath.Join(dir, name+".crt"), "--tls-key", filepath.Join(dir, name+".key"), "--tls-peer", peer}
	}
	listen = fmt.Sprintf("%s:%d", tb.Host(1).Addr(), port)
	b = startAgentIn(t, tb.Host(1), dir, "b", append(append([]string{"--listen", listen}, tlsOf("host-b", "host-a")...), bArgs...)...)
	a = startAgentIn(t, tb.Host(0), dir, "a", append(tlsOf("host-a", "host-b"), aArgs...)...)
	return a, b, listen
}

// TestAgentLoad runs 16 migrations at once between two agents over mutual TLS on a 1 Gbit/s
// link, pre-copy, post-copy and hybrid mixed, each verified by its guest at the destination;
// each migration's share of the link (its bytes over its time) is logged with Jain's fairness
// index over them. A 17th, slowed by its bandwidth cap, loses its destination VM process
// during its pre-copy: that migration fails, its source VM runs on and verifies, and the 16
// are not disturbed.
func TestAgentLoad(t *testing.T) {
	requireKVM(t)
	tb := newTestbed(t, gbit)
	a, b, listen := agentPair(t, tb, 7700, nil, nil)

	const n = 16
	modes := []string{migration.ModePrecopy, migration.ModePostcopy, migration.ModeHybrid}
	name := func(i int) string { return fmt.Sprintf("vm%02d", i) }
	// Each holds 64 MiB of random pages; every fourth instead writes 16 MiB over and over at 4 MB/s,
	// half its share of the link (auto-converge slows it if it keeps up nonetheless). Emulated,
	// in a nested host, where TLS alone moves a few MB/s, each holds a sixteenth of that.
	mem, touch, wss, rate, limit := "128M", "0.5", "16M", "1000", "300ms"
	if emulated() {
		mem, touch, wss, rate, limit = "16M", "0.25", "1M", "60", "10s"
	}
	for i := 0; i < n; i++ {
		args := []string{"--agent", a.sock, "run", "--name", name(i), "--mem", mem, "--content", "random", "--seed", strconv.Itoa(i + 1)}
		if i%4 == 3 {
			args = append(args, "--workload", "dirty", "--wss", wss, "--rate", rate)
		} else {
			args = append(args, "--touch", touch, "--idle-interval", "20ms") // 33 VMs share 2 cores
		}
		if out, err := godwit(args...).CombinedOutput(); err != nil {
			t.Fatalf("run %s: %v %s", name(i), err, out)
		}
	}
	if out, err := godwit("--agent", a.sock, "run", "--name", "victim", "--mem", "64M", "--touch", "0.5", "--content", "random").CombinedOutput(); err != nil {
		t.Fatalf("run victim: %v %s", err, out)
	}
	time.Sleep(3 * time.Second) // the guests have written their pages

	type result struct {
		rep migration.Report
		out []byte
		err error
		end time.Time
	}
	results := make([]chan result, n)
	for i := range results {
		results[i] = make(chan result, 1)
		args := []string{"--agent", a.sock, "migrate", "--json", "--vm", name(i), "--to", "agent:" + listen, "--mode", modes[i%len(modes)], "--streams", "1"}
		if modes[i%len(modes)] != migration.ModePostcopy {
			args = append(args, "--auto-converge", "--downtime-limit", limit)
		}
		cmd := godwit(args...)
		go func(c chan result) {
			var r result
			r.out, r.err = cmd.Output()
			r.end = time.Now()
			if r.err == nil {
				r.err = json.Unmarshal(r.out, &r.rep)
			}
			c <- r
		}(results[i])
	}
	victim := godwit("--agent", a.sock, "migrate", "--json", "--vm", "victim", "--to", "agent:"+listen, "--max-bandwidth", "2M")
	var victimOut bytes.Buffer
	victim.Stdout = &victimOut
	if err := victim.Start(); err != nil {
		t.Fatal(err)
	}
	// Its destination VM process dies during its pre-copy, which takes 16 s at 2 MB/s.
	dest := b.waitState(t, "victim", agent.Running)
	for dest.PID <= 0 { // the record shows the VM before its process has a pid
		time.Sleep(10 * time.Millisecond)
		dest = b.ps(t)["victim"]
	}
	time.Sleep(time.Second)
	if err := syscall.Kill(dest.PID, syscall.SIGKILL); err != nil {
		t.Fatalf("kill the victim's destination VM process %d: %v", dest.PID, err)
	}

	var spans []migrationSpan
	for i, c := range results {
		r := <-c
		if r.err != nil || r.rep.Result != migration.ResultOK {
			t.Errorf("migration %d of %d (%s): %v %s", i+1, n, modes[i%len(modes)], r.err, r.out)
			continue
		}
		total := time.Duration(r.rep.TotalMS * float64(time.Millisecond))
		spans = append(spans, migrationSpan{start: r.end.Add(-total), end: r.end, bytes: r.rep.BytesWire})
		t.Logf("%s %-8s %6.1f MB/s: %d bytes in %.0f ms, downtime %.1f ms", name(i), r.rep.Mode, float64(r.rep.BytesWire)/total.Seconds()/1e6, r.rep.BytesWire, r.rep.TotalMS, r.rep.DowntimeMS)
	}
	if err := victim.Wait(); err == nil {
		t.Errorf("the migration whose destination VM process was killed succeeded: %s", victimOut.String())
	} else {
		t.Logf("the victim's migration: %v %s", err, victimOut.String())
	}
	if t.Failed() {
		t.Fatalf("source agent: %s\ndestination agent: %s", a.stderr, b.stderr)
	}
	logShares(t, spans)

	// The guests verify at once: each re-derives its every page, and 2 cores take a while.
	verified := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() {
			var r vmm.VerifyReport
			out, err := godwit("--agent", b.sock, "verify", "--json", "--vm", name(i)).Output()
			if err == nil {
				err = json.Unmarshal(out, &r)
			}
			if err == nil && (r.Mismatches != 0 || r.PagesChecked == 0) {
				err = fmt.Errorf("%+v", r)
			}
			if err != nil {
				err = fmt.Errorf("verify %s at the destination: %v %s", name(i), err, out)
			}
			verified <- err
		}()
	}
	for range n {
		if err := <-verified; err != nil {
			t.Error(err)
		}
	}
	srcVMs, dstVMs := a.ps(t), b.ps(t)
	for i := 0; i < n; i++ {
		if v := srcVMs[name(i)]; v.State != agent.Exited || v.Result != "migrated" {
			t.Errorf("the source's record of %s: %+v", name(i), v)
		}
		if v := dstVMs[name(i)]; v.State != agent.Running {
			t.Errorf("the destination's record of %s: %+v", name(i), v)
		}
	}
	if v := a.ps(t)["victim"]; v.State != agent.Running {
		t.Fatalf("the victim's source VM after its destination died: %+v", v)
	}
	var r vmm.VerifyReport
	runJSON(t, &r, "--agent", a.sock, "verify", "--json", "--vm", "victim")
	if r.Mismatches != 0 || r.PagesChecked == 0 {
		t.Fatalf("verify the victim at its source: %+v", r)
	}
	if v := b.ps(t)["victim"]; v.State != agent.Failed {
		t.Errorf("the destination's record of the victim: %+v", v)
	}
}

// migrationSpan is when one migration ran (by its own clock) and what it sent.
type migrationSpan struct {
	start, end time.Time
	bytes      int64
}

// logShares logs the link's use by concurrent migrations and how fairly they shared it. The
// migrations do not start together (each destination VM process is started first, on a busy
// host), so a migration's own rate says little: its fair share is what an equal split of the
// link's measured throughput among the migrations running at each moment would have given
// it, and its share is its bytes over that. Jain's index over the shares is 1 when they are
// equal and 1/n when one migration took everything.
func logShares(t *testing.T, spans []migrationSpan) {
	t.Helper()
	var edges []time.Time
	var total int64
	for _, s := range spans {
		edges = append(edges, s.start, s.end)
		total += s.bytes
	}
	slices.SortFunc(edges, func(a, b time.Time) int { return a.Compare(b) })
	busy := 0.0            // seconds with any migration running
	type interval struct { // between two starts or ends: who ran
		dt     float64
		active []int
	}
	var intervals []interval
	for k := 0; k+1 < len(edges); k++ {
		from, to := edges[k], edges[k+1]
		var active []int
		for i, s := range spans {
			if !s.start.After(from) && !s.end.Before(to) {
				active = append(active, i)
			}
		}
		if dt := to.Sub(from).Seconds(); dt > 0 && len(active) > 0 {
			busy += dt
			intervals = append(intervals, interval{dt, active})
		}
	}
	rate := float64(total) / busy // the link's throughput while migrations ran
	fair := make([]float64, len(spans))
	for _, iv := range intervals {
		for _, i := range iv.active {
			fair[i] += rate * iv.dt / float64(len(iv.active))
		}
	}
	shares := make([]float64, len(spans))
	var sum, sq float64
	for i, s := range spans {
		shares[i] = float64(s.bytes) / fair[i]
		sum, sq = sum+shares[i], sq+shares[i]*shares[i]
	}
	slices.Sort(shares)
	t.Logf("%d concurrent migrations: %d bytes in %.2f s with any running, %.1f MB/s; each one's bytes over its fair share: min %.2f, median %.2f, max %.2f; Jain's fairness index %.3f (1 = equal shares)",
		len(spans), total, busy, rate/1e6, shares[0], shares[len(shares)/2], shares[len(shares)-1], sum*sum/(float64(len(shares))*sq))
}
