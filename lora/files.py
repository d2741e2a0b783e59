"""Reading files that come from outside: one open, regular files only, a size cap, and an optional root.

Every file a user or a client names (adapter checkpoints, configs, mappers) is read here, so that
  - a FIFO or a device (/dev/zero) is refused before a byte is read, never blocking the reader or filling memory;
  - the size is checked on the opened file and at most `max_bytes + 1` bytes are read, so a file that grows
    while it is read is refused too;
  - with `root`, the path is opened one component at a time from a descriptor of the root, refusing every
    symbolic link, so nothing swapped in between a check and the read can lead outside the root;
  - the bytes returned are those of the very file that was checked.
"""
import errno
import os
import stat

from .errors import LoraError

MAX_JSON_BYTES = 8 << 20  # configs, task metadata and mappers are kilobytes; 8 MiB leaves room for any real one
MAX_DATA_BYTES = 4 << 30  # training and validation data: past 4 GiB, its Python objects would not fit in memory anyway


class OutsideRootError(LoraError):
    """A file that is not inside the allowed root when it is opened (the server answers 403)."""


class MissingFileError(LoraError):
    """The file does not exist (callers with optional files, or a better hint, catch this one)."""


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO for reading would otherwise wait for a writer
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_SEARCH = getattr(os, "O_PATH", 0)  # folders on the way need only search permission, as in a normal open


def _kind(mode):
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _open_error(e, what, path):
    if e.errno == errno.ENOENT:
        return MissingFileError(f"{what} {path} does not exist")
    reason = {errno.EACCES: "is not readable (permission denied)",
              errno.ENOTDIR: "has a path component that is not a directory"}.get(e.errno, f"cannot be opened ({e.strerror})")
    return LoraError(f"{what} {path} {reason}")


def _relative_to_root(path, root):
    """`path`'s components below `root`, lexically; tried against the root as given and as resolved."""
    target = os.path.abspath(path)
    for base in dict.fromkeys((os.path.abspath(root), os.path.realpath(root))):
        if os.path.commonpath([base, target]) == base and target != base:
            return base, os.path.relpath(target, base).split(os.sep)
    raise OutsideRootError(f"{path} is not inside the allowed root {root}; give a path inside it")


def _open_in_root(path, root, what):
    """Open `path` walking down from `root` without following any symbolic link; returns the fd."""
    if not (_NOFOLLOW and os.open in os.supports_dir_fd):
        raise LoraError(f"reading files only inside a root needs openat() and O_NOFOLLOW, which this system lacks; "
                        f"cannot safely read {path}")
    base, parts = _relative_to_root(path, root)
    try:
        fd = os.open(base, _OPEN_FLAGS | _DIRECTORY | _SEARCH)
    except OSError as e:
        raise _open_error(e, "root folder", root) from None
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = _OPEN_FLAGS | _NOFOLLOW | (_NONBLOCK if last else _DIRECTORY | _SEARCH)
            try:
                child = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                # O_NOFOLLOW makes a link fail with ELOOP, or ENOTDIR with O_DIRECTORY; tell links apart from the rest.
                try:
                    is_link = stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
                except OSError:
                    is_link = False
                if is_link:
                    shown = os.path.join(base, *parts[:i + 1])
                    raise OutsideRootError(
                        f"{what} {path}: {shown} is a symbolic link; links are never followed below the root {root} "
                        f"(not even ones that stay inside it), so a link cannot lead outside it: copy the files into "
                        f"the root instead") from None
                raise _open_error(e, what, path) from None
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path, *, what, max_bytes, root=None):
    """The bytes of the regular file `path`, read through one open file descriptor.

    Args:
        path: the file to read.
        what: what the file is, for messages ("adapter config").
        max_bytes: refuse a file larger than this.
        root: when given, refuse (OutsideRootError) a path that is not inside this folder at the moment it is
            opened, or that passes through any symbolic link below it.
    """
    path = os.fspath(path)
    if root is not None:
        fd = _open_in_root(path, os.fspath(root), what)
    else:
        try:
            fd = os.open(path, _OPEN_FLAGS | _NONBLOCK)
        except OSError as e:
            raise _open_error(e, what, path) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LoraError(f"{what} {path} is {_kind(info.st_mode)}, not a regular file; point to the file itself")
        if info.st_size > max_bytes:
            raise LoraError(f"{what} {path} is {info.st_size:,} bytes, more than the {max_bytes:,} allowed; "
                            f"is it the right file?")
        # Ask for one byte more than fstat says, which shows a file that grows while it is read; each read
        # allocates what it asks for, so never ask for max_bytes up front.
        chunks, total, expected = [], 0, info.st_size + 1
        while total <= max_bytes:
            chunk = os.read(fd, min(max_bytes + 1, max(expected, total + (1 << 16))) - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > max_bytes:
        raise LoraError(f"{what} {path} grew past the {max_bytes:,} bytes allowed while it was read; "
                        f"read it once it is complete")
    return b"".join(chunks)


def read_text(path, *, what, max_bytes, root=None):
    """`read_bytes` decoded as UTF-8 (a leading byte-order mark dropped, newlines made "\\n" as open() does).

    Args: as for `read_bytes`.
    """
    data = read_bytes(path, what=what, max_bytes=max_bytes, root=root)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise LoraError(f"{what} {path} is not UTF-8 text (line {line}, byte {e.start}); save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")
