package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/godwit-vm/godwit/internal/control"
	"github.com/godwit-vm/godwit/internal/guestmem"
	"github.com/godwit-vm/godwit/internal/vmm"
	"github.com/godwit-vm/godwit/migration"
)

// Gang migration, the source's side (package gang is the engine's side). 'godwit migrate
// --gang' drives one migration of several VMs from its own process: each VM process lends it
// its VM for the migration (POST /v1/gang/lend, a stream that stays open as long as the lease
// holds), and the gang process reads each VM's memory itself, through the VM's memfd (opened
// as /proc/PID/fd/N), while the VM process keeps what only it can do: dirty logging, pausing,
// saving state, throttling (POST /v1/gang/op). If the gang process goes away before it has
// released the VMs, the lease ends with the stream and each VM process undoes what the gang
// did (resumes, unthrottles, stops logging): the VM runs on.

// lendAnswer is the first line of a lend: what the gang process needs of the VM.
type lendAnswer struct {
	Token    string   `json:"token"`
	PID      int      `json:"pid"`
	MemFD    int      `json:"mem_fd"`
	MemBytes uint64   `json:"mem_bytes"`
	VCPUs    int      `json:"vcpus"`
	Devices  []string `json:"devices"`
}

// gangOp is the body of POST /v1/gang/op.
type gangOp struct {
	Token   string            `json:"token"`
	Op      string            `json:"op"` // start-dirty, fetch-dirty, stop-dirty, pause, resume, throttle, save-state, release
	Percent int               `json:"percent,omitempty"`
	Report  *migration.Report `json:"report,omitempty"` // release: the gang's report, for the VM's summary
}

// gangOpAnswer is what an op returns.
type gangOpAnswer struct {
	Dirty    string              `json:"dirty,omitempty"` // fetch-dirty: the bitmap's words, little endian, base64
	Sections []migration.Section `json:"sections,omitempty"`
}

// lease is a VM lent to a gang.
type lease struct {
	token string
	src   vmm.MigrationSource
	done  chan struct{} // closed on release

	mu                         sync.Mutex
	logging, paused, throttled bool
	released                   bool
}

// lend serves POST /v1/gang/lend.
func (p *vmProcess) lend(ctx context.Context, _ []byte, emit func(any)) (any, error) {
	m, err := p.machine()
	if err != nil {
		return nil, err
	}
	if err := p.stillArriving("lending it to a gang"); err != nil {
		return nil, err
	}
	if m.Config().Clone != nil {
		return nil, badRequest(fmt.Errorf("gang: VM %q is a clone of a template; a gang moves VMs of their own memory", p.name))
	}
	if m.Memory().Fd() < 0 {
		return nil, badRequest(fmt.Errorf("gang: VM %q has no memory file to lend", p.name))
	}
	var tok [16]byte
	rand.Read(tok[:])
	l := &lease{token: hex.EncodeToString(tok[:]), src: vmm.MigrationSource{M: m}, done: make(chan struct{})}
	p.mu.Lock()
	switch {
	case p.out != nil:
		p.mu.Unlock()
		return nil, conflict(fmt.Errorf("gang: VM %q is migrating already", p.name))
	case p.lease != nil:
		p.mu.Unlock()
		return nil, conflict(fmt.Errorf("gang: VM %q is lent to a gang already", p.name))
	case p.localizing:
		p.mu.Unlock()
		return nil, p.busyLocalizing("lending it to a gang")
	}
	p.lease = l
	p.mu.Unlock()
	d := l.src.Describe()
	emit(lendAnswer{Token: l.token, PID: os.Getpid(), MemFD: m.Memory().Fd(), MemBytes: m.Config().MemBytes, VCPUs: d.VCPUs, Devices: d.Devices})
	select {
	case <-l.done:
	case <-ctx.Done():
	}
	p.mu.Lock()
	p.lease = nil
	p.mu.Unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.released {
		return map[string]string{"lease": "released"}, nil
	}
	// The gang went away without releasing the VM: it runs on here, as it did.
	var errs []error
	if l.paused {
		errs = append(errs, l.src.Resume())
	}
	if l.throttled {
		errs = append(errs, l.src.SetThrottle(0))
	}
	if l.logging {
		errs = append(errs, l.src.StopDirtyLog())
	}
	fmt.Fprintf(os.Stderr, "godwit: VM %q: its gang migration ended without it; it runs on here\n", p.name)
	return map[string]string{"lease": "ended"}, errors.Join(errs...)
}

// gangOp serves POST /v1/gang/op.
func (p *vmProcess) gangOp(_ context.Context, body []byte) (any, error) {
	var op gangOp
	if err := json.Unmarshal(body, &op); err != nil {
		return nil, badRequest(fmt.Errorf("gang op: bad request: %w", err))
	}
	p.mu.Lock()
	l := p.lease
	p.mu.Unlock()
	if l == nil || op.Token != l.token {
		return nil, conflict(fmt.Errorf("gang op %s: VM %q is not lent to this gang", op.Op, p.name))
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.released {
		return nil, conflict(fmt.Errorf("gang op %s: VM %q was released", op.Op, p.name))
	}
	s := l.src
	switch op.Op {
	case "start-dirty":
		err := s.StartDirtyLog()
		l.logging = l.logging || err == nil
		return gangOpAnswer{}, err
	case "stop-dirty":
		err := s.StopDirtyLog()
		l.logging = l.logging && err != nil
		return gangOpAnswer{}, err
	case "fetch-dirty":
		b, err := s.FetchDirty()
		if err != nil {
			return nil, err
		}
		pages := s.M.Memory().Pages()
		words := make([]byte, (pages+63)/64*8)
		b[0].Words(pages, func(w, word uint64) bool {
			binary.LittleEndian.PutUint64(words[w*8:], word)
			return true
		})
		return gangOpAnswer{Dirty: base64.StdEncoding.EncodeToString(words)}, nil
	case "pause":
		err := s.Pause()
		l.paused = true // a failed pause may have stopped some vCPUs: resume them at the end
		return gangOpAnswer{}, err
	case "resume":
		err := s.Resume()
		l.paused = l.paused && err != nil
		return gangOpAnswer{}, err
	case "throttle":
		err := s.SetThrottle(op.Percent)
		l.throttled = op.Percent != 0 || (l.throttled && err != nil)
		return gangOpAnswer{}, err
	case "save-state":
		secs, err := s.SaveState()
		return gangOpAnswer{Sections: secs}, err
	case "release":
		// The VM runs at the destination now: this one ends as migrated.
		l.released = true
		close(l.done)
		s.M.Close()
		rep := op.Report
		if rep == nil {
			rep = &migration.Report{Result: migration.ResultOK}
		}
		select {
		case p.migrated <- rep:
		default:
		}
		return gangOpAnswer{}, nil
	}
	return nil, badRequest(fmt.Errorf("gang op %q: unknown", op.Op))
}

// lentVM is a VM lent to this process's gang: a migration.Source over its VM process.
type lentVM struct {
	name string
	cl   *control.Client
	ans  lendAnswer
	mem  *guestmem.Region // the VM's memfd, mapped here
	stop context.CancelFunc
	done chan error // the lend stream's end
}

var (
	_ migration.Source     = (*lentVM)(nil)
	_ migration.Throttler  = (*lentVM)(nil)
	_ migration.PageViewer = (*lentVM)(nil)
)

// borrow asks the VM process at sock to lend its VM, and maps its memory.
func borrow(ctx context.Context, name, sock string) (*lentVM, error) {
	lctx, stop := context.WithCancel(context.Background())
	v := &lentVM{name: name, cl: control.Dial(sock), stop: stop, done: make(chan error, 1)}
	first := make(chan lendAnswer, 1)
	go func() {
		got := false
		v.done <- v.cl.Stream(lctx, http.MethodPost, "/v1/gang/lend", nil, func(raw json.RawMessage) {
			var a lendAnswer
			if !got && json.Unmarshal(raw, &a) == nil {
				got = true
				first <- a
			}
		}, nil)
	}()
	select {
	case v.ans = <-first:
	case err := <-v.done:
		stop()
		return nil, fmt.Errorf("VM %q (%s): %w", name, sock, err)
	case <-ctx.Done():
		stop()
		return nil, context.Cause(ctx)
	}
	fd, err := openFDOf(v.ans.PID, v.ans.MemFD)
	if err == nil {
		v.mem, err = guestmem.OpenRegion("ram", 0, v.ans.MemBytes, fd)
	}
	if err != nil {
		v.giveBack()
		return nil, fmt.Errorf("VM %q: its memory: %w", name, err)
	}
	return v, nil
}

// openFDOf opens file descriptor fd of process pid for ourselves (a memfd: the same memory).
func openFDOf(pid, fd int) (int, error) {
	path := fmt.Sprintf("/proc/%d/fd/%d", pid, fd)
	nfd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", path, err)
	}
	return nfd, nil
}

// giveBack ends the lease (the VM process undoes what is left undone) and unmaps its memory.
func (v *lentVM) giveBack() {
	v.stop()
	select {
	case <-v.done:
	case <-time.After(10 * time.Second):
	}
	if v.mem != nil {
		v.mem.Close()
	}
}

func (v *lentVM) op(o gangOp) (gangOpAnswer, error) {
	o.Token = v.ans.Token
	var a gangOpAnswer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := v.cl.Call(ctx, http.MethodPost, "/v1/gang/op", o, &a)
	return a, err
}

func (v *lentVM) Describe() migration.Description {
	return migration.Description{
		Layout:  migration.Layout{PageSize: guestmem.PageSize, Regions: []migration.Region{{Name: "ram", GPA: 0, Size: v.ans.MemBytes}}},
		VCPUs:   v.ans.VCPUs,
		Devices: v.ans.Devices,
	}
}

func (v *lentVM) Populated() ([]migration.Bitmap, error) {
	b, err := v.mem.Populated()
	if err != nil {
		return nil, err
	}
	return []migration.Bitmap{migration.BitmapOf(b)}, nil
}

func (v *lentVM) StartDirtyLog() error { _, err := v.op(gangOp{Op: "start-dirty"}); return err }
func (v *lentVM) StopDirtyLog() error  { _, err := v.op(gangOp{Op: "stop-dirty"}); return err }
func (v *lentVM) Pause() error         { _, err := v.op(gangOp{Op: "pause"}); return err }
func (v *lentVM) Resume() error        { _, err := v.op(gangOp{Op: "resume"}); return err }

func (v *lentVM) SetThrottle(percent int) error {
	_, err := v.op(gangOp{Op: "throttle", Percent: percent})
	return err
}

func (v *lentVM) FetchDirty() ([]migration.Bitmap, error) {
	a, err := v.op(gangOp{Op: "fetch-dirty"})
	if err != nil {
		return nil, err
	}
	raw, err := base64.StdEncoding.DecodeString(a.Dirty)
	if err != nil || uint64(len(raw)) != (v.mem.Pages()+63)/64*8 {
		return nil, fmt.Errorf("VM %q: a dirty bitmap of %d bytes (%v)", v.name, len(raw), err)
	}
	words := make([]uint64, len(raw)/8)
	for i := range words {
		words[i] = binary.LittleEndian.Uint64(raw[i*8:])
	}
	return []migration.Bitmap{migration.BitmapOf(words)}, nil
}

func (v *lentVM) SaveState() ([]migration.Section, error) {
	a, err := v.op(gangOp{Op: "save-state"})
	return a.Sections, err
}

func (v *lentVM) ReadPages(r int, first uint64, dst []byte) error {
	if r != 0 {
		return fmt.Errorf("VM %q has no region %d", v.name, r)
	}
	n, err := v.mem.ReadAt(dst, int64(first*guestmem.PageSize))
	if err == nil && n != len(dst) {
		err = fmt.Errorf("VM %q: read %d of %d bytes at page %d", v.name, n, len(dst), first)
	}
	return err
}

// ViewPages: the memory is mapped here, and a source's pages are never missing.
func (v *lentVM) ViewPages(r int, first, n uint64) []byte {
	if r != 0 || first+n > v.mem.Pages() {
		return nil
	}
	return v.mem.Mem[first*guestmem.PageSize : (first+n)*guestmem.PageSize : (first+n)*guestmem.PageSize]
}

// release tells the VM process that its VM runs at the destination: it ends as migrated.
func (v *lentVM) release(rep *migration.Report) error {
	_, err := v.op(gangOp{Op: "release", Report: rep})
	return err
}
