// Command godwit runs and live-migrates KVM virtual machines.
//
//	godwit run      run a VM in the foreground (or wait for one with --incoming)
//	godwit stats    a running VM's figures
//	godwit verify   make the guest re-check its memory
//	godwit pause | resume | quit
//	godwit migrate  live-migrate a VM to another host
//
// Every command takes --json for scripts.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/alecthomas/kong"
)

// Globals are the flags every command takes.
type Globals struct {
	JSON bool `help:"Print machine-readable JSON instead of text."`
}

// CLI is godwit's command line.
type CLI struct {
	Globals

	Run     RunCmd     `cmd:"" help:"Run a VM in the foreground, serving a control socket."`
	Stats   StatsCmd   `cmd:"" help:"Show a running VM's figures."`
	Verify  VerifyCmd  `cmd:"" help:"Make the guest re-check every page it owns; exits 1 on any mismatch."`
	Pause   PauseCmd   `cmd:"" help:"Stop a VM's vCPUs."`
	Resume  ResumeCmd  `cmd:"" help:"Run a paused VM's vCPUs again."`
	Quit    QuitCmd    `cmd:"" help:"Make the guest verify its memory and exit, ending the VM process."`
	Migrate MigrateCmd `cmd:"" help:"Live-migrate a running VM to a 'godwit run --incoming' on another host (pre-copy, post-copy or hybrid)."`
	Bench   BenchCmd   `cmd:"" help:"Run the migration scenario suite on godwit and on QEMU (the baseline); write results, a report and plots."`
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
	)
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
			json.NewEncoder(os.Stdout).Encode(map[string]string{"result": "failed", "error": err.Error()})
		} else {
			fmt.Fprintf(os.Stderr, "godwit: %v\n", err)
		}
		os.Exit(1)
	}
}

// printJSON writes v indented on stdout.
func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
