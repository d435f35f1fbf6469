import math

import numpy as np

from distill.teacher import _trim_after_eos, fit_prompt, place_by_rank


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


def test_generate_padding_after_eos_is_dropped():
    assert _trim_after_eos([1, 2, 9, 2, 0, 0], prompt_len=2, eos=2) == [1, 2, 9, 2]
    assert _trim_after_eos(np.arange(5).tolist(), prompt_len=2, eos=[7]) == [0, 1, 2, 3, 4]


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


def test_teacher_backend_auto_picks_the_engine_that_finishes_the_job_first(micro, monkeypatch, tmp_path):
    import importlib.util
    import json

    from distill.stages.generate import AUTO_HF_MAX_TOKENS, choose_backend
    from distill.vllm import engine
    from distill.vllm.engine import teacher_engine_args

    model = tmp_path / "teacher"
    small = [(f"b{i}", [1] * 64) for i in range(10)]
    large = [(f"b{i}", [1] * 1000) for i in range(AUTO_HF_MAX_TOKENS // 1000 + 1)]
    score, sample = micro("generate.mode=score"), micro("generate.mode=sample")
    assert score.teacher.backend == "auto"  # the default
    assert choose_backend(score, model, "cpu", small) == (
        "hf", f"scoring 640 tokens on CPU: below {AUTO_HF_MAX_TOKENS:,}, vLLM's start costs more"
    )  # fmt: skip
    assert choose_backend(score, model, "cpu", large)[0] == "vllm"
    assert choose_backend(sample, model, "cpu", small)[0] == "vllm"
    assert choose_backend(score, model, "cuda", small)[0] == "vllm"
    named = micro("generate.mode=score", "teacher.backend=vllm")
    assert choose_backend(named, model, "cpu", small) == ("vllm", "teacher.backend: vllm")
    # the engine of this run's other store, kept running (distill run's kept_engines), costs no start
    key = json.dumps(teacher_engine_args(score, model), sort_keys=True, default=str)
    monkeypatch.setitem(engine._kept, "llm", object())
    monkeypatch.setitem(engine._kept, "key", key)
    assert choose_backend(score, model, "cpu", small) == ("vllm", "its engine is already running")
    monkeypatch.setitem(engine._kept, "llm", None)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    assert choose_backend(sample, model, "cpu", small) == ("hf", "vLLM is not installed")


def test_the_auto_threshold_is_the_crossing_measured_on_the_real_teacher():
    """AUTO_HF_MAX_TOKENS is where vLLM's start-up is paid back (bench/results/real_teacher.json)."""
    import json
    from pathlib import Path

    from distill.stages.generate import AUTO_HF_MAX_TOKENS

    results = Path(__file__).resolve().parents[1] / "bench" / "results" / "real_teacher.json"
    sp = json.loads(results.read_text())["speed"]
    crossing = sp["vllm_engine_start_s"] / (
        1 / sp["hf_score_tokens_per_s"] - 1 / sp["vllm_score_tokens_per_s"]
    )
    assert abs(crossing - AUTO_HF_MAX_TOKENS) < 1000
