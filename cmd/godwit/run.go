package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/vmm"
	"github.com/godwit-vm/godwit/migration"
)

// WorkloadFlags choose what the built-in guest does.
type WorkloadFlags struct {
	Workload string        `enum:"idle,dirty" default:"idle" help:"idle: touch a fraction of memory once, then only heartbeat; dirty: rewrite pages of a working set at a rate (${enum})."`
	WSS      Size          `name:"wss" default:"64M" help:"dirty: working set size, split evenly between vCPUs."`
	Rate     Rate          `default:"max" help:"dirty: page writes per second over all vCPUs, or 'max' for as fast as the guest can."`
	Pattern  string        `enum:"sequential,random,hotcold" default:"random" help:"dirty: which pages of the working set are written (${enum})."`
	Content  string        `enum:"zero,text,random,image" default:"text" help:"Page content: zero pages, compressible text, incompressible random, or image-like pages that repeat within and across VMs of the same seed (${enum})."`
	Seed     uint64        `default:"1" help:"Seed of page content and write pattern."`
	Touch    float64       `default:"0.25" help:"idle: fraction of memory the guest writes once at start (0..1)."`
	Batch    int           `default:"64" help:"Pages written per unit of work; the guest heartbeats once per unit."`
	HotSize  float64       `name:"hot-size" default:"0.1" help:"hotcold: fraction of the working set that is hot."`
	HotProb  float64       `name:"hot-prob" default:"0.9" help:"hotcold: fraction of writes that go to the hot part."`
	Interval time.Duration `name:"idle-interval" default:"1ms" help:"idle: time between heartbeats."`
}

// RunCmd is 'godwit run'.
type RunCmd struct {
	Name      string `default:"vm" help:"The VM's name."`
	Mem       Size   `default:"1G" help:"Guest memory: a size such as 512M or 1G (a plain number means MiB)."`
	VCPUs     int    `name:"vcpus" default:"1" help:"Number of vCPUs; each runs the workload on its own slice of memory."`
	Control   string `placeholder:"PATH" help:"Control socket to serve (default /run/godwit/NAME.sock)."`
	KVMDevice string `name:"kvm-device" default:"/dev/kvm" help:"The KVM device."`
	Incoming  string `placeholder:"tcp:HOST:PORT" help:"Wait for a VM migrated to this address instead of booting one; its size and workload come from the source."`
	WorkloadFlags
}

func (c *RunCmd) controlPath() string {
	if c.Control != "" {
		return c.Control
	}
	return filepath.Join("/run/godwit", c.Name+".sock")
}

// workloadDescription is what stats and the destination of a migration show of the workload.
func (c *RunCmd) workloadDescription() map[string]any {
	w := map[string]any{"workload": c.Workload, "content": c.Content, "seed": c.Seed}
	if c.Workload == "dirty" {
		w["wss"] = uint64(c.WSS)
		w["rate"] = c.Rate.String()
		w["pattern"] = c.Pattern
	} else {
		w["touch"] = c.Touch
	}
	return w
}

func (c *RunCmd) Run(g *Globals, ctx context.Context) error {
	if c.Incoming != "" {
		return c.runIncoming(g, ctx)
	}
	params, err := c.paramsBuilder()
	if err != nil {
		return err
	}
	m, err := vmm.New(vmm.Config{
		Name: c.Name, MemBytes: uint64(c.Mem), VCPUs: c.VCPUs, KVMDevice: c.KVMDevice,
		Image: guest.Image, Params: params, Workload: c.workloadDescription(),
		Console: consolePrinter(g),
	})
	if err != nil {
		return err
	}
	defer m.Close()
	p, err := newVMProcess(g, c.Name, c.controlPath())
	if err != nil {
		return err
	}
	defer p.close()
	p.setMachine(m)
	if err := m.Start(); err != nil {
		return err
	}
	return p.run(ctx, m)
}

// runIncoming waits for one incoming migration, then runs the machine it brought.
func (c *RunCmd) runIncoming(g *Globals, ctx context.Context) error {
	addr, err := parseTCPAddr(c.Incoming)
	if err != nil {
		return fmt.Errorf("--incoming: %w", err)
	}
	p, err := newVMProcess(g, c.Name, c.controlPath())
	if err != nil {
		return err
	}
	defer p.close()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--incoming: %w", err)
	}
	p.mu.Lock()
	p.incoming = ln.Addr().String()
	p.mu.Unlock()
	if !g.JSON {
		fmt.Printf("godwit: VM %q waiting for an incoming migration on %s; control socket %s\n", c.Name, ln.Addr(), c.controlPath())
	}
	conn, err := acceptOne(ctx, ln)
	ln.Close()
	if err != nil {
		return err
	}
	defer conn.Close()
	dst := &vmm.MigrationDestination{Template: vmm.Config{Name: c.Name, KVMDevice: c.KVMDevice, Console: consolePrinter(g)}}
	rep, err := migration.Receive(ctx, dst, conn, migration.ReceiveOptions{})
	if err != nil {
		if g.JSON {
			printJSON(runSummary{Result: "failed", Error: err.Error(), Incoming: rep})
			return exitError{1}
		}
		return fmt.Errorf("incoming migration failed: %w", err)
	}
	conn.Close()
	m := dst.M
	defer m.Close()
	p.mu.Lock()
	p.inReport = rep
	p.mu.Unlock()
	p.setMachine(m)
	return p.run(ctx, m)
}

func acceptOne(ctx context.Context, ln net.Listener) (net.Conn, error) {
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("--incoming: accept: %w", r.err)
		}
		return r.c, nil
	case <-ctx.Done():
		ln.Close()
		return nil, errors.New("interrupted while waiting for an incoming migration")
	}
}

// consolePrinter shows guest console text: on stdout normally, on stderr with --json so that
// stdout stays one JSON document.
func consolePrinter(g *Globals) func(int, string) {
	out := os.Stdout
	if g.JSON {
		out = os.Stderr
	}
	return func(vcpu int, text string) {
		fmt.Fprintf(out, "guest[%d]: %s\n", vcpu, trimNL(text))
	}
}

func trimNL(s string) string {
	for len(s) > 0 && (s[len(s)-1] == '\n' || s[len(s)-1] == 0) {
		s = s[:len(s)-1]
	}
	return s
}
