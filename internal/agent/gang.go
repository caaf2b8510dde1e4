package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/godwit-vm/godwit/internal/control"
	"github.com/godwit-vm/godwit/internal/transport"
)

// Gangs between agents. 'godwit --agent SOCK migrate --gang A,B --to agent:HOST:PORT' asks this
// agent to prepare the gang's destination (POST /v1/gang/prepare): the destination agent starts
// a VM process for each VM of the gang, which waits for its memory and state (run --incoming
// unix:VMS/NAME.in), and a 'godwit gang receive' that takes the gang's migration on a route of
// its port and hands each VM over to its process. The VMs are that agent's from the start: its
// records, its logs, its ps. The CLI then migrates the gang itself, to the route, with this
// agent's certificates.

// GangPrepareRequest is the body of POST /v1/gang/prepare on the agent's API.
type GangPrepareRequest struct {
	To    string   `json:"to"`    // the destination agent's HOST:PORT
	Names []string `json:"names"` // the gang's VMs
}

// GangPrepared says where the gang goes and with which certificates.
type GangPrepared struct {
	To       string   `json:"to"` // tcp:HOST:PORT/ROUTE
	TLSCA    string   `json:"tls_ca,omitempty"`
	TLSCert  string   `json:"tls_cert,omitempty"`
	TLSKey   string   `json:"tls_key,omitempty"`
	TLSPeers []string `json:"tls_peers,omitempty"`
}

// IncomingGangRequest is the body of POST /v1/incoming-gang between agents.
type IncomingGangRequest struct {
	Names []string `json:"names"`
}

// prepareGang serves POST /v1/gang/prepare.
func (a *Agent) prepareGang(ctx context.Context, body []byte) (any, error) {
	var req GangPrepareRequest
	if err := json.Unmarshal(body, &req); err != nil || req.To == "" || len(req.Names) < 2 {
		return nil, badRequest(fmt.Errorf("gang prepare: want the destination agent (to) and two VMs at least (names): %v", err))
	}
	hc, err := a.peerClient(req.To)
	if err != nil {
		return nil, badRequest(fmt.Errorf("migrate --gang --to agent: %w", err))
	}
	b, _ := json.Marshal(IncomingGangRequest{Names: req.Names})
	ctx, cancel := context.WithTimeout(ctx, peerTimeout)
	defer cancel()
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://agent/v1/incoming-gang", bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(hreq)
	if err != nil {
		return nil, fmt.Errorf("the agent at %s: %w", req.To, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, peerError(req.To, resp)
	}
	var ans IncomingAnswer
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&ans); err != nil || ans.To == "" {
		return nil, fmt.Errorf("the agent at %s answered no route: %v", req.To, err)
	}
	out := GangPrepared{To: ans.To}
	if p := a.cfg.Peering; p.Security != nil {
		out.TLSCA, out.TLSCert, out.TLSKey, out.TLSPeers = p.Files.CA, p.Files.Cert, p.Files.Key, p.Security.Peers
	}
	a.log.Info("gang migrating to an agent", "vms", strings.Join(req.Names, ","), "agent", req.To, "to", ans.To)
	return out, nil
}

// incomingGang starts the VM processes of an arriving gang and its receiver.
func (a *Agent) incomingGang(w http.ResponseWriter, r *http.Request) {
	var req IncomingGangRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&req); err != nil || len(req.Names) < 2 {
		control.WriteError(w, http.StatusBadRequest, fmt.Errorf("incoming gang: want two VMs at least: %v", err))
		return
	}
	la, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	if !ok {
		control.WriteError(w, http.StatusInternalServerError, fmt.Errorf("incoming gang: the request's local address is unknown"))
		return
	}
	var tlsArgs []string
	peer := "an agent without TLS (--insecure)"
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		peer = peerName(r.TLS)
		f := a.cfg.Peering.Files
		tlsArgs = []string{"--tls-ca", f.CA, "--tls-cert", f.Cert, "--tls-key", f.Key, "--tls-peer", peer}
	}
	a.log.Info("incoming gang", "vms", strings.Join(req.Names, ","), "from", peer)
	var started []VM
	fail := func(err error) {
		for _, v := range started {
			syscall.Kill(v.PID, syscall.SIGKILL)
		}
		control.WriteError(w, http.StatusInternalServerError, fmt.Errorf("incoming gang: %w", err))
	}
	for _, name := range req.Names {
		if err := checkName(name); err != nil {
			fail(err)
			return
		}
		v, err := a.startVM(r.Context(), StartRequest{Name: name, Args: []string{"--incoming", "unix:" + filepath.Join(a.vmsDir, name+".in"), "--incoming-timeout", IncomingTimeout.String()}})
		if err == nil {
			started = append(started, v)
			err = a.waitIncoming(r.Context(), v.Control)
		}
		if err != nil {
			fail(fmt.Errorf("VM %q: %w", name, err))
			return
		}
	}
	var tok [16]byte
	rand.Read(tok[:])
	route := hex.EncodeToString(tok[:])
	sock := filepath.Join(a.vmsDir, "gang-"+route[:8]+".in.sock")
	logPath := filepath.Join(a.vmsDir, "gang-"+route[:8]+".log")
	log, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		fail(err)
		return
	}
	defer log.Close()
	args := append([]string{"gang", "receive", "--json", "--started", "--incoming", "routed:" + sock, "--dir", a.vmsDir, "--incoming-timeout", IncomingTimeout.String()}, tlsArgs...)
	cmd := exec.Command(a.cfg.Binary, args...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	a.router.Add(route, sock)
	if err := cmd.Start(); err != nil {
		a.router.Remove(route)
		fail(err)
		return
	}
	go func() {
		err := cmd.Wait()
		a.router.Remove(route)
		a.log.Info("gang received", "vms", strings.Join(req.Names, ","), "exit", fmt.Sprint(err), "log", logPath)
	}()
	if err := waitListening(r.Context(), sock); err != nil {
		cmd.Process.Kill()
		fail(fmt.Errorf("its receiver (log %s): %w", logPath, err))
		return
	}
	to := transport.Address{Network: transport.TCP, Addr: la.String(), Route: route}
	writeJSON(w, IncomingAnswer{Name: strings.Join(req.Names, ","), To: to.String()})
}

// waitListening waits until the Unix socket sock exists (a probe connection would be taken
// for the migration's).
func waitListening(ctx context.Context, sock string) error {
	ctx, cancel := context.WithTimeout(ctx, StartTimeout)
	defer cancel()
	for {
		if _, err := os.Stat(sock); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("nothing listens on %s", sock)
		case <-time.After(10 * time.Millisecond):
		}
	}
}
