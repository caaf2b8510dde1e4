// Package control is the VM process's control API: HTTP with JSON bodies on a Unix socket.
// The server routes requests to a Backend (the running machine and, later, its migrations);
// the client is what the CLI uses. Every error travels as {"error": "..."} with a non-2xx status.
//
// Endpoints (all under /v1):
//
//	GET  /stats          machine figures (vmm.Stats)
//	POST /verify         the guest re-checks its memory; returns a vmm.VerifyReport
//	POST /pause          stop the vCPUs
//	POST /resume         run them again
//	POST /quit           the guest verifies and exits; returns the final report; the process ends
//	POST /debug/write    {"gpa": N, "data": base64} written by the VMM behind the guest's back
//	POST /migrate        start an outgoing migration (body: options); GET /migrate: its status;
//	DELETE /migrate      cancel it (the VM keeps running here)
package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Handler serves one endpoint: it decodes nothing itself; body is the raw request body.
type Handler func(ctx context.Context, body []byte) (any, error)

// Server serves the control API on a Unix socket.
type Server struct {
	path    string
	ln      net.Listener
	srv     *http.Server
	routes  map[string]Handler // "METHOD /path"
	streams map[string]StreamHandler
	under   []prefixRoute // checked in order when no route matches
}

type prefixRoute struct {
	prefix string
	h      http.Handler
}

// StatusError lets a handler choose the HTTP status of its error.
type StatusError struct {
	Status int
	Err    error
}

func (e *StatusError) Error() string { return e.Err.Error() }
func (e *StatusError) Unwrap() error { return e.Err }

// Listen creates the socket at path (replacing a stale one) and returns a server without routes.
func Listen(path string) (*Server, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("control: create directory for %s: %w", path, err)
	}
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("control: %s is in use by another running VM", path)
	}
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control: listen on %s: %w", path, err)
	}
	return &Server{path: path, ln: ln, routes: map[string]Handler{}, streams: map[string]StreamHandler{}}, nil
}

// Path is the socket's path.
func (s *Server) Path() string { return s.path }

// Handle registers h for method and path (for example "GET", "/v1/stats").
func (s *Server) Handle(method, path string, h Handler) { s.routes[method+" "+path] = h }

// HandleUnder passes every request whose path begins with prefix, and that no route takes, to
// h as it came (a proxy to another control socket: the agent's for its VMs).
func (s *Server) HandleUnder(prefix string, h http.Handler) {
	s.under = append(s.under, prefixRoute{prefix, h})
}

// Serve answers requests until Close.
func (s *Server) Serve() error {
	s.srv = &http.Server{Handler: http.HandlerFunc(s.serveHTTP), ReadHeaderTimeout: 10 * time.Second}
	err := s.srv.Serve(s.ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Close stops serving and removes the socket.
func (s *Server) Close() error {
	var err error
	if s.srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err = s.srv.Shutdown(ctx)
		cancel()
	} else {
		err = s.ln.Close()
	}
	os.Remove(s.path)
	return err
}

const maxBody = 1 << 20

func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	h, ok := s.routes[r.Method+" "+r.URL.Path]
	sh, streaming := s.streams[r.Method+" "+r.URL.Path]
	if !ok && !streaming {
		for _, u := range s.under {
			if strings.HasPrefix(r.URL.Path, u.prefix) {
				u.h.ServeHTTP(w, r)
				return
			}
		}
		writeJSON(w, http.StatusNotFound, map[string]string{"error": fmt.Sprintf("control: no endpoint %s %s", r.Method, r.URL.Path)})
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil || len(body) > maxBody {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "control: request body unreadable or over 1 MiB"})
		return
	}
	if streaming {
		s.serveStream(w, r, sh, body)
		return
	}
	out, err := h(r.Context(), body)
	if err != nil {
		WriteError(w, http.StatusInternalServerError, err)
		return
	}
	if out == nil {
		out = map[string]bool{"ok": true}
	}
	writeJSON(w, http.StatusOK, out)
}

// WriteError answers with err as {"error": ...}, under its StatusError's status if it has one
// (else status).
func WriteError(w http.ResponseWriter, status int, err error) {
	var se *StatusError
	if errors.As(err, &se) {
		status = se.Status
	}
	writeJSON(w, status, map[string]string{"error": err.Error()})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// Client talks to a VM's control socket.
type Client struct {
	path   string
	prefix string // before every request's path (Under)
	hc     *http.Client
}

// Under returns a client for the API that the server at the socket serves under prefix: a
// call of /v1/PATH goes to prefix/PATH (a VM's API behind the agent's, /v1/vms/NAME).
func (c *Client) Under(prefix string) *Client {
	u := *c
	u.prefix = prefix
	return &u
}

func (c *Client) url(path string) string {
	if c.prefix != "" {
		path = c.prefix + strings.TrimPrefix(path, "/v1")
	}
	return "http://vm" + path
}

// Dial returns a client for the socket at path. It does not connect until the first call.
func Dial(path string) *Client {
	return &Client{path: path, hc: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}}
}

// Call sends a request with in as the JSON body (nil for none) and decodes the answer into out
// (nil to discard it).
func (c *Client) Call(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("control: encode %s %s: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.url(path), body)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return c.dialErr(method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("control: %s %s: reading answer: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		return answerErr(method, path, resp.StatusCode, data)
	}
	if out == nil {
		return nil
	}
	if raw, ok := out.(*json.RawMessage); ok {
		*raw = append((*raw)[:0], data...)
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("control: %s %s: decoding answer: %w", method, path, err)
	}
	return nil
}

func (c *Client) dialErr(method, path string, err error) error {
	if _, serr := os.Stat(c.path); serr != nil {
		return fmt.Errorf("control: no VM at %s: %w", c.path, serr)
	}
	return fmt.Errorf("control: %s %s on %s: %w", method, path, c.path, err)
}

func answerErr(method, path string, status int, data []byte) error {
	var e struct {
		Error string `json:"error"`
	}
	if json.Unmarshal(data, &e) == nil && e.Error != "" {
		return errors.New(e.Error)
	}
	return fmt.Errorf("control: %s %s: HTTP %d: %s", method, path, status, bytes.TrimSpace(data))
}
