// Package outgoing runs the life of one outgoing migration around the engine's Send: the
// first call and one per resume, the redialling after a post-copy link broke, the total-time
// clock across all of them, and what becomes of the VM on this host, as typed states.
//
// The VM's fate follows from the state: before the switch to post-copy (Connecting, Live) a
// failure leaves it running here (Failed); past the switch (Switched, Recovering, Stranded) it
// runs at the destination, which needs this host's memory, so it must never run here again
// and the migration cannot be cancelled, only finished: by the redialling, or by Resume once
// Send has given up (Stranded). Succeeded means the destination has everything and the
// source's memory was released.
package outgoing

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/godwit-vm/godwit/internal/transport"
	"github.com/godwit-vm/godwit/migration"
)

// State is where an outgoing migration stands.
type State int

const (
	Connecting State = iota // dialling the destination
	Live                    // Send runs; the switch to post-copy has not begun
	Switched                // past the switch: the VM runs at the destination
	Recovering              // switched, the link broke: redialling and rejoining
	Stranded                // switched, Send gave up: the VM waits here, paused, for Resume
	Succeeded               // the destination has everything; the source's memory was released
	Failed                  // before the switch: the VM runs here as before
	// Undecided: a handover failed after the state went out, and the destination may run the
	// VM on the memory handed over: it stays paused here, never to run here again.
	Undecided
)

var stateNames = [...]string{"connecting", "live", "switched", "recovering", "stranded", "succeeded", "failed", "undecided"}

func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// Switched reports whether the VM has run at the destination: then it must never run here
// again, and this host holds memory the destination needs.
func (s State) Switched() bool { return s == Switched || s == Recovering || s == Stranded }

// Over reports whether the migration has ended for good.
func (s State) Over() bool { return s == Succeeded || s == Failed }

// StateError is a request the migration's state does not allow.
type StateError struct {
	State  State
	Reason string
}

func (e *StateError) Error() string { return e.Reason }

func stateError(st State, format string, args ...any) error {
	return &StateError{State: st, Reason: fmt.Sprintf(format, args...)}
}

// ErrDetached is returned by Wait when its context ended after the switch: the migration goes
// on without the caller.
var ErrDetached = errors.New("outgoing: the caller went away; the post-copy migration goes on")

// MinResumeWindow is how long a resume request's address is redialled when the migration's
// own reconnect window is shorter (or 0).
const MinResumeWindow = 10 * time.Second

// Config is what an outgoing migration needs.
type Config struct {
	Source migration.Source
	To     transport.Address
	// Options for each call of Send. Start sets Progress and DialStream, and Reconnect in
	// post-copy and hybrid; a resume reuses them with ResumeID set.
	Options migration.SendOptions
	// ReconnectWindow is how long after a post-copy link broke the destination is redialled
	// before Send gives up (Stranded); 0: not at all.
	ReconnectWindow time.Duration
	// Release is called once the migration succeeded, before its report is final: the
	// source's memory may go.
	Release func()
	// Note receives each step worth a line in the log: connected, link broken, reconnected,
	// given up. May be nil.
	Note func(string)
	// ResumeHint is how a user resumes a stranded migration, for its error message.
	ResumeHint string
	// Start is when the migration was asked for: its total time counts from here. Zero: now.
	Start time.Time
}

// Migration is one outgoing migration. Its methods may be called from any goroutine.
type Migration struct {
	cfg   Config
	start time.Time
	kick  chan struct{} // a resume request brought an address
	done  chan struct{} // closed when the state is Over

	mu          sync.Mutex
	state       State
	addr        transport.Address // where to (re)dial: the destination's current address
	cur         *run
	brokenSince time.Time // when the link broke, while redialling
	watch       func(migration.Progress)
	last        migration.Progress
	recovered   int // reconnections and resumes that succeeded
}

// run is one call of migration.Send: the first, and one per resume.
type run struct {
	at     time.Time // when Send was called
	ctx    context.Context
	cancel context.CancelCauseFunc
	done   chan struct{} // closed once Send returned and rep, err are final
	rep    *migration.Report
	err    error
	gaveUp error // the reconnect window passed: why
}

// Start begins the migration: it dials cfg.To and calls Send, in the background and in a
// context of its own (Cancel ends it), since a post-copy outlives whoever asked for it.
func Start(cfg Config) *Migration {
	m := &Migration{cfg: cfg, start: cfg.Start, kick: make(chan struct{}, 1), done: make(chan struct{}), addr: cfg.To}
	if m.start.IsZero() {
		m.start = time.Now()
	}
	if m.cfg.Note == nil {
		m.cfg.Note = func(string) {}
	}
	if m.cfg.Options.Mode == "" {
		m.cfg.Options.Mode = migration.ModePrecopy
	}
	o := &m.cfg.Options
	o.Progress = m.progress
	o.DialStream = func(ctx context.Context) (io.ReadWriter, error) { return m.Address().Dial(ctx) }
	if o.Mode != migration.ModePrecopy {
		o.Reconnect = m.reconnect
	}
	r := m.newRun()
	go func() {
		conn, err := cfg.To.Dial(r.ctx)
		if err != nil {
			rep := m.failedReport("cannot reach the destination: " + err.Error())
			m.finish(r, rep, fmt.Errorf("cannot reach the destination %s: %w", cfg.To, err))
			return
		}
		m.cfg.Note(fmt.Sprintf("migrating to %s (%s)", conn.RemoteAddr(), o.Mode))
		m.mu.Lock()
		m.state = Live
		m.mu.Unlock()
		m.send(r, conn, m.cfg.Options)
	}()
	return m
}

func (m *Migration) newRun() *run {
	ctx, cancel := context.WithCancelCause(context.Background())
	r := &run{at: time.Now(), ctx: ctx, cancel: cancel, done: make(chan struct{})}
	m.mu.Lock()
	m.cur = r
	m.mu.Unlock()
	return r
}

// send calls Send for r on conn and settles its outcome.
func (m *Migration) send(r *run, conn io.ReadWriteCloser, opts migration.SendOptions) {
	rep, err := migration.Send(r.ctx, m.cfg.Source, conn, opts)
	conn.Close()
	m.finish(r, rep, err)
	r.cancel(nil)
}

// finish settles the state once a run's Send returned, and the report's total time: from the
// request to now, or after a post-copy to when the destination had every page (the engine's
// figure for its call), since the source may release its memory from then on and only waited
// for the destination's figures.
func (m *Migration) finish(r *run, rep *migration.Report, err error) {
	if rep == nil {
		rep = m.failedReport("")
	}
	engineTotal := rep.TotalMS
	m.mu.Lock()
	stranded := err != nil && (m.state.Switched() || errors.Is(err, migration.ErrStranded))
	if rep.Postcopy != nil && m.recovered > rep.Postcopy.Reconnects {
		// A resume is a recovery too; the engine counts only those of its own call.
		rep.Postcopy.Reconnects = m.recovered
	}
	gaveUp := r.gaveUp
	m.mu.Unlock()
	rep.TotalMS = msSince(m.start)
	var next State
	switch {
	case err == nil:
		if m.cfg.Release != nil {
			m.cfg.Release()
		}
		if rep.Postcopy != nil && engineTotal > 0 {
			rep.TotalMS = float64(r.at.Sub(m.start).Microseconds())/1000 + engineTotal
		}
		next = Succeeded
	case errors.Is(err, migration.ErrHandoverUndecided):
		// Whether the destination runs the VM is unknown: nothing here may run it.
		rep.Error = err.Error()
		m.cfg.Note(err.Error())
		next = Undecided
	case stranded:
		if gaveUp != nil {
			// The reconnect window, not a caller, ended it.
			rep.Result = migration.ResultFailed
		}
		err = fmt.Errorf("%w; the VM stays paused here with its memory, waiting for '%s' (the destination's old or new address)", err, m.cfg.ResumeHint)
		rep.Error = err.Error()
		m.cfg.Note(err.Error())
		next = Stranded
	default:
		if rep.Result == "" || rep.Result == migration.ResultOK {
			rep.Result = migration.ResultFailed
		}
		err = fmt.Errorf("%w (the VM keeps running here)", err)
		next = Failed
	}
	m.mu.Lock()
	m.state = next
	r.rep, r.err = rep, err
	m.mu.Unlock()
	close(r.done)
	if next.Over() {
		close(m.done)
	}
}

func (m *Migration) failedReport(msg string) *migration.Report {
	return &migration.Report{Side: "source", Result: migration.ResultFailed, Error: msg, Mode: m.cfg.Options.Mode, TotalMS: msSince(m.start)}
}

// State is where the migration stands now.
func (m *Migration) State() State {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state
}

// Address is the destination's current address.
func (m *Migration) Address() transport.Address {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.addr
}

// Done is closed once the migration has ended for good (Succeeded or Failed).
func (m *Migration) Done() <-chan struct{} { return m.done }

// now is the state and the latest run, together.
func (m *Migration) now() (State, *run) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state, m.cur
}

// Result is the outcome of the latest call of Send once it returned (Stranded, Succeeded,
// Failed); before that, nil and nil.
func (m *Migration) Result() (*migration.Report, error) {
	_, r := m.now()
	select {
	case <-r.done:
		return r.rep, r.err
	default:
		return nil, nil
	}
}

// Watch sends the migration's progress to f, in place of any earlier watcher, until the
// returned function is called. f must not call the Migration's methods.
func (m *Migration) Watch(f func(migration.Progress)) (stop func()) {
	m.mu.Lock()
	m.watch = f
	m.mu.Unlock()
	return func() {
		m.mu.Lock()
		m.watch = nil
		m.mu.Unlock()
	}
}

// Wait waits until the latest call of Send returns and gives its outcome. If ctx ends first,
// a migration before the switch is cancelled (and its outcome returned), one past it goes on
// and Wait returns ErrDetached.
func (m *Migration) Wait(ctx context.Context) (*migration.Report, error) {
	_, r := m.now()
	select {
	case <-r.done:
		return r.rep, r.err
	case <-ctx.Done():
		if err := m.Cancel(errors.New("the client went away")); err != nil {
			return nil, ErrDetached
		}
		<-r.done
		return r.rep, r.err
	}
}

// Cancel ends a migration before the switch with cause; past the switch it refuses, since the
// VM runs at the destination and needs this host's memory until every page has arrived.
func (m *Migration) Cancel(cause error) error {
	st, r := m.now()
	if st.Switched() {
		return stateError(st, "the migration has switched to post-copy and cannot be cancelled: the VM runs at the destination and needs this host's memory until every page has arrived")
	}
	if st.Over() {
		return stateError(st, "the migration is over (%s)", st)
	}
	r.cancel(cause)
	return nil
}

// Resume gives the migration the destination's new address: in flight past the switch, it is
// dialled at the next reconnection (at once if the migration is recovering now); stranded, a
// new call of Send rejoins the destination there. Wait follows the migration on.
func (m *Migration) Resume(ctx context.Context, addr transport.Address) error {
	st, r := m.now()
	switch st {
	case Switched, Recovering:
		m.mu.Lock()
		m.addr = addr
		m.mu.Unlock()
		select {
		case m.kick <- struct{}{}:
		default:
		}
		return nil
	case Stranded:
	case Connecting:
		return stateError(st, "the migration is only starting: there is nothing to resume")
	case Live:
		return stateError(st, "the migration has not switched to post-copy: there is nothing to resume (it goes on)")
	default:
		return stateError(st, "the migration is over (%s): there is nothing to resume", st)
	}
	id := ""
	if r.rep != nil && r.rep.Postcopy != nil {
		id = r.rep.Postcopy.MigrationID
	}
	if id == "" {
		return fmt.Errorf("the migration cannot be resumed: its report names no migration id (%v)", r.err)
	}
	conn, err := addr.Dial(ctx)
	if err != nil {
		return fmt.Errorf("cannot reach the destination at %s: %w (the migration stays interrupted; the VM stays paused here)", addr, err)
	}
	m.mu.Lock()
	if m.cur != r || m.state != Stranded {
		m.mu.Unlock()
		conn.Close()
		return stateError(Stranded, "another resume of this migration is under way")
	}
	m.addr = addr
	m.recovered++
	m.brokenSince = time.Time{}
	m.state = Recovering
	m.mu.Unlock()
	m.cfg.Note(fmt.Sprintf("resuming the post-copy migration %s at %s", id, addr))
	opts := m.cfg.Options
	opts.ResumeID = id
	nr := m.newRun()
	go m.send(nr, conn, opts)
	return nil
}

// progress takes the engine's progress: its stage moves the state, and the watcher sees it.
func (m *Migration) progress(pr migration.Progress) {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch pr.Stage {
	case migration.StageSwitched:
		m.state = Switched
		m.brokenSince = time.Time{} // the link works (again)
	case migration.StageRecovering:
		m.state = Recovering
	}
	m.last = pr
	if m.watch != nil {
		m.watch(pr)
	}
}

// note logs a recovery step and shows it on the watcher's progress line.
func (m *Migration) note(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	m.cfg.Note(msg)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.watch != nil {
		pr := m.last
		pr.Phase = msg
		pr.Elapsed = time.Since(m.start)
		m.watch(pr)
	}
}

// reconnect is the migration's Reconnector, called by the engine after the link broke past the
// switch (and again when a new connection failed to rejoin). It redials the destination's
// current address until the reconnect window, counted from the break, has passed; a resume
// request brings a new address at any time and opens a new window. When the window passes it
// ends the run's Send, which then fails, stranded.
func (m *Migration) reconnect(ctx context.Context) (io.ReadWriter, error) {
	m.mu.Lock()
	m.state = Recovering
	r := m.cur
	window := m.cfg.ReconnectWindow
	first := m.brokenSince.IsZero()
	if first {
		m.brokenSince = time.Now()
	}
	addr := m.addr
	m.mu.Unlock()
	if first && window > 0 {
		m.note("the link to the destination %s broke after the switch to post-copy; redialling for %v", addr, window)
	}
	for attempt := 1; ; attempt++ {
		m.mu.Lock()
		addr, deadline := m.addr, m.brokenSince.Add(window)
		m.mu.Unlock()
		if !time.Now().Before(deadline) {
			why := fmt.Errorf("could not reach the destination at %s within the reconnect window of %v", addr, window)
			if window == 0 {
				why = errors.New("the link broke and automatic redialling is off (reconnect window 0)")
			}
			m.note("%v; the VM stays paused here", why)
			m.mu.Lock()
			r.gaveUp = why
			m.mu.Unlock()
			r.cancel(why)
			return nil, why
		}
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		c, err := addr.Dial(dctx)
		cancel()
		if err == nil {
			m.mu.Lock()
			m.recovered++
			m.mu.Unlock()
			m.note("reconnected to %s (attempt %d)", addr, attempt)
			return c, nil
		}
		t := time.NewTimer(250 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, context.Cause(ctx)
		case <-m.kick:
			m.mu.Lock()
			addr = m.addr
			// A new window, at least MinResumeWindow long, from now.
			m.brokenSince = time.Now().Add(max(window, MinResumeWindow) - window)
			m.mu.Unlock()
			m.note("resuming: dialling %s", addr)
		case <-t.C:
		}
		t.Stop()
	}
}

func msSince(t time.Time) float64 { return float64(time.Since(t).Microseconds()) / 1000 }
