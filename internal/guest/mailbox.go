package guest

import (
	"encoding/binary"
	"fmt"
)

// Mailbox is what a vCPU's mailbox page says: its progress counters and its last verify report.
type Mailbox struct {
	WorkUnits    uint64 // units of work done
	PagesWritten uint64 // page writes done

	VerifySeq      uint64 // verify passes completed; the fields below are from the last one
	PagesChecked   uint64
	Mismatches     uint64
	FirstBadPage   uint64 // guest page frame number of the first mismatch, or NoBadPage
	FirstBadOffset uint64 // byte offset in that page of the first differing 8-byte word
	Expected       uint64 // the word the page should hold there
	Found          uint64 // the word it holds
	PagesVersioned uint64 // pages written at least once (churn: allocated ones)
	PagesFree      uint64 // churn: pages free (their content is not checked)
}

// NoBadPage is FirstBadPage when a verify found no mismatch.
const NoBadPage = ^uint64(0)

// DecodeMailbox reads a mailbox page (at least up to the console area).
func DecodeMailbox(page []byte) (Mailbox, error) {
	if len(page) < MbConsole {
		return Mailbox{}, fmt.Errorf("guest: mailbox of %d bytes, want at least %d", len(page), MbConsole)
	}
	u := func(off int) uint64 { return binary.LittleEndian.Uint64(page[off:]) }
	return Mailbox{
		WorkUnits:      u(MbWorkUnits),
		PagesWritten:   u(MbPagesWritten),
		VerifySeq:      u(MbVerifySeq),
		PagesChecked:   u(MbPagesChecked),
		Mismatches:     u(MbMismatches),
		FirstBadPage:   u(MbFirstBadPage),
		FirstBadOffset: u(MbFirstBadOffset),
		Expected:       u(MbExpected),
		Found:          u(MbFound),
		PagesVersioned: u(MbPagesVersioned),
		PagesFree:      u(MbPagesFree),
	}, nil
}

// ConsoleText is the console text of a mailbox page announced with length n (the eax of the
// PortConsole or PortPanic write), clamped to the console area.
func ConsoleText(page []byte, n uint32) string {
	if len(page) < MbConsole {
		return ""
	}
	text := page[MbConsole:min(len(page), MbConsole+MbConsoleMax)]
	return string(text[:min(int(n), len(text))])
}
