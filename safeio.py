"""
Writing safely: an output never lands on an input, a write never follows a link it did not make, and one run at a
time owns an output folder.

The idea: every output path is checked against the run's inputs before anything loads (clash: the same file after
symlinks and hard links, inside an input folder, or the shipped checkpoint), and every file is created new, under a
random name beside its destination, opened with O_CREAT|O_EXCL|O_NOFOLLOW (an existing file or a planted symlink
makes the open fail instead of being written through), then renamed over the destination. A rename replaces a
symlink at the destination; it never writes through it.

- same_file / within: path identity after symlinks (realpath) and hard links (os.path.samefile).
- clash(out, inputs): why writing `out` could overwrite or land inside an input of the run, or None.
- open_exclusive(path): a new file, never an existing one or a link.
- replace_file(path): a new file renamed onto `path` at once and returned open, for outputs written as a run goes
  (subtitles, JSON lines): a reader sees them grow, a crash keeps what was written.
- write_atomic(path): the same, renamed only once the writing succeeded: a reader never sees half a file.
- RunLock(out): an exclusive flock on `.NAME.lock` beside an output; a second run is refused in one line that names
  the process holding it.
"""
import contextlib
import os
import re
import secrets
import stat

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

SHIPPED_HOME = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
MAX_SCAN = 10_000  # files of an input folder compared inode by inode with an output that has other hard links


class Busy(SystemExit):
    """Another process holds the lock of an output (a SystemExit: uncaught, it is the one line a script ends with)."""


def within(path, folder):
    """Whether real path `path` is `folder` or inside it (both already realpath'd)."""
    return os.path.commonpath([path, folder]) == folder


def same_file(a, b):
    """Whether paths a and b name the same file: equal after symlinks, or hard links to one inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _linked_into(out, folder):
    """Whether an existing file `out` with several hard links is one of the files under `folder`."""
    try:
        st = os.stat(out)
    except OSError:
        return False
    if st.st_nlink < 2 or not stat.S_ISREG(st.st_mode):
        return False
    for n, (root, _, names) in enumerate(os.walk(folder)):
        for name in names[:MAX_SCAN]:
            try:
                other = os.stat(os.path.join(root, name))
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return True
        if n > MAX_SCAN:
            break
    return False


def clash(out, inputs=(), holds=False):
    """Why writing `out` could destroy an input of this run or the shipped checkpoint, or None. `inputs` are the
    run's input files and folders (missing ones and None are skipped). `out` clashes when it is an input (after
    symlinks, or a hard link to one), lies inside an input folder, or lies in checkpoints/; with holds=True (a
    folder a run replaces whole, train.py's --out) also when it holds an input or checkpoints/."""
    real = os.path.realpath(out)
    guarded = [(f"{p}, an input of this run", os.path.realpath(p)) for p in inputs if p and os.path.exists(p)]
    guarded.append(("the shipped checkpoints/ folder, which no run writes", os.path.realpath(SHIPPED_HOME)))
    for name, src in guarded:
        if real == src or (os.path.exists(out) and same_file(out, src)):  # the same file, or a hard link to it
            return f"{out} is {name}: outputs never overwrite inputs"
        if os.path.isdir(src) and (within(real, src) or _linked_into(out, src)):
            return f"{out} is inside {name}: outputs never write into inputs"
        if holds and within(src, real):
            return f"{out} holds {name}, which a save would replace"
    return None


def open_exclusive(path, mode="w", perms=0o666):
    """A new file at `path`, opened for writing; FileExistsError when anything (a file, a symlink) is there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, perms)
    try:
        return os.fdopen(fd, mode)
    except Exception:
        os.close(fd)
        raise


def _fresh_beside(path, mode):
    """(temporary path, file): a new file under a random name in `path`'s folder (made if missing), with the mode
    a replaced regular file had (else the umask's)."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            f = open_exclusive(tmp, mode)
            break
        except FileExistsError:
            continue
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
    return tmp, f


def replace_file(path, mode="w"):
    """A new, empty file renamed onto `path` now and returned open: whatever was at `path` (a file, a symlink) is
    replaced, never written through."""
    tmp, f = _fresh_beside(path, mode)
    try:
        os.replace(tmp, path)
    except OSError:
        f.close()
        os.unlink(tmp)
        raise
    return f


@contextlib.contextmanager
def write_atomic(path, mode="w"):
    """with write_atomic(path) as f: ... -- written under a temporary name and renamed onto `path` only when the
    block succeeds; on an error the temporary file goes and `path` is untouched."""
    tmp, f = _fresh_beside(path, mode)
    try:
        with f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def keep_mode(folder, new):
    """Give folder `new` (about to replace `folder`) the mode `folder` has, so a private (0700) folder stays so."""
    with contextlib.suppress(OSError):
        os.chmod(new, stat.S_IMODE(os.stat(folder).st_mode))


def lock_path(out):
    parent, name = os.path.split(os.path.abspath(out))
    return os.path.join(parent, f".{name}.lock")


class RunLock:
    """with RunLock(out): ... -- this process alone writes `out`. An exclusive flock on `.NAME.lock` beside it (not
    inside: train.py swaps its --out folder whole), holding this process's id for the run that is refused. The lock
    goes with the process, however it ends; the small file stays."""

    def __init__(self, out, flag="--out", enabled=True):
        self.out, self.flag, self.path, self.fd, self.enabled = out, flag, lock_path(out), None, enabled

    def __enter__(self):
        if fcntl is None or not self.enabled:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:  # a planted symlink (ELOOP), no permission
            raise Busy(f"{self.flag} {self.out}: cannot take the lock {self.path} ({e.strerror or e})") from None
        st, head = os.fstat(fd), os.pread(fd, 33, 0)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1 or not re.fullmatch(rb"(\d{1,20}\n)?", head):
            os.close(fd)   # the lock is truncated when taken: never a file that holds something else
            raise Busy(f"{self.flag} {self.out}: {self.path} is in the way of the lock file (not a lock this code "
                       "wrote: a file of its own, or a link to one); move it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise Busy(f"{self.flag} {self.out} is in use by process {holder} (lock {self.path}): one run at a time "
                       "per output; wait for it or pick another") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None
