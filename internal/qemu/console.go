package qemu

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Kind is what a guest line says (see internal/guest/src/qemu.c for the format).
type Kind int

const (
	KindOther       Kind = iota // anything else, including a line cut in two by a migration
	KindBoot                    // godwit-qemu boot mem=... : the CPL3 code runs
	KindConsole                 // console TEXT: the guest's own console text
	KindHeartbeat               // hb UNITS
	KindVerifyBegin             // verify-begin SEQ
	KindVerify                  // verify SEQ pages=... mismatches=...
	KindExit                    // exit STATUS
	KindPanic                   // panic TEXT
)

func (k Kind) String() string {
	switch k {
	case KindBoot:
		return "boot"
	case KindConsole:
		return "console"
	case KindHeartbeat:
		return "heartbeat"
	case KindVerifyBegin:
		return "verify-begin"
	case KindVerify:
		return "verify"
	case KindExit:
		return "exit"
	case KindPanic:
		return "panic"
	}
	return "other"
}

// Line is one line of guest text, timestamped by the host when its newline arrived.
type Line struct {
	Time time.Time
	Text string
	Kind Kind
	// N is the number the line carries: work units for a heartbeat, the pass for
	// verify-begin and verify, the status for exit.
	N      uint64
	Fields map[string]uint64 // key=value numbers of boot and verify lines
}

// Verify is a verification line's report.
type Verify struct {
	Seq         uint64    `json:"seq"`
	Pages       uint64    `json:"pages"`
	Mismatches  uint64    `json:"mismatches"`
	Versioned   uint64    `json:"versioned"`
	FirstBadPFN uint64    `json:"first_bad_pfn"`
	Begin       time.Time `json:"begin"` // when its verify-begin line arrived (zero if unseen)
	End         time.Time `json:"end"`   // when the verify line arrived
}

func (l Line) verify() Verify {
	return Verify{Seq: l.N, Pages: l.Fields["pages"], Mismatches: l.Fields["mismatches"],
		Versioned: l.Fields["versioned"], FirstBadPFN: l.Fields["first_bad_pfn"], End: l.Time}
}

func parseLine(t time.Time, text string) Line {
	l := Line{Time: t, Text: text}
	word, rest, _ := strings.Cut(text, " ")
	num := func(s string) (uint64, bool) {
		n, err := strconv.ParseUint(s, 0, 64)
		return n, err == nil
	}
	fields := func(s string) map[string]uint64 {
		m := map[string]uint64{}
		for _, f := range strings.Fields(s) {
			if k, v, ok := strings.Cut(f, "="); ok {
				if n, ok := num(v); ok {
					m[k] = n
				}
			}
		}
		return m
	}
	switch word {
	case "godwit-qemu":
		if strings.HasPrefix(rest, "boot ") {
			l.Kind, l.Fields = KindBoot, fields(rest)
		}
	case "console":
		l.Kind = KindConsole
	case "panic":
		l.Kind = KindPanic
	case "hb", "verify-begin", "exit":
		if n, ok := num(rest); ok {
			l.N = n
			l.Kind = map[string]Kind{"hb": KindHeartbeat, "verify-begin": KindVerifyBegin, "exit": KindExit}[word]
		}
	case "verify":
		seq, more, _ := strings.Cut(rest, " ")
		if n, ok := num(seq); ok {
			l.Kind, l.N, l.Fields = KindVerify, n, fields(more)
			if _, ok := l.Fields["mismatches"]; !ok {
				l.Kind = KindOther
			}
		}
	}
	return l
}

// Console collects the lines a guest writes to isa-debugcon.
type Console struct {
	mu     sync.Mutex
	lines  []Line
	notify chan struct{}
	eof    error // set when the stream has ended
	log    io.Writer
}

func newConsole(log io.Writer) *Console {
	return &Console{notify: make(chan struct{}), log: log}
}

// read consumes r until it ends, timestamping each line as its newline arrives.
func (c *Console) read(r io.Reader) {
	br := bufio.NewReaderSize(r, 64<<10)
	var err error
	for {
		var s string
		s, err = br.ReadString('\n')
		now := time.Now()
		if s != "" {
			text := strings.TrimRight(s, "\r\n")
			l := parseLine(now, text)
			if c.log != nil && l.Kind != KindHeartbeat {
				fmt.Fprintf(c.log, "%s %s\n", now.Format("15:04:05.000"), text)
			}
			c.mu.Lock()
			c.lines = append(c.lines, l)
			close(c.notify)
			c.notify = make(chan struct{})
			c.mu.Unlock()
		}
		if err != nil {
			break
		}
	}
	c.mu.Lock()
	if err == io.EOF {
		err = fmt.Errorf("guest console: QEMU closed it")
	}
	c.eof = err
	close(c.notify)
	c.mu.Unlock()
}

// Lines returns the lines so far.
func (c *Console) Lines() []Line {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Line(nil), c.lines...)
}

// Len is the number of lines so far.
func (c *Console) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.lines)
}

// Wait returns the first line at index from or later for which match is true, and its index.
func (c *Console) Wait(ctx context.Context, from int, match func(Line) bool) (Line, int, error) {
	for {
		c.mu.Lock()
		for i := max(from, 0); i < len(c.lines); i++ {
			if match(c.lines[i]) {
				l := c.lines[i]
				c.mu.Unlock()
				return l, i, nil
			}
		}
		from = len(c.lines)
		notify, eof := c.notify, c.eof
		c.mu.Unlock()
		if eof != nil {
			return Line{}, -1, eof
		}
		select {
		case <-notify:
		case <-ctx.Done():
			return Line{}, -1, ctx.Err()
		}
	}
}

// WaitKind waits for a line of kind k at index from or later.
func (c *Console) WaitKind(ctx context.Context, from int, k Kind) (Line, int, error) {
	return c.Wait(ctx, from, func(l Line) bool { return l.Kind == k })
}

// NextVerify waits for the first verification pass that begins at index from or later (its
// verify-begin line) and returns its report. A panic line ends the wait with an error.
func (c *Console) NextVerify(ctx context.Context, from int) (Verify, error) {
	begin, i, err := c.Wait(ctx, from, func(l Line) bool { return l.Kind == KindVerifyBegin || l.Kind == KindPanic })
	if err != nil {
		return Verify{}, fmt.Errorf("waiting for a verification to begin: %w", err)
	}
	if begin.Kind == KindPanic {
		return Verify{}, fmt.Errorf("guest: %s", begin.Text)
	}
	end, _, err := c.Wait(ctx, i+1, func(l Line) bool {
		return (l.Kind == KindVerify && l.N == begin.N) || l.Kind == KindPanic
	})
	if err != nil {
		return Verify{}, fmt.Errorf("waiting for verification %d: %w", begin.N, err)
	}
	if end.Kind == KindPanic {
		return Verify{}, fmt.Errorf("guest: %s", end.Text)
	}
	v := end.verify()
	v.Begin = begin.Time
	return v, nil
}

// Heartbeats returns the arrival times of the lines between from and to (inclusive; zero times
// leave that end open). Every line shows the guest running, a line cut in two by a migration
// included, and heartbeat lines come while it verifies or sleeps too: a gap between two lines
// is time the vCPU did not run.
func (c *Console) Heartbeats(from, to time.Time) []time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ts []time.Time
	for _, l := range c.lines {
		if (!from.IsZero() && l.Time.Before(from)) || (!to.IsZero() && l.Time.After(to)) {
			continue
		}
		ts = append(ts, l.Time)
	}
	return ts
}

// MaxGap is the largest gap between consecutive times of the merged, sorted series, and when
// it ended (gap 0 and the zero time with fewer than two times).
func MaxGap(series ...[]time.Time) (gap time.Duration, end time.Time) {
	var all []time.Time
	for _, s := range series {
		all = append(all, s...)
	}
	slices.SortFunc(all, time.Time.Compare)
	for i := 1; i < len(all); i++ {
		if d := all[i].Sub(all[i-1]); d > gap {
			gap, end = d, all[i]
		}
	}
	return gap, end
}
