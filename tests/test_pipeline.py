"""`distill run` (what `make demo` calls) on a micro recipe, through the real CLI."""

import json
import subprocess
import sys

from .conftest import MICRO, TINY


def test_run_prepares_pretrains_and_summarises(cache_dir, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "distill",
        "run",
        str(TINY),
        *MICRO,
        "pretrain.max_steps=20",
        "pretrain.batch_size=8",
        "pretrain.eval_every=10",
        f"runs_dir={tmp_path}",
        "--no-progress",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "held-out (test) loss" in first.stdout and "perplexity" in first.stdout
    assert "uniform over the vocabulary: loss 8.318" in first.stdout
    assert "not chained by `distill run` yet: generate, train" in first.stdout
    manifest = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    assert manifest["stages"]["prepare"]["status"] == "done"
    assert manifest["stages"]["pretrain"]["status"] == "done"
    assert manifest["stages"]["pretrain"]["versions"]["torch"]

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "(reused from cache)" in again.stdout
