"""lora/files.py: what a hostile or careless path can make the reader do (nothing but raise LoraError)."""
import os
import threading

import pytest

from lora import LoraError
from lora.files import OutsideRootError, read_bytes, read_text
from lora.inject import read_target_modules
from lora.registry import read_mapper


def call_with_timeout(fn, *args, seconds=10, **kwargs):
    """fn(*args, **kwargs) in a thread, so a reader that blocks fails the test instead of hanging the suite."""
    result = {}

    def run():
        try:
            result["value"] = fn(*args, **kwargs)
        except Exception as e:
            result["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__}{args} blocked"
    if "error" in result:
        raise result["error"]
    return result["value"]


def read_with_timeout(path, **kwargs):
    return call_with_timeout(read_bytes, path, **{"what": "config", "max_bytes": 1 << 20, **kwargs})


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "adapter_config.json"
    os.mkfifo(fifo)
    with pytest.raises(LoraError, match=r"adapter_config.json is a named pipe \(FIFO\), not a regular file"):
        read_with_timeout(fifo)
    with pytest.raises(LoraError, match="named pipe"):
        read_with_timeout(fifo, root=tmp_path)


def test_device_behind_a_symlink_is_refused(tmp_path):
    link = tmp_path / "adapter_config.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(LoraError, match="is a character device, not a regular file"):
        read_with_timeout(link)
    with pytest.raises(OutsideRootError, match="symbolic link"):
        read_with_timeout(link, root=tmp_path)
    with pytest.raises(LoraError, match="is a directory"):
        read_with_timeout(tmp_path)


def test_size_cap_is_checked_before_and_while_reading(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    path.write_bytes(b"x" * 100)
    assert read_bytes(path, what="config", max_bytes=100) == b"x" * 100
    with pytest.raises(LoraError, match=r"config .*f.json is 100 bytes, more than the 99 allowed"):
        read_bytes(path, what="config", max_bytes=99)
    # A file that grows after fstat (here: fstat under-reports) is still read no further than the cap.
    real_fstat = os.fstat

    def stale_fstat(fd):
        info = real_fstat(fd)
        return os.stat_result((*info[:6], 10, *info[7:]))
    monkeypatch.setattr(os, "fstat", stale_fstat)
    with pytest.raises(LoraError, match="grew past the 99 bytes allowed"):
        read_bytes(path, what="config", max_bytes=99)
    assert read_bytes(path, what="config", max_bytes=100) == b"x" * 100


@pytest.fixture
def tree(tmp_path):
    """root/adapter/adapter_config.json inside the root, outside/adapter_config.json beside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "adapter").mkdir(parents=True)
    outside.mkdir()
    (root / "adapter" / "adapter_config.json").write_text('{"inside": true}')
    (outside / "adapter_config.json").write_text('{"inside": false}')
    return root, outside


def test_plain_file_inside_the_root_is_read(tree, tmp_path):
    root, _ = tree
    config = root / "adapter" / "adapter_config.json"
    assert read_text(config, what="config", max_bytes=100, root=root) == '{"inside": true}'
    # A root given through a link, with the path given as the resolved one (what a server's check yields).
    (tmp_path / "root-link").symlink_to(root)
    assert read_bytes(os.path.realpath(config), what="config", max_bytes=100, root=tmp_path / "root-link")
    relative = os.path.relpath(config)
    assert read_bytes(relative, what="config", max_bytes=100, root=root) == b'{"inside": true}'


def test_paths_outside_the_root_are_refused(tree):
    root, outside = tree
    for path in (outside / "adapter_config.json", root / ".." / "outside" / "adapter_config.json", root):
        with pytest.raises(OutsideRootError):
            read_bytes(path, what="config", max_bytes=100, root=root)


def test_folder_swapped_for_a_symlink_after_the_check_is_refused(tree):
    root, outside = tree
    folder = root / "adapter"
    assert os.path.commonpath([os.path.realpath(folder), str(root)]) == str(root)  # the server's check passes...
    folder.rename(root / "moved")  # ...then the folder is swapped for a link leading outside
    folder.symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutsideRootError, match=r"adapter is a symbolic link"):
        read_bytes(folder / "adapter_config.json", what="config", max_bytes=100, root=root)
    assert read_bytes(folder / "adapter_config.json", what="config", max_bytes=100) == b'{"inside": false}'


def test_symlinked_file_leaving_the_root_is_refused(tree):
    root, outside = tree
    config = root / "adapter" / "adapter_model.safetensors"
    config.symlink_to(outside / "adapter_config.json")
    with pytest.raises(OutsideRootError, match="adapter_model.safetensors is a symbolic link"):
        read_bytes(config, what="adapter weights", max_bytes=100, root=root)


def test_text_is_utf8_with_universal_newlines(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"\xef\xbb\xbfQ: {instruction}\r\nA:\r")
    assert read_text(path, what="prompt format", max_bytes=100) == "Q: {instruction}\nA:\n"
    path.write_bytes(b"ok\n\xff\n")
    with pytest.raises(LoraError, match=r"prompt format .*prompt.txt is not UTF-8 text \(line 2"):
        read_text(path, what="prompt format", max_bytes=100)
    with pytest.raises(LoraError, match="missing.txt does not exist"):
        read_text(tmp_path / "missing.txt", what="prompt format", max_bytes=100)


def test_target_modules_and_mapper_files_are_read_safely(tmp_path):
    os.mkfifo(tmp_path / "target_modules.txt")
    (tmp_path / "mapper.json").symlink_to("/dev/zero")
    with pytest.raises(LoraError, match="target modules file .* is a named pipe"):
        call_with_timeout(read_target_modules, tmp_path / "target_modules.txt")
    with pytest.raises(LoraError, match="checkpoint mapper .* is a character device"):
        call_with_timeout(read_mapper, tmp_path / "mapper.json")
