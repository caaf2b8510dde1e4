package kvmhost

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// moduleIndex describes the loadable modules of one unpacked kernel tree
// (lib/modules/RELEASE). Debian's kernel package does not ship modules.dep (depmod runs at
// install time, and the package is never installed here), so dependencies are read from each
// module's own .modinfo section, the same data depmod uses.
type moduleIndex struct {
	dir     string            // lib/modules/RELEASE
	path    map[string]string // module name -> file path
	builtin map[string]bool   // module names compiled into the kernel image
}

// canonicalModule turns a file or dependency name into the kernel's module name: the kernel
// treats '-' and '_' alike and reports names with '_'.
func canonicalModule(name string) string {
	name = strings.TrimSuffix(filepath.Base(name), ".ko")
	return strings.ReplaceAll(name, "-", "_")
}

func loadModuleIndex(dir string) (*moduleIndex, error) {
	idx := &moduleIndex{dir: dir, path: map[string]string{}, builtin: map[string]bool{}}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		switch {
		case strings.HasSuffix(p, ".ko"):
			name := canonicalModule(p)
			if _, dup := idx.path[name]; !dup {
				idx.path[name] = p
			}
		case strings.HasSuffix(p, ".ko.xz"), strings.HasSuffix(p, ".ko.zst"), strings.HasSuffix(p, ".ko.gz"):
			// Compressed modules would need decompressing before busybox insmod can
			// load them; the Debian 6.1 kernels this is built for ship plain .ko files.
			return fmt.Errorf("compressed kernel module %s is not supported (only plain .ko files are)", p)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("indexing kernel modules in %s: %w", dir, err)
	}
	if len(idx.path) == 0 {
		return nil, fmt.Errorf("no kernel modules (*.ko) found in %s", dir)
	}
	if f, err := os.Open(filepath.Join(dir, "modules.builtin")); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if line := strings.TrimSpace(sc.Text()); line != "" {
				idx.builtin[canonicalModule(line)] = true
			}
		}
		f.Close()
		if err := sc.Err(); err != nil {
			return nil, fmt.Errorf("reading %s/modules.builtin: %w", dir, err)
		}
	}
	return idx, nil
}

// moduleDepends returns the "depends=" list recorded in a module's .modinfo section.
func moduleDepends(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading kernel module %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("kernel module %s has no .modinfo section", path)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("reading .modinfo of %s: %w", path, err)
	}
	var deps []string
	for _, kv := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			for _, d := range strings.Split(string(v), ",") {
				if d = strings.TrimSpace(d); d != "" {
					deps = append(deps, canonicalModule(d))
				}
			}
		}
	}
	return deps, nil
}

// loadOrder returns the modules to insmod, dependencies first, for the wanted modules in the
// given order. Built-in modules are left out; a module that is neither built in nor present is
// an error naming who needed it.
func (idx *moduleIndex) loadOrder(wanted []string) ([]string, error) {
	var order []string
	state := map[string]int{} // 1: visiting, 2: done
	var visit func(name, neededBy string) error
	visit = func(name, neededBy string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("kernel module dependency cycle through %s", name)
		case 2:
			return nil
		}
		if idx.builtin[name] {
			state[name] = 2
			return nil
		}
		p, ok := idx.path[name]
		if !ok {
			if neededBy != "" {
				return fmt.Errorf("kernel module %s (needed by %s) not found in %s", name, neededBy, idx.dir)
			}
			return fmt.Errorf("kernel module %s not found in %s", name, idx.dir)
		}
		state[name] = 1
		deps, err := moduleDepends(p)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d, name); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, name)
		return nil
	}
	for _, w := range wanted {
		if err := visit(canonicalModule(w), ""); err != nil {
			return nil, err
		}
	}
	return order, nil
}
