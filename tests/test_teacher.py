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
