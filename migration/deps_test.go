package migration_test

import (
	"go/build"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

const module = "github.com/godwit-vm/godwit"

// TestLayering keeps the engine independent of the VMM: migration and its subpackages import
// nothing from internal/, wire and pages know nothing of each other or of the engine.
func TestLayering(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Dir(filepath.Dir(file)) // the module root
	forbidden := map[string][]string{
		"migration":               {"internal/"},
		"migration/migrationtest": {"internal/"},
		"migration/wire":          {"internal/", "migration"},
		"migration/pages":         {"internal/", "migration"},
	}
	for pkg, bad := range forbidden {
		for dep := range moduleDeps(t, root, module+"/"+pkg) {
			rel := strings.TrimPrefix(dep, module+"/")
			for _, b := range bad {
				if strings.HasPrefix(rel+"/", strings.TrimSuffix(b, "/")+"/") {
					t.Errorf("%s depends on %s", pkg, rel)
				}
			}
		}
	}
	// The walk must see real edges, or the test proves nothing.
	if deps := moduleDeps(t, root, module+"/migration"); !deps[module+"/migration/wire"] || !deps[module+"/migration/pages"] {
		t.Fatalf("migration's module dependencies %v lack wire and pages", deps)
	}
}

// moduleDeps returns the module's packages that pkg imports, directly or not (tests excluded).
func moduleDeps(t *testing.T, root, pkg string) map[string]bool {
	seen := map[string]bool{}
	var walk func(string)
	walk = func(p string) {
		bp, err := build.Default.Import(p, root, 0)
		if err != nil {
			bp, err = build.Default.ImportDir(filepath.Join(root, strings.TrimPrefix(p, module+"/")), 0)
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
		}
		for _, imp := range bp.Imports {
			if strings.HasPrefix(imp, module+"/") && !seen[imp] {
				seen[imp] = true
				walk(imp)
			}
		}
	}
	walk(pkg)
	return seen
}
