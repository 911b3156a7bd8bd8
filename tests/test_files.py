import os

import pytest

from lisa_control.core.files import write_text_atomically


def test_a_write_killed_before_the_rename_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    write_text_atomically(path, '{"old": 1}')
    assert path.read_text() == '{"old": 1}'

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomically(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}'
    monkeypatch.undo()
    write_text_atomically(path, '{"new": 2}')
    assert path.read_text() == '{"new": 2}'
