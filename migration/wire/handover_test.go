package wire

import (
	"bytes"
	"errors"
	"net"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// handoverSourceStream writes a legal handover from the source: Hello, Memory, state, Complete.
func handoverSourceStream(t testing.TB) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	d := testDesc()
	for _, err := range []error{
		w.WritePreamble(),
		w.WriteHello(&Hello{Caps: CapHandover | CapBlackout, Desc: d}),
		w.WriteRawFrame(TypeMemory, 0, AppendMemory(nil, &Memory{Sizes: []uint64{d.Regions[0].Size, d.Regions[1].Size}})),
		w.WriteSection(&Section{ID: "vcpu0", Version: 3, Data: []byte("registers")}, 0),
		w.WriteSection(&Section{ID: "vcpu1", Version: 3}, 0),
		w.WriteSection(&Section{ID: "serial", Version: 1}, 0),
		w.WriteComplete(&Complete{PauseUnixNano: 5, Sections: 3}),
		w.WriteDoneAck(),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}

// handoverDestStream writes a legal handover from the destination.
func handoverDestStream(t testing.TB) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	for _, err := range []error{
		w.WritePreamble(),
		w.WriteWelcome(&Welcome{Caps: CapHandover | CapBlackout}),
		w.WriteMemoryAck(),
		w.WriteResumed(&Resumed{ResumeUnixNano: 9}),
		w.WriteDone(&Done{}),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}

func TestSharedMemoryStream(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	d := testDesc()
	w.WritePreamble()
	w.WriteHello(&Hello{Caps: CapShared, Desc: d})
	if err := w.WriteMemory(&Memory{Sizes: []uint64{d.Regions[0].Size, d.Regions[1].Size}, ID: [16]byte{7}}, nil); err != nil {
		t.Fatalf("shared memory on a buffer (no files to pass): %v", err)
	}
	w.WriteComplete(&Complete{})
	w.WriteDoneAck()
	got, err := readAll(buf.Bytes(), AtDestination, CapShared)
	if err != nil || len(got) != 4 || !strings.Contains(got[1], "ID:[7 0 ") {
		t.Fatalf("read %q: %v", got, err)
	}
}

func TestHandoverStream(t *testing.T) {
	got, err := readAll(handoverSourceStream(t), AtDestination, CapHandover|CapBlackout)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 7 || !strings.HasPrefix(got[1], "memory &{Sizes:[32768 8192] ID:[0 0 ") {
		t.Fatalf("destination read %q", got)
	}
	got, err = readAll(handoverDestStream(t), AtSource, CapHandover|CapBlackout)
	if err != nil || len(got) != 4 || got[1] != "memory ack &{}" {
		t.Fatalf("source read %q: %v", got, err)
	}
}

// TestHandoverRefused: a handover stream that breaks the rules fails with the right error.
func TestHandoverRefused(t *testing.T) {
	d := testDesc()
	sizes := []uint64{d.Regions[0].Size, d.Regions[1].Size}
	source := func(caps Caps, frames func(w *Writer)) []byte {
		var buf bytes.Buffer
		w := NewWriter(&buf)
		w.WritePreamble()
		w.WriteHello(&Hello{Caps: caps, Desc: d})
		frames(w)
		return buf.Bytes()
	}
	memory := func(s []uint64) func(w *Writer) {
		return func(w *Writer) { w.WriteRawFrame(TypeMemory, 0, AppendMemory(nil, &Memory{Sizes: s})) }
	}
	for _, c := range []struct {
		name string
		data []byte
		caps Caps
		kind error
	}{
		{"memory without the capability", source(0, memory(sizes)), 0, ErrOrder},
		{"a round instead of memory", source(CapHandover, func(w *Writer) { w.WriteRound(&Round{N: 1}) }), CapHandover, ErrOrder},
		{"state before memory", source(CapHandover, func(w *Writer) { w.WriteSection(&Section{ID: "vcpu0"}, 0) }), CapHandover, ErrOrder},
		{"a region short", source(CapHandover, memory(sizes[:1])), CapHandover, ErrMalformed},
		{"a size not the hello's", source(CapHandover, memory([]uint64{sizes[0], sizes[1] * 2})), CapHandover, ErrMalformed},
		{"pages after memory", source(CapHandover, func(w *Writer) {
			memory(sizes)(w)
			w.WriteRound(&Round{N: 1, Final: true})
		}), CapHandover, ErrOrder},
		{"a second memory", source(CapHandover, func(w *Writer) { memory(sizes)(w); memory(sizes)(w) }), CapHandover, ErrOrder},
		{"shared memory without an id", source(CapShared, memory(sizes)), CapShared, ErrMalformed},
		{"an id in a handover", source(CapHandover, func(w *Writer) {
			w.WriteRawFrame(TypeMemory, 0, AppendMemory(nil, &Memory{Sizes: sizes, ID: [16]byte{1}}))
		}), CapHandover, ErrMalformed},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := readAll(c.data, AtDestination, c.caps)
			if !errors.Is(err, c.kind) {
				t.Fatalf("got %v, want %v", err, c.kind)
			}
			t.Log(err)
		})
	}
	// At the source: Resumed before the memory was acknowledged.
	var buf bytes.Buffer
	w := NewWriter(&buf)
	w.WritePreamble()
	w.WriteWelcome(&Welcome{Caps: CapHandover})
	w.WriteResumed(&Resumed{})
	if _, err := readAll(buf.Bytes(), AtSource, CapHandover); !errors.Is(err, ErrOrder) {
		t.Fatalf("resumed before the memory ack: %v", err)
	}
}

// TestWriteMemoryPassesFiles: the Memory frame's files arrive beside its bytes on a real Unix
// socket pair, as files of the same memory.
func TestWriteMemoryPassesFiles(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socket")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UnixConn)
	}
	a, b := conn(fds[0]), conn(fds[1])
	mem, err := unix.MemfdCreate("test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(mem)
	unix.Pwrite(mem, []byte("guest"), 4096)
	w := NewWriter(a)
	if err := w.WriteMemory(&Memory{Sizes: []uint64{8192}}, []int{mem}); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 1024)
	oob := make([]byte, syscall.CmsgSpace(4*4))
	n, oobn, _, _, err := b.ReadMsgUnix(p, oob)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := syscall.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		t.Fatalf("control messages %v: %v", msgs, err)
	}
	got, err := syscall.ParseUnixRights(&msgs[0])
	if err != nil || len(got) != 1 {
		t.Fatalf("rights %v: %v", got, err)
	}
	defer unix.Close(got[0])
	back := make([]byte, 5)
	if _, err := unix.Pread(got[0], back, 4096); err != nil || string(back) != "guest" {
		t.Fatalf("the file passed reads %q: %v", back, err)
	}
	r := NewReader(bytes.NewReader(append(preamble(), p[:n]...)), AtDestination)
	r.SetCaps(CapHandover)
	if _, err := r.ReadPreamble(); err != nil {
		t.Fatal(err)
	}
	r.st, r.desc = stStream, &Description{PageSize: testPS, Regions: []Region{{Name: "ram", Size: 8192}}}
	m, err := r.Next()
	if err != nil {
		t.Fatal(err)
	}
	if mm, ok := m.(*Memory); !ok || !slices.Equal(mm.Sizes, []uint64{8192}) {
		t.Fatalf("read %+v", m)
	}
	// Not a Unix socket: refused before anything is written.
	var buf bytes.Buffer
	if err := NewWriter(&buf).WriteMemory(&Memory{Sizes: []uint64{8192}}, []int{mem}); err == nil || buf.Len() != 0 {
		t.Fatalf("memory on a buffer: %v, %d bytes written", err, buf.Len())
	}
}

// preamble is a version-1 preamble.
func preamble() []byte {
	var buf bytes.Buffer
	NewWriter(&buf).WritePreamble()
	return buf.Bytes()
}
