package agent

import (
	"context"
	"fmt"
	"time"

	"github.com/shadow-project/shadow/bitmap"
	"github.com/shadow-project/shadow/cluster"
	"github.com/shadow-project/shadow/cmd/internal/device"
	"github.com/shadow-project/shadow/cmd/internal/memberlog"
	"github.com/shadow-project/shadow/cmd/internal/meta"
	"github.com/shadow-project/shadow/cmd/internal/vu"
	"github.com/shadow-project/shadow/shadowset"
)

// Write logs across hosts. A write-log block has one writer, so on a set
// a cluster holds, the write-log region of every member is split into
// cluster.WriteLogSlots slots, and each host that mounts the set logs its
// own writes in its own slot, taken through the log (ClaimSlot). The
// member's metadata records the whole region with memberlog.FlagHostSlots.
//
//   - A host formats its slot empty when it takes it, and again, after a
//     flush, when it dismounts cleanly; then it frees it.
//   - A host that fails keeps its slot: what it logged is what it may have
//     left different. The merge that follows reads every slot whose owner
//     no longer mounts the set, on every full member, and merges their
//     union; when that merge completes, its host formats those slots
//     empty and frees them ("a failed host's area is cleared only by the
//     merge that covered it").
//   - The first host to mount a dirty set reads every slot (nobody mounts
//     it: every slot is orphaned), and the controller minimerge merges
//     their union.
//   - A set last written by a single-host agent (one log over the whole
//     region) found dirty by a cluster gets a full merge: its log is not
//     in slots.

// orphanSlots are the write-log slots whose owner no longer mounts the
// set: what they logged may differ between members.
func (a *Agent) orphanSlots(set string, locked bool) []int {
	var owners []string
	var sv shadowset.SetView
	if locked {
		owners = a.clog.SlotOwnersLocked(set)
		sv, _ = a.elog.Locked().Set(set)
	} else {
		owners = a.clog.SlotOwners(set)
		sv, _ = a.setView(set)
	}
	var out []int
	for i, o := range owners {
		mounted := false
		for _, h := range sv.Mounted {
			mounted = mounted || h == o
		}
		if o != "" && !mounted {
			out = append(out, i)
		}
	}
	return out
}

// fullDevices are the set's full members' devices.
func (vol *volume) fullDevices() []device.Device {
	var out []device.Device
	vol.mdMu.Lock()
	defer vol.mdMu.Unlock()
	for _, m := range vol.vu.Members() {
		if rt := vol.members[m.Path]; rt != nil && m.Role == vu.Full {
			out = append(out, rt.dev)
		}
	}
	return out
}

// clusterLogBitmap (under the log's lock) is what a controller minimerge
// on a shared set merges:
// the union of the orphaned slots on every full member, and what this
// host recovered at mount. ok false: some log could not be read: merge
// the whole volume.
func (a *Agent) clusterLogBitmap(vol *volume, act shadowset.Action) (*bitmap.Bitmap, []int, bool) {
	b, err := bitmap.New(vol.bm.chunkSize)
	if err != nil {
		return nil, nil, false
	}
	if rec := vol.loggedChunks(); rec != nil {
		if err := b.Or(rec); err != nil {
			return nil, nil, false
		}
	}
	slots := a.orphanSlots(act.Set, true)
	if lost := memberlog.ReadSlots(vol.fullDevices(), vol.size, slots, b); len(lost) > 0 {
		a.log.Warn().Str("vu", act.Set).Strs("lost", lost).Msg("write logs unreadable: the merge covers the whole volume")
		return nil, slots, false
	}
	return b, slots, true
}

// releaseMergedSlots runs after a controller minimerge completed on this
// host: the orphaned slots it covered are emptied and freed.
func (a *Agent) releaseMergedSlots(vol *volume, slots []int) {
	if len(slots) == 0 {
		return
	}
	a.wg.Go(func() {
		// Only slots still orphaned: none can have been retaken, since a
		// taken slot has an owner that mounts the set.
		still := map[int]bool{}
		for _, k := range a.orphanSlots(vol.name, false) {
			still[k] = true
		}
		var mine []int
		for _, k := range slots {
			if still[k] {
				mine = append(mine, k)
			}
		}
		if err := memberlog.FormatSlots(vol.fullDevices(), vol.size, mine); err != nil {
			a.log.Error().Str("vu", vol.name).Err(err).Msg("cannot empty the merged write-log slots: they stay taken, and the next merge covers them again")
			return
		}
		ctx, cancel := context.WithTimeout(a.ctx, 30*time.Second)
		defer cancel()
		for _, k := range mine {
			if err := a.clog.FreeSlot(ctx, vol.name, k); err != nil {
				a.log.Warn().Str("vu", vol.name).Int("slot", k).Err(err).Msg("cannot free a merged write-log slot")
			}
		}
		a.log.Info().Str("vu", vol.name).Ints("slots", mine).Msg("write-log slots of departed hosts emptied after the merge")
	})
}

// releaseOwnSlot: at a clean dismount, with every write of this host
// flushed, its slot holds nothing a merge needs: empty it and free it.
func (a *Agent) releaseOwnSlot(vol *volume) {
	if !a.clustered() || !vol.writeLog {
		return
	}
	// Every write this host made must be on stable storage of every
	// member before its log may forget it.
	if err := vol.vu.Flush(); err != nil {
		a.log.Warn().Str("vu", vol.name).Err(err).Msg("flush before releasing the write-log slot failed: the slot stays, and the next merge covers it")
		return
	}
	k := -1
	vol.mdMu.Lock()
	var devs []device.Device
	for _, m := range vol.members {
		ld, ok := m.dev.(*memberlog.Device)
		if !ok {
			continue
		}
		if slot, ok := ld.HostSlot(); ok {
			k = slot
			_ = ld.Log().Close()
			devs = append(devs, ld.Device)
		}
	}
	vol.mdMu.Unlock()
	if k < 0 {
		return
	}
	if err := memberlog.FormatSlots(devs, vol.size, []int{k}); err != nil {
		a.log.Warn().Str("vu", vol.name).Err(err).Msg("cannot empty this host's write-log slot: the next merge covers it")
		return
	}
	ctx, cancel := context.WithTimeout(a.ctx, 30*time.Second)
	defer cancel()
	if err := a.clog.FreeSlot(ctx, vol.name, k); err != nil {
		a.log.Warn().Str("vu", vol.name).Err(err).Msg("cannot free this host's write-log slot")
	}
}

// attachClusterLogs is mount's write-log step on a shared set, for the
// first host to mount it: read what every slot logged (when the set was
// found dirty: nobody mounts it, so every slot is orphaned), take a slot,
// and put every member's writes through it.
func (a *Agent) attachClusterLogs(set string, probes []*probe, roles []role, wasDirty bool, md meta.Metadata, size int64, logs *memberlog.State) error {
	if wasDirty {
		if md.WriteLog.Length != 0 && md.WriteLog.Flags&memberlog.FlagHostSlots == 0 {
			logs.Lost = append(logs.Lost, "the set's write log was kept by a single-host agent, not in host slots")
		} else {
			var fulls []device.Device
			for i, p := range probes {
				if roles[i].full {
					fulls = append(fulls, p.dev)
				}
			}
			logs.Lost = append(logs.Lost, memberlog.ReadSlots(fulls, size, allSlots(), logs.Logged)...)
		}
	}
	return a.attachOwnSlot(set, probes, size)
}

// attachOwnSlot takes this host's write-log slot and formats it on every
// member, which then writes through it.
func (a *Agent) attachOwnSlot(set string, probes []*probe, size int64) error {
	ctx, cancel := context.WithTimeout(a.ctx, 30*time.Second)
	defer cancel()
	k, err := a.clog.ClaimSlot(ctx, set)
	if err != nil {
		return fmt.Errorf("write log: %w", err)
	}
	for _, p := range probes {
		ld, err := memberlog.AttachSlot(p.dev, size, k)
		if err != nil {
			a.freeOwnSlotAfterFailedMount(set)
			return err
		}
		p.dev = ld
	}
	return nil
}

// freeOwnSlotAfterFailedMount gives back a slot a failed mount took (it
// was formatted empty, or never written).
func (a *Agent) freeOwnSlotAfterFailedMount(set string) {
	owners := a.clog.SlotOwners(set)
	for k, o := range owners {
		if o == a.host {
			ctx, cancel := context.WithTimeout(a.ctx, 10*time.Second)
			_ = a.clog.FreeSlot(ctx, set, k)
			cancel()
		}
	}
}

func allSlots() []int {
	out := make([]int, cluster.WriteLogSlots)
	for i := range out {
		out[i] = i
	}
	return out
}
