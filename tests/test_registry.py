"""`distill promote` and `distill registry` through the CLI: the gate decides, --force needs a reason that is
recorded, versions are immutable copies, and a kill mid-promotion leaves no half-written entry."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distill.artifacts import QUANT_RECORD, atomic_write_json
from distill.config import recipe_to_yaml

PASSED = {"passed": True, "eval_passed": True, "noise": "paired", "z": 1.0, "checks": [], "errors": [],
          "models": {"teacher": {"role": "teacher", "scores": {"distill_cloze": {"acc": 0.5}}}}}  # fmt: skip
FAILED_CHECK = {
    "model": "student", "against": "teacher", "task": "distill_cloze", "metric": "acc",
    "rule": "max_drop 0.05", "higher_is_better": True, "value": 0.2, "reference": 0.4, "threshold": 0.35,
    "margin": -0.15, "se": 0.03, "noise": "paired (100 documents)", "passed": False, "within_noise": False,
}  # fmt: skip


DEAD_PID = 4194304  # above any pid a Linux kernel hands out (pids stay below pid_max <= 2**22)


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "distill", *args], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.fixture
def run(micro, tmp_path):
    """A run directory as the stages leave it: recipe, a student (with a weights file), a quantized
    student, the teacher store's manifest and a gate decision (passed unless a test rewrites it)."""
    recipe = micro()
    root = recipe.run_dir
    (root / "student" / "final").mkdir(parents=True)
    (root / "student" / "final" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (root / "student" / "final" / "model.safetensors").write_bytes(b"weights-v1")
    for quant in ("w8a8", f".fp8.tmp-{DEAD_PID}"):  # a finished quantization, and a killed one's temporary
        (root / "quant" / quant).mkdir(parents=True)
        (root / "quant" / quant / "config.json").write_text("{}")
    (root / "quant" / "w8a8" / QUANT_RECORD).write_text('{"scheme": "w8a8"}')
    (root / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    teacher = {"path": "/models/teacher", "config_hash": "c0ffee", "weights_hash": "beef"}
    atomic_write_json(root / "teacher" / "manifest.json", {"identity": {"teacher": teacher}})
    atomic_write_json(root / "eval" / "gate.json", PASSED)
    return root, tmp_path / "registry"


def test_promote_copies_a_passing_student_into_numbered_immutable_versions(run):
    root, registry = run
    out = cli("promote", str(root), "--registry", str(registry))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "promoted: tiny@1"
    assert "serve it: distill serve --promoted tiny@1 --student" in out.stdout
    entry = json.loads((registry / "tiny" / "1" / "entry.json").read_text())
    assert entry["name"] == "tiny" and entry["version"] == 1 and entry["ref"] == "tiny@1"
    assert entry["gate"]["passed"] and not entry["forced"] and entry["reason"] is None
    assert entry["gate"]["scores"]["teacher"] == {"distill_cloze": {"acc": 0.5}}
    assert entry["teacher"] == {"path": "/models/teacher", "config_hash": "c0ffee", "weights_hash": "beef"}
    assert entry["student"] == str((registry / "tiny" / "1" / "student").resolve())
    assert entry["quantized"] == {"w8a8": str((registry / "tiny" / "1" / "quant" / "w8a8").resolve())}
    assert entry["source"]["student"] == str((root / "student" / "final").resolve())
    assert time.strftime("%Y-%m-%d") in entry["promoted_at"]
    assert (registry / "tiny" / "1" / "recipe.yaml").read_text() == (root / "recipe.yaml").read_text()

    # retraining the run changes nothing already promoted; promoting again makes version 2
    (root / "student" / "final" / "model.safetensors").write_bytes(b"weights-v2")
    assert (registry / "tiny" / "1" / "student" / "model.safetensors").read_bytes() == b"weights-v1"
    out = cli("promote", str(root), "--registry", str(registry), "--name", "coder-draft")
    assert out.returncode == 0 and out.stdout.startswith("promoted: coder-draft@1"), out.stderr
    assert cli("promote", str(root), "--registry", str(registry)).stdout.startswith("promoted: tiny@2")
    assert (registry / "tiny" / "2" / "student" / "model.safetensors").read_bytes() == b"weights-v2"
    again = cli("promote", str(root), "--registry", str(registry))  # the same student: no new version
    assert again.stdout.startswith("promoted: tiny@2 (already promoted: the same student)"), again.stderr

    listing = cli("registry", "list", "--registry", str(registry)).stdout.splitlines()
    assert [line.split()[0] for line in listing] == ["coder-draft@1", "tiny@1", "tiny@2"]
    assert all("gate passed" in line for line in listing)
    # DISTILL_REGISTRY is the default registry; NAME alone is the newest version
    env = {**os.environ, "DISTILL_REGISTRY": str(registry)}
    assert json.loads(cli("registry", "show", "tiny", env=env).stdout)["version"] == 2
    assert json.loads(cli("registry", "show", "tiny@1", env=env).stdout)["version"] == 1
    missing = cli("registry", "show", "tiny@7", env=env)
    assert (
        missing.returncode == 1
        and f"tiny@7 is not in the registry {registry} (versions: [1, 2])" in missing.stderr
    )
    unknown = cli("registry", "show", "nope", env=env)
    assert unknown.returncode == 1 and "(it has: coder-draft, tiny)" in unknown.stderr

    # serving a promoted student reads the registry's copy, not the run
    dry = cli("serve", "--promoted", "tiny@1", "--student", "--dry-run", "serve.port=9001", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"vllm serve {registry / 'tiny' / '1' / 'student'} --host 127.0.0.1 --port 9001 " in dry.stdout
    quant = cli("serve", "--promoted", "tiny", "--student", "--quant", "fp8", "--dry-run", env=env)
    assert quant.returncode == 1 and "has no quantized student fp8 (it has: w8a8)" in quant.stderr


def test_promotion_refuses_a_failed_gate_unless_forced_with_a_reason(run):
    root, registry = run
    gate = {**PASSED, "passed": False, "eval_passed": False, "checks": [FAILED_CHECK]}
    atomic_write_json(root / "eval" / "gate.json", gate)
    out = cli("promote", str(root), "--registry", str(registry))
    assert out.returncode == 3
    assert (
        f"distill: error: {root} did not pass the gate, so it is not promoted: student: distill_cloze acc 0.2 misses 0.35"
        in out.stderr
    )
    assert '(to promote it anyway: --force --reason "...")' in out.stderr
    assert not (registry / "tiny").exists()  # refused before anything was written

    out = cli("promote", str(root), "--registry", str(registry), "--force")
    assert out.returncode == 1 and "--force needs --reason" in out.stderr
    out = cli("promote", str(root), "--registry", str(registry), "--force", "--reason", "hotfix for the demo")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("promoted: tiny@1 (gate overridden: hotfix for the demo)")
    entry = json.loads((registry / "tiny" / "1" / "entry.json").read_text())
    assert entry["forced"] and entry["reason"] == "hotfix for the demo" and not entry["gate"]["passed"]
    assert entry["gate"]["failures"][0].startswith("student: distill_cloze acc 0.2 misses 0.35")
    assert "FORCED: hotfix for the demo" in cli("registry", "list", "--registry", str(registry)).stdout

    # an unfinished evaluation, or none at all, is no pass either
    atomic_write_json(root / "eval" / "gate.json", {"passed": False, "status": "evaluating"})
    out = cli("promote", str(root), "--registry", str(registry))
    assert out.returncode == 3 and "the evaluation did not finish" in out.stderr
    (root / "eval" / "gate.json").unlink()
    out = cli("promote", str(root), "--registry", str(registry))
    assert out.returncode == 3 and "no gate decision (run `distill eval`)" in out.stderr


def test_a_kill_during_promote_leaves_no_half_written_version(run):
    root, registry = run
    assert cli("promote", str(root), "--registry", str(registry)).returncode == 0
    with open(root / "student" / "final" / "model.safetensors", "wb") as f:
        f.truncate(400 << 20)  # big enough that copying it takes a while
    proc = subprocess.Popen(
        [sys.executable, "-m", "distill", "promote", str(root), "--registry", str(registry)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list((registry / "tiny").glob(".2.tmp-*/student")):
        assert proc.poll() is None and time.time() < deadline, "promote finished before it could be killed"
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (registry / "tiny" / "2").exists()  # no version 2, not even a partial one
    listing = cli("registry", "list", "--registry", str(registry))
    assert listing.returncode == 0 and [line.split()[0] for line in listing.stdout.splitlines()] == ["tiny@1"]
    assert json.loads(cli("registry", "show", "tiny", "--registry", str(registry)).stdout)["version"] == 1
    assert (registry / "tiny" / "1" / "student" / "model.safetensors").read_bytes() == b"weights-v1"

    out = cli("promote", str(root), "--registry", str(registry))
    assert out.returncode == 0 and out.stdout.startswith("promoted: tiny@2"), out.stderr
    assert (registry / "tiny" / "2" / "student" / "model.safetensors").stat().st_size == 400 << 20
    assert sorted(p.name for p in (registry / "tiny").iterdir()) == [".lock", "1", "2"]  # leftovers removed
