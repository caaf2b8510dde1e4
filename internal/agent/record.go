package agent

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// VM states as the agent reports them.
const (
	Running = "running" // its process runs
	Exited  = "exited"  // it ended on request or migrated away (its last report says ok or migrated)
	Failed  = "failed"  // it ended otherwise: killed, crashed, its guest failed or found corrupt memory
)

// Record is what the agent keeps of one VM, in STATE/vms/NAME.json: enough to find its process
// again after the agent restarts (the VM process outlives the agent) and to say how it ended.
type Record struct {
	Name    string    `json:"name"`
	PID     int       `json:"pid"`
	Control string    `json:"control"` // the VM process's control socket
	Log     string    `json:"log"`     // its standard output and error
	Args    []string  `json:"args"`    // the 'godwit run' flags it was started with
	Started time.Time `json:"started"`
	State   string    `json:"state"`
	// Route, for a VM process that waits for a migration from another agent, is the route on
	// this agent's --listen port that reaches it (see transport.Router).
	Route string `json:"route,omitempty"`
	// Adopted says that an agent started after this VM's took it over.
	Adopted bool       `json:"adopted,omitempty"`
	Ended   *time.Time `json:"ended,omitempty"`
	// How it ended: the process's exit ("exit status 1", "signal: killed"; unknown for an
	// adopted VM, whose exit status went to the agent that started it), and the result and
	// error of the last report it printed.
	Exit   string `json:"exit,omitempty"`
	Result string `json:"result,omitempty"`
	Error  string `json:"error,omitempty"`
}

// nameRE is what a VM may be called: it names files in the state directory and a path of the
// API.
var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

func checkName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("VM name %q: want 1 to 63 letters, digits, '.', '_' or '-', not starting with '.', '_' or '-'", name)
	}
	return nil
}

// Save writes the record to dir, atomically: a crash leaves the old one or the new one.
func (r Record) Save(dir string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(dir, r.Name+".json")
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("agent: saving VM %q: %w", r.Name, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("agent: saving VM %q: %w", r.Name, err)
	}
	return nil
}

// LoadRecords reads every record in dir. A record that cannot be read is an error that names
// it: the agent must not forget a VM that may still run.
func LoadRecords(dir string) ([]Record, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return nil, err
	}
	var out []Record
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		var r Record
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, fmt.Errorf("agent: VM record %s: %w", p, err)
		}
		if err := checkName(r.Name); err != nil || filepath.Base(p) != r.Name+".json" {
			return nil, fmt.Errorf("agent: VM record %s names VM %q", p, r.Name)
		}
		out = append(out, r)
	}
	return out, nil
}

// lastReport finds the last JSON object 'godwit run --json' printed in its log: the summary
// it prints when the VM ends (its result and error).
func lastReport(log string) (result, errText string) {
	f, err := os.Open(log)
	if err != nil {
		return "", ""
	}
	defer f.Close()
	// The summary is an indented object whose first line is "{" and last "}".
	var cur, last bytes.Buffer
	in := false
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "{":
			in = true
			cur.Reset()
			cur.WriteString(line)
		case in:
			cur.WriteString(line)
			if line == "}" {
				in = false
				last.Reset()
				last.Write(cur.Bytes())
			}
		}
	}
	var s struct {
		Result string `json:"result"`
		Error  string `json:"error"`
	}
	if json.Unmarshal(last.Bytes(), &s) != nil {
		return "", ""
	}
	return s.Result, s.Error
}

// tailLines is the last n lines of a log, for an error.
func tailLines(log string, n int) string {
	b, err := os.ReadFile(log)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

var errDraining = errors.New("agent: shutting down: no new work")
