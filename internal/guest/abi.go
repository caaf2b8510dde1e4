// Package guest holds godwit's built-in workload guests: the freestanding C sources under src/,
// the flat binary built from them by `go generate` (committed, embedded), and the ABI between
// the guest and the VMM.
//
// # Execution model
//
// The guest starts directly in 64-bit mode at CPL3 (set up entirely by the VMM: identity page
// tables with the user bit at every level, a GDT with DPL3 descriptors, IOPL 3 and a TSS whose
// I/O permission bitmap opens the paravirtual ports, so that in/out reach the VMM as port I/O
// exits whether or not the host honours IOPL). It never enables interrupts and uses no
// privileged instruction. CR4.OSFXSR is set so that compiled code may use SSE; AVX is not
// enabled (no CR4.OSXSAVE, no XCR0), so the image is built without it. An exception in the guest
// enters a VMM-written CPL0 stub through the IDT that reports it on PortFault.
//
// Each vCPU enters [EntryGPA] with RDI = vCPU index, RSI = [ParamsGPA] and RSP = its stack top
// minus 8 (so the C entry function sees the ABI's call alignment). Each vCPU works only on its
// own slice of memory, so verification needs no locking.
//
// # Guest physical layout
//
//	0x000000  unused (never written)
//	0x001000  GDT (VMM-written)
//	0x002000  Params, 8 KiB: header at 0, per-vCPU records at ParamsVCPUOffset
//	0x004000  IDT (VMM-written): exception vectors 0..31, 16 bytes each; stubs at FaultStubGPA
//	0x010000  PML4; 0x011000 PDPT; 0x012000.. up to MaxPDs page directories (2 MiB pages)
//	0x060000  per-vCPU mailbox pages, one page each, MaxVCPUs of them
//	0x0a0000  per-vCPU TSS blocks (VMM-written), TSSBlockSize each: the TSS with its I/O
//	          permission bitmap, then the stack exceptions are delivered on (TSS.RSP0 is the
//	          block's end)
//	0x100000  guest image (code, data, bss), at most ImageMax bytes; EntryGPA is its start
//	0x200000  stacks, StackSize per vCPU
//	0x800000  data area (DataGPA): split evenly between vCPUs; each slice starts with its
//	          version table (one uint32 per data page of the slice, page aligned) followed by
//	          its data pages.
//
// # Ports (all 32-bit accesses: `in eax, dx` / `out dx, eax`)
//
//	PortConsole   out  mailbox console text is ready; eax = length in bytes
//	PortHeartbeat in   one unit of work is done; the VMM timestamps it and returns a Command
//	PortSleep     out  sleep eax microseconds (the VMM blocks the vCPU thread, interruptibly)
//	PortVerified  out  the mailbox verify report is filled in
//	PortExit      out  the vCPU has finished; eax = status (0 ok)
//	PortPanic     out  the guest found an internal error; mailbox console text says what
//	PortFreePages out  churn: the mailbox list at MbFreeList names eax free pages
//	PortFreeDone  out  answers CmdReportFree: eax = 1 once every free page is reported, 0 when
//	                   the workload has no allocator
//	PortBalloonTarget  in   answers CmdBalloon: the balloon's target
//	PortBalloonInflate out  churn: the mailbox list names eax pages now in the balloon
//	PortBalloonHeld    out  answers CmdBalloonList: the mailbox list names eax pages in the balloon
//
// # Page content and verification
//
// Every data page has a version in the slice's table: 0 means never written, and the page must
// be all zero. A write to page p with new version v regenerates the whole page from
// (seed, content kind, page frame number p, v) and only then stores v in the table. Verify
// re-derives every page of the slice from its table and compares; the report counts pages
// checked and mismatches, and names the first bad page. Kinds: ContentZero (page stays zero),
// ContentText (words from a small dictionary: compresses well), ContentRandom
// (incompressible), ContentImage (drawn from a pool of ImagePoolPages distinct pages that
// depend only on the seed, so pages repeat within a VM and across VMs with the same seed),
// ContentPatch (a text page of which each version rewrites one 64-byte slot: a re-dirtied
// page that changed little).
//
// # Churn and free page reporting
//
// WorkloadChurn runs a page allocator over the slice: its first data pages hold the slots, one
// uint32 data page index per page it hands out (the free ones first), and the version table
// flags a free page with VersionFree, keeping its version: a freed page keeps its stale
// content, which after a migration may be anything. Verify checks every allocated page as
// above and the allocator's structures (every page in the slots once, flagged free exactly in
// the free part). On CmdReportFree the vCPU lists all its free pages through PortFreePages, then
// answers PortFreeDone, and from then on lists each page it frees. A listed page is not
// allocated again until the PortFreePages write that lists it has returned: that is what lets
// the VMM skip it, since any write to it comes after the VMM took the list.
//
// The allocator also runs a balloon (self-ballooning): on CmdBalloon it reads a target, and
// after each unit of work it moves free pages into the balloon (PortBalloonInflate: the VMM
// punches them out of guest memory, so the host gets the memory back and no migration sees
// them) or gives them back, at once when the target falls and a few at a time when it has no
// other free page to allocate (deflate on demand; the mailbox counts both kinds of deflate). It
// takes only memory the guest has not needed for a while: never more than the fewest free
// pages of the last one to two seconds (given the TSC frequency). A ballooned page is a free
// page to verify. With a peak above touch, the allocated share swings
// between the two, a batch of allocations (or of frees) per unit of work, so that the guest's
// need for memory grows and falls as a real one's does; growing into the balloon deflates it.
package guest

// Guest physical addresses and sizes of the fixed layout.
const (
	PageSize = 4096

	GDTGPA       = 0x1000
	ParamsGPA    = 0x2000
	ParamsSize   = 0x2000
	PML4GPA      = 0x10000
	PDPTGPA      = 0x11000
	PDBaseGPA    = 0x12000
	MaxPDs       = 64 // page directories of 2 MiB pages: 64 GiB of guest memory at most
	MailboxGPA   = 0x60000
	EntryGPA     = 0x100000
	ImageMax     = 0x100000
	StackGPA     = 0x200000
	StackSize    = 0x10000
	MaxVCPUs     = 64
	DataGPA      = 0x800000
	MinMemory    = 16 << 20
	MaxMemory    = MaxPDs << 30
	CodeSelector = 0x1b // GDT entry 3, RPL 3
	DataSelector = 0x23 // GDT entry 4, RPL 3

	// The VMM's exception reporting (never used by the guest code itself; see internal/vmm).
	IDTGPA       = 0x4000
	FaultStubGPA = 0x4200
	TSSGPA       = 0xa0000
	TSSBlockSize = 0x400
)

// Ports of the paravirtual interface. The TSS I/O permission bitmap lets CPL3 reach exactly
// these (some hosts, PVM among them, run the guest with IOPL 0 whatever RFLAGS said).
const (
	PortConsole   = 0x500
	PortHeartbeat = 0x501
	PortSleep     = 0x502
	PortVerified  = 0x503
	PortExit      = 0x504
	PortPanic     = 0x505
	// PortFreePages: the guest reports free pages (churn); eax = how many page frame numbers
	// (uint32 each) the mailbox list at MbFreeList holds, at most MbFreeMax. The guest holds
	// every listed page out of its allocator until the write returns.
	PortFreePages = 0x506
	// PortFreeDone answers CmdReportFree once every free page is reported: eax = 1, or 0 when
	// the workload has no allocator (it never reports).
	PortFreeDone = 0x507
	// PortBalloonTarget (in) answers CmdBalloon with the balloon's target for this vCPU:
	// pages, or BalloonAuto | the per mille of its free pages to keep in the balloon.
	PortBalloonTarget = 0x508
	// PortBalloonInflate: the pages the mailbox list at MbFreeList names (eax of them) went
	// into the balloon; the VMM may release their memory. They stay out of the guest's use
	// until it deflates them, and read as zero (or anything) then.
	PortBalloonInflate = 0x509
	// PortBalloonHeld answers CmdBalloonList: the mailbox list names eax pages that are in the
	// balloon already (named before, by PortBalloonInflate); the VMM may release them now.
	PortBalloonHeld = 0x50a
	// PortDiverge (in) answers CmdDiverge, read twice: the per mille of its data pages the
	// vCPU rewrites, then the salt that picks them and sets their new versions.
	PortDiverge = 0x50b
	// PortFault is written by the VMM's exception stubs at CPL0, never by the guest (its bit in
	// the I/O bitmap stays set): the vCPU faulted; the stack holds vector, error code and the
	// CPU's exception frame.
	PortFault = 0x5f0
)

// Command is what the VMM answers to a heartbeat.
type Command uint32

const (
	CmdContinue Command = 0 // keep working
	CmdVerify   Command = 1 // verify the slice, report through PortVerified, keep working
	CmdExit     Command = 2 // verify the slice, report through PortVerified, then PortExit
	// CmdReportFree: report every free page now (PortFreePages, then PortFreeDone), and from
	// then on each page freed, in lists of MbFreeMax.
	CmdReportFree Command = 3
	// CmdBalloon: read the balloon's new target from PortBalloonTarget.
	CmdBalloon Command = 4
	// CmdBalloonList: name every page in the balloon again (PortBalloonHeld), a few lists per
	// unit of work. A VMM that could not release pages when they went in (it was receiving by
	// post-copy then) asks for it once it can.
	CmdBalloonList Command = 5
	// CmdDiverge: rewrite a share of the slice's data pages once, with versions of their own
	// (PortDiverge gives the share and a salt). A VM cloned from a template does it so that
	// clones of one template hold private data beside the template's, as clones do.
	CmdDiverge Command = 6
)

// BalloonAuto marks a balloon target that is a per mille of the free pages (in its low bits)
// rather than a number of pages.
const BalloonAuto = 0x80000000

// Workload kinds.
const (
	WorkloadIdle  = 0 // touch a fraction of the slice once, then only sleep and heartbeat
	WorkloadDirty = 1 // rewrite pages of the working set at a rate, with a pattern
	WorkloadChurn = 2 // allocate, write and free pages like an OS's page allocator, at a rate
)

// Page content kinds.
const (
	ContentZero   = 0
	ContentText   = 1
	ContentRandom = 2
	ContentImage  = 3
	ContentPatch  = 4 // text that each version changes in one 64-byte slot (deltas are small)
)

// Write patterns of the dirty workload.
const (
	PatternSequential = 0
	PatternRandom     = 1
	PatternHotCold    = 2
)

// Version table flags of the churn workload: a free page keeps its last version (its content
// is stale, and may be anything after a migration) with VersionFree set. Versions count
// within VersionMask.
const (
	VersionFree = 0x80000000
	VersionMask = 0x3fffffff
)

// ParamsMagic identifies the params page ("GODWITP1" little endian).
const ParamsMagic = 0x3150544957444f47

// ABIVersion is bumped whenever this layout changes.
const ABIVersion = 1

// Byte offsets of the params header fields (all uint64, little endian).
const (
	ParMagic            = 0x00
	ParABIVersion       = 0x08
	ParNrVCPUs          = 0x10
	ParTSCKHz           = 0x18
	ParWorkload         = 0x20
	ParContent          = 0x28
	ParPattern          = 0x30
	ParSeed             = 0x38
	ParRate             = 0x40 // pages per second per vCPU; 0 = as fast as it can
	ParBatchPages       = 0x48 // pages per unit of work (one heartbeat each)
	ParTouchPermille    = 0x50 // idle: per mille of the slice's data pages touched once
	ParIdleIntervalUS   = 0x58 // idle: microseconds slept per unit of work
	ParHotPermille      = 0x60 // hot/cold: hot part, per mille of the working set
	ParHotProbPermille  = 0x68 // hot/cold: per mille of writes that go to the hot part
	ParImagePoolPages   = 0x70 // image content: distinct pages in the pool
	ParPeakPermille     = 0x78 // churn: per mille allocated at the top of the swing (0 = none)
	ParPrivatePermille  = 0x80 // image content: per mille of pages that are the VM's own
	ParNearPermille     = 0x88 // image content: per mille of pages that are near-duplicates
	ParPrivateSeed      = 0x90 // image content: the seed of the VM's own pages and changes
	ParamsVCPUOffset    = 0x400
	ParamsVCPURecord    = 0x40
	VCPUVersionTableGPA = 0x00 // offsets within a per-vCPU record
	VCPUDataGPA         = 0x08
	VCPUDataPages       = 0x10
	VCPUWSSPages        = 0x18 // dirty: pages of the working set, from the start of the data
	VCPUMailboxGPA      = 0x20
	VCPUStackTop        = 0x28
)

// Byte offsets within a vCPU's mailbox page.
const (
	MbWorkUnits      = 0x000 // uint64, units of work done (guest-maintained)
	MbPagesWritten   = 0x008 // uint64, page writes done (guest-maintained)
	MbVerifySeq      = 0x010 // uint64, number of verify passes completed
	MbPagesChecked   = 0x018 // uint64
	MbMismatches     = 0x020 // uint64
	MbFirstBadPage   = 0x028 // uint64 guest page frame number of the first mismatch, or ^0
	MbFirstBadOffset = 0x030 // uint64 byte offset in that page
	MbExpected       = 0x038 // uint64 expected word at that offset
	MbFound          = 0x040 // uint64 word found there
	MbPagesVersioned = 0x048 // uint64 pages with a version other than 0
	MbPagesFree      = 0x050 // uint64 churn: pages free at the last verify
	MbBalloonPages   = 0x058 // uint64 churn: pages in the balloon now (guest-maintained)
	MbBalloonDeflate = 0x060 // uint64 churn: pages taken back out of the balloon, ever
	MbBalloonDemand  = 0x068 // uint64 churn: of them, pages taken back on demand
	MbFreeList       = 0x100 // uint32 page frame numbers of a PortFreePages report
	MbFreeMax        = 448   // entries the list holds (up to the console area)
	MbConsole        = 0x800 // console text, up to MbConsoleMax bytes
	MbConsoleMax     = 0x800
)
