package migration

import (
	"context"
	"time"

	"github.com/godwit-vm/godwit/migration/pages"
)

// FreePageReporter is an optional Source capability: the guest reports the pages it does not
// use (whose content does not matter to it), and the engine sends none of them: pre-copy skips
// them in the first round and drops them from later sets, post-copy leaves them out of the
// pages the destination fetches (there they read as zero, or as an older copy).
//
// What makes skipping them safe is an ordering the Source keeps: the guest holds a page out of
// use until its report is taken; a report is taken whole, never in the middle of a
// FetchDirty; and taking it clears the page's earlier writes from the dirty log. So a write
// to a page after it was reported free is in a later FetchDirty, and the engine, which takes
// the reports right after each FetchDirty, then no longer counts the page free.
type FreePageReporter interface {
	// StartFreePages asks the guest, with logging on, for every page it holds free, and
	// waits until it has answered or ctx is done. It returns false when the guest does not
	// report. Reports arrive until StopDirtyLog.
	StartFreePages(ctx context.Context) (bool, error)
	// TakeFreePages returns, per region, the pages reported free since the previous call (or
	// since StartFreePages).
	TakeFreePages() ([]Bitmap, error)
}

// freeAnswerWait bounds the wait for the guest's first report: it answers at its next unit of
// work (a heartbeat), which a running guest reaches within milliseconds.
const freeAnswerWait = 2 * time.Second

// startLogging turns on the dirty log and, unless the options say not to, asks the guest for
// its free pages.
func (s *sender) startLogging() error {
	if err := s.vmm("StartDirtyLog", s.src.StartDirtyLog()); err != nil {
		return err
	}
	s.logging = true
	fr, ok := s.src.(FreePageReporter)
	switch {
	case s.opts.IgnoreFreePages:
		s.rep.FreePages = "off"
		return nil
	case !ok:
		return nil
	}
	ctx, cancel := context.WithTimeout(s.ctx, freeAnswerWait)
	reports, err := fr.StartFreePages(ctx)
	cancel()
	if err := s.vmm("StartFreePages", err); err != nil {
		return err
	}
	if !reports {
		s.rep.FreePages = "not reported by the guest"
		return nil
	}
	s.rep.FreePages = "reported by the guest"
	s.reporter = fr
	s.freeSet = make([]Bitmap, len(s.sizes))
	for r := range s.freeSet {
		s.freeSet[r] = NewBitmap(s.sizes[r])
	}
	return s.takeFree(nil)
}

// takeFree adds the pages reported since the last call to the free set and removes those in
// dirty: written after their report (or, harmlessly, before it but since the last fetch).
func (s *sender) takeFree(dirty []Bitmap) error {
	if s.reporter == nil {
		return nil
	}
	got, err := s.reporter.TakeFreePages()
	if err := s.vmm("TakeFreePages", err); err != nil {
		return err
	}
	if err := checkBitmaps("TakeFreePages", got, &s.desc.Layout); err != nil {
		return err
	}
	for r := range s.freeSet {
		s.rep.FreePagesReported += got[r].Count(s.sizes[r])
		s.freeSet[r].Or(got[r])
		if dirty != nil {
			s.freeSet[r].AndNot(dirty[r])
		}
	}
	return nil
}

// dropFree removes the pages of the free set from set, counting them as pages.Free, and
// returns set. Only right after a fetch does the free set hold no page written since.
func (s *sender) dropFree(set []Bitmap) []Bitmap {
	if s.reporter == nil {
		return set
	}
	for r := range set {
		n := s.sizes[r]
		before := set[r].Count(n)
		set[r].AndNot(s.freeSet[r])
		s.cls.Counters.Add(pages.Free, before-set[r].Count(n))
	}
	return set
}
