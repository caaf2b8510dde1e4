package uffd

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The tests never touch a missing page from Go code: every access to registered memory is made
// by the kernel inside a system call (pwrite from the mapping into a sink memfd, pread into the
// mapping), where the goroutine is in a syscall and the garbage collector does not wait for it.

// region is a memfd mapped shared and registered in MISSING mode, plus a sink memfd that
// faulting reads copy the mapping into.
type region struct {
	u     *UFFD
	fd    int
	sink  int
	mem   []byte
	base  uintptr
	pages int
	ps    int
}

func newRegion(t *testing.T, pages int) *region {
	t.Helper()
	u, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	ps := int(u.PageSize())
	r := &region{u: u, pages: pages, ps: ps}
	for _, fd := range []*int{&r.fd, &r.sink} {
		if *fd, err = unix.MemfdCreate("uffd-test", unix.MFD_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		if err := unix.Ftruncate(*fd, int64(pages*ps)); err != nil {
			t.Fatal(err)
		}
	}
	if r.mem, err = unix.Mmap(r.fd, 0, pages*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Close first: threads still waiting on pages are released before the unmap.
		u.Close()
		unix.Munmap(r.mem)
		unix.Close(r.fd)
		unix.Close(r.sink)
	})
	r.base = Addr(r.mem)
	ioctls, err := u.Register(r.base, uint64(pages*ps))
	if err != nil {
		t.Fatal(err)
	}
	if ioctls&(IoctlCopy|IoctlWake) != IoctlCopy|IoctlWake {
		t.Fatalf("register: ioctls 0x%x lack copy and wake", ioctls)
	}
	return r
}

// load reads n bytes of the mapping at off the way the kernel does (pwrite from the mapping to
// the sink) and returns them as the sink then holds them. A signal can cut a faulting copy
// short (EFAULT or a short write); that part is retried.
func (r *region) load(off, n int) ([]byte, error) {
	for done := 0; done < n; {
		k, err := unix.Pwrite(r.sink, r.mem[off+done:off+n], int64(off+done))
		if err != nil && err != unix.EFAULT && err != unix.EINTR {
			return nil, err
		}
		if k > 0 {
			done += k
		}
	}
	b := make([]byte, n)
	if _, err := unix.Pread(r.sink, b, int64(off)); err != nil {
		return nil, err
	}
	return b, nil
}

// store writes b into the mapping at off from the kernel (pread from a memfd into the mapping):
// a write fault.
func (r *region) store(off int, b []byte) error {
	fd, err := unix.MemfdCreate("uffd-src", unix.MFD_CLOEXEC)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if _, err := unix.Pwrite(fd, b, 0); err != nil {
		return err
	}
	for done := 0; done < len(b); {
		k, err := unix.Pread(fd, r.mem[off+done:off+len(b)], int64(done))
		if err != nil && err != unix.EFAULT && err != unix.EINTR {
			return err
		}
		if k > 0 {
			done += k
		}
	}
	return nil
}

// memfd reads the region's memfd directly (pread: never faults; a missing page reads as zero).
func (r *region) memfd(off, n int) []byte {
	b := make([]byte, n)
	if _, err := unix.Pread(r.fd, b, int64(off)); err != nil {
		panic(err)
	}
	return b
}

func pattern(page, ps int) []byte {
	b := make([]byte, ps)
	for i := range b {
		b[i] = byte(page*7 + i/16 + 1)
	}
	return b
}

// serve answers faults until the UFFD is closed, calling fill for each one; it returns the
// messages seen through the channel when it ends.
func (r *region) serve(t *testing.T, fill func(page int) error) <-chan []Msg {
	out := make(chan []Msg, 1)
	go func() {
		var seen []Msg
		defer func() { out <- seen }()
		msgs := make([]Msg, 16)
		for {
			n, err := r.u.Read(msgs)
			if errors.Is(err, ErrClosed) {
				return
			}
			if err != nil {
				t.Error(err)
				return
			}
			for _, m := range msgs[:n] {
				seen = append(seen, m)
				if m.Event != EventPagefault {
					t.Errorf("event 0x%x, want a page fault", m.Event)
					continue
				}
				if err := fill(int(uintptr(m.Address)-r.base) / r.ps); err != nil {
					t.Error(err)
				}
			}
		}
	}()
	return out
}

func (r *region) copyPattern(page int) error {
	_, err := r.u.Copy(r.base+uintptr(page*r.ps), pattern(page, r.ps), Options{})
	return err
}

func TestOpenReportsFeatures(t *testing.T) {
	u, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if u.Features()&FeatureMissingShmem == 0 {
		t.Fatalf("features 0x%x: no MISSING mode on shared memory", u.Features())
	}
	if u.Ioctls()&(IoctlAPI|IoctlRegister|IoctlUnregister) != IoctlAPI|IoctlRegister|IoctlUnregister {
		t.Fatalf("ioctls 0x%x", u.Ioctls())
	}
	t.Logf("features 0x%x, ioctls 0x%x, page size %d", u.Features(), u.Ioctls(), u.PageSize())
}

// Without the device, Open falls back to the userfaultfd(2) system call.
func TestOpenFallsBackToSyscall(t *testing.T) {
	defer func(p string) { devicePath = p }(devicePath)
	devicePath = "/nonexistent/userfaultfd"
	r := newRegion(t, 2)
	r.serve(t, r.copyPattern)
	got, err := r.load(r.ps, r.ps)
	if err != nil || !bytes.Equal(got, pattern(1, r.ps)) {
		t.Fatalf("fault through a userfaultfd from the system call: %v", err)
	}
}

func TestCopyServesReadAndWriteFaults(t *testing.T) {
	r := newRegion(t, 16)
	done := r.serve(t, r.copyPattern)
	for p := 0; p < 8; p++ {
		got, err := r.load(p*r.ps, r.ps)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, pattern(p, r.ps)) {
			t.Fatalf("page %d: read %x..., want %x...", p, got[:8], pattern(p, r.ps)[:8])
		}
	}
	// A write into a missing page faults too; the page arrives first, then the write lands.
	if err := r.store(9*r.ps+100, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	want := pattern(9, r.ps)
	copy(want[100:], "hello")
	if got := r.memfd(9*r.ps, r.ps); !bytes.Equal(got, want) {
		t.Fatalf("page 9 after a write: %q", got[96:110])
	}
	r.u.Close()
	msgs := <-done
	if len(msgs) < 9 {
		t.Fatalf("%d fault messages, want at least 9", len(msgs))
	}
	var writes int
	for _, m := range msgs {
		if uintptr(m.Address)%uintptr(r.ps) != 0 {
			t.Errorf("fault address 0x%x not page aligned", m.Address)
		}
		if m.Flags&FlagWrite != 0 {
			writes++
			if uintptr(m.Address) != r.base+uintptr(9*r.ps) {
				t.Errorf("write fault at 0x%x, want page 9", m.Address)
			}
		}
	}
	if writes == 0 {
		t.Error("the write into page 9 raised no write fault")
	}
}

func TestZeroPage(t *testing.T) {
	r := newRegion(t, 8)
	r.serve(t, func(p int) error {
		_, err := r.u.ZeroPage(r.base+uintptr(p*r.ps), uint64(r.ps), Options{})
		return err
	})
	got, err := r.load(2*r.ps, 3*r.ps)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, 3*r.ps)) {
		t.Fatal("zero pages read non-zero")
	}
	// They are real pages now: a write through the kernel no longer faults.
	if err := r.store(3*r.ps, []byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	if got := r.memfd(3*r.ps, 3); !bytes.Equal(got, []byte{1, 2, 3}) {
		t.Fatalf("page 3 after write: %v", got)
	}
}

func TestCopyAndZeroSkipExistingPages(t *testing.T) {
	r := newRegion(t, 16)
	// Install page 3 and page 6 up front (nobody faults: no wake needed, but harmless).
	if res, err := r.u.Copy(r.base+uintptr(3*r.ps), pattern(100, r.ps), Options{}); err != nil || res.Installed != uint64(r.ps) {
		t.Fatalf("copy page 3: %+v, %v", res, err)
	}
	if res, err := r.u.ZeroPage(r.base+uintptr(6*r.ps), uint64(r.ps), Options{}); err != nil || res.Installed != uint64(r.ps) {
		t.Fatalf("zero page 6: %+v, %v", res, err)
	}
	src := make([]byte, 8*r.ps)
	for p := 0; p < 8; p++ {
		copy(src[p*r.ps:], pattern(p, r.ps))
	}
	res, err := r.u.Copy(r.base, src, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Installed != uint64(6*r.ps) || res.Existing != uint64(2*r.ps) {
		t.Fatalf("copy over 2 present pages: %+v, want 6 installed and 2 existing pages", res)
	}
	for p := 0; p < 8; p++ {
		want := pattern(p, r.ps)
		switch p {
		case 3:
			want = pattern(100, r.ps)
		case 6:
			want = make([]byte, r.ps)
		}
		if got := r.memfd(p*r.ps, r.ps); !bytes.Equal(got, want) {
			t.Errorf("page %d: %x..., want %x...", p, got[:8], want[:8])
		}
	}
	res, err = r.u.ZeroPage(r.base+uintptr(6*r.ps), uint64(4*r.ps), Options{})
	if err != nil || res.Installed != uint64(2*r.ps) || res.Existing != uint64(2*r.ps) {
		t.Fatalf("zero pages 6..9: %+v, %v; want 2 installed (8, 9) and 2 existing (6, 7)", res, err)
	}
	if got := r.memfd(7*r.ps, 8); !bytes.Equal(got, pattern(7, r.ps)[:8]) {
		t.Fatalf("page 7 was zeroed over: %x", got)
	}
}

func TestDontWakeThenWake(t *testing.T) {
	r := newRegion(t, 4)
	faulted := make(chan Msg, 1)
	go func() {
		msgs := make([]Msg, 1)
		if n, err := r.u.Read(msgs); err == nil && n == 1 {
			faulted <- msgs[0]
		}
	}()
	loaded := make(chan []byte, 1)
	go func() {
		b, err := r.load(r.ps, r.ps)
		if err != nil {
			t.Error(err)
		}
		loaded <- b
	}()
	m := <-faulted
	if uintptr(m.Address) != r.base+uintptr(r.ps) {
		t.Fatalf("fault at 0x%x, want page 1", m.Address)
	}
	if _, err := r.u.Copy(r.base+uintptr(r.ps), pattern(1, r.ps), Options{DontWake: true}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-loaded:
		// A signal can make the waiting thread retry the fault, which then finds the page.
		t.Log("the faulting thread finished without a wake (it was interrupted and retried)")
		return
	case <-time.After(100 * time.Millisecond):
	}
	if err := r.u.Wake(r.base, uint64(4*r.ps)); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-loaded:
		if !bytes.Equal(b, pattern(1, r.ps)) {
			t.Fatal("woken read got the wrong content")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Wake did not wake the faulting thread")
	}
}

func TestCloseStopsBlockedReader(t *testing.T) {
	r := newRegion(t, 4)
	res := make(chan error, 1)
	go func() {
		msgs := make([]Msg, 4)
		_, err := r.u.Read(msgs)
		res <- err
	}()
	time.Sleep(50 * time.Millisecond)
	start := time.Now()
	if err := r.u.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-res:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("blocked Read returned %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not stop the blocked reader")
	}
	t.Logf("reader stopped %v after Close", time.Since(start))
	if _, err := r.u.Copy(r.base, pattern(0, r.ps), Options{}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Copy after Close: %v, want ErrClosed", err)
	}
	if _, err := r.u.Read(make([]Msg, 1)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Read after Close: %v", err)
	}
	if err := r.u.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// Closing the userfaultfd while a thread waits on a missing page releases it (the page faults
// in as zero): an aborted post-copy must not leave threads hanging.
func TestCloseReleasesFaultingThread(t *testing.T) {
	r := newRegion(t, 4)
	loaded := make(chan []byte, 1)
	go func() {
		b, err := r.load(2*r.ps, r.ps)
		if err != nil {
			t.Error(err)
		}
		loaded <- b
	}()
	msgs := make([]Msg, 1)
	if _, err := r.u.Read(msgs); err != nil {
		t.Fatal(err)
	}
	r.u.Close()
	select {
	case b := <-loaded:
		if !bytes.Equal(b, make([]byte, r.ps)) {
			t.Fatal("page released by Close is not zero")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the faulting thread still waits after Close")
	}
}

func TestUnregisterReleasesAndStopsFaults(t *testing.T) {
	r := newRegion(t, 4)
	if err := r.u.Unregister(r.base, uint64(4*r.ps)); err != nil {
		t.Fatal(err)
	}
	got, err := r.load(0, r.ps) // no fault any more: ordinary zero page
	if err != nil || !bytes.Equal(got, make([]byte, r.ps)) {
		t.Fatalf("after unregister: %v", err)
	}
	if _, err := r.u.Copy(r.base+uintptr(r.ps), pattern(1, r.ps), Options{}); err == nil {
		t.Fatal("copy into an unregistered range succeeded")
	}
}

func TestErrorsNameOperationAndRange(t *testing.T) {
	r := newRegion(t, 4)
	_, err := r.u.Copy(r.base+1, pattern(0, r.ps), Options{})
	if err == nil || !strings.Contains(err.Error(), "copy") || !strings.Contains(err.Error(), fmt.Sprintf("0x%x", r.base+1)) {
		t.Fatalf("misaligned copy: %v", err)
	}
	_, err = r.u.ZeroPage(r.base+uintptr(8*r.ps), uint64(r.ps), Options{}) // outside the region
	if err == nil || !strings.Contains(err.Error(), "UFFDIO_ZEROPAGE") || !strings.Contains(err.Error(), fmt.Sprintf("0x%x", r.base+uintptr(8*r.ps))) {
		t.Fatalf("zeropage outside the range: %v", err)
	}
	if _, err := r.u.Register(r.base, 0); err == nil || !strings.Contains(err.Error(), "register") {
		t.Fatalf("empty register: %v", err)
	}
}

func TestManyConcurrentFaults(t *testing.T) {
	const pages, workers, reads = 512, 24, 64
	r := newRegion(t, pages)
	var served atomic.Int64
	var wg sync.WaitGroup
	done := make([]<-chan []Msg, 2) // two handlers read the same userfaultfd
	for i := range done {
		done[i] = r.serve(t, func(p int) error {
			served.Add(1)
			if p%5 == 0 {
				_, err := r.u.ZeroPage(r.base+uintptr(p*r.ps), uint64(r.ps), Options{})
				return err
			}
			return r.copyPattern(p)
		})
	}
	// The collector runs throughout: goroutines waiting on missing pages inside system calls
	// must not hold it up.
	gcStop := make(chan struct{})
	gcDone := make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-gcStop:
				gcDone <- n
				return
			default:
			}
			runtime.GC()
			n++
		}
	}()
	start := time.Now()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, 1))
			for i := 0; i < reads; i++ {
				p := rng.IntN(pages)
				n := 1 + rng.IntN(3)
				if p+n > pages {
					n = pages - p
				}
				got, err := r.load(p*r.ps, n*r.ps)
				if err != nil {
					t.Error(err)
					return
				}
				for q := p; q < p+n; q++ {
					want := pattern(q, r.ps)
					if q%5 == 0 {
						want = make([]byte, r.ps)
					}
					if !bytes.Equal(got[(q-p)*r.ps:(q-p+1)*r.ps], want) {
						t.Errorf("page %d: wrong content", q)
						return
					}
				}
			}
		}(uint64(w))
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(gcStop)
	gcs := <-gcDone
	r.u.Close()
	total := 0
	for _, d := range done {
		total += len(<-d)
	}
	t.Logf("%d workers x %d reads over %d pages: %d fault messages, %d served, %v, %d garbage collections meanwhile", workers, reads, pages, total, served.Load(), elapsed, gcs)
	if total == 0 {
		t.Fatal("no faults")
	}
}
