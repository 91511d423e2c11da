"""The one atomic writer and the one disk cache."""

from __future__ import annotations

import logging

from fedalign_moe.files import load_or_build, replace_atomically


def test_a_file_or_a_folder_appears_whole_and_no_temporary_stays(tmp_path):
    target = tmp_path / "model"
    for text in ("old", "new"):  # a folder that holds files is replaced too
        def write(tmp, text=text):
            tmp.mkdir()
            (tmp / "config.json").write_text(text)
        replace_atomically(target, write)
    assert (target / "config.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")
    try:
        replace_atomically(tmp_path / "file", broken)
    except OSError:
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # neither the file nor its temporary


def test_the_cache_builds_once_rebuilds_what_does_not_match_and_survives_a_full_disk(tmp_path, caplog):
    built = []
    path = tmp_path / "cache" / "value.txt"

    def build():
        built.append(1)
        return "value"

    def load(p):
        text = p.read_text()
        if text == "garbage":
            raise ValueError("unreadable")
        return text if text == "value" else None

    save = lambda value, tmp: tmp.write_text(value)  # noqa: E731
    assert load_or_build(path, load, build, save, "thing") == ("value", False)
    assert load_or_build(path, load, build, save, "thing") == ("value", True) and len(built) == 1
    with caplog.at_level(logging.WARNING, logger="fedalign_moe.files"):
        for bad, said in (("other", "is not what this run expects"), ("garbage", "is unreadable (unreadable)")):
            path.write_text(bad)
            assert load_or_build(path, load, build, save, "thing") == ("value", False) and said in caplog.text
            assert path.read_text() == "value"

    def full(value, tmp):
        raise OSError("No space left on device")

    def torch_full(value, tmp):  # torch.save on a full disk
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert load_or_build(tmp_path / "torch" / "v.pt", load, build, torch_full, "thing") == ("value", False)
    assert load_or_build(tmp_path / "other" / "v.txt", load, build, full, "thing") == ("value", False)
    assert "the thing is not kept" in caplog.text and not (tmp_path / "other" / "v.txt").exists()
    assert load_or_build(None, load, build, save, "thing") == ("value", False)
