package vu

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/rs/zerolog"

	"github.com/shadow-project/shadow/cmd/internal/device"
)

// The VU write path against a bare device, side by side in one run
// (go test -bench . ./cmd/internal/vu): 16 writers of 4 KiB at random
// offsets, as fio's iodepth 16 would issue them. The ratio shows what the
// second member and the engine cost.

func benchFile(b *testing.B, name string) device.Device {
	p := filepath.Join(b.TempDir(), name)
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		b.Fatal(err)
	}
	if err := os.Truncate(p, 256<<20); err != nil {
		b.Fatal(err)
	}
	d, err := device.Open(p, device.Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { d.Close() })
	return d
}

// sixteenWriters runs 16 goroutines of 4 KiB requests at random offsets.
func sixteenWriters(b *testing.B, write func(buf []byte, off int64) error) {
	var wg sync.WaitGroup
	per := b.N/16 + 1
	b.ResetTimer()
	for w := range 16 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			buf := make([]byte, 4096)
			for range per {
				if err := write(buf, int64(rng.IntN(256<<20/4096))*4096); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
}

func BenchmarkWriteOneDevice(b *testing.B) {
	d := benchFile(b, "a")
	sixteenWriters(b, func(buf []byte, off int64) error { _, err := d.WriteAt(buf, off); return err })
}

// twoFileVU is a VU over two fresh 256 MiB files.
func twoFileVU(b *testing.B) *VU {
	v, err := New(Config{Name: "DSA1", Size: 256 << 20, Logger: zerolog.Nop(),
		Members: []MemberSpec{{Dev: benchFile(b, "a"), Role: Full}, {Dev: benchFile(b, "b"), Role: Full}}})
	if err != nil {
		b.Fatal(err)
	}
	return v
}

func BenchmarkWriteVUTwoMembers(b *testing.B) {
	v := twoFileVU(b)
	sixteenWriters(b, func(buf []byte, off int64) error { return v.WriteAt(buf, off, false) })
}

// The read path, cached: what the VU adds to a pread (member choice by
// cost and queue depth).
func BenchmarkReadOneDevice(b *testing.B) {
	d := benchFile(b, "a")
	sixteenWriters(b, func(buf []byte, off int64) error { _, err := d.ReadAt(buf, off); return err })
}

func BenchmarkReadVUTwoMembers(b *testing.B) {
	v := twoFileVU(b)
	sixteenWriters(b, func(buf []byte, off int64) error { return v.ReadAt(buf, off) })
}
