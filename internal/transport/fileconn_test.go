package transport

import (
	"bufio"
	"context"
	"io"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// pair returns both ends of a Unix connection made by Listen and Dial.
func pair(t *testing.T) (accepted, dialled net.Conn) {
	a, _ := Parse("unix:" + filepath.Join(t.TempDir(), "s.sock"))
	ln, err := a.Listen()
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		got <- c
	}()
	d, err := a.Dial(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	c := <-got
	if c == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); d.Close() })
	return c, d
}

// TestFileConnKeepsFDs: descriptors passed beside bytes survive a reader that reads bytes only
// (bufio), and refer to the same file.
func TestFileConnKeepsFDs(t *testing.T) {
	src, dst := pair(t)
	fc, ok := dst.(*FileConn)
	if !ok {
		t.Fatalf("a Unix connection is %T, want *FileConn", dst)
	}
	mem, err := unix.MemfdCreate("test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(mem)
	unix.Pwrite(mem, []byte("memory"), 100)
	if _, _, err := src.(*FileConn).WriteMsgUnix([]byte("frame with files"), syscall.UnixRights(mem, mem), nil); err != nil {
		t.Fatal(err)
	}
	io.WriteString(src, ", then more bytes")
	src.Close()
	b, err := io.ReadAll(bufio.NewReaderSize(dst, 16))
	if err != nil || string(b) != "frame with files, then more bytes" {
		t.Fatalf("read %q: %v", b, err)
	}
	fds := fc.TakeFDs()
	if len(fds) != 2 {
		t.Fatalf("took %d descriptors, want 2", len(fds))
	}
	for _, fd := range fds {
		back := make([]byte, 6)
		if _, err := unix.Pread(fd, back, 100); err != nil || string(back) != "memory" {
			t.Fatalf("descriptor %d reads %q: %v", fd, back, err)
		}
		unix.Close(fd)
	}
	if again := fc.TakeFDs(); len(again) != 0 {
		t.Fatalf("taken twice: %v", again)
	}
}

// TestFileConnTooManyFDs: a message with more descriptors than a read takes breaks the
// connection with an error that says so, and none of them leaks.
func TestFileConnTooManyFDs(t *testing.T) {
	src, dst := pair(t)
	fds := make([]int, maxFDsPerRead+1)
	for i := range fds {
		fds[i], _ = unix.Dup(0)
		defer unix.Close(fds[i])
	}
	if _, _, err := src.(*FileConn).WriteMsgUnix([]byte("x"), syscall.UnixRights(fds...), nil); err != nil {
		t.Fatal(err)
	}
	_, err := dst.Read(make([]byte, 10))
	if err == nil || !strings.Contains(err.Error(), "more than") {
		t.Fatalf("read: %v", err)
	}
	if _, again := dst.Read(make([]byte, 10)); again != err {
		t.Fatalf("read after the error: %v", again)
	}
}
