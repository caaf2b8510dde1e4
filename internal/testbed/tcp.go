package testbed

import (
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// MeasureTCP sends n bytes over one TCP connection from host 0 to host 1 and returns the
// throughput the receiver saw, in bytes/s: the link's real capacity in this run, the baseline a
// migration's throughput is compared with. The clock starts at the first byte received, so
// connection set-up and slow start's first round trip are not counted.
func (tb *Testbed) MeasureTCP(n int64) (float64, error) { return tb.MeasureTCPConns(n, 1) }

// MeasureTCPConns is MeasureTCP over conns connections at once, n/conns bytes each: the
// baseline of a migration that uses as many. The clock runs from the first byte received on
// any of them to the last.
func (tb *Testbed) MeasureTCPConns(n int64, conns int) (float64, error) {
	if conns < 1 || n < 2*int64(conns) {
		return 0, fmt.Errorf("testbed: measure TCP: %d bytes over %d connections", n, conns)
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
	each := n / int64(conns)
	var mu sync.Mutex
	var first, last time.Time
	errs := make(chan error, conns)
	go func() {
		for range conns {
			c, err := ln.Accept()
			if err != nil {
				errs <- err
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 1<<20)
				if _, err := io.ReadFull(c, buf[:1]); err != nil {
					errs <- err
					return
				}
				mu.Lock()
				if first.IsZero() {
					first = time.Now()
				}
				mu.Unlock()
				k, err := io.CopyBuffer(io.Discard, io.LimitReader(c, each-1), buf)
				if err == nil && k != each-1 {
					err = fmt.Errorf("received %d of %d bytes", k+1, each)
				}
				mu.Lock()
				last = time.Now()
				mu.Unlock()
				errs <- err
			}()
		}
	}()
	var sendErr error
	var wg sync.WaitGroup
	var once sync.Once
	for range conns {
		var c net.Conn
		if err := src.Do(func() (err error) {
			c, err = net.Dial("tcp", ln.Addr().String())
			return err
		}); err != nil {
			return 0, fmt.Errorf("testbed: measure TCP: dial from host 0: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			buf := make([]byte, 1<<20)
			for sent := int64(0); sent < each; {
				k := min(int64(len(buf)), each-sent)
				if _, err := c.Write(buf[:k]); err != nil {
					once.Do(func() { sendErr = err })
					return
				}
				sent += k
			}
		}()
	}
	wg.Wait()
	if sendErr != nil {
		return 0, fmt.Errorf("testbed: measure TCP: send: %w", sendErr)
	}
	for range conns {
		if err := <-errs; err != nil {
			return 0, fmt.Errorf("testbed: measure TCP: receive: %w", err)
		}
	}
	return float64(each*int64(conns)-1) / last.Sub(first).Seconds(), nil
}
