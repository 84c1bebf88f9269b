//go:build race

package bitmap

// raceEnabled lets slow, single-goroutine measurements skip themselves
// under the race detector, which slows them twenty-fold and checks nothing.
const raceEnabled = true
