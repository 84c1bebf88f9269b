// Package internal groups the agent-side packages of the shadow binary:
// member devices, member metadata, the VU I/O engine and the NBD export.
// They do I/O; every decision they act on comes from the shadowset core.
package internal

import (
	// Pinned here until the packages that use them land, so that go.mod
	// stays tidy while they are written in parallel.
	_ "github.com/rs/zerolog"
	_ "golang.org/x/sys/unix"
)
