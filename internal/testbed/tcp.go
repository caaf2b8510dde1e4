package testbed

import (
	"fmt"
	"io"
	"net"
	"time"
)

// MeasureTCP sends n bytes over one TCP connection from host 0 to host 1 and returns the
// throughput the receiver saw, in bytes/s: the link's real capacity in this run, the baseline a
// migration's throughput is compared with. The clock starts at the first byte received, so
// connection set-up and slow start's first round trip are not counted.
func (tb *Testbed) MeasureTCP(n int64) (float64, error) {
	if n < 2 {
		return 0, fmt.Errorf("testbed: measure TCP: %d bytes is too few", n)
	}
	if len(tb.hosts) < 2 {
		return 0, fmt.Errorf("testbed: measure TCP: needs two hosts, have %d", len(tb.hosts))
	}
	src, dst := tb.hosts[0], tb.hosts[1]
	var ln net.Listener
	if err := dst.Do(func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(dst.Addr().String(), "0"))
		return err
	}); err != nil {
		return 0, fmt.Errorf("testbed: measure TCP: listen on host 1: %w", err)
	}
	defer ln.Close()
	type result struct {
		d   time.Duration
		err error
	}
	got := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		defer c.Close()
		buf := make([]byte, 1<<20)
		if _, err := io.ReadFull(c, buf[:1]); err != nil {
			got <- result{err: err}
			return
		}
		start := time.Now()
		k, err := io.CopyBuffer(io.Discard, io.LimitReader(c, n-1), buf)
		if err == nil && k != n-1 {
			err = fmt.Errorf("received %d of %d bytes", k+1, n)
		}
		got <- result{time.Since(start), err}
	}()
	var c net.Conn
	if err := src.Do(func() (err error) {
		c, err = net.Dial("tcp", ln.Addr().String())
		return err
	}); err != nil {
		return 0, fmt.Errorf("testbed: measure TCP: dial from host 0: %w", err)
	}
	defer c.Close()
	buf := make([]byte, 1<<20)
	for sent := int64(0); sent < n; {
		k := min(int64(len(buf)), n-sent)
		if _, err := c.Write(buf[:k]); err != nil {
			return 0, fmt.Errorf("testbed: measure TCP: send: %w", err)
		}
		sent += k
	}
	r := <-got
	if r.err != nil {
		return 0, fmt.Errorf("testbed: measure TCP: receive: %w", r.err)
	}
	return float64(n-1) / r.d.Seconds(), nil
}
