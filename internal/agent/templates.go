package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/godwit-vm/godwit/internal/control"
	"github.com/godwit-vm/godwit/internal/template"
	"github.com/godwit-vm/godwit/internal/transport"
)

// Templates between agents. A VM cloned from a template migrates only to a host whose store
// holds the template (its unchanged pages are not sent). Before it asks the destination agent
// for a VM process, the source agent asks whether the destination holds the template (GET
// /v1/templates/ID between agents) and, if not, pushes it there (PUT, the push stream of
// package template, which the destination checks against the id before it keeps it): once,
// on first need. The push is reported apart from the migration: in the log, in the event
// stream (event "template-pushed") and in godwit_template_push_bytes_total.

// TemplatePush is what a push did.
type TemplatePush struct {
	ID         string  `json:"id"`
	To         string  `json:"to"`
	Bytes      int64   `json:"bytes"`   // the push stream's bytes (0 when the peer held it)
	Existed    bool    `json:"existed"` // the peer held it already
	DurationMS float64 `json:"duration_ms"`
}

func (a *Agent) store() (template.Store, error) {
	if a.cfg.Templates == "" {
		return template.Store{}, errors.New("this agent has no template store (godwit agent --templates DIR)")
	}
	return template.Store{Dir: a.cfg.Templates}, nil
}

// peerClient is an HTTP client to the agent at addr, over the agents' mutual TLS.
func (a *Agent) peerClient(addr string) (*http.Client, error) {
	p := a.cfg.Peering
	if p.Security == nil && !p.Insecure {
		return nil, errors.New("this agent has no TLS for other agents: start it with --tls-ca, --tls-cert and --tls-key (or, explicitly, --insecure)")
	}
	peer := transport.Address{Network: transport.TCP, Addr: addr, Security: p.Security}
	return &http.Client{Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext:       func(ctx context.Context, _, _ string) (net.Conn, error) { return peer.Dial(ctx) },
	}}, nil
}

// peerError reads the error of a peer's answer.
func peerError(addr string, resp *http.Response) error {
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	var e struct{ Error string }
	json.Unmarshal(data, &e)
	return fmt.Errorf("the agent at %s: %s", addr, strings.TrimSpace(e.Error+" "+http.StatusText(resp.StatusCode)))
}

// pushTemplate makes sure the agent at addr holds template id, pushing it there if not.
func (a *Agent) pushTemplate(ctx context.Context, addr, id string) (TemplatePush, error) {
	start := time.Now()
	out := TemplatePush{ID: id, To: addr}
	st, err := a.store()
	if err != nil {
		return out, err
	}
	t, err := st.Find(id)
	if err != nil {
		return out, err
	}
	out.ID = t.Meta.ID
	hc, err := a.peerClient(addr)
	if err != nil {
		return out, err
	}
	url := "http://agent/v1/templates/" + t.Meta.ID
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return out, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return out, fmt.Errorf("the agent at %s: %w", addr, err)
	}
	resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
		out.Existed = true
		out.DurationMS = float64(time.Since(start).Microseconds()) / 1000
		return out, nil
	case http.StatusNotFound:
	default:
		return out, peerError(addr, resp)
	}
	pr, pw := io.Pipe()
	go func() {
		n, err := t.Export(pw)
		out.Bytes = n
		pw.CloseWithError(err)
	}()
	req, err = http.NewRequestWithContext(ctx, http.MethodPut, url, pr)
	if err != nil {
		pr.Close()
		return out, err
	}
	resp, err = hc.Do(req)
	pr.Close()
	if err != nil {
		return out, fmt.Errorf("pushing template %s to the agent at %s: %w", t.ID.Short(), addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return out, fmt.Errorf("pushing template %s: %w", t.ID.Short(), peerError(addr, resp))
	}
	out.DurationMS = float64(time.Since(start).Microseconds()) / 1000
	a.log.Info("template pushed", "template", t.ID.Short(), "to", addr, "bytes", out.Bytes, "ms", out.DurationMS)
	a.obs.pushed(out)
	return out, nil
}

// peerTemplate answers another agent: GET whether this host holds a template, PUT one pushed.
func (a *Agent) peerTemplate(w http.ResponseWriter, r *http.Request) {
	id, err := template.ParseID(r.PathValue("id"))
	if err != nil {
		control.WriteError(w, http.StatusBadRequest, err)
		return
	}
	st, err := a.store()
	if err != nil {
		control.WriteError(w, http.StatusNotFound, err)
		return
	}
	if r.Method == http.MethodGet {
		t, err := st.Get(id)
		if err != nil {
			control.WriteError(w, http.StatusNotFound, err)
			return
		}
		writeJSON(w, t.Meta)
		return
	}
	t, existed, err := st.Import(r.Body)
	switch {
	case err != nil:
		control.WriteError(w, http.StatusBadRequest, fmt.Errorf("template %s: %w", id.Short(), err))
	case t.ID != id:
		st.Remove(t.ID)
		control.WriteError(w, http.StatusBadRequest, fmt.Errorf("template pushed as %s is %s", id.Short(), t.ID.Short()))
	default:
		a.log.Info("template received", "template", id.Short(), "from", r.RemoteAddr, "existed", existed)
		writeJSON(w, map[string]any{"id": t.Meta.ID, "existed": existed})
	}
}

// PushRequest is the body of POST /v1/templates/ID/push on the agent's API.
type PushRequest struct {
	To string `json:"to"` // the other agent's HOST:PORT
}

// apiPush pushes a template to another agent on the CLI's request (godwit template push --to
// agent:HOST:PORT).
func (a *Agent) apiPush(w http.ResponseWriter, r *http.Request) {
	id, rest, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/v1/templates/"), "/")
	if r.Method != http.MethodPost || rest != "push" {
		control.WriteError(w, http.StatusNotFound, fmt.Errorf("%s %s: the agent's templates take POST /v1/templates/ID/push", r.Method, r.URL.Path))
		return
	}
	var req PushRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&req); err != nil || req.To == "" {
		control.WriteError(w, http.StatusBadRequest, fmt.Errorf("template push: bad request (want the agent's HOST:PORT in to): %v", err))
		return
	}
	out, err := a.pushTemplate(r.Context(), req.To, id)
	if err != nil {
		control.WriteError(w, http.StatusBadGateway, err)
		return
	}
	writeJSON(w, out)
}

// cloneOf asks VM name's process which template it is a clone of ("" for none).
func (a *Agent) cloneOf(ctx context.Context, name string) (string, error) {
	a.mu.Lock()
	rec := a.vms[name]
	a.mu.Unlock()
	if rec == nil {
		return "", fmt.Errorf("no VM %q", name)
	}
	var s struct {
		CloneOf string `json:"clone_of"`
	}
	if err := control.Dial(rec.Control).Call(ctx, http.MethodGet, "/v1/stats", nil, &s); err != nil {
		return "", err
	}
	return s.CloneOf, nil
}
