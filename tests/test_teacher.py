import math

import pytest

from distill.teacher import fit_prompt, place_by_rank


def test_place_by_rank_orders_slots_and_ignores_the_extra_actual_token():
    entries = [(7, -9.0, 40), (3, -1.0, 1), (5, -2.0, 2), (9, -2.5, 3)]  # actual token 7 ranked 40th first
    ids, lps = place_by_rank(entries, k=3)
    assert ids.tolist() == [3, 5, 9] and lps.tolist() == [-1.0, -2.0, -2.5]


def test_a_token_listed_twice_takes_one_slot():
    entries = [(5, -2.0, 2), (3, -1.0, 1), (5, -2.0, 2), (9, -2.5, 3)]  # flat form: actual token, then top-k
    ids, _ = place_by_rank(entries, k=3)
    assert ids.tolist() == [3, 5, 9]


def test_missing_ranks_are_filled_not_assumed():
    ids, lps = place_by_rank([(3, -0.1, 1)], k=3)
    assert ids.tolist() == [3, 0, 0] and lps[0] == -0.1 and all(math.isinf(x) for x in lps[1:])


def test_fit_prompt_keeps_the_end_and_says_so():
    assert fit_prompt([1, 2, 3], 5) == ([1, 2, 3], False)
    assert fit_prompt([1, 2, 3, 4, 5, 6], 4) == ([3, 4, 5, 6], True)


def test_transformers_sampling_draws_from_the_teachers_distribution_cut_to_top_p():
    """HfTeacher._draw: softmax(logits / T), only the top_p nucleus, each prompt's rows from its own
    generator (a chi-square test over 20,000 draws; greedy is the argmax)."""
    import torch

    from distill.teacher import HfTeacher, SampleSettings

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(4, 1)
    hot = SampleSettings(samples_per_prompt=2, max_new_tokens=1, temperature=1.5, top_p=0.8, seed=0)
    probs = torch.softmax(logits[0] / 1.5, -1)
    keep = (probs.cumsum(0) - probs) < 0.8  # the nucleus: here the first three tokens
    assert keep.tolist() == [True, True, True, False, False, False]
    want = torch.where(keep, probs, 0) / probs[keep].sum()
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    draws = torch.stack([HfTeacher._draw(logits, hot, gens, 2) for _ in range(5000)]).flatten()
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[~keep].sum() == 0
    expected = want[keep] * draws.numel()
    chi2 = (((counts[keep] - expected) ** 2) / expected).sum().item()
    assert chi2 < 13.8  # 2 degrees of freedom, p = 0.001
    # rows of one prompt share its generator: the same seeds give the same draws, whatever else is drawn
    again = [torch.Generator().manual_seed(s) for s in (1, 2)]
    first = [HfTeacher._draw(logits, hot, again, 2) for _ in range(3)]
    alone = [torch.Generator().manual_seed(1)]
    assert [HfTeacher._draw(logits[:2], hot, alone, 2).tolist() for _ in range(3)] == [
        f[:2].tolist() for f in first
    ]
    greedy = SampleSettings(samples_per_prompt=1, max_new_tokens=1, temperature=0.0, top_p=1.0, seed=0)
    assert HfTeacher._draw(logits, greedy, gens, 1).tolist() == [0, 0, 0, 0]


def test_no_room_for_the_prompt_is_a_clear_error():
    import pytest

    from distill.errors import DistillError

    with pytest.raises(DistillError, match="generate.max_new_tokens leaves no room"):
        fit_prompt([1, 2], 0)


def test_an_empty_prompt_set_is_refused(prepared, micro, tmp_path):
    import shutil

    import pytest

    from distill.corpus import Corpus
    from distill.errors import DistillError
    from distill.run import PreparedData
    from distill.stages.generate import work_items

    corpus_dir = tmp_path / "corpus"
    shutil.copytree(prepared.corpus.root, corpus_dir)
    (corpus_dir / "prompts.jsonl").write_text("")
    data = PreparedData(Corpus(corpus_dir), prepared.tokenizer_dir, prepared.tokens_dir)
    with pytest.raises(
        DistillError, match=r"generate: nothing to do, the prompts in .*prompts.jsonl are empty"
    ):
        work_items(micro("generate.mode=sample"), data)
    assert len(work_items(micro("generate.mode=score", "generate.num_sequences=5"), data).items) == 5


def test_teacher_backend_auto_picks_the_engine_expected_to_finish_first(micro, monkeypatch, tmp_path):
    import importlib.util

    import numpy as np
    from safetensors.numpy import save_file

    from distill.stages.generate import choose_backend, cpu_score_seconds
    from distill.vllm import engine
    from distill.vllm.engine import teacher_engine_args

    tiny, unknown = tmp_path / "tiny", tmp_path / "unknown"  # 1 M parameters; no weights to count
    tiny.mkdir()
    save_file({"w": np.zeros((1000, 1000), np.float32)}, str(tiny / "model.safetensors"))
    blocks = [(f"b{i}", [1] * 1000) for i in range(100)]  # 100k tokens
    score, sample = micro("generate.mode=score"), micro("generate.mode=sample")
    assert score.teacher.backend == "auto"  # the default
    hf, vllm = cpu_score_seconds(1_000_000, 100_000)
    assert choose_backend(score, tiny, "cpu", blocks) == (
        "hf", f"scoring 100,000 tokens with 1.0 M parameters on CPU: about {hf:.0f} s in transformers, "
        f"{vllm:.0f} s in vLLM with its start"
    )  # fmt: skip
    # without safetensors, the larger measured teacher (SmolLM2-135M): vLLM pays off above about 75k tokens
    assert choose_backend(score, unknown, "cpu", blocks[:70])[0] == "hf"
    assert choose_backend(score, unknown, "cpu", blocks[:80])[0] == "vllm"
    assert choose_backend(sample, tiny, "cpu", blocks)[0] == "vllm"
    assert choose_backend(score, tiny, "cuda", blocks)[0] == "vllm"
    named = micro("generate.mode=score", "teacher.backend=vllm")
    assert choose_backend(named, tiny, "cpu", blocks) == ("vllm", "teacher.backend: vllm")
    # the engine of this run's other store, kept running (distill run's kept_engines), costs no start
    key = engine.engine_key(teacher_engine_args(score, tiny))
    monkeypatch.setitem(engine._kept, "llm", object())
    monkeypatch.setitem(engine._kept, "key", key)
    assert choose_backend(score, tiny, "cpu", blocks) == ("vllm", "its engine is already running")
    monkeypatch.setitem(engine._kept, "llm", None)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    assert choose_backend(sample, tiny, "cpu", blocks) == ("hf", "vLLM is not installed")


def test_the_cpu_speed_model_is_the_measured_one():
    """choose_backend's two points are the committed measurements, and reproduce them."""
    import json
    from pathlib import Path

    from distill.stages.generate import CPU_SCORE_SPEED, VLLM_CPU_START_S, cpu_score_seconds

    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    small = json.loads((results / "teacher_capture.json").read_text())
    real = json.loads((results / "real_teacher.json").read_text())
    for (parameters, hf, vllm), (n, speed) in zip(
        CPU_SCORE_SPEED,
        [(small["model_parameters"], small["speed"]), (real["parameters"], real["speed"])],
        strict=True,
    ):
        assert parameters == n
        assert hf == pytest.approx(speed["hf_score_tokens_per_s"], rel=0.01)
        assert vllm == pytest.approx(speed["vllm_score_tokens_per_s"], rel=0.01)
        assert cpu_score_seconds(n, 10_000)[0] == pytest.approx(10_000 / hf)
    slowest_start = max(small["speed"]["vllm_engine_start_s"], real["speed"]["vllm_engine_start_s"])
    assert abs(VLLM_CPU_START_S - slowest_start) < 0.5


def test_a_dry_run_names_the_engine_that_will_capture_the_store(tmp_path):
    from tests.conftest import TINY, run_cli

    for overrides, shown in (
        ([], "(vllm.LLM on the pretrained tiny teacher, engine {}, in process)"),  # tiny.yaml samples
        (["generate.mode=score"], "(transformers or vllm.LLM, whichever is expected to finish first, on"),
        (
            ["generate.mode=score", "teacher.backend=hf"],
            "(transformers on the pretrained tiny teacher, in process)",
        ),
    ):
        out = run_cli("run", TINY, f"runs_dir={tmp_path}", *overrides, "--dry-run")
        assert out.returncode == 0 and shown in out.stdout, out.stdout
    assert not (tmp_path / "tiny").exists()


@pytest.mark.slow
def test_auto_continues_a_store_with_the_engine_that_began_it(cache_dir, tmp_path, monkeypatch):
    """A store begun with one engine is finished with it, whatever auto would pick now (here forced to
    vLLM, as a running engine would): one store, never 'capture.backend changed'."""
    import distill.stages.generate as generate_stage
    from distill.store import TeacherStore
    from tests.conftest import MICRO, TEACHER, TINY, run_cli

    args = ("generate", TINY, *MICRO, *TEACHER, f"runs_dir={tmp_path}", "generate.mode=score",
            "generate.num_sequences=4", "generate.items_per_shard=2", "generate.top_k=8")  # fmt: skip
    first = run_cli(*args, "teacher.backend=hf")
    assert first.returncode == 0, first.stderr[-2000:]
    store = tmp_path / "tiny" / "teacher"
    shard = store / "shard-00001.parquet"
    shard.unlink()  # an unfinished store: one shard to redo
    monkeypatch.setattr(generate_stage, "choose_backend", lambda *a: ("vllm", "forced"))
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (
        f"generate: teacher.backend auto: transformers (continuing {store}, which it began)" in again.stdout
    )
    assert shard.exists() and TeacherStore(store).summary()["backend"] == "hf"
