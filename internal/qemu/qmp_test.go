package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"testing"
	"time"
)

// fakeQMP plays a QMP server on one end of a pipe: it greets, then answers each command with
// the reply serve returns (a JSON object without the id, which it adds), possibly writing
// events first.
type fakeQMP struct {
	t        *testing.T
	conn     net.Conn
	commands chan map[string]any
}

func startFake(t *testing.T, greeting string, serve func(cmd string, args map[string]any, w func(string)) string) (*fakeQMP, net.Conn) {
	server, client := net.Pipe()
	f := &fakeQMP{t: t, conn: server, commands: make(chan map[string]any, 100)}
	go func() {
		defer server.Close()
		w := func(s string) { server.Write([]byte(s + "\r\n")) }
		w(greeting)
		sc := bufio.NewScanner(server)
		for sc.Scan() {
			var req map[string]any
			if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
				w(`{"error": {"class": "GenericError", "desc": "bad json"}}`)
				continue
			}
			f.commands <- req
			cmd, _ := req["execute"].(string)
			args, _ := req["arguments"].(map[string]any)
			ans := serve(cmd, args, w)
			if ans == "" {
				continue
			}
			id, _ := json.Marshal(req["id"])
			w(strings.TrimSuffix(ans, "}") + `, "id": ` + string(id) + `}`)
		}
	}()
	return f, client
}

const greeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}`

func TestQMPHandshakeCommandsEvents(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f, conn := startFake(t, greeting, func(cmd string, args map[string]any, w func(string)) string {
		switch cmd {
		case "qmp_capabilities":
			return `{"return": {}}`
		case "query-migrate":
			// An event arrives before the answer, as QEMU may interleave them.
			w(`{"timestamp": {"seconds": 1700000000, "microseconds": 250000}, "event": "STOP"}`)
			return `{"return": {"status": "completed", "total-time": 1234, "downtime": 56, "setup-time": 7,
				"ram": {"transferred": 1000, "duplicate": 3, "normal": 9, "dirty-sync-count": 4, "postcopy-requests": 2, "mbps": 941.5}}}`
		case "migrate":
			if args["uri"] != "tcp:10.0.0.2:4444" {
				return `{"error": {"class": "GenericError", "desc": "bad uri"}}`
			}
			return `{"return": {}}`
		}
		return `{"error": {"class": "CommandNotFound", "desc": "The command ` + cmd + ` has not been found"}}`
	})
	c, err := NewClient(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if v := c.Version(); v.Major != 7 || v.Minor != 2 || v.Micro != 22 || v.String() != "7.2.22 (Debian 1:7.2+dfsg-7)" {
		t.Fatalf("version %+v %q", v, v)
	}
	if first := <-f.commands; first["execute"] != "qmp_capabilities" {
		t.Fatalf("first command %v, want qmp_capabilities", first)
	}

	var info MigrationInfo
	if err := c.Execute(ctx, "query-migrate", nil, &info); err != nil {
		t.Fatal(err)
	}
	if info.Status != "completed" || info.TotalTime != 1234 || info.Downtime != 56 || info.SetupTime != 7 ||
		info.RAM == nil || info.RAM.Transferred != 1000 || info.RAM.DirtySyncCount != 4 ||
		info.RAM.PostcopyRequests != 2 || info.RAM.Mbps != 941.5 {
		t.Fatalf("query-migrate decoded as %+v %+v", info, info.RAM)
	}
	req := <-f.commands
	if _, ok := req["arguments"]; ok {
		t.Fatalf("a command without arguments was sent with some: %v", req)
	}
	ev, i, err := c.WaitEvent(ctx, "STOP", 0)
	if err != nil {
		t.Fatal(err)
	}
	if i != 0 || !ev.Time.Equal(time.Unix(1700000000, 250000000)) || ev.Received.IsZero() {
		t.Fatalf("event %+v at %d", ev, i)
	}

	if err := c.Execute(ctx, "migrate", map[string]any{"uri": "tcp:10.0.0.2:4444"}, nil); err != nil {
		t.Fatal(err)
	}
	if got := (<-f.commands)["arguments"].(map[string]any)["uri"]; got != "tcp:10.0.0.2:4444" {
		t.Fatalf("migrate sent uri %v", got)
	}
	err = c.Execute(ctx, "no-such-command", nil, nil)
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" || qe.Command != "no-such-command" {
		t.Fatalf("error answer came back as %v", err)
	}
	// A later event is found from a later index; an earlier index finds the first again.
	wctx, wcancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer wcancel()
	if _, _, err := c.WaitEvent(wctx, "STOP", 1); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitEvent for an event that never came: %v", err)
	}
}

// Concurrent commands get their own answers even when the server answers out of order.
func TestQMPConcurrentOutOfOrder(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	held := make(chan func(), 1)
	_, conn := startFake(t, greeting, func(cmd string, args map[string]any, w func(string)) string {
		switch cmd {
		case "qmp_capabilities":
			return `{"return": {}}`
		case "slow":
			// Answer later, after the next command's answer.
			held <- func() { w(`{"return": {"who": "slow"}, "id": 2}`) }
			return ""
		case "fast":
			ans := `{"return": {"who": "fast"}}`
			(<-held)()
			return ans
		}
		return `{"return": {}}`
	})
	c, err := NewClient(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	type who struct{ Who string }
	slow := make(chan who, 1)
	go func() {
		var r who
		if err := c.Execute(ctx, "slow", nil, &r); err != nil {
			t.Error(err)
		}
		slow <- r
	}()
	time.Sleep(50 * time.Millisecond) // let slow go first: it gets id 2
	var r who
	if err := c.Execute(ctx, "fast", nil, &r); err != nil {
		t.Fatal(err)
	}
	if r.Who != "fast" {
		t.Fatalf("fast got %q", r.Who)
	}
	if s := <-slow; s.Who != "slow" {
		t.Fatalf("slow got %q", s.Who)
	}
}

func TestQMPServerGoesAway(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, conn := startFake(t, greeting, func(cmd string, args map[string]any, w func(string)) string {
		if cmd == "quit" {
			return "" // and the fake closes when the client does; simulate by never answering
		}
		return `{"return": {}}`
	})
	c, err := NewClient(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Execute(ctx, "quit", nil, nil) }()
	time.Sleep(50 * time.Millisecond)
	c.Close()
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Fatalf("pending command after close: %v, want ErrClosed", err)
	}
	if err := c.Execute(ctx, "query-status", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("command after close: %v", err)
	}
	if _, _, err := c.WaitEvent(ctx, "STOP", 0); err == nil {
		t.Fatal("WaitEvent on a closed connection returned no error")
	}
}

func TestQMPBadGreeting(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, conn := startFake(t, `{"hello": 1}`, func(string, map[string]any, func(string)) string { return "" })
	if _, err := NewClient(ctx, conn); err == nil || !strings.Contains(err.Error(), "greet") {
		t.Fatalf("bad greeting: %v", err)
	}
	_, conn = startFake(t, greeting, func(cmd string, _ map[string]any, _ func(string)) string {
		return `{"error": {"class": "GenericError", "desc": "capabilities negotiation failed"}}`
	})
	if _, err := NewClient(ctx, conn); err == nil || !strings.Contains(err.Error(), "negotiation") {
		t.Fatalf("refused qmp_capabilities: %v", err)
	}
}

func TestParseLines(t *testing.T) {
	now := time.Now()
	cases := []struct {
		text string
		kind Kind
		n    uint64
	}{
		{"godwit-qemu boot mem=66977792 pages=14290 wss=2048 tsc_khz=2096019 scrubbed=27", KindBoot, 0},
		{"console godwit guest: 1 vcpu", KindConsole, 0},
		{"hb 12345", KindHeartbeat, 12345},
		{"45", KindOther, 0}, // the second half of a line cut by a migration
		{"hb", KindOther, 0},
		{"verify-begin 3", KindVerifyBegin, 3},
		{"verify 3 pages=14290 mismatches=2 versioned=2048 first_bad_pfn=0x1234 offset=0x8 expected=0x1 found=0x2", KindVerify, 3},
		{"verify 3 pages=14290", KindOther, 3},
		{"exit 0", KindExit, 0},
		{"panic godwit guest: vcpu 0: bad", KindPanic, 0},
	}
	for _, c := range cases {
		l := parseLine(now, c.text)
		if l.Kind != c.kind || (c.kind != KindOther && l.N != c.n) {
			t.Errorf("%q: kind %v n %d, want %v %d", c.text, l.Kind, l.N, c.kind, c.n)
		}
	}
	v := parseLine(now, cases[6].text).verify()
	if v.Seq != 3 || v.Pages != 14290 || v.Mismatches != 2 || v.Versioned != 2048 || v.FirstBadPFN != 0x1234 {
		t.Errorf("verify fields %+v", v)
	}
	if b := parseLine(now, cases[0].text); b.Fields["tsc_khz"] != 2096019 || b.Fields["mem"] != 66977792 {
		t.Errorf("boot fields %v", b.Fields)
	}
}

func TestConsoleNextVerifyAndGaps(t *testing.T) {
	c := newConsole(nil)
	r, w := net.Pipe()
	go c.read(r)
	go func() {
		for _, s := range []string{"hb 1", "verify-begin 1", "hb 2", "verify 1 pages=10 mismatches=0 versioned=3 first_bad_pfn=0xffffffffffffffff",
			"hb 3", "verify-begin 2", "verify 2 pages=10 mismatches=1 versioned=3 first_bad_pfn=0x900"} {
			w.Write([]byte(s + "\n"))
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(60 * time.Millisecond)
		w.Write([]byte("hb 4\n"))
		w.Close()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	v, err := c.NextVerify(ctx, 0)
	if err != nil || v.Seq != 1 || v.Mismatches != 0 || v.Begin.IsZero() || v.End.Before(v.Begin) {
		t.Fatalf("first verify %+v %v", v, err)
	}
	v, err = c.NextVerify(ctx, 3)
	if err != nil || v.Seq != 2 || v.Mismatches != 1 || v.FirstBadPFN != 0x900 {
		t.Fatalf("second verify %+v %v", v, err)
	}
	if _, _, err := c.WaitKind(ctx, 0, KindExit); err == nil {
		t.Fatal("waiting past the end of the stream returned no error")
	}
	gap, end := MaxGap(c.Heartbeats(time.Time{}, time.Time{}))
	if gap < 50*time.Millisecond || end.IsZero() {
		t.Fatalf("largest gap %v ending %v, want the 60 ms pause", gap, end)
	}
	a := []time.Time{time.Unix(0, 0), time.Unix(2, 0)}
	b := []time.Time{time.Unix(1, 0), time.Unix(5, 0)}
	if g, e := MaxGap(a, b); g != 3*time.Second || !e.Equal(time.Unix(5, 0)) {
		t.Fatalf("merged gap %v %v", g, e)
	}
}
