package demand

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/godwit-vm/godwit/internal/guestmem"
	"github.com/godwit-vm/godwit/migration"
)

// The tests never touch a missing page from Go code: loads go through the kernel (pwrite from
// the mapping into a sink memfd), where the goroutine is in a system call.

type fixture struct {
	mem    *guestmem.Region
	sink   int
	faults chan migration.Fault
}

func newFixture(t testing.TB, pages uint64) *fixture {
	t.Helper()
	mem, err := guestmem.NewRegion("test-ram", 0, pages*guestmem.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	sink, err := unix.MemfdCreate("test-sink", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(sink, guestmem.PageSize); err != nil {
		t.Fatal(err)
	}
	f := &fixture{mem: mem, sink: sink, faults: make(chan migration.Fault, 64)}
	t.Cleanup(func() {
		mem.Close()
		unix.Close(sink)
	})
	return f
}

func page(i uint64) []byte { return bytes.Repeat([]byte{byte(i%251 + 1)}, guestmem.PageSize) }

// load reads page p through the mapping from the kernel and returns its content.
func (f *fixture) load(p uint64) ([]byte, error) {
	off := p * guestmem.PageSize
	for {
		_, err := unix.Pwrite(f.sink, f.mem.Mem[off:off+guestmem.PageSize], 0)
		if err == nil {
			break
		}
		if err != unix.EFAULT && err != unix.EINTR {
			return nil, err
		}
	}
	b := make([]byte, guestmem.PageSize)
	_, err := unix.Pread(f.sink, b, 0)
	return b, err
}

// goLoad loads page p on a goroutine and delivers the result.
func (f *fixture) goLoad(p uint64) <-chan []byte {
	ch := make(chan []byte, 1)
	go func() {
		b, err := f.load(p)
		if err != nil {
			b = []byte(err.Error())
		}
		ch <- b
	}()
	return ch
}

func TestDemandPaging(t *testing.T) {
	const pages = 256
	f := newFixture(t, pages)
	// Held before arming: 10..19 (10..14 stale, in the set), 200 (kept). 100..109 missing, 150
	// a complete hole.
	for i := uint64(10); i < 20; i++ {
		if _, err := f.mem.WriteAt(page(i), int64(i*guestmem.PageSize)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.mem.WriteAt(page(200), 200*guestmem.PageSize); err != nil {
		t.Fatal(err)
	}
	missing := migration.NewBitmap(pages)
	missing.SetRange(10, 5)
	missing.SetRange(100, 10)
	if err := DiscardStale(f.mem, missing); err != nil {
		t.Fatal(err)
	}
	held, err := f.mem.Populated()
	if err != nil {
		t.Fatal(err)
	}
	for i := uint64(0); i < pages; i++ {
		want := (i >= 15 && i < 20) || i == 200
		if held.Test(i) != want {
			t.Fatalf("page %d held %v after DiscardStale, want %v", i, held.Test(i), want)
		}
	}
	p, err := Arm(f.mem, missing, Config{Region: 3, Faults: f.faults})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Shutdown()

	// A complete page reads at once: held, or a hole (zero, served locally).
	for _, i := range []uint64{15, 200} {
		if b, err := f.load(i); err != nil || !bytes.Equal(b, page(i)) {
			t.Fatalf("complete page %d: %v", i, err)
		}
	}
	if b, err := f.load(150); err != nil || !bytes.Equal(b, make([]byte, guestmem.PageSize)) {
		t.Fatalf("complete hole 150: %v", err)
	}
	// A missing page blocks until placed and is reported once, with two loaders.
	got1, got2 := f.goLoad(100), f.goLoad(100)
	select {
	case fl := <-f.faults:
		if fl.Region != 3 || fl.Page != 100 {
			t.Fatalf("fault %+v, want region 3 page 100", fl)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no fault for a missing page")
	}
	select {
	case <-got1:
		t.Fatal("a missing page was read before it was placed")
	case <-time.After(50 * time.Millisecond):
	}
	if err := p.Place(100, 2, slices.Concat(page(100), page(101))); err != nil {
		t.Fatal(err)
	}
	for _, ch := range []<-chan []byte{got1, got2} {
		if b := <-ch; !bytes.Equal(b, page(100)) {
			t.Fatalf("page 100 after placing: %.40q", b)
		}
	}
	// The VMM's own access waits on a channel and is reported as a fault.
	ensured := make(chan error, 1)
	go func() { ensured <- p.Ensure(context.Background(), 101, 3) }() // 101 placed, 102 and 103 missing
	var asked []uint64
	for len(asked) < 2 {
		select {
		case fl := <-f.faults:
			asked = append(asked, fl.Page)
		case <-time.After(5 * time.Second):
			t.Fatalf("Ensure reported %v, want 102 and 103", asked)
		}
	}
	if err := p.Place(102, 2, nil); err != nil { // zero pages
		t.Fatal(err)
	}
	if err := <-ensured; err != nil {
		t.Fatal(err)
	}
	if b, err := f.load(103); err != nil || !bytes.Equal(b, make([]byte, guestmem.PageSize)) {
		t.Fatalf("zero-placed page 103: %v", err)
	}
	// Placing a present page keeps it.
	if err := p.Place(100, 1, page(7)); err != nil {
		t.Fatal(err)
	}
	if b, _ := f.load(100); !bytes.Equal(b, page(100)) {
		t.Fatal("placing over a present page changed it")
	}
	st := p.Stats()
	if st.Missing != 15 || st.Left != 11 || st.Faults != 3 || st.VMMFaults != 2 || st.LocalZero != 1 || st.PagesExisting != 1 {
		t.Fatalf("stats %+v", st)
	}
	if err := p.Complete(); err == nil {
		t.Fatal("Complete with 11 pages missing")
	}
	// Shutdown releases waiters: Ensure ends with ErrEnded.
	go func() { ensured <- p.Ensure(context.Background(), 104, 1) }()
	<-f.faults
	if err := p.Shutdown(); err != nil {
		t.Fatal(err)
	}
	if err := <-ensured; !errors.Is(err, ErrEnded) {
		t.Fatalf("Ensure after Shutdown: %v, want ErrEnded", err)
	}
	if _, ok := <-f.faults; ok {
		t.Fatal("Faults still open after Shutdown")
	}
}

func TestSetFor(t *testing.T) {
	f := newFixture(t, 100) // two words, 36 bits of the second past the end
	if _, err := SetFor(f.mem, migration.NewBitmap(64)); err == nil {
		t.Fatal("SetFor took a bitmap too short for the region")
	}
	long := migration.NewBitmap(300)
	long.SetRange(90, 200)
	bm, err := SetFor(f.mem, long)
	if err != nil {
		t.Fatal(err)
	}
	if bm.Count(100) != 10 || !bm.Has(90) || !bm.Has(99) {
		t.Fatalf("SetFor: %d pages; want pages 90..99", bm.Count(100))
	}
	long.Set(0)
	if bm.Has(0) {
		t.Fatal("SetFor shares storage with its argument")
	}
}

func TestArmChecks(t *testing.T) {
	f := newFixture(t, 64)
	if _, err := Arm(f.mem, migration.NewBitmap(32), Config{Faults: f.faults}); err == nil {
		t.Fatal("Arm took a bitmap too small for the region")
	}
	if _, err := Arm(f.mem, migration.NewBitmap(64), Config{}); err == nil {
		t.Fatal("Arm took no Faults channel")
	}
	if err := DiscardStale(f.mem, migration.NewBitmap(63)); err == nil {
		t.Fatal("DiscardStale took a bitmap too small for the region")
	}
	p, err := Arm(f.mem, migration.NewBitmap(64), Config{Faults: f.faults})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Place(60, 5, nil); err == nil {
		t.Fatal("Place past the end")
	}
	if err := p.Place(3, 1, make([]byte, 10)); err == nil {
		t.Fatal("Place took a source that is not one page")
	}
	if err := p.Place(64, 0, nil); err != nil {
		t.Fatalf("placing no pages: %v", err)
	}
	if err := p.Complete(); err != nil {
		t.Fatalf("Complete with nothing missing: %v", err)
	}
	if err := p.Shutdown(); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkFaultService: a load of a missing page (in the kernel, on a system call) until it
// returns, served by a goroutine that places each reported page at once: the local part of a
// demand fault's service time, without the network.
func BenchmarkFaultService(b *testing.B) {
	pages := uint64(max(b.N, 64)+63) / 64 * 64
	f := newFixture(b, pages)
	missing := migration.NewBitmap(pages)
	missing.SetRange(0, pages)
	p, err := Arm(f.mem, missing, Config{Faults: f.faults})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Shutdown()
	src := page(1)
	go func() {
		for fl := range f.faults {
			if err := p.Place(fl.Page, 1, src); err != nil {
				return
			}
		}
	}()
	var lat []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := f.load(uint64(i)); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-us")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-us")
}
