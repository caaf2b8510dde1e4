package version

import (
	"regexp"
	"testing"
)

func TestString(t *testing.T) {
	re := regexp.MustCompile(`^godwit \S+ \(commit (unknown|[0-9a-f]{12}(\+dirty)?), go\S+\)$`)
	if s := String(); !re.MatchString(s) {
		t.Fatalf("String() = %q, want a match of %s", s, re)
	}
}
