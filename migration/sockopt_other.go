//go:build !linux

package migration

import "time"

// Outside Linux these do nothing: the push then queues as much as the sockets take.

func setNotSentLowat(conn any, v int) (old int, ok bool) { return 0, false }
func setRecvWindow(conn any, v int) (old int, ok bool)   { return 0, false }

func tcpMinRTT(conn any) (time.Duration, bool) { return 0, false }
