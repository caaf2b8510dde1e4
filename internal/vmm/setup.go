package vmm

import (
	"encoding/binary"
	"fmt"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/kvm"
)

// Control register and EFER bits of the long-mode CPL3 set-up (see ../shared facts: the guest
// never runs privileged code, so nothing below is ever changed by it).
const (
	cr0PE     = 1 << 0
	cr0MP     = 1 << 1
	cr0ET     = 1 << 4
	cr0NE     = 1 << 5
	cr0PG     = 1 << 31
	cr4PAE    = 1 << 5
	cr4OSFXSR = 1 << 9
	cr4XMMEXC = 1 << 10
	eferLME   = 1 << 8
	eferLMA   = 1 << 10

	rflagsIOPL3 = 3 << 12
	rflagsFixed = 1 << 1

	pteP   = 1 << 0
	pteRW  = 1 << 1
	pteUS  = 1 << 2
	ptePS  = 1 << 7
	pdSize = 2 << 20
)

// GDT descriptors: null, kernel code/data (the kernel code segment is what the exception
// stubs run in), user code (64-bit, DPL3) and user data (DPL3), then one 16-byte 64-bit TSS
// descriptor per vCPU (tssSelector), so that each vCPU has its own exception stack.
var gdtEntries = []uint64{
	0,
	0x00209A0000000000,
	0x0000920000000000,
	0x0020FA0000000000,
	0x0000F20000000000,
}

const (
	kernelCodeSelector = 0x08
	tssSelectorBase    = 0x28
	gdtLimit           = tssSelectorBase + 16*guest.MaxVCPUs - 1
)

// The 64-bit TSS: RSP0 at 4, the I/O map base at 102, the I/O permission bitmap at 104. The
// bitmap covers ports 0..ioBitmapPorts-1 with a bit each, set = denied; the CPU reads two bytes
// for every check, so one more byte of all ones ends it, and every port past it is denied.
const (
	tssRSP0       = 4
	tssIOMapBase  = 102
	tssIOBitmap   = 104
	ioBitmapPorts = 0x600
	tssLimit      = tssIOBitmap + ioBitmapPorts/8 // the last byte: the 0xff terminator
)

// openPorts are the ports CPL3 may use: the paravirtual ports, from the first to the last one
// abi.go defines for the guest, each with all four bytes of its 32-bit access (the CPU checks
// the bit of every byte accessed).
var openPorts = [2]uint16{guest.PortConsole, guest.PortDiverge + 3}

func tssSelector(id int) uint16 { return uint16(tssSelectorBase + 16*id) }
func tssGPA(id int) uint64      { return guest.TSSGPA + uint64(id)*guest.TSSBlockSize }

// buildBootPages writes the GDT, each vCPU's TSS, the IDT with its exception stubs and the
// identity page tables (2 MiB pages, user bit at every level) covering memBytes into mem, which
// is guest physical memory starting at GPA 0.
func buildBootPages(mem []byte, memBytes uint64, vcpus int) error {
	if memBytes%pdSize != 0 {
		return fmt.Errorf("vmm: memory size %d is not a multiple of 2 MiB", memBytes)
	}
	gdt := mem[guest.GDTGPA:]
	for i, e := range gdtEntries {
		binary.LittleEndian.PutUint64(gdt[8*i:], e)
	}
	for id := 0; id < vcpus; id++ {
		// 64-bit available TSS (type 9), present, DPL0.
		base := tssGPA(id)
		lo := uint64(tssLimit&0xffff) | (base&0xffffff)<<16 | uint64(0x89)<<40 | (base>>24&0xff)<<56
		binary.LittleEndian.PutUint64(gdt[tssSelector(id):], lo)
		binary.LittleEndian.PutUint64(gdt[tssSelector(id)+8:], base>>32)
		writeTSS(mem[base:base+guest.TSSBlockSize], base+guest.TSSBlockSize)
	}
	writeIDT(mem)

	gib := (memBytes + (1<<30 - 1)) >> 30
	if gib > guest.MaxPDs {
		return fmt.Errorf("vmm: %d bytes of memory need %d page directories, at most %d", memBytes, gib, guest.MaxPDs)
	}
	binary.LittleEndian.PutUint64(mem[guest.PML4GPA:], guest.PDPTGPA|pteP|pteRW|pteUS)
	for i := uint64(0); i < gib; i++ {
		pd := guest.PDBaseGPA + i*guest.PageSize
		binary.LittleEndian.PutUint64(mem[guest.PDPTGPA+8*i:], pd|pteP|pteRW|pteUS)
	}
	for addr := uint64(0); addr < memBytes; addr += pdSize {
		entry := addr / pdSize
		binary.LittleEndian.PutUint64(mem[guest.PDBaseGPA+8*entry:], addr|pteP|pteRW|pteUS|ptePS)
	}
	return nil
}

// writeTSS fills one vCPU's TSS block: exceptions switch to the stack ending at stackTop, and
// the I/O bitmap opens openPorts only. Some hosts (PVM) clear RFLAGS.IOPL on guest entry, and
// then every in/out at CPL3 is checked against this bitmap; VMX and SVM hosts consult it only
// when CPL > IOPL, which the guest's IOPL 3 never is.
func writeTSS(block []byte, stackTop uint64) {
	clear(block)
	binary.LittleEndian.PutUint64(block[tssRSP0:], stackTop)
	binary.LittleEndian.PutUint16(block[tssIOMapBase:], tssIOBitmap)
	bitmap := block[tssIOBitmap : tssLimit+1]
	for i := range bitmap {
		bitmap[i] = 0xff
	}
	for p := openPorts[0]; p <= openPorts[1]; p++ {
		bitmap[p/8] &^= 1 << (p % 8)
	}
}

func segment(sel uint16, code bool) kvm.Segment {
	s := kvm.Segment{Base: 0, Limit: 0xffffffff, Selector: sel, Present: 1, DPL: 3, S: 1, G: 1}
	if code {
		s.Type = 0xb // execute/read, accessed
		s.L = 1
	} else {
		s.Type = 0x3 // read/write, accessed
		s.DB = 1
	}
	return s
}

// initialSregs is the long-mode CPL3 state vCPU id starts in.
func initialSregs(s kvm.Sregs, id int) kvm.Sregs {
	s.CS = segment(guest.CodeSelector, true)
	ds := segment(guest.DataSelector, false)
	s.DS, s.ES, s.FS, s.GS, s.SS = ds, ds, ds, ds, ds
	s.TR = kvm.Segment{Base: tssGPA(id), Limit: tssLimit, Selector: tssSelector(id), Type: 0xb, Present: 1}
	s.LDT = kvm.Segment{Type: 0x2, Unusable: 1}
	s.GDT = kvm.DTable{Base: guest.GDTGPA, Limit: gdtLimit}
	s.IDT = kvm.DTable{Base: guest.IDTGPA, Limit: idtLimit}
	s.CR0 = cr0PE | cr0MP | cr0ET | cr0NE | cr0PG
	s.CR3 = guest.PML4GPA
	s.CR4 = cr4PAE | cr4OSFXSR | cr4XMMEXC
	s.EFER = eferLME | eferLMA
	return s
}

// initialRegs enters the guest image on vCPU id.
func initialRegs(id int) kvm.Regs {
	stackTop := uint64(guest.StackGPA + (id+1)*guest.StackSize)
	return kvm.Regs{
		RIP:    guest.EntryGPA,
		RDI:    uint64(id),
		RSI:    guest.ParamsGPA,
		RSP:    stackTop - 8,
		RFLAGS: rflagsFixed | rflagsIOPL3,
	}
}

// mailboxGPA is where vCPU id's mailbox page lives.
func mailboxGPA(id int) uint64 { return guest.MailboxGPA + uint64(id)*guest.PageSize }
