// Package vu owns the virtual unit's I/O engine: it turns one block
// request on a shadow set into I/O on its members. Writes go to every full
// member and copy target and complete when all have; overlapping requests
// are ordered by a range lock shared with the merge and copy engines; reads
// go to the full member with the lowest read cost plus queue depth; while a
// merge is required, a read of a block the merge has not reached yet is
// served from the merge master and written to the other members first, so
// two reads of one block never disagree. A member whose write or flush
// fails is expelled (through the Expel callback, which makes the removal
// durable) before the request is acknowledged; the last full member is
// never expelled: the request fails instead.
//
// The engine decides nothing about merges and copies: the agent tells it
// which members exist in which role and which merge work is pending, as
// the shadowset core decided.
package vu

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/rs/zerolog"

	"github.com/shadow-project/shadow/cmd/internal/device"
)

// Device is what the engine needs of a member.
type Device interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Flush() error
	Zero(off, length int64) error
	Path() string
}

// Role of a member in the engine.
type Role uint8

const (
	// Full members hold valid data and serve reads.
	Full Role = iota + 1
	// CopyTarget members receive every write but serve no read.
	CopyTarget
)

func (r Role) String() string {
	if r == CopyTarget {
		return "copy-target"
	}
	return "full"
}

// Errors callers test for.
var (
	// ErrRange: the request lies outside the volume. It wraps EINVAL so
	// the NBD server answers with the protocol's error.
	ErrRange = fmt.Errorf("vu: request out of range: %w", syscall.EINVAL)
	// ErrNoMember: no full member could serve the request.
	ErrNoMember = fmt.Errorf("vu: no full member left: %w", syscall.EIO)
	// ErrUnknownMember: a management call named a member the VU lacks.
	ErrUnknownMember = errors.New("vu: unknown member")
)

// DefaultReadCost is a member's read cost unless set (OpenVMS: 1–65535).
const DefaultReadCost = 100

// member is one device in the set. inflight is its queue depth, added to
// the read cost when choosing where to read.
type member struct {
	dev      Device
	role     Role
	readCost int
	inflight atomic.Int64
	// quick is dev's fast path, nil without one; quickWrites says whether
	// its TryWriteAt can ever succeed. Both are fixed at open, so they
	// are looked up once, not per request.
	quick       device.Quick
	quickWrites bool
}

// MemberSpec describes a member at construction.
type MemberSpec struct {
	Dev      Device
	Role     Role
	ReadCost int
}

// MemberInfo is a snapshot of a member for display.
type MemberInfo struct {
	Path     string
	Role     Role
	ReadCost int
	Inflight int64
}

// MergeWork says which bytes a required merge has not reached yet.
type MergeWork interface {
	Pending(off, n int64) bool
}

// Config builds a VU.
type Config struct {
	Name    string
	Size    int64
	Members []MemberSpec
	// Expel removes a failed member durably (cluster-wide, on the
	// survivors' metadata) and returns only when that is done; the failing
	// request is acknowledged after it. An error keeps the member and
	// fails the request.
	Expel func(path string, cause error) error
	// Gate, if set, brackets application writes and flushes.
	Gate Gate
	// Shared: other hosts write the members too. Reads never write
	// members then: a repair write under this host's range lock could land
	// after another host's newer write and leave the members different.
	// A read the merge has not reached reads the merge master alone (every
	// host picks the same one), and the merge engine, which holds the
	// cluster's window over its range, is what makes the members agree.
	Shared bool
	// Acknowledge, if set, runs before a write, zero or flush that
	// succeeded on the members is acknowledged; an error fails it
	// instead. The agent checks the lease there: a host stopped between
	// its member I/O and its reply, and declared failed meanwhile, must
	// not acknowledge a write the survivors have since merged behind and
	// written over.
	Acknowledge func() error
	Logger      zerolog.Logger
}

// Gate is the agent's hook around application I/O. The agent uses it to
// make the dirty flag durable before the first write after a clean
// period, to record each range in its write bitmaps before the data
// moves, to know when no write is in flight, and to learn what a
// successful flush covers. An interface rather than funcs returning
// funcs, so that the write path allocates nothing for it.
type Gate interface {
	// BeginWrite runs before a write or zero of [off, off+n) touches any
	// member; an error refuses the request.
	BeginWrite(off, n int64) error
	// TryBeginWrite is BeginWrite when it can admit the write without
	// waiting (for metadata to be written, or for a flush holding the
	// gate); false: nothing was admitted, call BeginWrite.
	TryBeginWrite(off, n int64) bool
	// EndWrite runs when that request completes, whatever the outcome.
	EndWrite(off, n int64)
	// BeginFlush runs before a flush reaches the members; end gets
	// whether every member that stayed in the set flushed.
	BeginFlush() (end func(ok bool))
}

// VU is one virtual unit. All methods are safe for concurrent use.
type VU struct {
	name  string
	size  int64
	locks RangeLock
	// writes: see Writes. ioErrors, expulsions: see Faults.
	writes, ioErrors, expulsions atomic.Uint64
	expel                        func(string, error) error
	gate                         Gate
	ack                          func() error
	log                          zerolog.Logger
	// shared: see Config.Shared.
	shared bool
	// appIO counts application requests in flight and appDone those
	// completed; engines throttle to their minimum rate while their
	// BusyProbe says so.
	appIO   atomic.Int64
	appDone atomic.Uint64
	// partial: see TakePartial.
	partial atomic.Bool

	mu      sync.RWMutex
	members []*member
	merge   MergeWork
	master  string
}

// New builds a VU over its members.
func New(cfg Config) (*VU, error) {
	if cfg.Size <= 0 {
		return nil, fmt.Errorf("vu %s: size %d is not positive", cfg.Name, cfg.Size)
	}
	v := &VU{name: cfg.Name, size: cfg.Size, expel: cfg.Expel, gate: cfg.Gate, log: cfg.Logger, shared: cfg.Shared, ack: cfg.Acknowledge}
	full := 0
	for _, s := range cfg.Members {
		if err := v.addMember(s); err != nil {
			return nil, err
		}
		if s.Role == Full {
			full++
		}
	}
	if full == 0 {
		return nil, fmt.Errorf("vu %s: no full member", cfg.Name)
	}
	return v, nil
}

func (v *VU) addMember(s MemberSpec) error {
	for _, m := range v.members {
		if m.dev.Path() == s.Dev.Path() {
			return fmt.Errorf("vu %s: %s is already a member", v.name, s.Dev.Path())
		}
	}
	cost := s.ReadCost
	if cost <= 0 {
		cost = DefaultReadCost
	}
	role := s.Role
	if role == 0 {
		role = Full
	}
	m := &member{dev: s.Dev, role: role, readCost: cost}
	if q, ok := s.Dev.(device.Quick); ok {
		m.quick, m.quickWrites = q, q.QuickWrites()
	}
	v.members = append(v.members, m)
	return nil
}

// Name is the VU name (DSAn).
func (v *VU) Name() string { return v.name }

// Size is the volume size in bytes.
func (v *VU) Size() int64 { return v.size }

// Lock takes the range lock; the merge and copy engines hold it around
// each chunk they move.
func (v *VU) Lock(off, n int64) func() { return v.locks.Lock(off, n) }

// AddMember adds a member (a new copy target, usually).
func (v *VU) AddMember(s MemberSpec) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.addMember(s)
}

// RemoveMember drops a member from the I/O path. Writes in flight to it
// finish first: removal waits for a write lock on the member list.
func (v *VU) RemoveMember(path string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	for i, m := range v.members {
		if m.dev.Path() == path {
			if m.role == Full && v.fullLocked() == 1 {
				return fmt.Errorf("vu %s: %s is the last full member", v.name, path)
			}
			v.members = append(v.members[:i], v.members[i+1:]...)
			return nil
		}
	}
	return fmt.Errorf("%w %s", ErrUnknownMember, path)
}

// SetRole changes a member's role (a completed copy makes its target full).
func (v *VU) SetRole(path string, r Role) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	m := v.find(path)
	if m == nil {
		return fmt.Errorf("%w %s", ErrUnknownMember, path)
	}
	if m.role == Full && r != Full && v.fullLocked() == 1 {
		return fmt.Errorf("vu %s: %s is the last full member", v.name, path)
	}
	m.role = r
	return nil
}

// SetReadCost sets a member's read cost (0 restores the default).
func (v *VU) SetReadCost(path string, cost int) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	m := v.find(path)
	if m == nil {
		return fmt.Errorf("%w %s", ErrUnknownMember, path)
	}
	if cost <= 0 {
		cost = DefaultReadCost
	}
	m.readCost = cost
	return nil
}

// SetMerge declares the pending work of a required merge and its master
// member; nil clears it when the merge completes.
func (v *VU) SetMerge(w MergeWork, master string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.merge, v.master = w, master
}

// Members returns the members in order.
func (v *VU) Members() []MemberInfo {
	v.mu.RLock()
	defer v.mu.RUnlock()
	out := make([]MemberInfo, 0, len(v.members))
	for _, m := range v.members {
		out = append(out, MemberInfo{Path: m.dev.Path(), Role: m.role, ReadCost: m.readCost, Inflight: m.inflight.Load()})
	}
	return out
}

// Device returns a member's device (for the engines).
func (v *VU) Device(path string) (Device, Role, bool) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	m := v.find(path)
	if m == nil {
		return nil, 0, false
	}
	return m.dev, m.role, true
}

func (v *VU) find(path string) *member {
	for _, m := range v.members {
		if m.dev.Path() == path {
			return m
		}
	}
	return nil
}

func (v *VU) fullLocked() int {
	n := 0
	for _, m := range v.members {
		if m.role == Full {
			n++
		}
	}
	return n
}

func (v *VU) check(off int64, n int64) error {
	if off < 0 || n < 0 || off > v.size || n > v.size-off {
		return fmt.Errorf("%w: [%d, +%d) on %s of %d bytes", ErrRange, off, n, v.name, v.size)
	}
	return nil
}

// ---- writes

// Busy reports application I/O in flight.
func (v *VU) Busy() bool { return v.appIO.Load() > 0 }

// BusyProbe returns the "is the application busy?" test for one engine
// run (merge or copy), called once per chunk from that run only. It also
// counts requests completed since its previous call: requests the NBD
// reader serves itself (TryWriteAt) are in flight for microseconds, so
// sampling Busy alone would mostly miss a busy application. Each run has
// its own probe, so two engines on one VU do not take each other's
// observations.
func (v *VU) BusyProbe() func() bool {
	seen := v.appDone.Load()
	return func() bool {
		done := v.appDone.Load()
		busy := done != seen || v.appIO.Load() > 0
		seen = done
		return busy
	}
}

func (v *VU) beginAppIO() { v.appIO.Add(1) }

func (v *VU) endAppIO() {
	v.appIO.Add(-1)
	v.appDone.Add(1)
}

// beginWrite passes the gate; endWrite must follow once it succeeded.
func (v *VU) beginWrite(off, n int64) error {
	if v.gate == nil {
		return nil
	}
	if err := v.gate.BeginWrite(off, n); err != nil {
		return fmt.Errorf("vu %s: %w", v.name, err)
	}
	return nil
}

func (v *VU) endWrite(off, n int64) {
	if v.gate != nil {
		v.gate.EndWrite(off, n)
	}
}

// WriteAt writes p to every full member and copy target.
func (v *VU) WriteAt(p []byte, off int64, fua bool) error {
	if err := v.check(off, int64(len(p))); err != nil {
		return err
	}
	v.beginAppIO()
	defer v.endAppIO()
	if err := v.beginWrite(off, int64(len(p))); err != nil {
		return err
	}
	defer v.endWrite(off, int64(len(p)))
	v.writes.Add(1)
	unlock := v.locks.Lock(off, int64(len(p)))
	defer unlock()
	return v.everyMember("write", func(d Device) error {
		if _, err := d.WriteAt(p, off); err != nil {
			return err
		}
		if fua {
			return d.Flush()
		}
		return nil
	})
}

// Zero makes [off, off+n) read as zeroes on every member (TRIM and
// WRITE_ZEROES both end here: a trimmed block must not read differently
// from one member to the next).
func (v *VU) Zero(off, n int64, fua bool) error {
	if err := v.check(off, n); err != nil {
		return err
	}
	v.beginAppIO()
	defer v.endAppIO()
	if err := v.beginWrite(off, n); err != nil {
		return err
	}
	defer v.endWrite(off, n)
	unlock := v.locks.Lock(off, n)
	defer unlock()
	return v.everyMember("zero", func(d Device) error {
		if err := d.Zero(off, n); err != nil {
			return err
		}
		if fua {
			return d.Flush()
		}
		return nil
	})
}

// Trim discards a range; it reads as zeroes afterwards on every member.
func (v *VU) Trim(off, n int64) error { return v.Zero(off, n, false) }

// Flush makes every acknowledged write durable on every member.
func (v *VU) Flush() error {
	flush := func(d Device) error { return d.Flush() }
	if v.gate == nil {
		return v.everyMember("flush", flush)
	}
	end := v.gate.BeginFlush()
	err := v.everyMember("flush", flush)
	// A member that failed to flush was expelled (err is nil then): what
	// stays in the set flushed.
	end(err == nil)
	return err
}

// everyMember runs op on every full member and copy target at once, then
// expels the members it failed on (see settle).
func (v *VU) everyMember(what string, op func(Device) error) error {
	var msBuf [maxFanout]*member
	var rolesBuf [maxFanout]Role
	ms, roles := v.writeTargets(msBuf[:0], rolesBuf[:0])
	errs := make([]error, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms[1:] {
		wg.Go(func() {
			m.inflight.Add(1)
			errs[i+1] = op(m.dev)
			m.inflight.Add(-1)
		})
	}
	ms[0].inflight.Add(1)
	errs[0] = op(ms[0].dev)
	ms[0].inflight.Add(-1)
	wg.Wait()
	return v.settle(what, ms, roles, errs)
}

// maxFanout sizes the stack arrays of the write path: six members plus
// copy targets being added fit; more spill to the heap.
const maxFanout = 8

// writeTargets appends the members a write goes to (every full member and
// copy target) and their roles at this moment: a copy completing changes
// a role under v.mu.
func (v *VU) writeTargets(ms []*member, roles []Role) ([]*member, []Role) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	for _, m := range v.members {
		ms = append(ms, m)
		roles = append(roles, m.role)
	}
	return ms, roles
}

// settle expels the members whose part of a request failed (errs[i] for
// ms[i]), unless that would leave no full member with the data: then the
// request fails and nobody is expelled.
func (v *VU) settle(what string, ms []*member, roles []Role, errs []error) error {
	fullOK := 0
	failed := false
	for i := range ms {
		if errs[i] != nil {
			failed = true
		} else if roles[i] == Full {
			fullOK++
		}
	}
	if !failed {
		return v.acknowledge(what)
	}
	if err := v.fenced(what, errs); err != nil {
		return err
	}
	for _, err := range errs {
		if err != nil {
			v.ioErrors.Add(1)
		}
	}
	if fullOK == 0 {
		err := errors.Join(errs...)
		v.log.Error().Str("vu", v.name).Str("op", what).Err(err).Msg("no full member completed the request; it fails and no member is expelled")
		return fmt.Errorf("vu %s: %s failed on every full member: %w", v.name, what, errors.Join(ErrNoMember, err))
	}
	for i, err := range errs {
		if err == nil {
			continue
		}
		if xerr := v.expelMember(ms[i], fmt.Errorf("%s: %w", what, err)); xerr != nil {
			return xerr
		}
	}
	return v.acknowledge(what)
}

// Acknowledge (nbd.Acknowledger) is Config.Acknowledge, for the NBD
// server to call right before a success reply goes out.
func (v *VU) Acknowledge() error {
	if v.ack == nil {
		return nil
	}
	return v.ack()
}

// acknowledge is Config.Acknowledge for a request that succeeded.
func (v *VU) acknowledge(what string) error {
	if v.ack == nil {
		return nil
	}
	if err := v.ack(); err != nil {
		return fmt.Errorf("vu %s: %s done but not acknowledged: %w", v.name, what, err)
	}
	return nil
}

// fenced fails a request that the lease refused on some member: nobody
// is expelled (no member is at fault). A write or zero that reached some
// members and not others left them different: the VU remembers it until
// TakePartial, for the agent to report (Table 8-1 row 3).
func (v *VU) fenced(what string, errs []error) error {
	var fe error
	reached := false
	for _, err := range errs {
		switch {
		case err == nil:
			reached = true
		case errors.Is(err, device.ErrFenced):
			fe = err
		}
	}
	if fe == nil {
		return nil
	}
	if reached && what != "flush" {
		v.partial.Store(true)
	}
	return fmt.Errorf("vu %s: %s: %w", v.name, what, fe)
}

// TakePartial reports, once, whether a write reached only some members
// because the lease refused the others.
func (v *VU) TakePartial() bool { return v.partial.Swap(false) }

// MarkPartial remembers a partial write again (its report failed).
func (v *VU) MarkPartial() { v.partial.Store(true) }

// TryWriteAt serves a write (without FUA) at once, on the caller's
// goroutine, when nothing in it has to wait: the gate admits it without
// writing metadata, no request in flight overlaps it, and every member
// can take it from memory (device.Quick: buffered I/O, a write log whose
// extent is already durable). done false: nothing happened, call WriteAt.
//
// The members are written one after the other rather than at once:
// each write is a copy into the page cache, and the goroutine and thread
// wake-ups a concurrent fan-out costs are more than the copy itself. A
// member that turns out unable to write from memory (its log extent went
// cold meanwhile) is written with WriteAt, in turn too. Failures are
// settled as for WriteAt.
func (v *VU) TryWriteAt(p []byte, off int64) (done bool, err error) {
	n := int64(len(p))
	if err := v.check(off, n); err != nil {
		return true, err
	}
	if v.gate != nil && !v.gate.TryBeginWrite(off, n) {
		return false, nil
	}
	e := v.locks.tryLock(off, n)
	if e == nil {
		v.endWrite(off, n)
		return false, nil
	}
	defer v.locks.release(e)
	var msBuf [maxFanout]*member
	var rolesBuf [maxFanout]Role
	var errsBuf [maxFanout]error
	ms, roles := v.writeTargets(msBuf[:0], rolesBuf[:0])
	for _, m := range ms {
		if !m.quickWrites {
			v.endWrite(off, n)
			return false, nil
		}
	}
	v.beginAppIO()
	defer v.endAppIO()
	defer v.endWrite(off, n)
	errs := errsBuf[:0]
	if len(ms) > maxFanout {
		errs = make([]error, 0, len(ms))
	}
	errs = errs[:len(ms)]
	for i, m := range ms {
		m.inflight.Add(1)
		ok, err := m.quick.TryWriteAt(p, off)
		if !ok && i == 0 {
			m.inflight.Add(-1)
			return false, nil // the deferred calls undo the admission
		}
		if !ok {
			_, err = m.dev.WriteAt(p, off)
		}
		m.inflight.Add(-1)
		errs[i] = err
	}
	v.writes.Add(1)
	return true, v.settle("write", ms, roles, errs)
}

// Faults is how many member I/Os failed (fencing refusals aside) and how
// many members were expelled for it, since the VU was made.
func (v *VU) Faults() (ioErrors, expulsions uint64) {
	return v.ioErrors.Load(), v.expulsions.Load()
}

// Writes is how many application writes (WRITE, not zeroes or trims)
// were issued to the members so far. A write is counted between its
// gate's BeginWrite and EndWrite, so with the gate held exclusively the
// count is exact.
func (v *VU) Writes() uint64 { return v.writes.Load() }

// expelMember removes a failed member before the failing request is
// acknowledged.
func (v *VU) expelMember(m *member, cause error) error {
	path := m.dev.Path()
	v.log.Warn().Str("vu", v.name).Str("member", path).Err(cause).Msg("expelling member after an I/O error")
	if v.expel != nil {
		if err := v.expel(path, cause); err != nil {
			return fmt.Errorf("vu %s: expel %s: %w (after %v)", v.name, path, err, cause)
		}
	}
	v.expulsions.Add(1)
	v.mu.Lock()
	defer v.mu.Unlock()
	for i, x := range v.members {
		if x == m {
			v.members = append(v.members[:i], v.members[i+1:]...)
			break
		}
	}
	return nil
}

// ---- reads

// ReadAt fills p from the volume.
func (v *VU) ReadAt(p []byte, off int64) error {
	if err := v.check(off, int64(len(p))); err != nil {
		return err
	}
	v.beginAppIO()
	defer v.endAppIO()
	v.mu.RLock()
	merge, master := v.merge, v.master
	v.mu.RUnlock()
	if merge != nil && merge.Pending(off, int64(len(p))) {
		return v.mergeRead(p, off, master)
	}
	// Few members: a slice on the stack beats a map per read.
	var triedBuf [4]*member
	tried := triedBuf[:0]
	var firstErr error
	var bad []*member
	for {
		m := v.pickReader(tried)
		if m == nil {
			if firstErr == nil {
				firstErr = ErrNoMember
			}
			return fmt.Errorf("vu %s: read [%d, +%d): %w", v.name, off, len(p), errors.Join(ErrNoMember, firstErr))
		}
		tried = append(tried, m)
		m.inflight.Add(1)
		_, err := m.dev.ReadAt(p, off)
		m.inflight.Add(-1)
		if err == nil {
			for _, b := range bad {
				if v.shared {
					v.log.Warn().Str("vu", v.name).Str("member", b.dev.Path()).Int64("off", off).Msg("read error not repaired: the set is shared with other hosts (a merge repairs it)")
					continue
				}
				v.repair(b, p, off)
			}
			return nil
		}
		if errors.Is(err, device.ErrFenced) {
			// No member is at fault, and no other member may be read.
			return fmt.Errorf("vu %s: read [%d, +%d): %w", v.name, off, len(p), err)
		}
		v.ioErrors.Add(1)
		v.log.Warn().Str("vu", v.name).Str("member", m.dev.Path()).Int64("off", off).Int("len", len(p)).Err(err).Msg("read error; trying another member")
		if firstErr == nil {
			firstErr = err
		}
		bad = append(bad, m)
	}
}

// TryReadAt fills p at once, on the caller's goroutine, when the member
// ReadAt would choose holds the data in memory and no merge has to make
// the range consistent first. false: p holds nothing usable, call ReadAt
// (which also handles read errors and their repair).
func (v *VU) TryReadAt(p []byte, off int64) bool {
	if v.check(off, int64(len(p))) != nil {
		return false
	}
	v.mu.RLock()
	merge := v.merge
	v.mu.RUnlock()
	if merge != nil && merge.Pending(off, int64(len(p))) {
		return false
	}
	m := v.pickReader(nil)
	if m == nil {
		return false
	}
	if m.quick == nil {
		return false
	}
	v.beginAppIO()
	m.inflight.Add(1)
	ok := m.quick.TryReadAt(p, off)
	m.inflight.Add(-1)
	v.endAppIO()
	return ok
}

// pickReader returns the untried full member with the lowest read cost
// plus queue depth; ties go to the earlier member.
func (v *VU) pickReader(tried []*member) *member {
	v.mu.RLock()
	defer v.mu.RUnlock()
	var best *member
	var bestScore int64
	for _, m := range v.members {
		if m.role != Full || slices.Contains(tried, m) {
			continue
		}
		score := int64(m.readCost) + m.inflight.Load()
		if best == nil || score < bestScore {
			best, bestScore = m, score
		}
	}
	return best
}

// repair rewrites a block that failed to read on m with good data from
// another member, as md does; if that write fails, m is expelled.
func (v *VU) repair(m *member, good []byte, off int64) {
	unlock := v.locks.Lock(off, int64(len(good)))
	defer unlock()
	// Re-read under the lock: a write may have landed since the read.
	fresh := make([]byte, len(good))
	src := v.pickReader([]*member{m})
	if src == nil {
		return
	}
	if _, err := src.dev.ReadAt(fresh, off); err != nil {
		return
	}
	if _, err := m.dev.WriteAt(fresh, off); err != nil {
		if errors.Is(err, device.ErrFenced) {
			return // the member keeps its bad block; a merge repairs it
		}
		v.ioErrors.Add(1)
		_ = v.expelMember(m, fmt.Errorf("repair write after a read error: %w", err))
		return
	}
	v.log.Info().Str("vu", v.name).Str("member", m.dev.Path()).Int64("off", off).Int("len", len(good)).Msg("repaired a read error from another member")
}

// mergeRead serves a read the merge has not reached: under the range lock,
// read the merge master and write what it holds to every other member, so
// that any later read, from any member, returns the same data.
func (v *VU) mergeRead(p []byte, off int64, master string) error {
	if v.shared {
		return v.masterRead(p, off, master)
	}
	unlock := v.locks.Lock(off, int64(len(p)))
	defer unlock()
	v.mu.RLock()
	src := v.find(master)
	if src == nil || src.role != Full {
		src = nil
		for _, m := range v.members {
			if m.role == Full {
				src = m
				break
			}
		}
	}
	others := make([]*member, 0, len(v.members))
	for _, m := range v.members {
		if m != src {
			others = append(others, m)
		}
	}
	v.mu.RUnlock()
	if src == nil {
		return ErrNoMember
	}
	src.inflight.Add(1)
	_, err := src.dev.ReadAt(p, off)
	src.inflight.Add(-1)
	if err != nil {
		return fmt.Errorf("vu %s: merge-time read from master %s: %w", v.name, src.dev.Path(), err)
	}
	for _, m := range others {
		// The master read succeeded, so expelling a member that cannot
		// take its data never removes the last good copy.
		if _, err := m.dev.WriteAt(p, off); err != nil {
			if errors.Is(err, device.ErrFenced) {
				v.partial.Store(true)
				return fmt.Errorf("vu %s: merge-time write: %w", v.name, err)
			}
			v.ioErrors.Add(1)
			if xerr := v.expelMember(m, fmt.Errorf("merge-time write: %w", err)); xerr != nil {
				return xerr
			}
		}
	}
	return nil
}

// masterRead serves a read the merge has not reached on a shared set: from
// the merge master alone, with no write (see Config.Shared).
func (v *VU) masterRead(p []byte, off int64, master string) error {
	v.mu.RLock()
	src := v.find(master)
	if src == nil || src.role != Full {
		src = nil
	}
	v.mu.RUnlock()
	if src == nil {
		// The master left: any full member is as good as another until the
		// merge says otherwise, but reads must not be balanced.
		return v.ReadAtNoMerge(p, off)
	}
	src.inflight.Add(1)
	_, err := src.dev.ReadAt(p, off)
	src.inflight.Add(-1)
	if err != nil {
		return fmt.Errorf("vu %s: merge-time read from master %s: %w", v.name, src.dev.Path(), err)
	}
	return nil
}

// ReadAtNoMerge reads from the first full member in path order: the same
// member on every host.
func (v *VU) ReadAtNoMerge(p []byte, off int64) error {
	v.mu.RLock()
	var src *member
	for _, m := range v.members {
		if m.role == Full && (src == nil || m.dev.Path() < src.dev.Path()) {
			src = m
		}
	}
	v.mu.RUnlock()
	if src == nil {
		return ErrNoMember
	}
	_, err := src.dev.ReadAt(p, off)
	return err
}
