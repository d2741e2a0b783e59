"""Atomic directory writes: a folder is replaced by a complete new one in one step, and killed runs' leftovers go.

`atomic_directory(path)` yields a hidden temporary folder beside `path` and, on success, swaps it in with one
atomic exchange (Linux renameat2). Whenever a run is killed, `path` holds one complete folder, the old or the
new one. A killed run leaves a hidden `.name.tmp-PID-XXXXXXXX` (or `.name.old-PID-XXXXXXXX`) folder, which the
next write into the same parent removes once process PID is gone.
"""
import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator

LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[a-z0-9_]{8}")
AT_FDCWD, RENAME_EXCHANGE = -100, 2
# errno values that mean "no atomic exchange here" (old kernel, filesystem without it, seccomp)
NO_EXCHANGE = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_renameat2 = _load_renameat2()
HAS_EXCHANGE = _renameat2 is not None


def exchange(a: str, b: str) -> None:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); OSError where unsupported."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available here")
    if _renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), a, None, b)


def remove_path(path: str) -> None:
    """Delete a folder tree or a file (a link itself, never what it points to); gone already is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the renames are still atomic there
        pass
    finally:
        os.close(fd)


def _running(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, but another user's
        pass
    return True


def clean_leftovers(parent: str) -> None:
    """Remove the hidden copies that writes killed midway left in `parent` (only those of dead processes).

    A folder moved aside by the no-exchange fallback of `_replace` (`.name.old-*`) goes back under its name if
    that name is empty; every other leftover is deleted.
    """
    for entry in os.scandir(parent):
        m = LEFTOVER.fullmatch(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False) or _running(int(m["pid"])):
            continue
        target = os.path.join(parent, m["name"])
        if m["kind"] == "old" and not os.path.lexists(target):
            with contextlib.suppress(OSError):  # a leftover that cannot be moved must not stop this write
                os.rename(entry.path, target)
        remove_path(entry.path)


def _replace(tmp: str, path: str) -> str | None:
    """Put the folder `tmp` under `path`; returns where the previous `path` went (to delete), or None."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return None
    try:
        exchange(tmp, path)  # the name goes from the old complete copy to the new one in one step
        return tmp
    except OSError as e:
        if e.errno not in NO_EXCHANGE:
            raise
    # No atomic exchange on this system or filesystem: two renames, with the name empty for the instant between
    # them. A run killed right there leaves the old copy as .name.old-*, which the next write puts back.
    parent, name = os.path.split(path)
    old = os.path.join(parent, f".{name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    return old


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary directory beside `path`; on success it replaces `path` in one atomic exchange.

    Whenever a run is killed, `path` holds one complete directory, the old or the new one (on Linux; where the
    OS has no atomic exchange, see `_replace`). Hidden `.name.tmp-*` leftovers of killed runs are removed by
    the next write into the same folder.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    clean_leftovers(parent)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        # mkdtemp makes the folder private (0700); a checkpoint is shared like any saved model.
        os.chmod(tmp, 0o777 & ~umask)
        for entry in os.scandir(tmp):
            os.chmod(entry.path, 0o666 & ~umask)
            with open(entry.path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        old = _replace(tmp, path)
        fsync_dir(parent)
        if old is not None:
            remove_path(old)
    except BaseException:
        remove_path(tmp)
        raise
