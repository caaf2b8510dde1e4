// Package version says which godwit this is: the release, the commit it was built from and the
// Go toolchain, for --version, the JSON reports and the logs of both sides of a migration.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Version is the release. Builds of a release set it with
// -ldflags "-X github.com/godwit-vm/godwit/internal/version.Version=X.Y.Z".
var Version = "0.3.0-dev"

// Commit is the VCS revision the binary was built from (12 digits, "+dirty" when the work tree
// had changes), or "" when the build recorded none (go run, go test).
func Commit() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	var rev string
	var dirty bool
	for _, s := range info.Settings {
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

// String is the one-line description: "godwit 0.3.0-dev (commit 0123456789ab, go1.26.8)".
func String() string {
	commit := Commit()
	if commit == "" {
		commit = "unknown"
	}
	return fmt.Sprintf("godwit %s (commit %s, %s)", Version, commit, runtime.Version())
}
