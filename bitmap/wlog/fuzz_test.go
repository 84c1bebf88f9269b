package wlog_test

import (
	"errors"
	"hash/crc32"
	"testing"

	"github.com/shadow-project/shadow/bitmap/wlog"
	"github.com/shadow-project/shadow/bitmap/wlog/wlogtest"
)

// fuzzRegion is small, so that inputs stay short: a header and up to
// three bitmap blocks.
var fuzzRegion = wlog.Region{Offset: 0, Length: 4 * 4096}

// FuzzLoad: whatever the region holds, Load never panics; it returns
// either a log that makes sense or one of the sentinels that send the
// caller to a full merge. With reseal set, the input's checksums are
// fixed first, so that the fuzzer gets past them to the checks of the
// fields behind.
func FuzzLoad(f *testing.F) {
	seed := func(vol int64, offs ...int64) []byte {
		dev := wlogtest.NewMemDevice(fuzzRegion.Length)
		l, err := wlog.Format(dev, fuzzRegion, vol, 64*KiB)
		if err != nil {
			f.Fatal(err)
		}
		for _, off := range offs {
			if err := l.Acquire(bg, off, 1); err != nil {
				f.Fatal(err)
			}
		}
		l.Close()
		return dev.Bytes(0, fuzzRegion.Length)
	}
	empty := seed(64 * MiB)
	some := seed(64*MiB+5000, 0, 5*64*KiB, 64*MiB+4999)
	two := seed(40000*64*KiB, 0, int64(wlog.BitsPerBlock)*64*KiB, 39999*64*KiB)
	torn := append([]byte(nil), some...)
	torn[4096+64] ^= 0xff
	f.Add(false, []byte{})
	f.Add(false, empty)
	f.Add(false, some)
	f.Add(false, two)
	f.Add(false, torn)
	f.Add(true, torn)
	f.Add(true, two[:3*4096])

	f.Fuzz(func(t *testing.T, reseal bool, data []byte) {
		region := make([]byte, fuzzRegion.Length)
		copy(region, data)
		if reseal {
			for b := 0; b < len(region); b += 4096 {
				resealBytes(region[b : b+4096])
			}
		}
		dev := wlogtest.NewMemDevice(fuzzRegion.Length)
		dev.Poke(0, region)
		g, err := wlog.Load(dev, fuzzRegion, 0)
		if err != nil {
			if !errors.Is(err, wlog.ErrBlank) && !errors.Is(err, wlog.ErrTorn) && !errors.Is(err, wlog.ErrCorrupt) {
				t.Fatalf("load: %v: not a sentinel", err)
			}
			return
		}
		ext, vol := g.ExtentSize, g.VolumeSize
		if ext < wlog.MinExtentSize || ext > wlog.MaxExtentSize || ext&(ext-1) != 0 || vol <= 0 {
			t.Fatalf("loaded extent size %d, volume size %d", ext, vol)
		}
		n := uint64((vol-1)/ext + 1)
		for i, e := range g.Extents {
			if e >= n || i > 0 && e <= g.Extents[i-1] {
				t.Fatalf("extents %v: not ascending below %d", g.Extents, n)
			}
		}
		var total, end int64
		for off, length := range g.Ranges() {
			if off < end || length <= 0 || off+length > vol {
				t.Fatalf("range %d+%d after %d in a volume of %d", off, length, end, vol)
			}
			end = off + length
			total += length
		}
		if total != g.Bytes() {
			t.Fatalf("ranges sum to %d, Bytes says %d", total, g.Bytes())
		}
		// What Load accepts, Open resumes, holding the same extents.
		l, g2, err := wlog.Open(dev, fuzzRegion, vol)
		if err != nil {
			t.Fatalf("open of a log Load accepted: %v", err)
		}
		defer l.Close()
		if len(g2.Extents) != len(g.Extents) || l.Stats().Set != len(g.Extents) {
			t.Fatalf("open holds %d extents, load %d", len(g2.Extents), len(g.Extents))
		}
	})
}

func resealBytes(b []byte) {
	tab := crc32.MakeTable(crc32.Castagnoli)
	sum := crc32.Update(crc32.Checksum(b[:60], tab), tab, b[64:])
	b[60], b[61], b[62], b[63] = byte(sum), byte(sum>>8), byte(sum>>16), byte(sum>>24)
}
