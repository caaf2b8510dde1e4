package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/godwit-vm/godwit/internal/control"
	"github.com/godwit-vm/godwit/internal/transport"
)

// Between agents. A source agent that is asked to migrate a VM to agent:HOST:PORT asks the
// destination agent there (POST /v1/incoming on its --listen address, over mutual TLS) to
// start a VM process that waits for it, and gets back a route: a random token that names that
// VM process on the agent's port (tcp:HOST:PORT/ROUTE). The source agent then has its VM
// migrate there with the same certificates. Every connection of the migration comes to the
// agent's one port, names the route first, and is passed on (its file descriptor) to the VM
// process, which does the TLS handshake itself: the migration's connections are mutual TLS
// between the two VM processes, and the agent copies none of their bytes. A peer the
// destination agent does not accept is refused in its handshake with the agent, and no VM
// process is started for it; the VM process takes only the certificate of the agent that
// asked for it.

// Peering is how an agent meets other agents.
type Peering struct {
	// Listen is where other agents reach this one (HOST:PORT); "" takes no migrations in.
	Listen string
	// Security is the mutual TLS of every agent-to-agent connection and of the migrations
	// (nil only with Insecure). Files are its certificate files, which the VM processes load.
	Security *transport.Security
	Files    TLSFiles
	// Insecure allows plain TCP between agents and for migrations: anyone who reaches the
	// port can start a VM here and send it memory.
	Insecure bool
}

// TLSFiles are the PEM files of a host's mutual TLS.
type TLSFiles struct{ CA, Cert, Key string }

// IncomingRequest is the body of POST /v1/incoming between agents.
type IncomingRequest struct {
	Name string `json:"name"` // the VM's name at the source; the VM keeps it here
}

// IncomingAnswer says where the VM process that waits for the migration listens.
type IncomingAnswer struct {
	Name string `json:"name"`
	To   string `json:"to"` // tcp:HOST:PORT/ROUTE: this agent's port, and the route to the VM process
}

// peerTimeout bounds a call to another agent.
const peerTimeout = StartTimeout + 10*time.Second

// listenPeers starts taking other agents' requests.
func (a *Agent) listenPeers() (net.Listener, error) {
	p := a.cfg.Peering
	if p.Security == nil && !p.Insecure {
		return nil, errors.New("agent: --listen needs mutual TLS (--tls-ca, --tls-cert, --tls-key) or, explicitly, --insecure")
	}
	sec := p.Security
	if sec != nil {
		s := *sec
		s.Refused = func(from net.Addr, err error) {
			a.log.Warn("refused an agent", "from", from.String(), "err", err)
		}
		sec = &s
	}
	raw, err := net.Listen(transport.TCP, p.Listen)
	if err != nil {
		return nil, fmt.Errorf("agent: --listen: %w", err)
	}
	router := transport.NewRouter(raw)
	router.Dropped = func(from net.Addr, err error) {
		a.log.Warn("dropped a connection to a migration", "from", from.String(), "err", err)
	}
	a.mu.Lock()
	a.router = router
	for _, r := range a.vms { // adopted VMs that still wait for their migrations
		if r.State == Running && r.Route != "" {
			router.Add(r.Route, a.routeSocket(r.Name))
		}
	}
	a.mu.Unlock()
	if sec != nil {
		return sec.Listener(router), nil
	}
	return router, nil
}

// routeSocket is where the VM process of an incoming migration takes its routed connections.
func (a *Agent) routeSocket(name string) string { return filepath.Join(a.vmsDir, name+".in.sock") }

// IncomingTimeout is how long a VM process started for an incoming migration waits for the
// migration's first connection before it gives up and ends.
const IncomingTimeout = time.Minute

func (a *Agent) servePeers(ln net.Listener) *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/incoming", a.incoming)
	mux.HandleFunc("POST /v1/incoming-gang", a.incomingGang)
	mux.HandleFunc("GET /v1/templates/{id}", a.peerTemplate)
	mux.HandleFunc("PUT /v1/templates/{id}", a.peerTemplate)
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go hs.Serve(ln)
	return hs
}

// incoming starts a VM process that waits for the peer's migration.
func (a *Agent) incoming(w http.ResponseWriter, r *http.Request) {
	var req IncomingRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&req); err != nil {
		control.WriteError(w, http.StatusBadRequest, fmt.Errorf("incoming: bad request: %w", err))
		return
	}
	if err := checkName(req.Name); err != nil {
		control.WriteError(w, http.StatusBadRequest, fmt.Errorf("incoming: %w", err))
		return
	}
	// The source dials the address it reached this agent on, which every address of a
	// listener on all of them is not.
	la, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	if !ok {
		control.WriteError(w, http.StatusInternalServerError, errors.New("incoming: the request's local address is unknown"))
		return
	}
	var tok [16]byte
	rand.Read(tok[:])
	route := hex.EncodeToString(tok[:])
	sock := a.routeSocket(req.Name)
	peer := "an agent without TLS (--insecure)"
	args := []string{"--incoming", "routed:" + sock, "--incoming-timeout", IncomingTimeout.String()}
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		// The VM process takes the peer that asked, and nobody else.
		name := peerName(r.TLS)
		peer = name
		f := a.cfg.Peering.Files
		args = append(args, "--tls-ca", f.CA, "--tls-cert", f.Cert, "--tls-key", f.Key, "--tls-peer", name)
	}
	a.log.Info("incoming migration", "vm", req.Name, "from", peer, "remote", r.RemoteAddr)
	a.router.Add(route, sock) // its connections are dropped until the VM process listens
	v, err := a.startVM(r.Context(), StartRequest{Name: req.Name, Args: args, route: route})
	if err == nil {
		err = a.waitIncoming(r.Context(), v.Control)
	}
	if err != nil {
		a.router.Remove(route)
		control.WriteError(w, http.StatusInternalServerError, fmt.Errorf("incoming VM %q: %w", req.Name, err))
		return
	}
	to := transport.Address{Network: transport.TCP, Addr: la.String(), Route: route}
	writeJSON(w, IncomingAnswer{Name: req.Name, To: to.String()})
}

// peerName is the name the peer's certificate gives: its first DNS name, else its subject.
func peerName(cs *tls.ConnectionState) string {
	c := cs.PeerCertificates[0]
	if len(c.DNSNames) > 0 {
		return c.DNSNames[0]
	}
	return c.Subject.CommonName
}

// waitIncoming waits until the VM process listens for its migration.
func (a *Agent) waitIncoming(ctx context.Context, sock string) error {
	ctx, cancel := context.WithTimeout(ctx, StartTimeout)
	defer cancel()
	for {
		var s struct {
			Incoming string `json:"incoming"`
		}
		if err := control.Dial(sock).Call(ctx, http.MethodGet, "/v1/stats", nil, &s); err == nil && s.Incoming != "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return errors.New("it does not listen for the migration")
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// toAgent prepares the migration of VM name to the agent at addr (HOST:PORT): the destination
// agent starts the VM process that will take it, and the request body (a migrate request of
// the VM's control API) is rewritten to go there, with this agent's certificates.
func (a *Agent) toAgent(ctx context.Context, name, addr string, body map[string]any) error {
	p := a.cfg.Peering
	hc, err := a.peerClient(addr)
	if err != nil {
		return fmt.Errorf("migrate --to agent: %w", err)
	}
	if flatten, _ := body["flatten"].(bool); !flatten {
		// A clone goes to a host that holds its template: pushed there first if need be.
		id, err := a.cloneOf(ctx, name)
		if err != nil {
			return err
		}
		if id != "" {
			if _, err := a.pushTemplate(ctx, addr, id); err != nil {
				return fmt.Errorf("VM %q is a clone of template %.12s, which the destination agent lacks, and it could not be pushed there (or migrate with --flatten): %w", name, id, err)
			}
		}
	}
	b, _ := json.Marshal(IncomingRequest{Name: name})
	ctx, cancel := context.WithTimeout(ctx, peerTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://agent/v1/incoming", bytes.NewReader(b))
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("the agent at %s: %w", addr, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		json.Unmarshal(data, &e)
		return fmt.Errorf("the agent at %s: %s", addr, strings.TrimSpace(e.Error+" "+http.StatusText(resp.StatusCode)))
	}
	var ans IncomingAnswer
	if err := json.Unmarshal(data, &ans); err != nil || ans.To == "" {
		return fmt.Errorf("the agent at %s answered %q", addr, data)
	}
	body["to"] = ans.To
	if p.Security != nil {
		body["tls_ca"], body["tls_cert"], body["tls_key"] = p.Files.CA, p.Files.Cert, p.Files.Key
		// The destination VM shows the destination agent's certificate; the dialled address
		// is in it when 'godwit cert' made it with the host's address, else accept its name.
		body["tls_peers"] = p.Security.Peers
	}
	a.log.Info("migrating to an agent", "vm", name, "agent", addr, "to", ans.To)
	return nil
}
