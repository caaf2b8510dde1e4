// Package qemu runs godwit's built-in guest under QEMU-KVM and migrates it with QEMU's own
// migration, as the baseline `godwit bench` compares godwit with: a small QMP client, a
// launcher for qemu-system-x86_64 (inside a network namespace) that reads the guest's
// isa-debugcon lines and timestamps them as they arrive, and a migration driver that collects
// QEMU's figures, the STOP and RESUME event times and the guest's heartbeat blackout, and
// trusts nothing it did not see: a migration counts only when the destination guest's next
// verification of its own memory finds no mismatch.
package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// QMP is the QEMU Machine Protocol: JSON objects over a stream, one per line in practice but
// not by contract. The server greets with {"QMP": {"version": ..., "capabilities": [...]}};
// the client leaves capabilities negotiation mode with qmp_capabilities; then each
// {"execute": CMD, "arguments": ARGS, "id": ID} gets {"return": ..., "id": ID} or
// {"error": {"class": ..., "desc": ...}, "id": ID}, and asynchronous events
// {"event": NAME, "data": ..., "timestamp": {"seconds": S, "microseconds": US}} may come at any
// time in between.

// Event is an asynchronous QMP event.
type Event struct {
	Name string
	Data json.RawMessage
	// Time is the event's own timestamp (the QEMU process's wall clock when it happened);
	// Received is when this client read it.
	Time     time.Time
	Received time.Time
}

// Error is an error answer to a command.
type Error struct {
	Command string
	Class   string `json:"class"`
	Desc    string `json:"desc"`
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp: %s: %s: %s", e.Command, e.Class, e.Desc)
}

// Version is QEMU's version from the greeting.
type Version struct {
	Major, Minor, Micro int
	Package             string
}

func (v Version) String() string {
	s := fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro)
	if v.Package != "" {
		s += " (" + strings.TrimSpace(v.Package) + ")"
	}
	return s
}

// message is any QMP message from the server.
type message struct {
	QMP *struct {
		Version struct {
			QEMU struct {
				Major int `json:"major"`
				Minor int `json:"minor"`
				Micro int `json:"micro"`
			} `json:"qemu"`
			Package string `json:"package"`
		} `json:"version"`
		Capabilities []string `json:"capabilities"`
	} `json:"QMP"`
	Return    json.RawMessage `json:"return"`
	Error     *Error          `json:"error"`
	ID        json.RawMessage `json:"id"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

type reply struct {
	ret json.RawMessage
	err *Error
}

// Client is a QMP connection. Its methods are safe for concurrent use.
type Client struct {
	conn    net.Conn
	version Version
	caps    []string

	writeMu sync.Mutex

	mu      sync.Mutex
	nextID  uint64
	pending map[string]chan reply
	events  []Event
	notify  chan struct{} // closed and replaced whenever an event arrives
	err     error         // why the connection ended
	done    chan struct{}
}

// ErrClosed is returned for commands on a closed connection.
var ErrClosed = errors.New("qmp: connection closed")

// Dial connects to a QMP Unix socket, retrying until the socket accepts or ctx ends (QEMU
// creates it shortly after it starts), and negotiates capabilities.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return NewClient(ctx, conn)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("qmp: connecting to %s: %w (last error: %v)", path, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// NewClient runs the QMP handshake on conn (greeting, qmp_capabilities) and serves it. The
// client owns conn from then on.
func NewClient(ctx context.Context, conn net.Conn) (*Client, error) {
	c := &Client{conn: conn, pending: map[string]chan reply{}, notify: make(chan struct{}), done: make(chan struct{})}
	dec := json.NewDecoder(bufio.NewReader(conn))
	if dl, ok := ctx.Deadline(); ok {
		conn.SetReadDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Now()) })
	var greet message
	err := dec.Decode(&greet)
	stopped := !stop()
	conn.SetReadDeadline(time.Time{})
	if err == nil && stopped {
		err = ctx.Err()
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: reading the greeting: %w", err)
	}
	if greet.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: the server did not greet with a QMP object")
	}
	q := greet.QMP.Version
	c.version = Version{Major: q.QEMU.Major, Minor: q.QEMU.Minor, Micro: q.QEMU.Micro, Package: q.Package}
	c.caps = greet.QMP.Capabilities
	go c.read(dec)
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Version is the server's QEMU version.
func (c *Client) Version() Version { return c.version }

// Close ends the connection; pending commands fail with ErrClosed.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	return err
}

// Done is closed when the connection has ended (closed, or the server went away).
func (c *Client) Done() <-chan struct{} { return c.done }

func (c *Client) read(dec *json.Decoder) {
	var err error
	for {
		var m message
		if err = dec.Decode(&m); err != nil {
			break
		}
		now := time.Now()
		switch {
		case m.Event != "":
			ev := Event{Name: m.Event, Data: m.Data, Received: now}
			if ts := m.Timestamp; ts != nil {
				ev.Time = time.Unix(ts.Seconds, ts.Microseconds*1000)
			}
			c.mu.Lock()
			c.events = append(c.events, ev)
			close(c.notify)
			c.notify = make(chan struct{})
			c.mu.Unlock()
		case m.ID != nil:
			c.mu.Lock()
			ch := c.pending[string(m.ID)]
			delete(c.pending, string(m.ID))
			c.mu.Unlock()
			if ch != nil {
				ch <- reply{ret: m.Return, err: m.Error}
			}
		}
		// Anything else (an answer without an id, an unknown object) is ignored: this
		// client always sends ids.
	}
	c.mu.Lock()
	if errors.Is(err, io.EOF) {
		c.err = fmt.Errorf("%w by QEMU", ErrClosed)
	} else {
		c.err = fmt.Errorf("%w (%v)", ErrClosed, err)
	}
	for id, ch := range c.pending {
		ch <- reply{} // no return value: Execute reports c.err
		delete(c.pending, id)
	}
	close(c.notify)
	c.mu.Unlock()
	close(c.done)
}

// Execute runs cmd with args (nil for none) and decodes its return value into result (nil to
// discard it). A QMP error answer is an *Error.
func (c *Client) Execute(ctx context.Context, cmd string, args, result any) error {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}
	c.nextID++
	n := c.nextID
	id := strconv.FormatUint(n, 10)
	ch := make(chan reply, 1)
	c.pending[id] = ch
	c.mu.Unlock()

	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        uint64 `json:"id"`
	}{cmd, args, n}
	b, err := json.Marshal(req)
	if err != nil {
		c.forget(id)
		return fmt.Errorf("qmp: %s: encoding arguments: %w", cmd, err)
	}
	c.writeMu.Lock()
	_, err = c.conn.Write(append(b, '\n'))
	c.writeMu.Unlock()
	if err != nil {
		c.forget(id)
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}
	select {
	case r := <-ch:
		if r.err != nil {
			r.err.Command = cmd
			return r.err
		}
		if r.ret == nil {
			c.mu.Lock()
			err := c.err
			c.mu.Unlock()
			if err == nil {
				err = ErrClosed
			}
			return fmt.Errorf("qmp: %s: %w", cmd, err)
		}
		if result != nil {
			if err := json.Unmarshal(r.ret, result); err != nil {
				return fmt.Errorf("qmp: %s: decoding the answer %s: %w", cmd, r.ret, err)
			}
		}
		return nil
	case <-ctx.Done():
		c.forget(id)
		return fmt.Errorf("qmp: %s: %w", cmd, ctx.Err())
	}
}

func (c *Client) forget(id string) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// Events returns the events received so far, oldest first.
func (c *Client) Events() []Event {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Event(nil), c.events...)
}

// WaitEvent waits for an event named name, the first one at index from or later of the event
// list (Events), and returns it with its index.
func (c *Client) WaitEvent(ctx context.Context, name string, from int) (Event, int, error) {
	for {
		c.mu.Lock()
		for i := max(from, 0); i < len(c.events); i++ {
			if c.events[i].Name == name {
				ev := c.events[i]
				c.mu.Unlock()
				return ev, i, nil
			}
		}
		from = len(c.events)
		notify, err := c.notify, c.err
		c.mu.Unlock()
		if err != nil {
			return Event{}, -1, fmt.Errorf("qmp: waiting for %s: %w", name, err)
		}
		select {
		case <-notify:
		case <-ctx.Done():
			return Event{}, -1, fmt.Errorf("qmp: waiting for %s: %w", name, ctx.Err())
		}
	}
}
