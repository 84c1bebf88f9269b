// Package cluster will own the glue between hosts: memberlist for
// membership and failure detection, hashicorp/raft to order the events
// every host feeds its shadowset core, and the direct stream for bitmap
// messages. It turns what it learns into shadowset events; it never
// decides what happens to a shadow set.
package cluster
