package gang

import (
	"context"
	"fmt"
	"testing"

	"github.com/godwit-vm/godwit/migration"
	"github.com/godwit-vm/godwit/migration/migrationtest"
)

// TestGangDedupAcrossVMs migrates three fake guests that hold copies of one pool of pages as
// one gang with dedup: each arrives byte for byte, and the pages one VM holds that another sent
// first travel as references, so the gang sends about one VM's worth of distinct pages.
func TestGangDedupAcrossVMs(t *testing.T) {
	const size = 4 << 20
	var members []Member
	guests := map[string]*migrationtest.Guest{}
	for i := range 3 {
		g := migrationtest.NewGuest(migrationtest.SimpleDescription(size))
		g.FillPool(7, 64, 0.2, 0.1) // one pool: the same 64 pages in every VM
		name := fmt.Sprintf("vm%d", i)
		guests[name] = g
		members = append(members, Member{Name: name, Src: g})
	}
	src, err := NewSource(members)
	if err != nil {
		t.Fatal(err)
	}
	dests := map[string]*migrationtest.Dest{}
	dst := &Destination{New: func(name string, d migration.Description) (migration.Destination, error) {
		g := guests[name]
		if g == nil {
			return nil, fmt.Errorf("no VM %q", name)
		}
		x := migrationtest.NewDest()
		dests[name] = x
		return vcpus{x, g.Describe().VCPUs}, nil
	}}
	a, b := migrationtest.Link(migrationtest.LinkConfig{})
	errc := make(chan error, 1)
	go func() {
		_, err := migration.Receive(context.Background(), dst, b, migration.ReceiveOptions{})
		errc <- err
	}()
	rep, err := migration.Send(context.Background(), src, a, migration.SendOptions{Dedup: true})
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("receive: %v", err)
	}
	for name, g := range guests {
		if err := migrationtest.Compare(g, dests[name]); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	t.Logf("pages %+v, %d bytes", rep.Pages, rep.BytesWire)
	if rep.Pages.Dedup == 0 {
		t.Error("no page went as a reference")
	}
}

// vcpus gives a member destination the vCPU count its VMM would read from its components.
type vcpus struct {
	*migrationtest.Dest
	n int
}

func (v vcpus) Prepare(d migration.Description) error {
	d.VCPUs = v.n
	return v.Dest.Prepare(d)
}
