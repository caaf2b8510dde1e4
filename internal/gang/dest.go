package gang

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/godwit-vm/godwit/migration"
)

// NewMember makes the destination of one member, from the description it had at the source
// (its own region and component names; VCPUs is 0: the gang's Hello counts them all, so a
// member's come from its components, which only its VMM can read).
type NewMember func(name string, d migration.Description) (migration.Destination, error)

// Destination is a gang at the destination: it splits the gang's regions and sections among
// member destinations that New makes at Prepare.
type Destination struct {
	New NewMember

	names  []string
	dsts   []migration.Destination
	member []int // gang region -> member
	local  []int // gang region -> the member's region index
}

var (
	_ migration.Destination = (*Destination)(nil)
	_ migration.PageReader  = (*Destination)(nil)
)

// Members are the members' names and destinations, once prepared.
func (g *Destination) Members() ([]string, []migration.Destination) { return g.names, g.dsts }

// split cuts a gang name into the member's and its own.
func split(what, s string) (string, string, error) {
	name, rest, ok := strings.Cut(s, "/")
	if !ok || name == "" || rest == "" {
		return "", "", fmt.Errorf("gang: %s %q does not name a VM of the gang (NAME/...)", what, s)
	}
	return name, rest, nil
}

func (g *Destination) Prepare(d migration.Description) error {
	idx := map[string]int{}
	var descs []migration.Description
	for _, r := range d.Layout.Regions {
		name, rn, err := split("region", r.Name)
		if err != nil {
			return err
		}
		i, ok := idx[name]
		if !ok {
			i = len(g.names)
			idx[name] = i
			g.names = append(g.names, name)
			descs = append(descs, migration.Description{Layout: migration.Layout{PageSize: d.Layout.PageSize}})
		}
		if len(descs[i].Layout.Regions) > 0 && g.member[len(g.member)-1] != i {
			return fmt.Errorf("gang: the regions of VM %q are not together", name)
		}
		g.member = append(g.member, i)
		g.local = append(g.local, len(descs[i].Layout.Regions))
		r.Name = rn
		r.GPA %= MemberSpan
		descs[i].Layout.Regions = append(descs[i].Layout.Regions, r)
	}
	if len(g.names) < 2 {
		return fmt.Errorf("gang: %d VMs in the stream: a gang has two at least", len(g.names))
	}
	for _, id := range d.Devices {
		name, rest, err := split("component", id)
		if err != nil {
			return err
		}
		i, ok := idx[name]
		if !ok {
			return fmt.Errorf("gang: component %q belongs to no VM with memory", id)
		}
		descs[i].Devices = append(descs[i].Devices, rest)
	}
	for i, name := range g.names {
		dst, err := g.New(name, descs[i])
		if err != nil {
			return fmt.Errorf("gang: VM %q: %w", name, err)
		}
		g.dsts = append(g.dsts, dst)
	}
	// All at once: a member's preparation may start a process and wait for it.
	return g.each(func(i int, d migration.Destination) error { return d.Prepare(descs[i]) })
}

func (g *Destination) route(r int) (migration.Destination, int, error) {
	if r < 0 || r >= len(g.member) || g.member[r] >= len(g.dsts) {
		return nil, 0, fmt.Errorf("gang: region %d is no member's", r)
	}
	return g.dsts[g.member[r]], g.local[r], nil
}

func (g *Destination) WritePages(r int, first uint64, src []byte) error {
	d, lr, err := g.route(r)
	if err != nil {
		return err
	}
	return d.WritePages(lr, first, src)
}

func (g *Destination) ZeroPages(r int, first, n uint64) error {
	d, lr, err := g.route(r)
	if err != nil {
		return err
	}
	return d.ZeroPages(lr, first, n)
}

// ReadPages reads a member's page back, for references to it (dedup, delta): across VMs too.
func (g *Destination) ReadPages(r int, first uint64, dst []byte) error {
	d, lr, err := g.route(r)
	if err != nil {
		return err
	}
	pr, ok := d.(migration.PageReader)
	if !ok {
		return fmt.Errorf("gang: VM %q cannot read its pages back", g.names[g.member[r]])
	}
	return pr.ReadPages(lr, first, dst)
}

// each calls f on every member at once and joins their errors.
func (g *Destination) each(f func(i int, d migration.Destination) error) error {
	errs := make([]error, len(g.dsts))
	var wg sync.WaitGroup
	for i, d := range g.dsts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(i, d); err != nil {
				errs[i] = fmt.Errorf("VM %q: %w", g.names[i], err)
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (g *Destination) RestoreState(secs []migration.Section) error {
	per := make([][]migration.Section, len(g.dsts))
	idx := map[string]int{}
	for i, n := range g.names {
		idx[n] = i
	}
	for _, s := range secs {
		name, id, err := split("section", s.ID)
		if err != nil {
			return err
		}
		i, ok := idx[name]
		if !ok {
			return fmt.Errorf("gang: section %q of no VM of the gang", s.ID)
		}
		s.ID = id
		per[i] = append(per[i], s)
	}
	return g.each(func(i int, d migration.Destination) error { return d.RestoreState(per[i]) })
}

// Start runs every member, all at once.
func (g *Destination) Start() error {
	return g.each(func(_ int, d migration.Destination) error { return d.Start() })
}

func (g *Destination) Abort() {
	g.each(func(_ int, d migration.Destination) error { d.Abort(); return nil })
}
