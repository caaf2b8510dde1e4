package vmm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/migration"
)

// These tests drive post-copy by hand, as the engine would: the source runs, pauses and saves
// its state; the destination is prepared, armed with every populated page of the source missing,
// restored and started; a server goroutine answers Faults from the source's memory (demand
// first) and pushes the rest in page order; once every page is there, DisarmPostcopy. The guest
// then verifies every page it owns.

// postcopyPair is a paused source and a destination armed for post-copy, not started yet.
type postcopyPair struct {
	src     *Machine
	dst     *MigrationDestination
	missing migration.Bitmap
	pages   uint64
	srcHB   uint64
}

func newPostcopyPair(t testing.TB, memMiB uint64, vcpus int, w workload, heartbeats uint64) *postcopyPair {
	t.Helper()
	src := newMachine(t, memMiB, vcpus, w)
	if err := src.Start(); err != nil {
		t.Fatal(err)
	}
	waitHeartbeats(t, src, heartbeats)
	return armFrom(t, src)
}

func armFrom(t testing.TB, src *Machine) *postcopyPair {
	t.Helper()
	s := MigrationSource{M: src}
	if err := s.Pause(); err != nil {
		t.Fatal(err)
	}
	secs, err := s.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	pop, err := s.Populated()
	if err != nil {
		t.Fatal(err)
	}
	d := &MigrationDestination{Template: Config{Name: "dst"}}
	t.Cleanup(d.Abort)
	if err := d.Prepare(s.Describe()); err != nil {
		t.Fatal(err)
	}
	// Pre-copy leftovers must be discarded by ArmPostcopy: fill a few missing pages with
	// garbage first, as a stale pre-copy round would have.
	pages := src.Memory().Pages()
	junk := bytes.Repeat([]byte{0xee}, guest.PageSize)
	n := 0
	pop[0].Runs(pages, func(first, _ uint64) bool {
		if err := d.WritePages(0, first, junk); err != nil {
			t.Fatal(err)
		}
		n++
		return n < 16
	})
	if err := d.ArmPostcopy(pop); err != nil {
		t.Fatal(err)
	}
	if err := d.RestoreState(secs); err != nil {
		t.Fatal(err)
	}
	return &postcopyPair{src: src, dst: d, missing: pop[0], pages: pages, srcHB: s.ProgressCount()}
}

// server plays the engine's post-copy sender and the destination's receive loop in one.
type server struct {
	p         *postcopyPair
	push      bool          // push the pages nobody asked for, in page order
	batch     uint64        // pages per push
	pushDelay time.Duration // between pushes (the link's pace)
	corrupt   uint64        // a page sent with one byte changed (0: none)

	sent    migration.Bitmap
	lat     []time.Duration // fault service latency: Fault.At -> placed
	demand  int             // faults served by sending the page
	late    int             // faults for pages sent already (raced with the push)
	pushed  uint64
	zeroPgs uint64
}

func newServer(p *postcopyPair) *server {
	return &server{p: p, push: true, batch: 32, pushDelay: time.Millisecond, sent: migration.NewBitmap(p.pages)}
}

func (s *server) left() uint64 { return s.p.missing.Count(s.p.pages) - s.sent.Count(s.p.pages) }

// send reads n pages from the source and places them (zero pages with PlaceZero).
func (s *server) send(first, n uint64, buf []byte) error {
	buf = buf[:n*guest.PageSize]
	if err := (MigrationSource{M: s.p.src}).ReadPages(0, first, buf); err != nil {
		return err
	}
	for i := first; i < first+n; i++ {
		s.sent.Set(i)
	}
	if s.corrupt != 0 && s.corrupt >= first && s.corrupt < first+n {
		buf[(s.corrupt-first)*guest.PageSize+123] ^= 0x5a
	}
	if !slices.ContainsFunc(buf, func(b byte) bool { return b != 0 }) {
		s.zeroPgs += n
		return s.p.dst.PlaceZero(0, first, n)
	}
	return s.p.dst.PlacePages(0, first, buf)
}

func (s *server) serveFault(f migration.Fault, buf []byte) error {
	if f.Region != 0 || f.Page >= s.p.pages {
		return fmt.Errorf("fault outside guest RAM: %+v", f)
	}
	if !s.p.missing.Has(f.Page) {
		return fmt.Errorf("fault for page %d, which was not missing", f.Page)
	}
	if s.sent.Has(f.Page) {
		s.late++
		return nil
	}
	if err := s.send(f.Page, 1, buf); err != nil {
		return err
	}
	s.lat = append(s.lat, time.Since(f.At))
	s.demand++
	return nil
}

// run serves until every missing page is placed (or ctx ends), then disarms.
func (s *server) run(ctx context.Context) error {
	buf := make([]byte, s.batch*guest.PageSize)
	faults := s.p.dst.Faults()
	next := uint64(0)
	var pace <-chan time.Time
	for s.left() > 0 {
		select { // demand first
		case f, ok := <-faults:
			if !ok {
				return errors.New("faults closed while pages are missing")
			}
			if err := s.serveFault(f, buf); err != nil {
				return err
			}
			continue
		default:
		}
		if s.push && pace == nil {
			// The next run of unsent missing pages from next, at most batch long.
			for next < s.p.pages && (!s.p.missing.Has(next) || s.sent.Has(next)) {
				next++
			}
			n := uint64(0)
			for next+n < s.p.pages && n < s.batch && s.p.missing.Has(next+n) && !s.sent.Has(next+n) {
				n++
			}
			if n > 0 {
				if err := s.send(next, n, buf); err != nil {
					return err
				}
				s.pushed += n
				next += n
			}
			pace = time.After(s.pushDelay)
		}
		select {
		case f, ok := <-faults:
			if !ok {
				return errors.New("faults closed while pages are missing")
			}
			if err := s.serveFault(f, buf); err != nil {
				return err
			}
		case <-pace:
			pace = nil
		case <-ctx.Done():
			return fmt.Errorf("%d pages still missing: %w", s.left(), ctx.Err())
		}
	}
	return s.p.dst.DisarmPostcopy()
}

func (s *server) start(t testing.TB) <-chan error {
	done := make(chan error, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	t.Cleanup(cancel)
	go func() { done <- s.run(ctx) }()
	return done
}

func (s *server) report(t testing.TB, took time.Duration) {
	t.Helper()
	st, _ := s.p.dst.M.PostcopyStats()
	lat := slices.Clone(s.lat)
	slices.Sort(lat)
	q := func(f float64) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, int(f*float64(len(lat))))]
	}
	t.Logf("post-copy of %d pages in %v: %d demand faults served (%d late, raced with the push), %d pushed, %d zero; destination: %+v",
		s.p.missing.Count(s.p.pages), took.Round(time.Millisecond), s.demand, s.late, s.pushed, s.zeroPgs, st)
	t.Logf("fault service latency (fault read -> page placed): p50 %v, p90 %v, p99 %v, max %v",
		q(0.5), q(0.9), q(0.99), q(1))
}

// gcStress runs the garbage collector over and over until the returned function is called,
// which returns how many collections completed. A goroutine stuck on a missing page outside a
// system call would make a collection (its stop-the-world) wait forever.
func gcStress(t testing.TB) func() int {
	stop := make(chan struct{})
	count := make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				count <- n
				return
			default:
			}
			runtime.GC()
			n++
			time.Sleep(2 * time.Millisecond)
		}
	}()
	return func() int {
		close(stop)
		select {
		case n := <-count:
			return n
		case <-time.After(20 * time.Second):
			t.Fatal("a garbage collection has not finished in 20 s: some goroutine is stuck on a missing page")
			return 0
		}
	}
}

func TestPostcopyDirtyWorkload(t *testing.T) {
	p := newPostcopyPair(t, 128, 2, workload{kind: "dirty", content: "random", pattern: "random", wssMiB: 16}, 30)
	srcStats := p.src.Stats()
	s := newServer(p)
	stopGC := gcStress(t)
	done := s.start(t)
	start := time.Now()
	if err := p.dst.Start(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	gcs := stopGC()
	s.report(t, took)
	t.Logf("%d garbage collections ran during the post-copy", gcs)
	if _, ok := <-p.dst.Faults(); ok {
		t.Fatal("Faults still open after DisarmPostcopy")
	}
	st, _ := p.dst.M.PostcopyStats()
	// vCPU accesses inside KVM_RUN (through the memslot on the memfd mapping) must fault.
	if st.Armed || st.Left != 0 || st.Faults <= st.VMMFaults {
		t.Fatalf("post-copy figures after disarm: %+v (want vCPU faults: the vCPUs ran before the push ended)", st)
	}
	dst := p.dst.M
	waitHeartbeats(t, dst, p.srcHB+20)
	if got := p.dst.ProgressCount(); got < p.srcHB+20 {
		t.Fatalf("destination ProgressCount %d, want at least %d", got, p.srcHB+20)
	}
	r := verifyClean(t, dst)
	after := dst.Stats()
	if after.PagesWritten <= srcStats.PagesWritten {
		t.Fatalf("guest made no progress after the move: %d -> %d pages written", srcStats.PagesWritten, after.PagesWritten)
	}
	t.Logf("destination verified %d pages (%d versioned); heartbeats %d -> %d; gap across the move %.1f ms",
		r.PagesChecked, r.PagesVersioned, p.srcHB, after.Heartbeats, after.MigrationGapMS)
}

// The oracle can fail: one page served with a wrong byte is found by the guest's verify.
func TestPostcopyWrongPageIsCaught(t *testing.T) {
	src := newMachine(t, 64, 2, workload{kind: "idle", content: "random", touch: 0.25})
	if err := src.Start(); err != nil {
		t.Fatal(err)
	}
	waitHeartbeats(t, src, 10)
	verifyClean(t, src) // every touched page is written before the source pauses
	p := armFrom(t, src)
	s := newServer(p)
	s.batch, s.pushDelay = 64, 100*time.Microsecond
	// The highest populated page is a data page of the last vCPU's slice.
	p.missing.Runs(p.pages, func(first, n uint64) bool { s.corrupt = first + n - 1; return true })
	if s.corrupt*guest.PageSize < guest.DataGPA {
		t.Fatalf("highest populated page %d is not a data page", s.corrupt)
	}
	done := s.start(t)
	if err := p.dst.Start(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := p.dst.M.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Mismatches != 1 || r.FirstBadGPA == nil || *r.FirstBadGPA != s.corrupt*guest.PageSize {
		t.Fatalf("page %d (gpa 0x%x) served with a wrong byte; verify: %+v (first bad %v)", s.corrupt, s.corrupt*guest.PageSize, r, r.FirstBadGPA)
	}
	t.Logf("wrong page 0x%x found at offset %d: expected 0x%x, found 0x%x (%d pages checked)", *r.FirstBadGPA, r.FirstBadOffset, r.Expected, r.Found, r.PagesChecked)
}

// The VMM's own accesses to guest memory on a post-copy destination (mailbox reads for stats,
// console and verify; WriteGuest) fetch the missing pages first instead of reading zeros or
// filling them.
func TestPostcopyVMMAccessGetsTheRightData(t *testing.T) {
	p := newPostcopyPair(t, 64, 2, workload{kind: "dirty", content: "text", pattern: "random", wssMiB: 8}, 30)
	want := p.src.Stats()
	if want.WorkUnits == 0 {
		t.Fatalf("source did no work: %+v", want)
	}
	for id := 0; id < 2; id++ {
		if !p.missing.Has(mailboxGPA(id) / guest.PageSize) {
			t.Fatalf("mailbox of vCPU %d is not among the missing pages", id)
		}
	}
	s := newServer(p)
	buf := make([]byte, guest.PageSize)
	faults := p.dst.Faults()
	// serveUntil answers faults until fn's result arrives.
	serveUntil := func(res <-chan struct{}) {
		t.Helper()
		timeout := time.After(30 * time.Second)
		for {
			select {
			case f := <-faults:
				if err := s.serveFault(f, buf); err != nil {
					t.Fatal(err)
				}
			case <-res:
				return
			case <-timeout:
				t.Fatal("VMM access still waiting after 30 s")
			}
		}
	}

	// Stats reads both mailboxes: without the gate, pread of the missing pages reads zeros.
	var got Stats
	res := make(chan struct{})
	go func() { got = p.dst.M.Stats(); close(res) }()
	serveUntil(res)
	if got.WorkUnits != want.WorkUnits || got.PagesWritten != want.PagesWritten {
		t.Fatalf("destination stats before start: %d work units, %d pages written; the source has %d and %d",
			got.WorkUnits, got.PagesWritten, want.WorkUnits, want.PagesWritten)
	}
	st, _ := p.dst.M.PostcopyStats()
	if st.VMMFaults < 2 || s.demand < 2 {
		t.Fatalf("mailbox reads raised %d VMM faults (%d served), want 2: %+v", st.VMMFaults, s.demand, st)
	}

	// WriteGuest into a missing data page: the page arrives first, then the write lands on it.
	// Write back the bytes the source has, so the guest's memory stays correct.
	var page uint64
	p.missing.Runs(p.pages, func(first, n uint64) bool { page = first + n - 1; return true })
	srcPage := make([]byte, guest.PageSize)
	if err := (MigrationSource{M: p.src}).ReadPages(0, page, srcPage); err != nil {
		t.Fatal(err)
	}
	res = make(chan struct{})
	var werr error
	go func() { werr = p.dst.M.WriteGuest(page*guest.PageSize+200, srcPage[200:216]); close(res) }()
	serveUntil(res)
	if werr != nil {
		t.Fatal(werr)
	}
	dstPage := make([]byte, guest.PageSize)
	if _, err := p.dst.M.Memory().ReadAt(dstPage, int64(page*guest.PageSize)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dstPage, srcPage) {
		t.Fatalf("page %d after WriteGuest on the destination differs from the source's", page)
	}

	// Now run: console, heartbeats and verify reports all read mailboxes while pages arrive.
	stopGC := gcStress(t)
	defer stopGC()
	done := s.start(t)
	start := time.Now()
	if err := p.dst.Start(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ { // stats while post-copy runs
		if st := p.dst.M.Stats(); st.State != StateRunning {
			t.Fatalf("destination %s: %s", st.State, st.Error)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	s.report(t, time.Since(start))
	waitHeartbeats(t, p.dst.M, p.srcHB+10)
	verifyClean(t, p.dst.M)
}

// Abort while vCPUs and the VMM wait for pages that never come: everything is released.
func TestPostcopyAbortReleasesWaiters(t *testing.T) {
	p := newPostcopyPair(t, 64, 2, workload{kind: "dirty", content: "random", pattern: "random", wssMiB: 8}, 20)
	if err := p.dst.Start(); err != nil {
		t.Fatal(err)
	}
	faults := p.dst.Faults()
	select {
	case f := <-faults:
		t.Logf("first fault: page %d", f.Page)
	case <-time.After(30 * time.Second):
		t.Fatal("no fault from the started destination")
	}
	if err := p.dst.DisarmPostcopy(); err == nil || !strings.Contains(err.Error(), "still missing") {
		t.Fatalf("disarm with pages missing: %v", err)
	}
	m := p.dst.M
	statsDone := make(chan struct{})
	go func() { m.Stats(); close(statsDone) }()
	start := time.Now()
	p.dst.Abort()
	t.Logf("abort took %v", time.Since(start))
	for range faults { // closed by Abort
	}
	select {
	case <-statsDone:
	case <-time.After(10 * time.Second):
		t.Fatal("a VMM access waiting for a page was not released by Abort")
	}
	if st, _ := m.State(); st != StateReleased && st != StateRunning && st != StateFailed {
		t.Logf("machine state after abort: %s", st)
	}
}

// BenchmarkPostcopyFaultService measures demand faults served directly (no network): the
// guest writes random pages of a 16 MiB working set, every page of the source is missing, and
// only faults are served for a second; then the rest is pushed.
func BenchmarkPostcopyFaultService(b *testing.B) {
	var lat []time.Duration
	var faults int
	var served time.Duration
	for i := 0; i < b.N; i++ {
		p := newPostcopyPair(b, 64, 1, workload{kind: "dirty", content: "random", pattern: "random", wssMiB: 16}, 20)
		s := newServer(p)
		s.push = false
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		done := make(chan error, 1)
		go func() { done <- s.run(ctx) }()
		if err := p.dst.Start(); err != nil {
			b.Fatal(err)
		}
		err := <-done // nil: every page was demanded within the second
		cancel()
		served += time.Second
		if err != nil {
			s.push, s.pushDelay = true, 0
			ctx, cancel = context.WithTimeout(context.Background(), time.Minute)
			if err := s.run(ctx); err != nil {
				b.Fatal(err)
			}
			cancel()
		}
		lat = append(lat, s.lat...)
		faults += s.demand
		p.dst.Abort()
		p.src.Close()
	}
	slices.Sort(lat)
	if len(lat) == 0 {
		b.Fatal("no faults")
	}
	var sum time.Duration
	for _, l := range lat {
		sum += l
	}
	b.ReportMetric(float64(sum.Microseconds())/float64(len(lat)), "us/fault")
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-us")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-us")
	b.ReportMetric(float64(faults)/served.Seconds(), "faults/s")
}

// TestArmPostcopyPunchesOnlyStalePages: arming discards exactly the held pages of the missing
// set, with runs that span holes, and keeps every held page outside it (hybrid: pages that
// pre-copy delivered and the guest did not dirty again must survive the switch).
func TestArmPostcopyPunchesOnlyStalePages(t *testing.T) {
	src := newMachine(t, 16, 1, workload{kind: "idle", content: "text", touch: 0.1})
	t.Run("in ArmPostcopy", func(t *testing.T) { armPunchTest(t, src, false) })
	t.Run("in DiscardStale first", func(t *testing.T) { armPunchTest(t, src, true) })
}

func armPunchTest(t *testing.T, src *Machine, early bool) {
	d := &MigrationDestination{Template: Config{Name: "dst"}}
	t.Cleanup(d.Abort)
	if err := d.Prepare(MigrationSource{M: src}.Describe()); err != nil {
		t.Fatal(err)
	}
	pages := src.Memory().Pages()
	missing := migration.NewBitmap(pages)
	held := map[uint64]bool{}
	page := func(i uint64) []byte { return bytes.Repeat([]byte{byte(i%251 + 1)}, guest.PageSize) }
	// Patterns: held pages alternating kept/stale, stale runs separated by holes only, a
	// kept page between two stale ones, missing pages that were never held, the last page.
	for i := uint64(100); i < 140; i++ {
		held[i] = true
		if i%2 == 0 {
			missing.Set(i)
		}
	}
	for _, i := range []uint64{200, 203, 207, 300, 301, 303, pages - 1} {
		held[i] = true
		missing.Set(i)
	}
	held[302] = true // kept, between stale 301 and 303
	missing.SetRange(400, 50)
	for i := range held {
		if err := d.WritePages(0, i, page(i)); err != nil {
			t.Fatal(err)
		}
	}
	if early {
		if err := d.DiscardStale([]migration.Bitmap{missing}); err != nil {
			t.Fatal(err)
		}
		if err := d.DiscardStale([]migration.Bitmap{migration.NewBitmap(64)}); err == nil {
			t.Fatal("DiscardStale took a bitmap too short for the region")
		}
	}
	if err := d.ArmPostcopy([]migration.Bitmap{missing}); err != nil {
		t.Fatal(err)
	}
	if err := d.DiscardStale([]migration.Bitmap{missing}); err == nil {
		t.Fatal("DiscardStale after ArmPostcopy succeeded")
	}
	pop, err := d.M.mem.Populated()
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, guest.PageSize)
	for i := uint64(0); i < pages; i++ {
		keep := held[i] && !missing.Has(i)
		if pop.Test(i) != keep {
			t.Fatalf("page %d populated %v after arming, want %v (held %v, missing %v)", i, pop.Test(i), keep, held[i], missing.Has(i))
		}
		if keep {
			if _, err := d.M.mem.ReadAt(buf, int64(i*guest.PageSize)); err != nil || !bytes.Equal(buf, page(i)) {
				t.Fatalf("kept page %d changed by arming (%v)", i, err)
			}
		}
	}
}
