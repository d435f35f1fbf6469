import os
import subprocess

import pytest

from distill.artifacts import (
    QUANT_RECORD,
    atomic_directory,
    atomic_write_json,
    ensure_writable_dir,
    read_json,
    remove_directory,
    remove_stale_temps,
)
from distill.errors import DistillError
from distill.run import RunDir

DEAD = 4194304  # no process has this pid (Linux pids stay below pid_max <= 2**22)


def test_atomic_directory_replaces_only_when_complete(tmp_path):
    target = tmp_path / "final"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("died while writing")
    assert (target / "a").read_text() == "1"
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_kill_between_the_two_renames_is_undone(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "a").write_text("good")
    os.replace(target, tmp_path / f".final.old-{DEAD}")  # what a kill right after the first rename leaves
    (tmp_path / f".final.tmp-{DEAD}").mkdir()
    remove_stale_temps(tmp_path)
    assert (target / "a").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_temporaries_of_a_running_writer_are_kept_and_never_read_as_results(tmp_path):
    writer = subprocess.Popen(["sleep", "60"])
    try:
        for name in (f".w8a8.tmp-{writer.pid}", f".fp8.tmp-{DEAD}", "fp8"):
            (tmp_path / "quant" / name).mkdir(parents=True)
            (tmp_path / "quant" / name / "config.json").write_text("{}")
            (tmp_path / "quant" / name / QUANT_RECORD).write_text("{}")
        (tmp_path / "quant" / "w4a16").mkdir()  # no record: not a finished quantization
        (tmp_path / "quant" / "w4a16" / "config.json").write_text("{}")
        (tmp_path / "quant" / f".shard-00001.parquet.tmp-{DEAD}").write_bytes(b"half")
        assert [p.name for p in RunDir(tmp_path).quantized_students()] == ["fp8"]
        remove_stale_temps(tmp_path / "quant")
        assert sorted(p.name for p in (tmp_path / "quant").iterdir()) == [
            f".w8a8.tmp-{writer.pid}",
            "fp8",
            "w4a16",
        ]
    finally:
        writer.kill()
        writer.wait()
    remove_stale_temps(tmp_path / "quant")
    assert sorted(p.name for p in (tmp_path / "quant").iterdir()) == ["fp8", "w4a16"]


def test_remove_directory_leaves_nothing_under_the_real_name(tmp_path):
    doomed = tmp_path / "step-000003"
    doomed.mkdir()
    (doomed / "trainer_state.json").write_text("{}")
    remove_directory(doomed)
    assert not doomed.exists() and not list(tmp_path.iterdir())


def test_atomic_json_round_trip(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert read_json(tmp_path / "m.json") == {"a": [1, 2], "b": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unwritable_directory_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DistillError, match=r"run directory .*/file/run is not writable"):
        ensure_writable_dir(blocker / "run", "run directory")
