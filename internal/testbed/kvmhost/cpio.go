package kvmhost

import (
	"fmt"
	"io"
)

// cpioWriter writes the "newc" (SVR4, no checksum) cpio format, the only one the kernel's
// initramfs unpacker accepts. Each entry is a 110-byte ASCII header, the NUL-terminated name
// padded to 4 bytes, then the data padded to 4 bytes.
type cpioWriter struct {
	w   io.Writer
	ino uint32
	err error
}

const (
	cpioModeDir  = 0o040000
	cpioModeFile = 0o100000
	cpioModeChr  = 0o020000
)

func (c *cpioWriter) entry(name string, mode uint32, rdevMajor, rdevMinor uint32, data []byte) {
	if c.err != nil {
		return
	}
	c.ino++
	nlink := uint32(1)
	if mode&0o170000 == cpioModeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	buf := make([]byte, 0, len(hdr)+len(name)+8+len(data)+4)
	buf = append(buf, hdr...)
	buf = append(buf, name...)
	buf = append(buf, 0)
	buf = pad4(buf)
	buf = append(buf, data...)
	buf = pad4(buf)
	_, c.err = c.w.Write(buf)
}

func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func (c *cpioWriter) Dir(name string) { c.entry(name, cpioModeDir|0o755, 0, 0, nil) }
func (c *cpioWriter) File(name string, perm uint32, data []byte) {
	c.entry(name, cpioModeFile|perm, 0, 0, data)
}
func (c *cpioWriter) CharDev(name string, perm, major, minor uint32) {
	c.entry(name, cpioModeChr|perm, major, minor, nil)
}

// Close writes the trailer entry that ends the archive.
func (c *cpioWriter) Close() error {
	c.entry("TRAILER!!!", 0, 0, 0, nil)
	return c.err
}
