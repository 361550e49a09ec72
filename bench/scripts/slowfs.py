#!/usr/bin/python3
"""A slow disk for benchmarks: a FUSE passthrough of DIR at MOUNTPOINT that adds a delay to every write
(per 4 KiB written) and to every fsync, like a device of that speed (1 ms per 4 KiB is about 4 MB/s).

Usage (as root; Debian packages python3-fusepy and fuse3):
    bench/scripts/slowfs.py DIR MOUNTPOINT [--write-ms-per-4k 1] [--fsync-ms 50]
Runs in the foreground until unmounted (fusermount3 -u MOUNTPOINT, or umount).
"""

import argparse
import errno
import os
import threading
import time

import fusepy as fuse


class SlowPassthrough(fuse.Operations):
    def __init__(self, root, write_s_per_4k, fsync_s):
        self.root = os.path.realpath(root)
        self.write_s_per_4k = write_s_per_4k
        self.fsync_s = fsync_s
        # One device: writes and fsyncs queue behind each other like on a single disk.
        self.device = threading.Lock()

    def _p(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def _busy(self, seconds):
        if seconds > 0:
            with self.device:
                time.sleep(seconds)

    # Metadata
    def access(self, path, mode):
        if not os.access(self._p(path), mode):
            raise fuse.FuseOSError(errno.EACCES)

    def getattr(self, path, fh=None):
        st = os.lstat(self._p(path)) if fh is None else os.fstat(fh)
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._p(path))

    def statfs(self, path):
        sv = os.statvfs(self._p(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
                "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(sv, k) for k in keys}

    def chmod(self, path, mode):
        os.chmod(self._p(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._p(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._p(path), times)

    def mkdir(self, path, mode):
        os.mkdir(self._p(path), mode)

    def rmdir(self, path):
        os.rmdir(self._p(path))

    def unlink(self, path):
        os.unlink(self._p(path))

    def rename(self, old, new):
        os.rename(self._p(old), self._p(new))

    def truncate(self, path, length, fh=None):
        if fh is None:
            os.truncate(self._p(path), length)
        else:
            os.ftruncate(fh, length)

    # Files
    def create(self, path, mode, fi=None):
        return os.open(self._p(path), os.O_RDWR | os.O_CREAT, mode)

    def open(self, path, flags):
        return os.open(self._p(path), flags)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        n = os.pwrite(fh, data, offset)
        self._busy(self.write_s_per_4k * ((len(data) + 4095) // 4096))
        return n

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        self._busy(self.fsync_s)
        return 0

    def opendir(self, path):
        return os.open(self._p(path), os.O_RDONLY | os.O_DIRECTORY)

    def releasedir(self, path, fh):
        os.close(fh)
        return 0

    def fsyncdir(self, path, datasync, fh):
        os.fsync(fh)
        self._busy(self.fsync_s)
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("mountpoint")
    ap.add_argument("--write-ms-per-4k", type=float, default=1.0)
    ap.add_argument("--fsync-ms", type=float, default=50.0)
    a = ap.parse_args()
    ops = SlowPassthrough(a.dir, a.write_ms_per_4k / 1e3, a.fsync_ms / 1e3)
    # Kernel writes come in pieces of up to 128 KiB (big_writes); nothing is cached in the kernel.
    fuse.FUSE(ops, a.mountpoint, foreground=True, nothreads=False, allow_other=True, big_writes=True)


if __name__ == "__main__":
    main()
