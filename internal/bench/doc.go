// Package bench measures godwit's migrations. Its benchmarks run the engine between the hosts
// of a testbed over real TCP, and report each figure as a ratio to a baseline measured on the
// same link in the same run, because the machines are shared and their speed varies.
package bench
