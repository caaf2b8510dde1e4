package control

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func serve(t *testing.T) (*Server, *Client) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "c.sock")
	s, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve()
	t.Cleanup(func() { s.Close() })
	return s, Dial(path)
}

func TestCallsErrorsAndStreams(t *testing.T) {
	s, c := serve(t)
	s.Handle("GET", "/v1/echo", func(_ context.Context, body []byte) (any, error) {
		return map[string]int{"n": 7}, nil
	})
	s.Handle("POST", "/v1/busy", func(context.Context, []byte) (any, error) {
		return nil, &StatusError{Status: http.StatusConflict, Err: errors.New("vm: busy")}
	})
	cancelled := make(chan struct{})
	s.HandleStream("POST", "/v1/long", func(ctx context.Context, body []byte, emit func(any)) (any, error) {
		var in struct{ Steps int }
		json.Unmarshal(body, &in)
		for i := 0; i < in.Steps; i++ {
			emit(map[string]int{"step": i})
		}
		if in.Steps == 0 {
			<-ctx.Done()
			close(cancelled)
			return nil, ctx.Err()
		}
		return map[string]string{"result": "ok"}, nil
	})
	ctx := context.Background()
	var out struct{ N int }
	if err := c.Call(ctx, "GET", "/v1/echo", nil, &out); err != nil || out.N != 7 {
		t.Fatalf("echo: %+v %v", out, err)
	}
	if err := c.Call(ctx, "POST", "/v1/busy", nil, nil); err == nil || err.Error() != "vm: busy" {
		t.Fatalf("busy: %v", err)
	}
	if err := c.Call(ctx, "GET", "/v1/nothing", nil, nil); err == nil || !strings.Contains(err.Error(), "no endpoint") {
		t.Fatalf("unknown endpoint: %v", err)
	}
	var steps int
	var res struct{ Result string }
	err := c.Stream(ctx, "POST", "/v1/long", map[string]int{"steps": 5}, func(json.RawMessage) { steps++ }, &res)
	if err != nil || steps != 5 || res.Result != "ok" {
		t.Fatalf("stream: %d steps, %+v, %v", steps, res, err)
	}
	cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := c.Stream(cctx, "POST", "/v1/long", map[string]int{"steps": 0}, nil, nil); err == nil {
		t.Fatal("cancelled stream returned no error")
	}
	select {
	case <-cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("the handler did not see the client go away")
	}
	if err := Dial(filepath.Join(t.TempDir(), "none.sock")).Call(ctx, "GET", "/v1/echo", nil, nil); err == nil || !strings.Contains(err.Error(), "no VM at") {
		t.Fatalf("missing socket: %v", err)
	}
}

func TestListenRefusesALiveSocket(t *testing.T) {
	s, _ := serve(t)
	if _, err := Listen(s.Path()); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second listen on a live socket: %v", err)
	}
}
