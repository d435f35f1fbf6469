"""Instruction prompt sets (data.prompts): read as users have them, checked row by row, formatted with a
chat template, and learned from with the prompt masked out of the loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import MICRO, TEACHER, TINY, run_cli

# A ChatML-like template over the corpus tokenizer's own end-of-text token (no new tokens, so the micro
# teacher, keyed by its tokenizer.json, stays the session's)
CHAT = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)
EOS = "<|end_of_text|>"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_tokenizer(prepared, tmp_path_factory):
    """The corpus tokenizer with CHAT as its chat template (saved, and loaded back as a stage would)."""
    from distill.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    tokenizer.chat_template = CHAT
    out = tmp_path_factory.mktemp("chat-tokenizer")
    tokenizer.save_pretrained(out)
    return load_tokenizer(out)


def test_rows_become_messages_with_their_responses():
    from distill.prompts import normalise

    rows = [
        {
            "id": "a",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        },
        {"id": "b", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"id": "c", "prompt": "P", "response": "R"},
        {"id": "d", "prompt": "P2", "response": None},
    ]
    out = normalise(rows, chat=True, where="x.jsonl")
    assert out[0] == {"id": "a", "messages": rows[0]["messages"]}
    assert out[1] == {"id": "b", "messages": [{"role": "user", "content": "Q"}], "response": "A"}
    assert out[2] == {"id": "c", "messages": [{"role": "user", "content": "P"}], "response": "R"}
    assert out[3] == {"id": "d", "messages": [{"role": "user", "content": "P2"}]}
    assert normalise(rows[2:], chat=False, where="x")[0] == {"id": "c", "text": "P", "response": "R"}
    assert [r["id"] for r in normalise([{"prompt": "x"}, {"prompt": "y"}], True, "x")] == [
        "q000000",
        "q000001",
    ]


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"text": "t", "label": 1}],
            "x.jsonl has neither a 'messages' nor a 'prompt' column (columns: label, text)",
        ),
        (
            [
                {"messages": [{"role": "user", "content": "a"}]},
                {"messages": [{"role": "bot", "content": "b"}]},
            ],
            "x.jsonl row 1: message 0 has role 'bot' (expected one of system, developer, user, assistant, tool)",
        ),
        ([{"messages": [{"role": "user"}]}], "x.jsonl row 0: message 0 is not a {'role', 'content'} object"),
        (
            [{"messages": [{"role": "assistant", "content": "a"}]}],
            "x.jsonl row 0: no message before the assistant's",
        ),
        ([{"prompt": ""}], "x.jsonl row 0: 'prompt' is '', not a text"),
        ([{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}], "x.jsonl: its 'id' column repeats ids"),
    ],
)
def test_a_row_distill_cannot_read_is_one_line_naming_it(rows, message):
    from distill.errors import DistillError
    from distill.prompts import normalise

    with pytest.raises(DistillError) as err:
        normalise(rows, chat=True, where="x.jsonl")
    assert str(err.value) == f"data.prompts: {message}"


def test_jsonl_parquet_and_datasets_directories_read_the_same_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill.prompts import read_rows

    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)]
    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "train.jsonl", rows)
    for source in (jsonl, tmp_path / "p.parquet", tmp_path / "saved", tmp_path / "files"):
        got, identity = read_rows(str(source), "train")
        assert got == rows and identity, source
    assert (
        read_rows(str(jsonl), "train")[1]["sha256"]
        != read_rows(str(tmp_path / "p.parquet"), "train")[1]["sha256"]
    )


def test_instructions_are_built_from_the_corpus_the_same_every_time(prepared):
    from distill.prompts import TASKS, instructions

    texts = prepared.corpus.texts("train")
    rows = instructions(texts, 12)
    assert rows == instructions(list(reversed(texts)), 12)  # by content, not by position
    assert [r["prompt"].split("\n\n")[0] for r in rows[:4]] == list(TASKS)
    passage = rows[0]["prompt"].split("\n\n", 1)[1]
    assert any(passage in t for t in texts) and len(passage) <= 480


def test_the_chat_template_formats_the_prompt_and_the_response_follows_it(chat_tokenizer):
    """The round trip: prompt ids are the template with the generation prompt, the response ids are what
    the template puts after them, ending at the end-of-sequence token; prompt + response decodes to the
    whole conversation."""
    from distill.prompts import encode

    row = {
        "id": "a",
        "messages": [{"role": "user", "content": "Explain lists."}],
        "response": "A list holds items.",
    }
    prompt, response = encode(row, chat_tokenizer)
    assert chat_tokenizer.decode(prompt) == f"### user:\nExplain lists.{EOS}\n### assistant:\n"
    assert chat_tokenizer.decode(response) == f"A list holds items.{EOS}"
    assert response[-1] == chat_tokenizer.eos_token_id
    assert encode({"id": "b", "messages": row["messages"]}, chat_tokenizer) == (prompt, None)
    plain, answer = encode({"id": "c", "text": "Lists", "response": " hold items."}, chat_tokenizer)
    assert chat_tokenizer.decode(plain + answer) == f"<|begin_of_text|>Lists hold items.{EOS}"


def test_score_mode_scores_the_given_responses_and_training_masks_the_prompt(micro, chat_tokenizer, tmp_path):
    """A prompt set with responses, the teacher (transformers) scoring them: each store row holds the
    chat-formatted prompt and the response, with the teacher's distributions from the last prompt token
    on; the batch's loss mask covers exactly the response tokens, and the student trains on them."""
    from distill.pipeline import open_run
    from distill.prompts import encode
    from distill.stages.generate import generate
    from distill.store import TeacherStore, collate
    from tests.conftest import train_run

    rows = [{"id": f"r{i}", "prompt": f"Say something about number {i}.", "response": f"Number {i} is fine."}
            for i in range(6)]  # fmt: skip
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    overrides = [*TEACHER, f"data.prompts={path}", f"data.tokenizer={chat_tokenizer.name_or_path}",
                 "data.heldout_prompts=2", "generate.mode=score", "teacher.backend=hf",
                 "generate.validation_sequences=4", "train.max_steps=2", "train.batch_size=2",
                 "train.eval_every=2", "train.save_every=2"]  # fmt: skip
    recipe = micro(*overrides)
    run = open_run(recipe)
    store = generate(run)
    captured = {c.id: c for c in TeacherStore(store.root).rows()}
    kept = json.loads((run.data.prompt_set / "manifest.json").read_text())
    assert len(captured) == 4 and kept["prompts"] == 4 and kept["heldout"] == 2
    for row in rows:
        if row["id"] not in captured:
            continue
        prompt, response = encode({"id": row["id"], "messages": [{"role": "user", "content": row["prompt"]}],
                                   "response": row["response"]}, chat_tokenizer)  # fmt: skip
        c = captured[row["id"]]
        assert c.input_ids == prompt + response and c.start == len(prompt) - 1
        assert c.num_positions == len(response)
        batch = collate([c], store.k)
        assert batch["loss_mask"].sum().item() == len(response)
        assert not batch["loss_mask"][0, : len(prompt) - 1].any()
    from distill.heldout import Documents, measure
    from distill.models import load_causal_lm

    docs = Documents.responses(list(captured.values()), chat_tokenizer)  # measured on the responses alone
    teacher = load_causal_lm(run.teacher, "teacher", None)
    same = measure(teacher, teacher, docs)
    assert same["tokens"] == [c.num_positions for c in captured.values()] and max(same["kl"]) < 1e-6
    assert docs.bytes == [len(row["response"].encode()) + len(EOS) for row in rows if row["id"] in captured]
    result = train_run(recipe)
    assert result.steps == 2 and result.val_loss > 0


def test_chat_prompts_for_a_teacher_without_a_chat_template_are_refused_before_anything_is_written(
    cache_dir, tmp_path
):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}, {"prompt": "World"}])
    runs = tmp_path / "runs"
    out = run_cli("prepare", TINY, *MICRO, f"runs_dir={runs}", f"data.prompts={path}")
    assert out.returncode == 1 and out.stderr == (
        "distill: error: data.chat: the prompts are chat messages, and the tokenizer distill trains for "
        "teacher.tiny has no chat template (set data.chat: false, or data.tokenizer to one with a template)\n"
    )
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "Hello"}])
    out = run_cli("prepare", TINY, *MICRO, f"runs_dir={runs}", f"data.prompts={bad}", "data.chat=false")
    assert (
        out.returncode == 1 and "has neither a 'messages' nor a 'prompt' column (columns: text)" in out.stderr
    )
    assert not runs.exists()


def test_a_dataset_name_goes_to_the_hub_through_datasets(cache_dir, tmp_path):
    """Not a local path: `datasets.load_dataset(name, split=...)`, as on a host with a hub (here offline,
    so its error is one line naming the dataset)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = [*MICRO, f"runs_dir={tmp_path / 'runs'}", "data.prompts=someone/instructions", "data.chat=false"]
    out = subprocess.run([sys.executable, "-m", "distill.cli", "prepare", str(TINY), *args],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith(
        "distill: error: data.prompts: someone/instructions: no local file or directory, and the Hugging Face "
        "dataset could not be loaded ("
    )
    assert len(out.stderr.splitlines()) == 1 and not (tmp_path / "runs").exists()
