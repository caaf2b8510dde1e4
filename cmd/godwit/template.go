package main

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/godwit-vm/godwit/internal/agent"
	"github.com/godwit-vm/godwit/internal/template"
	"github.com/godwit-vm/godwit/internal/vmm"
)

// TemplateCmd is 'godwit template'.
type TemplateCmd struct {
	Save TemplateSaveCmd `cmd:"" help:"Save a paused VM's memory and state as a template, named by its content hash; 'godwit run --template ID' clones VMs from it."`
	Ls   TemplateLsCmd   `cmd:"" help:"List the templates in the store."`
	Push TemplatePushCmd `cmd:"" help:"Copy a template into another store (another host's), once: a clone migrates only to a host that holds its template."`
	Rm   TemplateRmCmd   `cmd:"" help:"Remove a template from the store (running clones keep their memory)."`
}

// TemplateStoreFlag is where templates are kept.
type TemplateStoreFlag struct {
	Templates string `name:"templates" env:"GODWIT_TEMPLATES" default:"/var/lib/godwit/templates" placeholder:"DIR" help:"The template store: one directory per template, named by its id. Put it on tmpfs (/dev/shm) to keep templates in memory. Default ${default}."`
}

func (f TemplateStoreFlag) store() template.Store { return template.Store{Dir: f.Templates} }

// TemplateSaveCmd is 'godwit template save'.
type TemplateSaveCmd struct {
	ControlFlag
	TemplateStoreFlag
}

// templateSaveRequest is the body of the VM process's POST /v1/template.
type templateSaveRequest struct {
	Store string `json:"store"`
}

// templateSaved is what a save answers.
type templateSaved struct {
	template.Meta
	Existed    bool    `json:"existed"` // the store held this content already
	DurationMS float64 `json:"duration_ms"`
}

func (c *TemplateSaveCmd) Run(g *Globals, ctx context.Context) error {
	cl, err := c.client(g)
	if err != nil {
		return err
	}
	var out templateSaved
	if err := cl.Call(ctx, http.MethodPost, "/v1/template", templateSaveRequest{Store: c.Templates}, &out); err != nil {
		return err
	}
	if g.JSON {
		return printJSON(out)
	}
	id, _ := template.ParseID(out.ID)
	note := ""
	if out.Existed {
		note = " (the store held it already)"
	}
	fmt.Printf("template %s saved from %q: %s of memory, %d vCPUs, in %.0f ms%s\n  %s\n", id.Short(), out.From, formatBytes(out.MemBytes), out.VCPUs, out.DurationMS, note, out.ID)
	return nil
}

// saveTemplate saves m, which must be paused, into the store dir.
func saveTemplate(m *vmm.Machine, dir string) (templateSaved, error) {
	start := time.Now()
	if st, _ := m.State(); st != vmm.StatePaused {
		return templateSaved{}, conflict(fmt.Errorf("template save: VM %q is %s; pause it first (godwit pause), so that its memory and state agree", m.Name(), st))
	}
	if m.Config().Clone != nil {
		return templateSaved{}, badRequest(fmt.Errorf("template save: VM %q is itself a clone of a template; templates of clones are not supported", m.Name()))
	}
	secs, err := m.SaveState()
	if err != nil {
		return templateSaved{}, err
	}
	ts := make([]template.Section, len(secs))
	for i, s := range secs {
		ts[i] = template.Section{ID: s.ID, Version: s.Version, Data: s.Data}
	}
	st := template.Store{Dir: dir}
	before, _ := st.List()
	cfg := m.Config()
	t, err := st.Save(template.Meta{MemBytes: cfg.MemBytes, VCPUs: cfg.VCPUs, From: cfg.Name, Workload: cfg.Workload}, ts, m.WriteMemory)
	if err != nil {
		return templateSaved{}, err
	}
	existed := false
	for _, b := range before {
		existed = existed || b.ID == t.Meta.ID
	}
	return templateSaved{Meta: t.Meta, Existed: existed, DurationMS: float64(time.Since(start).Microseconds()) / 1000}, nil
}

// TemplateLsCmd is 'godwit template ls'.
type TemplateLsCmd struct{ TemplateStoreFlag }

func (c *TemplateLsCmd) Run(g *Globals) error {
	all, err := c.store().List()
	if err != nil {
		return err
	}
	if g.JSON {
		if all == nil {
			all = []template.Meta{}
		}
		return printJSON(all)
	}
	if len(all) == 0 {
		fmt.Printf("no templates in %s\n", c.Templates)
		return nil
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tMEMORY\tVCPUS\tFROM\tSAVED")
	for _, m := range all {
		id, _ := template.ParseID(m.ID)
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\n", id.Short(), formatBytes(m.MemBytes), m.VCPUs, m.From, m.Saved.Format(time.RFC3339))
	}
	return w.Flush()
}

// TemplatePushCmd is 'godwit template push'.
type TemplatePushCmd struct {
	TemplateStoreFlag
	ID string `arg:"" help:"The template: its id, or enough of its first digits."`
	To string `required:"" placeholder:"DIR|agent:HOST:PORT" help:"Where to copy it: a store directory (another host's template store, as this host sees it), or agent:HOST:PORT, another host's agent, to which this host's agent (--agent SOCK) pushes it from its own store over their mutual TLS. A migration between agents pushes a clone's template by itself when the destination lacks it."`
}

// pushed is what a push reports: the template's bytes travel apart from any migration's.
type pushed struct {
	ID         string  `json:"id"`
	Bytes      int64   `json:"bytes"`
	Existed    bool    `json:"existed"` // the destination held it already: nothing was copied
	DurationMS float64 `json:"duration_ms"`
}

func (c *TemplatePushCmd) Run(g *Globals, ctx context.Context) error {
	if peer, ok := strings.CutPrefix(c.To, "agent:"); ok {
		return c.viaAgent(g, ctx, peer)
	}
	t, err := c.store().Find(c.ID)
	if err != nil {
		return err
	}
	out, err := pushTemplate(t, template.Store{Dir: c.To})
	if err != nil {
		return err
	}
	if g.JSON {
		return printJSON(out)
	}
	if out.Existed {
		fmt.Printf("template %s: %s holds it already\n", t.ID.Short(), c.To)
		return nil
	}
	fmt.Printf("template %s pushed to %s: %s in %.0f ms\n", t.ID.Short(), c.To, formatBytes(uint64(out.Bytes)), out.DurationMS)
	return nil
}

// viaAgent has this host's agent push the template (from its store) to the agent at peer.
func (c *TemplatePushCmd) viaAgent(g *Globals, ctx context.Context, peer string) error {
	cl, err := agentClient(g)
	if err != nil {
		return fmt.Errorf("template push --to agent:: %w", err)
	}
	var out agent.TemplatePush
	if err := cl.Call(ctx, http.MethodPost, "/v1/templates/"+url.PathEscape(c.ID)+"/push", agent.PushRequest{To: peer}, &out); err != nil {
		return err
	}
	if g.JSON {
		return printJSON(out)
	}
	if out.Existed {
		fmt.Printf("template %.12s: the agent at %s holds it already\n", out.ID, peer)
		return nil
	}
	fmt.Printf("template %.12s pushed to the agent at %s: %s in %.0f ms\n", out.ID, peer, formatBytes(uint64(out.Bytes)), out.DurationMS)
	return nil
}

// pushTemplate copies t into dst unless dst holds it, through the push stream (so that what
// arrives is checked against its id as it would be from another host).
func pushTemplate(t *template.Template, dst template.Store) (pushed, error) {
	start := time.Now()
	out := pushed{ID: t.Meta.ID}
	if _, err := dst.Get(t.ID); err == nil {
		out.Existed = true
		return out, nil
	}
	pr, pw := io.Pipe()
	errc := make(chan error, 1)
	go func() {
		n, err := t.Export(pw)
		out.Bytes = n
		pw.CloseWithError(err)
		errc <- err
	}()
	_, _, ierr := dst.Import(pr)
	pr.CloseWithError(errors.New("the receiving store gave up"))
	if err := <-errc; err != nil && ierr == nil {
		ierr = err
	}
	if ierr != nil {
		return out, fmt.Errorf("template push %s to %s: %w", t.ID.Short(), dst.Dir, ierr)
	}
	out.DurationMS = float64(time.Since(start).Microseconds()) / 1000
	return out, nil
}

// TemplateRmCmd is 'godwit template rm'.
type TemplateRmCmd struct {
	TemplateStoreFlag
	ID string `arg:"" help:"The template: its id, or enough of its first digits."`
}

func (c *TemplateRmCmd) Run(g *Globals) error {
	t, err := c.store().Find(c.ID)
	if err != nil {
		return err
	}
	if err := c.store().Remove(t.ID); err != nil {
		return err
	}
	if g.JSON {
		return printJSON(map[string]string{"removed": t.Meta.ID})
	}
	fmt.Printf("template %s removed\n", t.ID.Short())
	return nil
}

// cloneSalt is a clone's divergence salt when none is given: from its name, so that clones of
// different names write different private data.
func cloneSalt(name string) uint32 {
	h := fnv.New32a()
	h.Write([]byte(name))
	return h.Sum32()
}
