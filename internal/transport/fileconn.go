package transport

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
)

// FileConn is a Unix connection that keeps the file descriptors its peer passes beside the
// bytes (SCM_RIGHTS), until TakeFDs takes them: every read is a recvmsg with room for them, so
// that none is lost to a reader that reads bytes only (the kernel closes descriptors that
// arrive without room for them). It writes them with WriteMsgUnix, its *net.UnixConn's.
type FileConn struct {
	*net.UnixConn

	mu  sync.Mutex
	fds []int // received and not yet taken
	oob []byte
	err error // a message whose descriptors did not fit: the stream is broken for good
}

// maxFDsPerRead bounds the descriptors one read takes: a handover passes one per memory
// region, and guest memory has few. More in one message break the connection.
const maxFDsPerRead = 64

// Read reads bytes and keeps any descriptors that arrive with them.
func (c *FileConn) Read(b []byte) (int, error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return 0, c.err
	}
	if c.oob == nil {
		c.oob = make([]byte, syscall.CmsgSpace(4*maxFDsPerRead))
	}
	oob := c.oob
	c.mu.Unlock()
	n, oobn, flags, _, err := c.ReadMsgUnix(b, oob)
	n, oobn = max(n, 0), max(oobn, 0) // -1 on an error, which Read may not return
	// The end of the stream is io.EOF, as for Read (ReadMsgUnix wraps it, or returns 0 bytes).
	if errors.Is(err, io.EOF) || (err == nil && n == 0 && oobn == 0 && len(b) > 0) {
		err = io.EOF
	}
	if oobn == 0 && flags&syscall.MSG_CTRUNC == 0 {
		return n, err
	}
	fds, perr := parseRights(oob[:oobn])
	c.mu.Lock()
	defer c.mu.Unlock()
	c.fds = append(c.fds, fds...)
	switch {
	case flags&syscall.MSG_CTRUNC != 0:
		c.err = fmt.Errorf("transport: the peer passed more than %d file descriptors in one message", maxFDsPerRead)
	case perr != nil:
		c.err = fmt.Errorf("transport: a control message from the peer: %w", perr)
	}
	if c.err != nil {
		return n, c.err
	}
	return n, err
}

// parseRights returns the descriptors of the SCM_RIGHTS messages in oob.
func parseRights(oob []byte) ([]int, error) {
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for i := range msgs {
		if msgs[i].Header.Level != syscall.SOL_SOCKET || msgs[i].Header.Type != syscall.SCM_RIGHTS {
			continue
		}
		got, err := syscall.ParseUnixRights(&msgs[i])
		if err != nil {
			return fds, err
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

// TakeFDs returns the descriptors received so far, in order, and forgets them: they are the
// caller's to close.
func (c *FileConn) TakeFDs() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	fds := c.fds
	c.fds = nil
	return fds
}

// Close closes the connection and every descriptor received and not taken.
func (c *FileConn) Close() error {
	for _, fd := range c.TakeFDs() {
		syscall.Close(fd)
	}
	return c.UnixConn.Close()
}
