package migrationtest

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// LinkConfig shapes both directions of a Link.
type LinkConfig struct {
	// Buffer is how many bytes a direction holds that were written but not yet read: the
	// sender's and receiver's socket buffers together. A writer blocks while it is full.
	// Default 4 MiB.
	Buffer int
	// Latency is the one-way delay before written bytes can be read.
	Latency time.Duration
	// Bandwidth is the rate, in bytes/s, at which written bytes go out; 0 is unlimited.
	Bandwidth float64
}

// Link returns the two ends of an in-memory connection that behaves like TCP where the
// migration engine can tell: unlike net.Pipe, a write returns once its bytes fit in the
// buffer, without waiting for the reader, so a slow reader builds up a backlog as it would
// behind real socket buffers. Both ends support deadlines, Close and CloseWrite.
//
// Every wait is on a channel or a timer, so a Link created inside a testing/synctest bubble
// lets fake time advance while both sides are blocked on it (real sockets do not).
func Link(cfg LinkConfig) (net.Conn, net.Conn) {
	if cfg.Buffer <= 0 {
		cfg.Buffer = 4 << 20
	}
	ab, ba := newFlow(cfg), newFlow(cfg)
	a := &linkEnd{in: ba, out: ab, rd: newDeadline(), wd: newDeadline(), closed: make(chan struct{}), name: "a"}
	b := &linkEnd{in: ab, out: ba, rd: newDeadline(), wd: newDeadline(), closed: make(chan struct{}), name: "b"}
	return a, b
}

// flow is one direction of a Link.
type flow struct {
	cfg LinkConfig

	mu       sync.Mutex
	segs     []segment // written, not yet read, in order
	held     int       // bytes in segs
	departed time.Time // when the last written byte has gone out at Bandwidth
	eof      bool      // the writer closed its side: the reader gets io.EOF after the data
	gone     bool      // the reader closed: writes fail
	wake     chan struct{}
}

type segment struct {
	data  []byte
	ready time.Time // readable from then on
}

func newFlow(cfg LinkConfig) *flow { return &flow{cfg: cfg, wake: make(chan struct{})} }

// changed wakes everyone waiting on the flow. Called with mu held.
func (f *flow) changed() {
	close(f.wake)
	f.wake = make(chan struct{})
}

// deadline is one direction's deadline of one end: a channel closed once it has passed.
type deadline struct {
	mu    sync.Mutex
	timer *time.Timer
	ch    chan struct{}
}

func newDeadline() *deadline { return &deadline{ch: make(chan struct{})} }

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
	// A waiter never waits on a closed channel, so only an expired deadline needs a fresh
	// one; an open channel is kept, and whoever waits on it sees the new time.
	if closed(d.ch) {
		d.ch = make(chan struct{})
	}
	if t.IsZero() {
		return
	}
	wait := time.Until(t)
	if wait <= 0 {
		close(d.ch)
		return
	}
	ch := d.ch
	d.timer = time.AfterFunc(wait, func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.ch == ch && !closed(ch) {
			close(ch)
		}
	})
}

func (d *deadline) done() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ch
}

// linkEnd is one end of a Link.
type linkEnd struct {
	in, out   *flow
	rd, wd    *deadline
	closeOnce sync.Once
	closed    chan struct{}
	name      string
}

var errWriteClosed = errors.New("migrationtest: write after CloseWrite")

func (c *linkEnd) Read(p []byte) (int, error) {
	f := c.in
	for {
		if closed(c.closed) {
			return 0, net.ErrClosed
		}
		dl := c.rd.done()
		if closed(dl) {
			return 0, os.ErrDeadlineExceeded
		}
		f.mu.Lock()
		now := time.Now()
		n := 0
		for len(f.segs) > 0 && n < len(p) && !f.segs[0].ready.After(now) {
			k := copy(p[n:], f.segs[0].data)
			n += k
			if f.segs[0].data = f.segs[0].data[k:]; len(f.segs[0].data) == 0 {
				f.segs[0] = segment{}
				f.segs = f.segs[1:]
			}
		}
		if n > 0 || len(p) == 0 {
			f.held -= n
			f.changed()
			f.mu.Unlock()
			return n, nil
		}
		if len(f.segs) == 0 && f.eof {
			f.mu.Unlock()
			return 0, io.EOF
		}
		wake := f.wake
		var timer *time.Timer
		var ready <-chan time.Time
		if len(f.segs) > 0 {
			timer = time.NewTimer(f.segs[0].ready.Sub(now))
			ready = timer.C
		}
		f.mu.Unlock()
		select {
		case <-wake:
		case <-ready:
		case <-dl:
		case <-c.closed:
		}
		if timer != nil {
			timer.Stop()
		}
	}
}

func (c *linkEnd) Write(p []byte) (int, error) {
	f := c.out
	written := 0
	for {
		if closed(c.closed) {
			return written, net.ErrClosed
		}
		dl := c.wd.done()
		if closed(dl) {
			return written, os.ErrDeadlineExceeded
		}
		f.mu.Lock()
		switch {
		case f.eof:
			f.mu.Unlock()
			return written, errWriteClosed
		case f.gone:
			f.mu.Unlock()
			return written, io.ErrClosedPipe
		}
		if free := f.cfg.Buffer - f.held; free > 0 && len(p) > 0 {
			k := min(free, len(p))
			now := time.Now()
			out := now
			if f.cfg.Bandwidth > 0 {
				if f.departed.After(out) {
					out = f.departed
				}
				out = out.Add(time.Duration(float64(k) / f.cfg.Bandwidth * float64(time.Second)))
				f.departed = out
			}
			f.segs = append(f.segs, segment{data: append([]byte(nil), p[:k]...), ready: out.Add(f.cfg.Latency)})
			f.held += k
			f.changed()
			written += k
			p = p[k:]
		}
		if len(p) == 0 {
			f.mu.Unlock()
			return written, nil
		}
		wake := f.wake
		f.mu.Unlock()
		select {
		case <-wake:
		case <-dl:
		case <-c.closed:
		}
	}
}

// CloseWrite ends this end's writing: the peer reads io.EOF once it has read the data.
func (c *linkEnd) CloseWrite() error {
	f := c.out
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.eof {
		f.eof = true
		f.changed()
	}
	return nil
}

// Close ends both directions for this end: the peer reads io.EOF after the data, and its
// writes fail.
func (c *linkEnd) Close() error {
	c.closeOnce.Do(func() {
		close(c.closed)
		c.CloseWrite()
		f := c.in
		f.mu.Lock()
		f.gone = true
		f.segs, f.held = nil, 0
		f.changed()
		f.mu.Unlock()
	})
	return nil
}

type linkAddr string

func (a linkAddr) Network() string { return "migrationtest" }
func (a linkAddr) String() string  { return string(a) }

func (c *linkEnd) LocalAddr() net.Addr { return linkAddr(c.name) }
func (c *linkEnd) RemoteAddr() net.Addr {
	if c.name == "a" {
		return linkAddr("b")
	}
	return linkAddr("a")
}

func (c *linkEnd) SetDeadline(t time.Time) error {
	c.rd.set(t)
	c.wd.set(t)
	return nil
}

func (c *linkEnd) SetReadDeadline(t time.Time) error  { c.rd.set(t); return nil }
func (c *linkEnd) SetWriteDeadline(t time.Time) error { c.wd.set(t); return nil }
