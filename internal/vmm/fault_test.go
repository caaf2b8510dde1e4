package vmm

import (
	"encoding/binary"
	"errors"
	"regexp"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
)

// TestGuestFaultIsReported runs tiny images that take a known exception at their first
// instruction and checks that the machine's failure names it, with the vector, error code, RIP
// and instruction bytes, instead of a triple fault.
func TestGuestFaultIsReported(t *testing.T) {
	entry := "0x100000"
	cases := []struct {
		name  string
		image []byte
		want  string // regexp over the failure
		vec   int
	}{
		{"ud2", []byte{0x0f, 0x0b}, `vCPU 0: #UD at rip ` + entry + ` \(instruction bytes 0f 0b cc`, 6},
		{"hlt at cpl3", []byte{0xf4}, `vCPU 0: #GP\(0x0\) at rip ` + entry + ` \(instruction bytes f4 cc`, 13},
		{"divide by zero", []byte{0x31, 0xc9, 0xf7, 0xf1}, `vCPU 0: #DE at rip 0x100002 \(instruction bytes f7 f1`, 0},
		// mov $0x40000000, %rax; mov (%rax), %eax: 1 GiB is past the 256 MiB the page tables map.
		{"unmapped load", []byte{0x48, 0xb8, 0, 0, 0, 0x40, 0, 0, 0, 0, 0x8b, 0x00},
			`vCPU 0: #PF\(0x4\) at rip 0x10000a accessing 0x40000000 \(instruction bytes 8b 00`, 14},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			requireKVM(t)
			image := append(append([]byte{}, c.image...), make([]byte, 16)...)
			for i := len(c.image); i < len(image); i++ {
				image[i] = 0xcc
			}
			m, err := New(Config{
				Name: t.Name(), MemBytes: 256 << 20, VCPUs: 1, Image: image,
				Params: func(uint32) ([]byte, error) { return make([]byte, guest.ParamsSize), nil },
			})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			if err := m.Start(); err != nil {
				t.Fatal(err)
			}
			select {
			case <-m.Done():
			case <-time.After(30 * time.Second):
				t.Fatal("the faulting guest is still running after 30 s")
			}
			st, ferr := m.State()
			if st != StateFailed || ferr == nil {
				t.Fatalf("state %s (%v), want failed", st, ferr)
			}
			if !regexp.MustCompile(c.want).MatchString(ferr.Error()) {
				t.Fatalf("failure %q\ndoes not match %q", ferr, c.want)
			}
			var gf *GuestFault
			if !errors.As(ferr, &gf) || gf.Vector != c.vec || gf.CS&3 != 3 {
				t.Fatalf("failure %v: want a *GuestFault of vector %d at CPL3, got %+v", ferr, c.vec, gf)
			}
		})
	}
}

func TestSelfCheck(t *testing.T) {
	requireKVM(t)
	r, err := SelfCheck(t.Context(), "")
	if err != nil {
		t.Fatal(err)
	}
	if r.Heartbeats < 20 || r.PagesChecked == 0 {
		t.Fatalf("self-check: %+v", r)
	}
	t.Log(r)
}

// TestTSSOpensOnlyThePVPorts checks the I/O permission bitmap: every byte of the paravirtual
// ports' 32-bit accesses open, the ports around them and the fault port closed, the bitmap
// ended by a byte of ones inside the TSS limit.
func TestTSSOpensOnlyThePVPorts(t *testing.T) {
	block := make([]byte, guest.TSSBlockSize)
	writeTSS(block, 0xabc000)
	if got := binary.LittleEndian.Uint64(block[tssRSP0:]); got != 0xabc000 {
		t.Fatalf("RSP0 0x%x", got)
	}
	base := int(binary.LittleEndian.Uint16(block[tssIOMapBase:]))
	open := func(port int) bool {
		i := base + port/8
		if i > tssLimit {
			return false
		}
		return block[i]&(1<<(port%8)) == 0
	}
	for port := 0; port < 0x10000; port++ {
		want := port >= guest.PortConsole && port <= guest.PortDiverge+3
		if open(port) != want {
			t.Errorf("port 0x%x open %v, want %v", port, open(port), want)
		}
	}
	if block[tssLimit] != 0xff {
		t.Errorf("the byte at the TSS limit is 0x%x, want 0xff", block[tssLimit])
	}
	if open(guest.PortFault) {
		t.Error("the fault port is open to CPL3")
	}
}
