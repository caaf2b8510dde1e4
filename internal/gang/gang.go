// Package gang migrates several VMs of one host together, as one migration: a gang is one
// migration.Source whose memory regions and state sections are its members', and one
// migration.Destination that hands each member's regions and sections to a destination of
// its own. So one session carries the whole gang, and everything the engine does across
// regions it does across VMs: above all, the dedup index spans the members, and a page one VM
// holds that another sent before travels as a reference to that VM's page (Deshpande et al.,
// live gang migration). The members pause together, at the end of pre-copy, and run again
// together at the destination.
//
// # Names
//
// A member's region "R" travels as "NAME/R" and its component "ID" as "NAME/ID", NAME being
// the member's name (unique in the gang, no "/"). The destination splits them on the first
// "/" and gives each member its own description, with the names it had at the source. As the
// regions of one migration do not overlap, member i's regions travel at guest physical
// addresses moved up by i * MemberSpan (a member's memory must lie below MemberSpan).
//
// Package gang knows nothing of KVM or processes: members are migration Sources and
// Destinations, wherever their VMs run.
package gang

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/godwit-vm/godwit/migration"
)

// Member is one VM of a gang at the source.
type Member struct {
	Name string
	Src  migration.Source
}

// Source is a gang at the source: a migration.Source over its members, in order.
type Source struct {
	members []Member
	descs   []migration.Description
	firstR  []int // the gang's index of each member's first region
}

var (
	_ migration.Source     = (*Source)(nil)
	_ migration.Throttler  = (*Source)(nil)
	_ migration.PageViewer = (*Source)(nil)
)

// NewSource makes a gang of members: at least two, with distinct names, none a clone of a
// template (a gang's destination members start from empty memory).
func NewSource(members []Member) (*Source, error) {
	if len(members) < 2 {
		return nil, fmt.Errorf("gang: %d VMs: a gang has two at least", len(members))
	}
	g := &Source{members: members}
	seen := map[string]bool{}
	r := 0
	for _, m := range members {
		if err := checkName(m.Name); err != nil {
			return nil, err
		}
		if seen[m.Name] {
			return nil, fmt.Errorf("gang: VM %q twice", m.Name)
		}
		seen[m.Name] = true
		d := m.Src.Describe()
		for _, r := range d.Layout.Regions {
			if r.GPA+r.Size > MemberSpan || r.GPA+r.Size < r.GPA {
				return nil, fmt.Errorf("gang: VM %q: region %q ends beyond %d GiB, which a gang member's memory may not", m.Name, r.Name, MemberSpan>>30)
			}
		}
		if d.Base != ([32]byte{}) {
			return nil, fmt.Errorf("gang: VM %q is a clone of a template; a gang moves VMs of their own memory", m.Name)
		}
		if len(g.descs) > 0 && d.Layout.PageSize != g.descs[0].Layout.PageSize {
			return nil, fmt.Errorf("gang: VM %q has pages of %d bytes, %q of %d", m.Name, d.Layout.PageSize, members[0].Name, g.descs[0].Layout.PageSize)
		}
		g.descs = append(g.descs, d)
		g.firstR = append(g.firstR, r)
		r += len(d.Layout.Regions)
	}
	return g, nil
}

// MemberSpan separates the members' guest physical address spaces in the gang's layout.
const MemberSpan = 1 << 40

func checkName(name string) error {
	if name == "" || strings.Contains(name, "/") {
		return fmt.Errorf("gang: VM name %q: want a name without '/'", name)
	}
	return nil
}

// Describe is the members' regions and components, each named after its VM.
func (g *Source) Describe() migration.Description {
	d := migration.Description{Layout: migration.Layout{PageSize: g.descs[0].Layout.PageSize}}
	for i, m := range g.members {
		md := g.descs[i]
		for _, r := range md.Layout.Regions {
			r.Name = m.Name + "/" + r.Name
			r.GPA += uint64(i) * MemberSpan
			d.Layout.Regions = append(d.Layout.Regions, r)
		}
		for _, id := range md.Devices {
			d.Devices = append(d.Devices, m.Name+"/"+id)
		}
		d.VCPUs += md.VCPUs
	}
	return d
}

// member finds the member of gang region r and its region index there.
func (g *Source) member(r int) (int, int, error) {
	for i := len(g.firstR) - 1; i >= 0; i-- {
		if r >= g.firstR[i] {
			if lr := r - g.firstR[i]; lr < len(g.descs[i].Layout.Regions) {
				return i, lr, nil
			}
			break
		}
	}
	return 0, 0, fmt.Errorf("gang: region %d is no member's", r)
}

// each calls f on every member at once and joins their errors, each named after its VM.
func (g *Source) each(f func(i int, m Member) error) error {
	errs := make([]error, len(g.members))
	var wg sync.WaitGroup
	for i, m := range g.members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(i, m); err != nil {
				errs[i] = fmt.Errorf("VM %q: %w", m.Name, err)
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// bitmaps gathers the members' bitmaps in gang region order.
func (g *Source) bitmaps(get func(migration.Source) ([]migration.Bitmap, error)) ([]migration.Bitmap, error) {
	per := make([][]migration.Bitmap, len(g.members))
	err := g.each(func(i int, m Member) error {
		b, err := get(m.Src)
		if err == nil && len(b) != len(g.descs[i].Layout.Regions) {
			err = fmt.Errorf("%d bitmaps for %d regions", len(b), len(g.descs[i].Layout.Regions))
		}
		per[i] = b
		return err
	})
	if err != nil {
		return nil, err
	}
	var out []migration.Bitmap
	for _, b := range per {
		out = append(out, b...)
	}
	return out, nil
}

func (g *Source) Populated() ([]migration.Bitmap, error) {
	return g.bitmaps(migration.Source.Populated)
}

func (g *Source) FetchDirty() ([]migration.Bitmap, error) {
	return g.bitmaps(migration.Source.FetchDirty)
}

func (g *Source) StartDirtyLog() error {
	return g.each(func(_ int, m Member) error { return m.Src.StartDirtyLog() })
}

func (g *Source) StopDirtyLog() error {
	return g.each(func(_ int, m Member) error { return m.Src.StopDirtyLog() })
}

func (g *Source) ReadPages(r int, first uint64, dst []byte) error {
	i, lr, err := g.member(r)
	if err != nil {
		return err
	}
	return g.members[i].Src.ReadPages(lr, first, dst)
}

// ViewPages views a member's memory where the member offers views.
func (g *Source) ViewPages(r int, first, n uint64) []byte {
	i, lr, err := g.member(r)
	if err != nil {
		return nil
	}
	if v, ok := g.members[i].Src.(migration.PageViewer); ok {
		return v.ViewPages(lr, first, n)
	}
	return nil
}

// Pause stops every member, all at once, so that the gang's stop window is its slowest
// member's.
func (g *Source) Pause() error {
	return g.each(func(_ int, m Member) error { return m.Src.Pause() })
}

func (g *Source) Resume() error {
	return g.each(func(_ int, m Member) error { return m.Src.Resume() })
}

// SetThrottle slows every member that can be (auto-converge throttles the gang as one).
func (g *Source) SetThrottle(percent int) error {
	return g.each(func(_ int, m Member) error {
		if t, ok := m.Src.(migration.Throttler); ok {
			return t.SetThrottle(percent)
		}
		return nil
	})
}

func (g *Source) SaveState() ([]migration.Section, error) {
	per := make([][]migration.Section, len(g.members))
	err := g.each(func(i int, m Member) error {
		s, err := m.Src.SaveState()
		per[i] = s
		return err
	})
	if err != nil {
		return nil, err
	}
	var out []migration.Section
	for i, secs := range per {
		for _, s := range secs {
			s.ID = g.members[i].Name + "/" + s.ID
			out = append(out, s)
		}
	}
	return out, nil
}
