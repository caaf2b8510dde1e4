module github.com/godwit-vm/godwit

go 1.26.8

require (
	github.com/alecthomas/kong v1.17.0
	github.com/vishvananda/netlink v1.3.1
	github.com/vishvananda/netns v0.0.5
	golang.org/x/sys v0.49.0
)
