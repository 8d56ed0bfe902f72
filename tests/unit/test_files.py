"""kong_mtls.files: every file a config or command names is read with a size bound."""

from __future__ import annotations

import pytest

from kong_mtls.files import FileReadError, read_limited


def test_reads_a_small_file(tmp_path):
    (tmp_path / "a.pem").write_bytes(b"abc")
    assert read_limited(tmp_path / "a.pem") == b"abc"


def test_refuses_a_file_over_the_limit_without_echoing_it(tmp_path):
    (tmp_path / "big").write_bytes(b"SECRET" * 10)
    with pytest.raises(FileReadError, match="larger than 10 bytes") as info:
        read_limited(tmp_path / "big", limit=10)
    assert "SECRET" not in str(info.value)


@pytest.mark.parametrize("name", ["missing", "."])
def test_unreadable_paths_are_a_clear_error(tmp_path, name):
    with pytest.raises(FileReadError, match="cannot read"):
        read_limited(tmp_path / name)
