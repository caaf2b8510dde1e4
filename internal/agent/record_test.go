package agent

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// TestRecordSaveLoad: a record comes back as it was saved; a record file that does not parse
// or names another VM is an error, not a VM forgotten.
func TestRecordSaveLoad(t *testing.T) {
	dir := t.TempDir()
	r := Record{Name: "web", PID: 42, Control: "/x/web.sock", Log: "/x/web.log", Args: []string{"--mem", "1G"}, Started: time.Unix(1700000000, 0).UTC(), State: Running}
	if err := r.Save(dir); err != nil {
		t.Fatal(err)
	}
	got, err := LoadRecords(dir)
	if err != nil || len(got) != 1 || !reflect.DeepEqual(got[0], r) {
		t.Fatalf("loaded %+v, %v; want %+v", got, err, r)
	}
	os.WriteFile(filepath.Join(dir, "db.json"), []byte(`{"name": "web"}`), 0o600)
	if _, err := LoadRecords(dir); err == nil || !strings.Contains(err.Error(), "names VM") {
		t.Errorf("a record under another name: %v", err)
	}
	os.WriteFile(filepath.Join(dir, "db.json"), []byte(`{`), 0o600)
	if _, err := LoadRecords(dir); err == nil {
		t.Error("a broken record: no error")
	}
}

// TestLastReport finds the summary 'godwit run --json' prints last among other log lines.
func TestLastReport(t *testing.T) {
	log := filepath.Join(t.TempDir(), "vm.log")
	os.WriteFile(log, []byte("godwit: VM \"web\" running\n{\n  \"result\": \"failed\"\n}\nnoise {\n{\n  \"result\": \"migrated\",\n  \"error\": \"x\"\n}\ngodwit: ended\n"), 0o600)
	if res, e := lastReport(log); res != "migrated" || e != "x" {
		t.Fatalf("lastReport = %q, %q", res, e)
	}
	if res, _ := lastReport(filepath.Join(t.TempDir(), "none")); res != "" {
		t.Fatalf("no log: %q", res)
	}
}

func FuzzLastReport(f *testing.F) {
	f.Add([]byte("{\n  \"result\": \"ok\"\n}\n"))
	f.Add([]byte("{\n{\n}\n}\n"))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		p := filepath.Join(dir, "log")
		os.WriteFile(p, b, 0o600)
		lastReport(p) // must not panic on any log
	})
}
