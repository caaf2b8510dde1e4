package migration

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"github.com/godwit-vm/godwit/migration/wire"
)

// link is the connection a side's protocol runs on: the caller's, or after a broken post-copy
// link one from Reconnect (the source) or the listener (the destination). It owns what belongs
// to one connection: its writer and reader, the watch on its reads (for the watchdog and the
// destination's receive window), the context that ends with it, the interruption that
// unblocks its I/O then, and on the source the goroutine that reads it. Replacing the
// connection is replacing the link.
type link struct {
	conn  io.ReadWriter // nil: none (a resume that must dial first)
	owned bool          // from Reconnect: the engine closes it
	w     *wire.Writer
	r     *wire.Reader
	watch *readWatch

	ctx    context.Context // ends when this connection does, or the migration
	cancel context.CancelCauseFunc
	intr   *interrupter

	inbox      chan inbound  // source: what the reader goroutine read
	readerDone chan struct{} // closed when the reader goroutine stopped; nil before it started
}

// newLink wraps conn in a writer and a reader for side; start gives it a context.
func newLink(conn io.ReadWriter, owned bool, side wire.Side) *link {
	if conn == nil {
		return &link{w: wire.NewWriter(io.Discard), r: wire.NewReader(eofReader{}, side), watch: &readWatch{r: eofReader{}}}
	}
	l := &link{conn: conn, owned: owned, w: wire.NewWriter(conn), watch: &readWatch{r: conn}}
	l.r = wire.NewReader(l.watch, side)
	return l
}

// start makes the link's context a child of parent: its end (or the link's cancel) interrupts
// the connection's blocked I/O.
func (l *link) start(parent context.Context) {
	l.ctx, l.cancel = context.WithCancelCause(parent)
	l.intr = interruptOnDone(l.ctx, l.conn)
}

// err is why the link (or the migration) ended, if it has.
func (l *link) err() error {
	if l.ctx.Err() != nil {
		return context.Cause(l.ctx)
	}
	return nil
}

// watchdog ends the link once nothing has arrived on it for timeout (see watchLink).
func (l *link) watchdog(timeout time.Duration) { watchLink(l.ctx, l.cancel, l.watch, timeout) }

// stopReader stops the reader goroutine, if it runs, by a deadline in the past (or, on a
// connection without deadlines that the engine owns, by closing it).
func (l *link) stopReader() {
	if l.readerDone == nil {
		return
	}
	select {
	case <-l.readerDone:
	default:
		if setDeadline(l.conn, longAgo) {
			<-l.readerDone
		} else if l.owned {
			closeConn(l.conn)
			<-l.readerDone
		}
	}
}

// release leaves the connection as it came: no interruption pending, no reader, no deadline;
// closed if the engine owns it.
func (l *link) release() {
	l.intr.hold()
	l.stopReader()
	setDeadline(l.conn, time.Time{})
	if l.owned {
		closeConn(l.conn)
	}
	l.cancel(nil)
}

// dropped is what is left of a link replaced after it broke: its context, ended, so that
// whatever still checks it stops; writes go nowhere, reads end.
func (l *link) dropped() *link {
	d := newLink(nil, false, wire.AtSource)
	d.ctx, d.cancel, d.intr = l.ctx, l.cancel, l.intr
	return d
}

var errLinkDropped = errors.New("migration: connection replaced")

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }

// readWatch records when bytes last arrived on a connection, for the link watchdog.
// It also counts the bytes read, for the destination's receive window.
type readWatch struct {
	r    io.Reader
	last atomic.Int64 // Unix ns
	n    atomic.Int64 // bytes read
}

func (w *readWatch) Read(p []byte) (int, error) {
	n, err := w.r.Read(p)
	if n > 0 {
		w.last.Store(time.Now().UnixNano())
		w.n.Add(int64(n))
	}
	return n, err
}

// watchLink cancels ctx with ErrLinkTimeout once nothing has arrived on w for timeout. It
// returns when ctx is done. Timeouts use the time package, like every engine timeout.
func watchLink(ctx context.Context, cancel context.CancelCauseFunc, w *readWatch, timeout time.Duration) {
	w.last.Store(time.Now().UnixNano())
	go func() {
		t := time.NewTicker(max(timeout/4, time.Millisecond))
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-t.C:
				if idle := now.Sub(time.Unix(0, w.last.Load())); idle > timeout {
					cancel(fmt.Errorf("%w: nothing from the peer for %v", ErrLinkTimeout, idle.Round(time.Millisecond)))
					return
				}
			}
		}
	}()
}

// closeConn closes c if it can be closed.
func closeConn(c any) {
	if cl, ok := c.(io.Closer); ok {
		cl.Close()
	}
}
