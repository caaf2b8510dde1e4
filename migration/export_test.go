package migration

// SetChunkRuns lowers the runs per Switch or Lacking frame, so that tests exercise
// continuation; it returns a function that restores the default.
func SetChunkRuns(n int) (restore func()) {
	old := setChunkRuns
	setChunkRuns = n
	return func() { setChunkRuns = old }
}
