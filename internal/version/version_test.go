package version

import (
	"regexp"
	"runtime/debug"
	"testing"
)

func TestString(t *testing.T) {
	re := regexp.MustCompile(`^godwit \S+ \(go\S+, commit (unknown|[0-9a-f]{12}(\+dirty)?), protocol v\d+(, accepts v\d+)?\)$`)
	if s := String(); !re.MatchString(s) {
		t.Fatalf("String() = %q, want a match of %s", s, re)
	}
}

func TestCommit(t *testing.T) {
	rev := "0123456789abcdef0123456789abcdef01234567"
	for _, c := range []struct {
		settings []debug.BuildSetting
		want     string
	}{
		{nil, ""},
		{[]debug.BuildSetting{{Key: "vcs.revision", Value: rev}}, "0123456789ab"},
		{[]debug.BuildSetting{{Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: "true"}}, "0123456789ab+dirty"},
		{[]debug.BuildSetting{{Key: "vcs.modified", Value: "true"}}, ""},
	} {
		if got := commit(c.settings); got != c.want {
			t.Errorf("commit(%v) = %q, want %q", c.settings, got, c.want)
		}
	}
}
