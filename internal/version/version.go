// Package version says which godwit this is: the release, the commit it was built from, the Go
// toolchain and the migration protocol, for --version, the JSON reports and the logs of both
// sides of a migration.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/godwit-vm/godwit/migration/wire"
)

// Version is the release. A release build sets it with
// -ldflags "-X github.com/godwit-vm/godwit/internal/version.Version=X.Y.Z".
var Version = "0.3.0-dev"

// Commit is the VCS revision the binary was built from (12 digits, "+dirty" when the work tree
// had changes), or "" when the build recorded none (go run, go test, -buildvcs=false).
func Commit() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	return commit(info.Settings)
}

func commit(settings []debug.BuildSetting) string {
	var rev string
	var dirty bool
	for _, s := range settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if rev != "" && dirty {
		rev += "+dirty"
	}
	return rev
}

// String is the one-line description, e.g.
// "godwit 0.3.0-dev (go1.26.8, commit 0123456789ab, protocol v1)". The protocol is the newest
// this build speaks, with the oldest it still accepts when that is another.
func String() string {
	c := Commit()
	if c == "" {
		c = "unknown"
	}
	proto := fmt.Sprintf("protocol v%d", wire.Version)
	if wire.MinVersion != wire.Version {
		proto += fmt.Sprintf(", accepts v%d", wire.MinVersion)
	}
	return fmt.Sprintf("godwit %s (%s, commit %s, %s)", Version, runtime.Version(), c, proto)
}
