"""tunelab.io: atomic writes and the modes of what tunelab writes."""

import os
import stat
import tempfile

import torch
from safetensors.torch import save_file

from tunelab.io import atomic_write_text, created_mode, normal_modes


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_usual_modes_follow_the_umask():
    old = os.umask(0o027)
    try:
        assert (created_mode(), created_mode(directory=True)) == (0o640, 0o750)
    finally:
        os.umask(old)
    assert (created_mode(), created_mode(directory=True)) == (0o666 & ~old, 0o777 & ~old)


def test_an_atomic_write_gives_a_new_file_the_usual_mode_and_keeps_a_replaced_ones(tmp_path):
    new = tmp_path / "cleaned.jsonl"
    atomic_write_text(new, "{}\n")
    assert _mode(new) == created_mode()  # not mkstemp's private 0600
    private = tmp_path / "notes.txt"
    private.write_text("old")
    private.chmod(0o600)
    atomic_write_text(private, "new")
    assert private.read_text() == "new" and _mode(private) == 0o600


def test_normal_modes_opens_a_temporary_folder_and_safetensors_files(tmp_path):
    folder = tempfile.mkdtemp(dir=tmp_path)  # 0700
    os.mkdir(os.path.join(folder, "sub"), 0o700)
    save_file({"w": torch.ones(2)}, os.path.join(folder, "sub", "model.safetensors"))
    os.symlink("/etc/hostname", os.path.join(folder, "link"))
    before = _mode("/etc/hostname")
    normal_modes(folder)
    assert _mode(folder) == _mode(os.path.join(folder, "sub")) == created_mode(directory=True)
    assert _mode(os.path.join(folder, "sub", "model.safetensors")) == created_mode()
    assert _mode("/etc/hostname") == before  # a link's target is not ours to change
