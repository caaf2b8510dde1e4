// Command godwit runs and live-migrates KVM virtual machines.
//
//	godwit run      run a VM in the foreground (or wait for one with --incoming)
//	godwit stats    a running VM's figures
//	godwit verify   make the guest re-check its memory
//	godwit pause | resume | quit
//	godwit migrate  live-migrate a VM to another host
//	godwit bench    the scenario suite against QEMU
//	godwit cert     a test CA and host certificates for mutual TLS
//	godwit agent    the per-host daemon; godwit --agent SOCK run|ps|stats|verify|migrate|quit
//
// Every command takes --json for scripts; its JSON objects carry "godwit_version". godwit with no
// command prints its help on standard error and exits with status 2, as for any other usage
// error (--help prints it on standard output, status 0); --version prints the version.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/alecthomas/kong"

	"github.com/godwit-vm/godwit/internal/version"
)

// Globals are the flags every command takes.
type Globals struct {
	JSON    bool             `help:"Print machine-readable JSON instead of text."`
	Agent   string           `name:"agent" placeholder:"SOCK" env:"GODWIT_AGENT" help:"Work through the godwit agent on this socket ('godwit agent'): run starts the VM under it, ps lists its VMs, and the commands for one VM name it with --vm NAME instead of --control."`
	Version kong.VersionFlag `help:"Print godwit's version (release, Go, commit, migration protocol) and exit."`
}

// CLI is godwit's command line.
type CLI struct {
	Globals

	Run      RunCmd      `cmd:"" help:"Run a VM in the foreground, serving a control socket."`
	Stats    StatsCmd    `cmd:"" help:"Show a running VM's figures."`
	Verify   VerifyCmd   `cmd:"" help:"Make the guest re-check every page it owns; exits 1 on any mismatch."`
	Pause    PauseCmd    `cmd:"" help:"Stop a VM's vCPUs."`
	Resume   ResumeCmd   `cmd:"" help:"Run a paused VM's vCPUs again."`
	Balloon  BalloonCmd  `cmd:"" help:"Set the guest's balloon target (churn workload): free memory it hands back to the host, which no migration then sends."`
	Quit     QuitCmd     `cmd:"" help:"Make the guest verify its memory and exit, ending the VM process."`
	Migrate  MigrateCmd  `cmd:"" help:"Live-migrate a running VM to a 'godwit run --incoming' on another host (pre-copy, post-copy or hybrid)."`
	Bench    BenchCmd    `cmd:"" help:"Run the migration scenario suite on godwit and on QEMU (the baseline); write results, a report and plots."`
	Cert     CertCmd     `cmd:"" help:"Make a test CA and host certificates for mutual TLS between hosts."`
	Agent    AgentCmd    `cmd:"" help:"Run the per-host daemon that starts, watches and lists VMs (the CLI reaches it with --agent SOCK)."`
	Ps       PsCmd       `cmd:"" help:"List the agent's VMs (needs --agent)."`
	Gang     GangCmd     `cmd:"" help:"Gang migration: receive several VMs migrated together ('godwit migrate --gang')."`
	Template TemplateCmd `cmd:"" help:"Templates: save a paused VM as one, list, push to another host's store, remove; 'godwit run --template' clones VMs from them."`
}

// exitError carries a process exit status with an already printed message.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

func main() {
	var cli CLI
	parser := kong.Must(&cli,
		kong.Name("godwit"),
		kong.Description("godwit runs KVM virtual machines and live-migrates them between hosts."),
		kong.UsageOnError(),
		kong.ConfigureHelp(kong.HelpOptions{Compact: true}),
		kong.Vars{"version": versionLine()},
	)
	if len(os.Args) == 1 {
		// A newcomer's first try: show what there is rather than a parse error.
		usage(parser)
		os.Exit(2)
	}
	kctx, err := parser.Parse(os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "godwit: %v\n", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	kctx.BindTo(ctx, (*context.Context)(nil))
	err = kctx.Run(&cli.Globals)
	if err != nil {
		var ee exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		if cli.JSON {
			printJSON(map[string]string{"result": "failed", "error": err.Error()})
		} else {
			fmt.Fprintf(os.Stderr, "godwit: %v\n", err)
		}
		os.Exit(1)
	}
}

// usage prints the full help on standard error.
func usage(parser *kong.Kong) {
	parser.Stdout = os.Stderr
	kctx, err := kong.Trace(parser, nil)
	if err == nil {
		err = kctx.PrintUsage(false)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "godwit: %v\n", err)
	}
}

// versionLine is what --version prints and what the logs and reports call this godwit.
func versionLine() string { return version.String() }

// printJSON writes v indented on stdout. An object gets "godwit_version" as its first field, so
// that every report says which godwit made it.
func printJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(b) > 1 && b[0] == '{' {
		ver, _ := json.Marshal(version.String())
		sep := ","
		if b[1] == '}' {
			sep = ""
		}
		b = append(append([]byte(`{"godwit_version":`), ver...), append([]byte(sep), b[1:]...)...)
	}
	var out bytes.Buffer
	if err := json.Indent(&out, b, "", "  "); err != nil {
		return err
	}
	out.WriteByte('\n')
	_, err = os.Stdout.Write(out.Bytes())
	return err
}
