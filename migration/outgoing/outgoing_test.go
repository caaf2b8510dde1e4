package outgoing_test

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/transport"
	"github.com/godwit-vm/godwit/migration"
	mt "github.com/godwit-vm/godwit/migration/migrationtest"
	"github.com/godwit-vm/godwit/migration/outgoing"
)

const MiB = 1 << 20

// destination is a receiving host: Unix-socket listeners (a second one plays the address the
// destination moved to) feeding one Receive, which takes its reconnections from either.
type destination struct {
	addrs []transport.Address
	conns chan net.Conn
	cur   atomic.Pointer[net.Conn] // the connection Receive reads now
	done  chan result
}

type result struct {
	rep *migration.Report
	err error
}

func newDestination(t *testing.T, d migration.Destination, listeners int) *destination {
	dst := &destination{conns: make(chan net.Conn, 4), done: make(chan result, 1)}
	for range listeners {
		a := transport.Address{Network: transport.Unix, Addr: filepath.Join(t.TempDir(), "dst.sock")}
		ln, err := a.Listen()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		dst.addrs = append(dst.addrs, a)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				dst.conns <- c
			}
		}()
	}
	next := func(ctx context.Context) (io.ReadWriter, error) {
		select {
		case c := <-dst.conns:
			dst.cur.Store(&c)
			return c, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	go func() {
		c, err := next(t.Context())
		if err != nil {
			dst.done <- result{nil, err}
			return
		}
		rep, err := migration.Receive(t.Context(), d, c, migration.ReceiveOptions{Reconnect: next, LinkTimeout: 2 * time.Second})
		dst.done <- result{rep, err}
	}()
	return dst
}

// cut closes the connection the destination reads now: the link breaks.
func (d *destination) cut() {
	if c := d.cur.Load(); c != nil {
		(*c).Close()
	}
}

// watcher records the states a migration passes through, as its progress shows them.
type watcher struct {
	mu     sync.Mutex
	stages map[migration.Stage]int
	phases []string
}

func (w *watcher) watch(m *outgoing.Migration) func() {
	w.stages = map[migration.Stage]int{}
	return m.Watch(func(p migration.Progress) {
		w.mu.Lock()
		w.stages[p.Stage]++
		w.phases = append(w.phases, p.Phase)
		w.mu.Unlock()
	})
}

func (w *watcher) saw(s migration.Stage) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.stages[s] > 0
}

func newGuest(size uint64, seed uint64) *mt.Guest {
	g := mt.NewGuest(mt.SimpleDescription(size))
	g.Fill(seed, 0.3, 0.2)
	g.SetState("vcpu0", 1, []byte("registers"))
	return g
}

// waitOK waits for m's outcome and the destination's, and fails unless both succeeded.
func waitOK(t *testing.T, m *outgoing.Migration, dst *destination) *migration.Report {
	t.Helper()
	rep, err := m.Wait(t.Context())
	if err != nil || rep.Result != migration.ResultOK {
		t.Fatalf("migration: %v (%+v)", err, rep)
	}
	if r := <-dst.done; r.err != nil {
		t.Fatalf("destination: %v", r.err)
	}
	return rep
}

// startLive starts a pre-copy that cannot converge (a writer faster than its bandwidth cap
// allows, a downtime limit of 1 ms) and returns once it is live; the writer stops when the
// test ends.
func startLive(t *testing.T, size uint64, seed uint64) (*mt.Guest, *mt.Dest, *destination, *outgoing.Migration) {
	g, d := newGuest(size, seed), mt.NewDest()
	ctx, stop := context.WithCancel(t.Context())
	wait := g.RunWriter(ctx, mt.WriterConfig{Rate: 50000, WorkingSet: 2048, Seed: seed + 1})
	t.Cleanup(func() { stop(); wait() })
	dst := newDestination(t, d, 1)
	m := outgoing.Start(outgoing.Config{Source: g, To: dst.addrs[0],
		Options: migration.SendOptions{MaxBandwidth: 8 * MiB, DowntimeLimit: time.Millisecond}})
	waitState(t, m, outgoing.Live)
	return g, d, dst, m
}

// waitState polls until m reaches st.
func waitState(t *testing.T, m *outgoing.Migration, st outgoing.State) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for m.State() != st {
		if time.Now().After(deadline) {
			t.Fatalf("state %s, want %s", m.State(), st)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestPrecopySucceeds: a pre-copy passes through Live to Succeeded, releases the source's
// memory once, and the destination matches the source.
func TestPrecopySucceeds(t *testing.T) {
	g, d := newGuest(16*MiB, 1), mt.NewDest()
	dst := newDestination(t, d, 1)
	var released atomic.Int32
	start := time.Now()
	m := outgoing.Start(outgoing.Config{Source: g, To: dst.addrs[0], Release: func() { released.Add(1) }, Start: start})
	var w watcher
	defer w.watch(m)()
	rep := waitOK(t, m, dst)
	<-m.Done()
	if m.State() != outgoing.Succeeded || released.Load() != 1 || g.Running() {
		t.Fatalf("state %s, released %d times, source running %v; want succeeded, once, stopped", m.State(), released.Load(), g.Running())
	}
	if !w.saw(migration.StageLive) || w.saw(migration.StageSwitched) {
		t.Fatalf("stages seen %v: want live only", w.stages)
	}
	if rep.TotalMS <= 0 || rep.TotalMS > float64(time.Since(start).Microseconds())/1000 {
		t.Fatalf("total %.1f ms, want the time since the request", rep.TotalMS)
	}
	if err := mt.Compare(g, d); err != nil {
		t.Fatalf("oracle: %v", err)
	}
	if err := m.Cancel(errors.New("late")); err == nil {
		t.Fatal("cancelling a migration that is over succeeded")
	}
}

// TestUnreachableFails: a destination nobody listens at fails the migration, the VM runs on.
func TestUnreachableFails(t *testing.T) {
	g := newGuest(4*MiB, 2)
	to := transport.Address{Network: transport.Unix, Addr: filepath.Join(t.TempDir(), "nobody.sock")}
	m := outgoing.Start(outgoing.Config{Source: g, To: to, Release: func() { t.Error("released") }})
	rep, err := m.Wait(t.Context())
	if err == nil || !strings.Contains(err.Error(), "cannot reach the destination") || !strings.Contains(err.Error(), "keeps running here") {
		t.Fatalf("error %v, want it to say the destination cannot be reached and the VM runs on", err)
	}
	if rep == nil || rep.Result != migration.ResultFailed || m.State() != outgoing.Failed || !g.Running() {
		t.Fatalf("report %+v, state %s, running %v", rep, m.State(), g.Running())
	}
}

// TestCancelLive: a pre-copy that cannot converge is cancelled; the VM runs on, unchanged
// but for its own writes, and the migration may be asked for again.
func TestCancelLive(t *testing.T) {
	g, d, dst, m := startLive(t, 16*MiB, 3)
	time.Sleep(100 * time.Millisecond)
	if err := m.Cancel(errors.New("operator")); err != nil {
		t.Fatal(err)
	}
	rep, err := m.Wait(t.Context())
	if err == nil || m.State() != outgoing.Failed || !g.Running() {
		t.Fatalf("after cancel: %v, state %s, running %v", err, m.State(), g.Running())
	}
	if rep.Result != migration.ResultCancelled && rep.Result != migration.ResultFailed {
		t.Fatalf("result %q", rep.Result)
	}
	if r := <-dst.done; r.err == nil || d.State() != "aborted" {
		t.Fatalf("destination: %v, state %q; want it aborted", r.err, d.State())
	}
}

// TestPostcopyRecovers: the link breaks after the switch; the migration redials within its
// window and finishes; it cannot be cancelled once switched.
func TestPostcopyRecovers(t *testing.T) {
	g, d := newGuest(8*MiB, 5), mt.NewPostcopyDest()
	dst := newDestination(t, d, 1)
	var started atomic.Pointer[outgoing.Migration] // written before Start's sockets carry anything the race detector sees
	var refused atomic.Value
	d.Hook = func(op string, n int) error {
		if op == "PlacePages" && n == 10 {
			for started.Load() == nil {
				time.Sleep(time.Millisecond)
			}
			if err := started.Load().Cancel(errors.New("operator")); err != nil {
				refused.Store(err)
			}
			dst.cut()
		}
		return nil
	}
	var notes []string
	var mu sync.Mutex
	m := outgoing.Start(outgoing.Config{Source: g, To: dst.addrs[0], ReconnectWindow: 10 * time.Second,
		Options: migration.SendOptions{Mode: migration.ModePostcopy, BatchBytes: 16 << 10, LinkTimeout: 2 * time.Second},
		Note:    func(s string) { mu.Lock(); notes = append(notes, s); mu.Unlock() }})
	started.Store(m)
	var w watcher
	defer w.watch(m)()
	rep := waitOK(t, m, dst)
	var se *outgoing.StateError
	if err, _ := refused.Load().(error); !errors.As(err, &se) || !se.State.Switched() {
		t.Fatalf("cancel after the switch: %v, want a refusal", refused.Load())
	}
	if !w.saw(migration.StageSwitched) || !w.saw(migration.StageRecovering) || rep.Postcopy.Reconnects != 1 {
		t.Fatalf("stages %v, reconnects %d; want switched, recovering and one reconnection", w.stages, rep.Postcopy.Reconnects)
	}
	mu.Lock()
	defer mu.Unlock()
	if !strings.Contains(strings.Join(notes, "\n"), "reconnected") {
		t.Fatalf("notes %q lack the reconnection", notes)
	}
	if err := mt.Compare(g, d.Dest); err != nil {
		t.Fatalf("oracle: %v", err)
	}
}

// TestStrandedThenResumed: with no reconnect window a broken post-copy strands: the VM stays
// paused here with its memory; a resume at the destination's new address finishes it.
func TestStrandedThenResumed(t *testing.T) {
	g, d := newGuest(8*MiB, 6), mt.NewPostcopyDest()
	dst := newDestination(t, d, 2)
	d.Hook = func(op string, n int) error {
		if op == "PlacePages" && n == 10 {
			dst.cut()
		}
		return nil
	}
	var released atomic.Int32
	m := outgoing.Start(outgoing.Config{Source: g, To: dst.addrs[0], ResumeHint: "resume-me",
		Release: func() { released.Add(1) },
		Options: migration.SendOptions{Mode: migration.ModePostcopy, BatchBytes: 16 << 10}})
	rep, err := m.Wait(t.Context())
	if err == nil || !strings.Contains(err.Error(), "resume-me") || m.State() != outgoing.Stranded {
		t.Fatalf("first run: %v, state %s; want stranded, naming the resume", err, m.State())
	}
	if g.Running() || released.Load() != 0 || rep.Postcopy == nil || rep.Postcopy.MigrationID == "" {
		t.Fatalf("stranded: running %v, released %d, report %+v", g.Running(), released.Load(), rep.Postcopy)
	}
	if err := m.Cancel(errors.New("operator")); err == nil {
		t.Fatal("a stranded migration was cancelled")
	}
	if err := m.Resume(t.Context(), dst.addrs[1]); err != nil {
		t.Fatalf("resume: %v", err)
	}
	if m.Address() != dst.addrs[1] {
		t.Fatalf("address %s after the resume, want %s", m.Address(), dst.addrs[1])
	}
	rep, err = m.Wait(t.Context())
	if err != nil || rep.Result != migration.ResultOK || m.State() != outgoing.Succeeded || released.Load() != 1 {
		t.Fatalf("resumed: %v (%+v), state %s, released %d", err, rep, m.State(), released.Load())
	}
	if rep.Postcopy.Reconnects != 1 || rep.Postcopy.SwitchReason != "resumed" {
		t.Fatalf("reconnects %d, reason %q", rep.Postcopy.Reconnects, rep.Postcopy.SwitchReason)
	}
	if r := <-dst.done; r.err != nil {
		t.Fatalf("destination: %v", r.err)
	}
	if err := mt.Compare(g, d.Dest); err != nil {
		t.Fatalf("oracle: %v", err)
	}
}

// TestResumeRefusedBeforeSwitch: a resume asks for something only a switched migration has.
func TestResumeRefusedBeforeSwitch(t *testing.T) {
	_, _, dst, m := startLive(t, 8*MiB, 7)
	var se *outgoing.StateError
	if err := m.Resume(t.Context(), dst.addrs[0]); !errors.As(err, &se) || se.State != outgoing.Live {
		t.Fatalf("resume before the switch: %v, want a refusal in state live", err)
	}
	m.Cancel(errors.New("done"))
	m.Wait(t.Context())
	<-dst.done
}
