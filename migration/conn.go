package migration

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/godwit-vm/godwit/migration/wire"
)

// longAgo is a deadline in the past: setting it makes blocked reads and writes return at once.
var longAgo = time.Unix(1, 0)

type deadliner interface{ SetDeadline(time.Time) error }

// setDeadline sets conn's deadline if it has one and reports whether it did.
func setDeadline(conn any, t time.Time) bool {
	d, ok := conn.(deadliner)
	if ok {
		d.SetDeadline(t)
	}
	return ok
}

// interrupter makes blocked I/O on conn return once ctx is done: by an expired deadline when
// conn has deadlines (a net.Conn), else by closing it when it can be closed. Without either,
// cancellation takes effect at the next I/O call that returns by itself.
type interrupter struct {
	mu   sync.Mutex
	conn any
	off  bool
	stop func() bool
}

func interruptOnDone(ctx context.Context, conn any) *interrupter {
	i := &interrupter{conn: conn}
	i.stop = context.AfterFunc(ctx, i.fire)
	return i
}

func (i *interrupter) fire() {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.off {
		return
	}
	if !setDeadline(i.conn, longAgo) {
		if c, ok := i.conn.(io.Closer); ok {
			c.Close()
		}
	}
}

// hold stops all further interruptions, so the caller may set deadlines of its own.
func (i *interrupter) hold() {
	i.mu.Lock()
	i.off = true
	i.mu.Unlock()
	i.stop()
}

// limiter paces writes to a byte rate: each write of n bytes moves a virtual finish time
// n/rate later, and the caller sleeps while that time is ahead of now by more than the burst.
// Idle time earns at most one burst of credit, so a pause is not followed by a flood.
type limiter struct {
	rate  float64 // bytes/s; <= 0 means unlimited
	burst time.Duration
	clock Clock
	next  time.Time
}

// reserve counts n bytes against the cap and returns how long to sleep before writing them (0:
// at once). Writers that share a limiter reserve under their lock and sleep outside it, so that
// one writer's sleep never holds up another's reservation.
func (l *limiter) reserve(n int) time.Duration {
	if l.rate <= 0 {
		return 0
	}
	now := l.clock.Now()
	l.next = l.finish(now, n)
	return max(0, l.next.Sub(now)-l.burst)
}

// ahead is how long a write of n bytes would sleep if it were reserved now.
func (l *limiter) ahead(n int) time.Duration {
	if l.rate <= 0 {
		return 0
	}
	now := l.clock.Now()
	return max(0, l.finish(now, n).Sub(now)-l.burst)
}

// finish is the virtual finish time of n more bytes at now.
func (l *limiter) finish(now time.Time, n int) time.Time {
	next := l.next
	if floor := now.Add(-l.burst); next.Before(floor) {
		next = floor
	}
	return next.Add(time.Duration(float64(n) / l.rate * float64(time.Second)))
}

// vmmError is a failure of the VMM behind Source or Destination.
type vmmError struct {
	side string // "source" or "destination"
	op   string // the call, with its arguments
	err  error
}

func (e *vmmError) Error() string { return e.side + " " + e.op + ": " + e.err.Error() }
func (e *vmmError) Unwrap() error { return e.err }

// phaseError says in which phase a migration failed.
type phaseError struct {
	phase string
	err   error
}

func (e *phaseError) Error() string {
	return "migration: " + e.phase + ": " + strings.TrimPrefix(e.err.Error(), "migration: ")
}
func (e *phaseError) Unwrap() error { return e.err }

// errorCode picks the code for the Error frame that tells the peer why this side aborts.
func errorCode(err error, side string) wire.ErrCode {
	var ve *vmmError
	var fe *wire.FrameError
	switch {
	case errors.Is(err, context.Canceled):
		return wire.ErrCodeCancelled
	case errors.Is(err, ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		return wire.ErrCodeTimeout
	case errors.Is(err, ErrNotConverged):
		return wire.ErrCodeNoConverge
	case errors.As(err, &fe), errors.Is(err, ErrProtocol):
		return wire.ErrCodeProtocol
	case errors.As(err, &ve) && side == "source":
		return wire.ErrCodeSource
	case errors.As(err, &ve):
		return wire.ErrCodeDestination
	}
	return wire.ErrCodeInternal
}

// toWire converts a description for the Hello frame.
func toWire(d Description) wire.Description {
	w := wire.Description{PageSize: d.Layout.PageSize, VCPUs: d.VCPUs, Devices: d.Devices, Base: d.Base}
	for _, r := range d.Layout.Regions {
		w.Regions = append(w.Regions, wire.Region{Name: r.Name, GPA: r.GPA, Size: r.Size})
	}
	return w
}

func fromWire(w *wire.Description) Description {
	d := Description{Layout: Layout{PageSize: w.PageSize}, VCPUs: w.VCPUs, Devices: w.Devices, Base: w.Base}
	for _, r := range w.Regions {
		d.Layout.Regions = append(d.Layout.Regions, Region{Name: r.Name, GPA: r.GPA, Size: r.Size})
	}
	return d
}

// unexpected reports a message that the wire Reader allowed but this engine does not use here.
func unexpected(m wire.Msg, want string) error {
	return fmt.Errorf("%w: got %s, want %s", ErrProtocol, m.Type(), want)
}
