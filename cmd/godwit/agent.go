package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/godwit-vm/godwit/internal/agent"
	"github.com/godwit-vm/godwit/internal/control"
	"github.com/godwit-vm/godwit/internal/transport"
	"github.com/godwit-vm/godwit/internal/vmm"
)

// AgentCmd is 'godwit agent'.
type AgentCmd struct {
	StateDir string `name:"state-dir" default:"/var/lib/godwit" placeholder:"DIR" help:"Where the agent keeps a record, a log and the control socket of each VM (made owner-only). An agent started on the same directory later adopts the VMs that still run. Default ${default}."`
	Socket   string `default:"/run/godwit/agent.sock" placeholder:"PATH" help:"The agent's API socket (HTTP+JSON; owner-only, mode 0600). Default ${default}."`
	LogLevel string `name:"log-level" enum:"debug,info,warn,error" default:"info" help:"Least level of the log lines on standard error (${enum}). Default ${default}."`
	Metrics  string `placeholder:"HOST:PORT" help:"Serve Prometheus metrics at http://HOST:PORT/metrics: migrations by result and mode, their bytes, downtime and total time, post-copy faults and fault latency, each VM's guest progress and memory. Default: none."`
	Listen   string `placeholder:"HOST:PORT" help:"Take migrations from other agents here ('migrate --to agent:HOST:PORT' on theirs): for each, this agent starts the VM process that receives it, and passes it the migration's connections, which all come to this one port. Needs mutual TLS (--tls-*; --tls-peer names the agents accepted) or, explicitly, --insecure. Default: none."`
	Insecure bool   `help:"Let agents meet over plain TCP, without TLS: anyone who reaches --listen can then start a VM here and send it memory. For testbeds only."`
	TLSFlags
	TemplateStoreFlag
}

func (c *AgentCmd) Help() string {
	return `Runs godwit's per-host daemon. It starts VM processes on request and watches them: a VM
process that dies is reported (ps shows how it ended), never restarted. Its API is on a Unix
socket only its owner can use; the CLI speaks to it with --agent:

    godwit agent --state-dir /var/lib/godwit --socket /run/godwit/agent.sock &
    godwit --agent /run/godwit/agent.sock run --name web --mem 1G --workload dirty
    godwit --agent /run/godwit/agent.sock ps
    godwit --agent /run/godwit/agent.sock stats --vm web
    godwit --agent /run/godwit/agent.sock migrate --vm web --to tcp:HOST:PORT
    godwit --agent /run/godwit/agent.sock quit --vm web

With --listen and mutual TLS (--tls-*), it takes migrations from other agents: 'godwit --agent
SOCK migrate --vm web --to agent:HOST:PORT' on theirs makes this agent start the VM process
that receives it.

VM processes outlive the agent: stopping it (SIGTERM) refuses new work, cancels migrations
still in pre-copy (their VMs run on) and leaves the VMs running; the next agent on the same
state directory adopts them.`
}

func (c *AgentCmd) Run(g *Globals, ctx context.Context) error {
	if g.Agent != "" {
		return errors.New("'godwit agent' is the agent: --agent does not apply")
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	var h slog.Handler = slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})
	if g.JSON {
		h = slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level})
	}
	bin, err := os.Executable()
	if err != nil {
		return fmt.Errorf("agent: finding the godwit binary for VMs: %w", err)
	}
	peering := agent.Peering{Listen: c.Listen, Insecure: c.Insecure}
	if c.TLSFlags.given() {
		if c.Insecure {
			return errors.New("--insecure is for agents without TLS: leave out the --tls-* flags, or --insecure")
		}
		if err := c.TLSFlags.check(transport.Address{Network: transport.TCP}); err != nil {
			return err
		}
		if err := c.TLSFlags.absolute(); err != nil {
			return err
		}
		if peering.Security, err = c.TLSFlags.security(); err != nil {
			return err
		}
		peering.Files = agent.TLSFiles{CA: c.TLSCA, Cert: c.TLSCert, Key: c.TLSKey}
	}
	a, err := agent.New(agent.Config{StateDir: c.StateDir, Socket: c.Socket, Binary: bin, Metrics: c.Metrics, Peering: peering, Templates: c.Templates, Log: slog.New(h)})
	if err != nil {
		return err
	}
	return a.Serve(ctx)
}

func agentClient(g *Globals) (*control.Client, error) {
	if g.Agent == "" {
		return nil, errors.New("this needs an agent: give --agent SOCK (or GODWIT_AGENT)")
	}
	return control.Dial(g.Agent), nil
}

// runUnderAgent asks the agent to start the VM with this command's flags.
func (c *RunCmd) runUnderAgent(g *Globals, ctx context.Context) error {
	if c.Control != "" {
		return errors.New("--agent: the agent chooses the VM's control socket; leave out --control")
	}
	for _, p := range []struct{ flag, path string }{{"--memory-file", c.MemoryFile}, {"--tls-ca", c.TLSCA}, {"--tls-cert", c.TLSCert}, {"--tls-key", c.TLSKey}} {
		if p.path != "" && !filepath.IsAbs(p.path) {
			return fmt.Errorf("--agent: %s %s: the VM process does not run in this directory; give an absolute path", p.flag, p.path)
		}
	}
	cl, err := agentClient(g)
	if err != nil {
		return err
	}
	req := agent.StartRequest{Name: c.Name, Args: runFlagsOf(os.Args[1:])}
	var v agent.VM
	if err := cl.Call(ctx, http.MethodPost, "/v1/vms", req, &v); err != nil {
		return err
	}
	if g.JSON {
		return printJSON(v)
	}
	fmt.Printf("godwit: VM %q started under the agent (pid %d); its log: %s\n", v.Name, v.PID, v.Log)
	return nil
}

// runFlagsOf is the flags after 'run' in a command line, without those the agent sets itself
// (the name, the control socket, the output) and the global ones.
func runFlagsOf(args []string) []string {
	i := 0
	for i < len(args) && args[i] != "run" {
		i++
	}
	var out []string
	for j := i + 1; j < len(args); j++ {
		a := args[j]
		flag, _, hasValue := strings.Cut(a, "=")
		switch flag {
		case "--json":
			continue
		case "--name", "--agent":
			if !hasValue {
				j++ // its value follows
			}
			continue
		}
		out = append(out, a)
	}
	return out
}

// PsCmd is 'godwit ps'.
type PsCmd struct{}

func (c *PsCmd) Run(g *Globals, ctx context.Context) error {
	cl, err := agentClient(g)
	if err != nil {
		return err
	}
	var vms []agent.VM
	if err := cl.Call(ctx, http.MethodGet, "/v1/vms", nil, &vms); err != nil {
		return err
	}
	if g.JSON {
		return printJSON(map[string]any{"vms": vms})
	}
	tw := tabwriter.NewWriter(os.Stdout, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATE\tPID\tMEMORY\tUPTIME\tHEARTBEATS\tNOTE")
	for _, v := range vms {
		mem, up, beats, note := "-", "-", "-", ""
		switch {
		case v.Stats != nil:
			var s vmm.Stats
			if json.Unmarshal(v.Stats, &s) == nil {
				mem, beats = formatBytes(s.MemBytes), fmt.Sprint(s.Heartbeats)
				up = (time.Duration(s.UptimeMS) * time.Millisecond).Round(time.Second).String()
				note = string(s.State)
				if s.Error != "" {
					note += ": " + s.Error
				}
			}
		case v.State == agent.Running:
			note = "no stats: " + v.StatsError
		default:
			note = v.Exit
			if v.Result != "" {
				note += ", result " + v.Result
			}
			if v.Error != "" {
				note += ": " + v.Error
			}
		}
		if v.Adopted {
			note = "adopted; " + note
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\n", v.Name, v.State, v.PID, mem, up, beats, note)
	}
	return tw.Flush()
}
