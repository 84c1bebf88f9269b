package device

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// newLoop attaches a loop device to a fresh file of size bytes and
// detaches it when the test ends, whatever happens. It skips the test
// where loop devices cannot be made (no losetup, no /dev/loop-control,
// not root, inside a restricted container).
func newLoop(t *testing.T, size int64) (loop, backing string) {
	t.Helper()
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Skip("losetup not available")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skipf("no loop devices: %v", err)
	}
	backing = newFile(t, size)
	out, err := exec.Command("losetup", "-f", "--show", backing).CombinedOutput()
	if err != nil {
		t.Skipf("losetup -f --show failed: %v: %s", err, out)
	}
	loop = strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", loop).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", loop, err, out)
		}
	})
	return loop, backing
}

func TestLoopDevice(t *testing.T) {
	const size = 8 << 20
	loop, backing := newLoop(t, size)
	for _, direct := range []bool{false, true} {
		t.Run(map[bool]string{false: "buffered", true: "direct"}[direct], func(t *testing.T) {
			d, err := Open(loop, Options{Direct: direct})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if d.Size() != size {
				t.Fatalf("size %d, want %d", d.Size(), size)
			}
			// O_EXCL: a second open fails, from this process too.
			if d2, err := Open(loop, Options{ReadOnly: true}); !errors.Is(err, ErrBusy) {
				if d2 != nil {
					d2.Close()
				}
				t.Fatalf("second open: %v, want ErrBusy", err)
			}

			data := pattern(20, size)
			if _, err := d.WriteAt(data, 0); err != nil {
				t.Fatal(err)
			}
			// Unaligned edges (written) around an aligned middle
			// (BLKZEROOUT), and a range inside one sector.
			zeros := [][2]int64{{1000, 3 << 20}, {5<<20 + 7, 100}}
			for _, z := range zeros {
				if err := d.Zero(z[0], z[1]); err != nil {
					t.Fatal(err)
				}
				clear(data[z[0] : z[0]+z[1]])
			}
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(readAll(t, d), data) {
				t.Fatal("loop device contents differ")
			}
			// Flushed through the loop driver to the backing file.
			onDisk, err := os.ReadFile(backing)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(onDisk, data) {
				t.Fatal("backing file differs after Flush")
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			d2, err := Open(loop, Options{})
			if err != nil {
				t.Fatalf("open after close: %v", err)
			}
			d2.Close()
		})
	}
}
