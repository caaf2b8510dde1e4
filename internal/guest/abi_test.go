package guest

import (
	"go/ast"
	"go/constant"
	"go/parser"
	"go/token"
	"go/types"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// goToC names the abi.h macro that mirrors each constant of abi.go.
var goToC = map[string]string{
	"PageSize": "PAGE_SIZE", "GDTGPA": "GDT_GPA", "ParamsGPA": "PARAMS_GPA", "ParamsSize": "PARAMS_SIZE",
	"PML4GPA": "PML4_GPA", "PDPTGPA": "PDPT_GPA", "PDBaseGPA": "PD_BASE_GPA", "MaxPDs": "MAX_PDS",
	"MailboxGPA": "MAILBOX_GPA", "EntryGPA": "ENTRY_GPA", "ImageMax": "IMAGE_MAX", "StackGPA": "STACK_GPA",
	"StackSize": "STACK_SIZE", "MaxVCPUs": "MAX_VCPUS", "DataGPA": "DATA_GPA",

	"PortConsole": "PORT_CONSOLE", "PortHeartbeat": "PORT_HEARTBEAT", "PortSleep": "PORT_SLEEP",
	"PortVerified": "PORT_VERIFIED", "PortExit": "PORT_EXIT", "PortPanic": "PORT_PANIC",
	"PortFreePages": "PORT_FREE_PAGES", "PortFreeDone": "PORT_FREE_DONE", "CmdReportFree": "CMD_REPORT_FREE",
	"WorkloadChurn": "WORKLOAD_CHURN", "VersionFree": "VERSION_FREE", "VersionMask": "VERSION_MASK",
	"MbPagesFree": "MB_PAGES_FREE", "MbFreeList": "MB_FREE_LIST", "MbFreeMax": "MB_FREE_MAX",
	"PortBalloonTarget": "PORT_BALLOON_TARGET", "PortBalloonInflate": "PORT_BALLOON_INFLATE", "CmdBalloon": "CMD_BALLOON",
	"BalloonAuto": "BALLOON_AUTO", "MbBalloonPages": "MB_BALLOON_PAGES",
	"PortBalloonHeld": "PORT_BALLOON_HELD", "CmdBalloonList": "CMD_BALLOON_LIST",
	"PortDiverge": "PORT_DIVERGE", "CmdDiverge": "CMD_DIVERGE",
	"MbBalloonDeflate": "MB_BALLOON_DEFLATED", "MbBalloonDemand": "MB_BALLOON_DEMAND", "ParPeakPermille": "PAR_PEAK_PERMILLE",
	"ParPrivatePermille": "PAR_PRIVATE_PERMILLE", "ParNearPermille": "PAR_NEAR_PERMILLE", "ParPrivateSeed": "PAR_PRIVATE_SEED",

	"CmdContinue": "CMD_CONTINUE", "CmdVerify": "CMD_VERIFY", "CmdExit": "CMD_EXIT",
	"WorkloadIdle": "WORKLOAD_IDLE", "WorkloadDirty": "WORKLOAD_DIRTY",
	"ContentZero": "CONTENT_ZERO", "ContentText": "CONTENT_TEXT", "ContentRandom": "CONTENT_RANDOM",
	"ContentImage": "CONTENT_IMAGE", "ContentPatch": "CONTENT_PATCH",
	"PatternSequential": "PATTERN_SEQUENTIAL", "PatternRandom": "PATTERN_RANDOM", "PatternHotCold": "PATTERN_HOTCOLD",
	"ParamsMagic": "PARAMS_MAGIC", "ABIVersion": "ABI_VERSION",

	"ParMagic": "PAR_MAGIC", "ParABIVersion": "PAR_ABI_VERSION", "ParNrVCPUs": "PAR_NR_VCPUS",
	"ParTSCKHz": "PAR_TSC_KHZ", "ParWorkload": "PAR_WORKLOAD", "ParContent": "PAR_CONTENT",
	"ParPattern": "PAR_PATTERN", "ParSeed": "PAR_SEED", "ParRate": "PAR_RATE", "ParBatchPages": "PAR_BATCH_PAGES",
	"ParTouchPermille": "PAR_TOUCH_PERMILLE", "ParIdleIntervalUS": "PAR_IDLE_INTERVAL_US",
	"ParHotPermille": "PAR_HOT_PERMILLE", "ParHotProbPermille": "PAR_HOT_PROB_PERMILLE",
	"ParImagePoolPages": "PAR_IMAGE_POOL_PAGES", "ParamsVCPUOffset": "PARAMS_VCPU_OFFSET",
	"ParamsVCPURecord": "PARAMS_VCPU_RECORD", "VCPUVersionTableGPA": "VCPU_VERSION_TABLE_GPA",
	"VCPUDataGPA": "VCPU_DATA_GPA", "VCPUDataPages": "VCPU_DATA_PAGES", "VCPUWSSPages": "VCPU_WSS_PAGES",
	"VCPUMailboxGPA": "VCPU_MAILBOX_GPA", "VCPUStackTop": "VCPU_STACK_TOP",

	"MbWorkUnits": "MB_WORK_UNITS", "MbPagesWritten": "MB_PAGES_WRITTEN", "MbVerifySeq": "MB_VERIFY_SEQ",
	"MbPagesChecked": "MB_PAGES_CHECKED", "MbMismatches": "MB_MISMATCHES", "MbFirstBadPage": "MB_FIRST_BAD_PAGE",
	"MbFirstBadOffset": "MB_FIRST_BAD_OFFSET", "MbExpected": "MB_EXPECTED", "MbFound": "MB_FOUND",
	"MbPagesVersioned": "MB_PAGES_VERSIONED", "MbConsole": "MB_CONSOLE", "MbConsoleMax": "MB_CONSOLE_MAX",
}

// vmmOnly are abi.go constants the guest has no use for, so abi.h leaves them out.
var vmmOnly = map[string]bool{"MinMemory": true, "MaxMemory": true, "CodeSelector": true, "DataSelector": true,
	"IDTGPA": true, "FaultStubGPA": true, "TSSGPA": true, "TSSBlockSize": true, "PortFault": true}

// TestABIHeaderMatchesGo checks that src/abi.h mirrors every constant of abi.go with the same
// value, and defines nothing else.
func TestABIHeaderMatchesGo(t *testing.T) {
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "abi.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	pkg, err := (&types.Config{}).Check("guest", fset, []*ast.File{f}, nil)
	if err != nil {
		t.Fatalf("type-check abi.go: %v", err)
	}
	goVals := map[string]uint64{}
	for _, name := range pkg.Scope().Names() {
		c, ok := pkg.Scope().Lookup(name).(*types.Const)
		if !ok {
			continue
		}
		v, exact := constant.Uint64Val(c.Val())
		if !exact {
			t.Fatalf("abi.go: %s = %v is not a uint64", name, c.Val())
		}
		goVals[name] = v
	}

	header, err := os.ReadFile("src/abi.h")
	if err != nil {
		t.Fatal(err)
	}
	cVals := map[string]uint64{}
	def := regexp.MustCompile(`(?m)^#define[ \t]+(\w+)[ \t]+(\S+)[ \t]*$`)
	for _, m := range def.FindAllStringSubmatch(string(header), -1) {
		v, err := strconv.ParseUint(strings.TrimRight(m[2], "ULul"), 0, 64)
		if err != nil {
			t.Errorf("abi.h: %s: value %q: %v", m[1], m[2], err)
			continue
		}
		cVals[m[1]] = v
	}

	mirrored := map[string]bool{}
	for name, v := range goVals {
		if vmmOnly[name] {
			continue
		}
		cName, ok := goToC[name]
		if !ok {
			t.Errorf("abi.go constant %s has no abi.h counterpart: add it to abi.h and goToC", name)
			continue
		}
		mirrored[cName] = true
		cv, ok := cVals[cName]
		switch {
		case !ok:
			t.Errorf("abi.h does not define %s (abi.go %s = 0x%x)", cName, name, v)
		case cv != v:
			t.Errorf("abi.h %s = 0x%x, abi.go %s = 0x%x", cName, cv, name, v)
		}
	}
	for cName := range cVals {
		if !mirrored[cName] {
			t.Errorf("abi.h defines %s, which mirrors no abi.go constant", cName)
		}
	}
	if len(mirrored) < 70 {
		t.Errorf("only %d constants compared: the parsing went wrong", len(mirrored))
	}
}
