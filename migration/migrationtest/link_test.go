package migrationtest

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"testing/synctest"
	"time"
)

func TestLinkBuffersAndPaces(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := Link(LinkConfig{Buffer: 1000, Latency: 10 * time.Millisecond, Bandwidth: 100e3})
		start := time.Now()
		// Within the buffer, a write does not wait for the reader.
		if n, err := a.Write(bytes.Repeat([]byte{1}, 600)); n != 600 || err != nil {
			t.Fatalf("write: %d, %v", n, err)
		}
		if time.Since(start) != 0 {
			t.Fatalf("a write within the buffer waited %v", time.Since(start))
		}
		// Past it, the writer waits until the reader makes room.
		done := make(chan time.Duration)
		go func() {
			a.Write(bytes.Repeat([]byte{2}, 1000))
			done <- time.Since(start)
		}()
		// 600 bytes at 100 kB/s go out in 6ms and arrive 10ms later.
		buf := make([]byte, 2000)
		n, err := b.Read(buf)
		if n != 600 || err != nil || time.Since(start) != 16*time.Millisecond {
			t.Fatalf("read %d, %v after %v; want 600 bytes after 16ms", n, err, time.Since(start))
		}
		got := n
		for got < 1600 {
			n, err := b.Read(buf)
			if err != nil {
				t.Fatal(err)
			}
			got += n
		}
		if w := <-done; w < 16*time.Millisecond {
			t.Fatalf("the second write returned after %v, before the reader made room", w)
		}
	})
}

func TestLinkDeadlinesAndClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := Link(LinkConfig{})
		errc := make(chan error)
		go func() {
			_, err := b.Read(make([]byte, 10))
			errc <- err
		}()
		time.Sleep(time.Second)
		b.SetDeadline(time.Unix(1, 0)) // interrupts the blocked read
		if err := <-errc; !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("read after an expired deadline: %v", err)
		}
		b.SetDeadline(time.Now().Add(time.Second))
		a.Write([]byte("hello"))
		a.(interface{ CloseWrite() error }).CloseWrite()
		data, err := io.ReadAll(b)
		if string(data) != "hello" || err != nil {
			t.Fatalf("read %q, %v", data, err)
		}
		// Nothing comes the other way: a future deadline ends the wait when it passes.
		a.SetReadDeadline(time.Now().Add(time.Second))
		t0 := time.Now()
		if _, err := a.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) || time.Since(t0) != time.Second {
			t.Fatalf("read with a deadline 1s ahead: %v after %v", err, time.Since(t0))
		}
		b.Close()
		if _, err := a.Write([]byte("x")); err == nil {
			t.Fatalf("write to a closed peer succeeded")
		}
		if _, err := b.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read on a closed end: %v", err)
		}
	})
}
