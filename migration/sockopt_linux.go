//go:build linux

package migration

import (
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// setNotSentLowat sets TCP_NOTSENT_LOWAT on conn, if it is a TCP socket: from then on a write
// waits while v bytes or more sit in the socket's send buffer not yet sent, instead of filling
// the buffer (megabytes, with autotuning). It returns the previous value (0: the system's
// default, net.ipv4.tcp_notsent_lowat) and whether conn took it.
func setNotSentLowat(conn any, v int) (old int, ok bool) {
	return setTCPOpt(conn, unix.TCP_NOTSENT_LOWAT, v)
}

// setRecvWindow bounds what conn, if it is a TCP socket, lets the peer send ahead of what it
// has read (in flight plus unread) to about v bytes, by setting its receive buffer: SO_RCVBUF
// v, which the kernel doubles for its bookkeeping and advertises about half of. The buffer, not
// TCP_WINDOW_CLAMP, is what bounds it: on Linux 6.x a clamped socket (autotuned or not) kept
// megabytes unread in front of a slow reader, while the buffer held it to v. SO_RCVBUFFORCE
// lets v exceed net.core.rmem_max where the process may (CAP_NET_ADMIN); elsewhere the kernel
// caps v at rmem_max. Setting the buffer also ends its autotuning for the connection's life.
// It returns the previous value, to pass back to restore it, and whether conn took v.
func setRecvWindow(conn any, v int) (old int, ok bool) {
	ok = control(conn, func(fd int) (err error) {
		if old, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF); err != nil {
			return err
		}
		old /= 2 // the kernel reports the doubled size it keeps
		if err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, v); err != nil {
			err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, v)
		}
		return err
	})
	return old, ok
}

func setTCPOpt(conn any, opt, v int) (old int, ok bool) {
	ok = control(conn, func(fd int) (err error) {
		if old, err = unix.GetsockoptInt(fd, unix.IPPROTO_TCP, opt); err != nil {
			return err
		}
		return unix.SetsockoptInt(fd, unix.IPPROTO_TCP, opt, v)
	})
	return old, ok
}

// control runs f on conn's file descriptor, if conn is a socket or wraps one; it reports
// whether it could and f succeeded.
func control(conn any, f func(fd int) error) bool {
	// A wrapped connection (TLS) tunes the socket it wraps.
	for {
		w, ok := conn.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		conn = w.NetConn()
	}
	sc, isSock := conn.(syscall.Conn)
	if !isSock {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var ferr error
	err = rc.Control(func(fd uintptr) { ferr = f(int(fd)) })
	return err == nil && ferr == nil
}

// tcpMinRTT is the smallest round trip conn's TCP has seen (Linux keeps it over the last
// few minutes), or its smoothed round trip before it has a minimum.
func tcpMinRTT(conn any) (time.Duration, bool) {
	var info *unix.TCPInfo
	if !control(conn, func(fd int) (err error) {
		info, err = unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		return err
	}) {
		return 0, false
	}
	us := info.Min_rtt
	if us == 0 || us == ^uint32(0) {
		us = info.Rtt
	}
	return time.Duration(us) * time.Microsecond, us != 0
}
