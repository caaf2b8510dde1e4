package vmm

import (
	"context"
	"encoding/binary"
	"fmt"
	"strings"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
)

// Exception reporting. Without an IDT any exception in the guest becomes a triple fault, which
// KVM reports as a shutdown with no hint of the cause. So the VMM installs an IDT of interrupt
// gates for the 32 exception vectors; each points at a small CPL0 stub in guest memory that
// pushes a zero error code where the CPU pushes none, then the vector, and writes PortFault.
// The CPU has switched to the vCPU's own stack (TSS.RSP0) on the way in, so at the exit RSP
// points at: vector, error code, RIP, CS, RFLAGS, RSP, SS. The VMM reads that frame and
// reports the fault; the vCPU never runs again. The stubs run at CPL0, which PVM emulates
// instruction by instruction: fine for a crash path, and nothing else ever runs there.

const (
	exceptionVectors = 32
	idtLimit         = exceptionVectors*16 - 1
	faultStubSize    = 16
	faultFrameWords  = 7
)

// hasErrorCode lists the exception vectors for which the CPU pushes an error code.
var hasErrorCode = map[int]bool{8: true, 10: true, 11: true, 12: true, 13: true, 14: true, 17: true, 21: true, 29: true, 30: true}

var exceptionNames = [exceptionVectors]string{
	0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
	9: "coprocessor segment overrun", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF",
	15: "vector 15", 16: "#MF", 17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP",
	22: "vector 22", 23: "vector 23", 24: "vector 24", 25: "vector 25", 26: "vector 26",
	27: "vector 27", 28: "#HV", 29: "#VC", 30: "#SX", 31: "vector 31",
}

// writeIDT writes the IDT at guest.IDTGPA and its stubs at guest.FaultStubGPA into mem.
func writeIDT(mem []byte) {
	for v := 0; v < exceptionVectors; v++ {
		stub := uint64(guest.FaultStubGPA + v*faultStubSize)
		code := mem[stub : stub+faultStubSize]
		for i := range code {
			code[i] = 0xcc // int3: never reached
		}
		n := 0
		if !hasErrorCode[v] {
			n += copy(code[n:], []byte{0x6a, 0x00}) // push $0
		}
		n += copy(code[n:], []byte{0x6a, byte(v)})                                            // push $v
		n += copy(code[n:], []byte{0x66, 0xba, guest.PortFault & 0xff, guest.PortFault >> 8}) // mov $PortFault, %dx
		n += copy(code[n:], []byte{0xef})                                                     // out %eax, %dx
		copy(code[n:], []byte{0xeb, 0xfe})                                                    // jmp .

		// 64-bit interrupt gate (type 0xe), present, DPL0, kernel code, no IST.
		gate := mem[guest.IDTGPA+16*v:]
		lo := stub&0xffff | uint64(kernelCodeSelector)<<16 | uint64(0x8e)<<40 | (stub>>16&0xffff)<<48
		binary.LittleEndian.PutUint64(gate, lo)
		binary.LittleEndian.PutUint64(gate[8:], stub>>32)
	}
}

// GuestFault is an exception the guest took, as its exception stub reported it.
type GuestFault struct {
	VCPU      int
	Vector    int
	ErrorCode uint64
	RIP, RSP  uint64
	CS        uint16
	RFLAGS    uint64
	CR2       uint64 // the faulting address, for #PF
	Code      []byte // the instruction bytes at RIP, as many as could be read (up to 15)
}

func (f *GuestFault) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "vCPU %d: %s", f.VCPU, exceptionNames[f.Vector])
	if hasErrorCode[f.Vector] {
		fmt.Fprintf(&b, "(0x%x)", f.ErrorCode)
	}
	fmt.Fprintf(&b, " at rip 0x%x", f.RIP)
	if f.Vector == 14 {
		fmt.Fprintf(&b, " accessing 0x%x", f.CR2)
	}
	if len(f.Code) > 0 {
		fmt.Fprintf(&b, " (instruction bytes % x)", f.Code)
	}
	fmt.Fprintf(&b, ", cpl %d, rsp 0x%x, rflags 0x%x", f.CS&3, f.RSP, f.RFLAGS)
	return b.String()
}

// faultReport reads the exception frame vCPU v's stub left on its exception stack.
func (m *Machine) faultReport(v *vcpu) error {
	regs, err := v.kvm.Regs()
	if err != nil {
		return fmt.Errorf("vmm: vCPU %d faulted in the guest; reading its registers: %w", v.id, err)
	}
	frame := make([]byte, 8*faultFrameWords)
	if err := m.readGuest(regs.RSP, frame); err != nil {
		return fmt.Errorf("vmm: vCPU %d faulted in the guest; reading its exception frame at 0x%x: %w", v.id, regs.RSP, err)
	}
	w := func(i int) uint64 { return binary.LittleEndian.Uint64(frame[8*i:]) }
	f := &GuestFault{VCPU: v.id, Vector: int(w(0)), ErrorCode: w(1), RIP: w(2), CS: uint16(w(3)), RFLAGS: w(4), RSP: w(5)}
	if f.Vector < 0 || f.Vector >= exceptionVectors {
		return fmt.Errorf("vmm: vCPU %d: write to the fault port with a frame of vector %d", v.id, f.Vector)
	}
	if s, err := v.kvm.Sregs(); err == nil {
		f.CR2 = s.CR2
	}
	// The instruction bytes, where RIP is in guest RAM (virtual equals physical).
	code := make([]byte, 15)
	if end := min(f.RIP+uint64(len(code)), m.cfg.MemBytes); f.RIP < end {
		code = code[:end-f.RIP]
		if m.readGuest(f.RIP, code) == nil {
			f.Code = code
		}
	}
	return f
}

// readGuest reads guest RAM at gpa for a crash report, waiting a bounded time on a post-copy
// destination (a report must not hang on a page that never comes).
func (m *Machine) readGuest(gpa uint64, b []byte) error {
	if !m.mem.Contains(gpa, uint64(len(b))) {
		return fmt.Errorf("0x%x+%d is outside guest memory", gpa, len(b))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return m.readPresent(ctx, gpa, b)
}
