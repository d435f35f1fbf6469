import math

import pytest
import torch

import distill.training.loop as train_mod
import distill.training.validation as validation_mod
from distill.config import TinyModelConfig, TrackingConfig, TrainConfig
from distill.errors import DistillError
from distill.models import build_tiny_llama
from distill.tokenizer import load_tokenizer
from distill.tracking import read_metrics
from distill.training.checkpoint import list_checkpoints
from distill.training.data import BlockOrder
from distill.training.loop import TrainJob, lr_factor, train

MODEL = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=128)


def job(prepared, out_dir, resume=False, tracking="disabled", **train_overrides) -> TrainJob:
    settings = dict(
        loss="ce",
        lr=3e-3,
        warmup_steps=2,
        max_steps=12,
        batch_size=4,
        eval_every=4,
        eval_batches=2,
        save_every=3,
        keep_last=2,
        log_every=1,
        seed=5,
    )
    settings.update(train_overrides)
    tok = load_tokenizer(prepared.tokenizer_dir)
    return TrainJob(
        name="t",
        out_dir=out_dir,
        cfg=TrainConfig(**settings),
        tracking=TrackingConfig(wandb=tracking),
        tokenizer_dir=prepared.tokenizer_dir,
        tokens_dir=prepared.tokens_dir,
        seq_len=64,
        build_model=lambda: build_tiny_llama(MODEL, tok, seed=5),
        resume=resume,
        progress=False,
    )


def losses(out_dir):
    return [row["loss"] for row in read_metrics(out_dir / "metrics.jsonl")]


def test_loss_decreases_and_exports_hf_model(prepared, tmp_path):
    result = train(job(prepared, tmp_path, max_steps=30, lr=5e-3))
    curve = losses(tmp_path)
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1.0
    assert result.val_loss < math.log(4096) - 1.0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert model.config.num_hidden_layers == 2
    assert len(AutoTokenizer.from_pretrained(result.final_dir)) == 4096
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens"} <= rows[0].keys()
    assert "val_loss" in rows[3] and "val_ppl" in rows[3]
    assert rows[0]["lr"] == pytest.approx(5e-3 * lr_factor(0, TrainConfig(warmup_steps=2, max_steps=30)))


def test_keeps_only_the_last_checkpoints(prepared, tmp_path):
    train(job(prepared, tmp_path))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000009", "step-000012"]


def test_resume_reproduces_the_uninterrupted_run_exactly(prepared, tmp_path, monkeypatch):
    full = train(job(prepared, tmp_path / "full"))

    real_save = train_mod.save_checkpoint

    def save_then_die(accelerator, out_dir, state, keep_last):
        path = real_save(accelerator, out_dir, state, keep_last)
        if state["step"] == 6:
            raise KeyboardInterrupt  # the process is stopped right after the step-6 checkpoint
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(job(prepared, tmp_path / "cut"))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    with pytest.raises(DistillError, match="pass --resume"):
        train(job(prepared, tmp_path / "cut"))
    resumed = train(job(prepared, tmp_path / "cut", resume=True))

    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # bit-identical, every step
    assert resumed.val_loss == full.val_loss
    from safetensors.torch import load_file

    wa = load_file(full.final_dir / "model.safetensors")
    wb = load_file(resumed.final_dir / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_checkpoint_that_dies_mid_write_never_replaces_the_last_good_one(prepared, tmp_path, monkeypatch):
    from accelerate import Accelerator

    real = Accelerator.save_state

    def partial_write(self, output_dir, **kwargs):
        real(self, output_dir, **kwargs)
        if "step-000006" in output_dir:
            raise OSError("disk died mid-checkpoint")  # model files written, trainer_state not yet

    monkeypatch.setattr(Accelerator, "save_state", partial_write)
    with pytest.raises(OSError):
        train(job(prepared, tmp_path))
    monkeypatch.setattr(Accelerator, "save_state", real)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003"]
    assert any(".step-000006.tmp-" in p.name for p in (tmp_path / "checkpoints").iterdir())
    train(job(prepared, tmp_path, resume=True))  # continues from step 3 and cleans the leftover
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000009", "step-000012"]
    assert not any(".tmp-" in p.name for p in (tmp_path / "checkpoints").iterdir())


def test_gradient_accumulation_matches_a_larger_batch(prepared, tmp_path):
    train(job(prepared, tmp_path / "b4", max_steps=4, batch_size=4, grad_accum=1))
    train(job(prepared, tmp_path / "b2x2", max_steps=4, batch_size=2, grad_accum=2))
    assert losses(tmp_path / "b4") == pytest.approx(losses(tmp_path / "b2x2"), rel=1e-5)


def test_non_finite_loss_stops_with_the_last_good_checkpoint(prepared, tmp_path, monkeypatch):
    real = train_mod.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        loss, n = real(logits, labels)
        return (loss * float("nan"), n) if calls["n"] > 7 else (loss, n)

    monkeypatch.setattr(train_mod, "cross_entropy", poisoned)  # the training loss
    monkeypatch.setattr(validation_mod, "cross_entropy", poisoned)  # and the validation loss, counted alike
    with pytest.raises(
        DistillError, match=r"loss is nan at step \d+; stopped. Last good checkpoint: .*step-000003"
    ):
        train(job(prepared, tmp_path, fused_loss="off"))  # the loss `poisoned` replaces: the full logits'
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003"]


def test_wandb_offline_records_the_run_and_resumes_it(prepared, tmp_path, monkeypatch):
    real_save = train_mod.save_checkpoint

    def save_then_die(accelerator, out_dir, state, keep_last):
        path = real_save(accelerator, out_dir, state, keep_last)
        if state["step"] == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(job(prepared, tmp_path, tracking="offline", max_steps=4, save_every=2, eval_every=2))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    first_id = train_mod.read_json(list_checkpoints(tmp_path)[-1] / "trainer_state.json")["wandb_id"]
    train(job(prepared, tmp_path, tracking="offline", max_steps=4, save_every=2, eval_every=2, resume=True))
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # the resumed run is the same wandb run (wandb adds "-1" to the folder when both start in one second)
    assert first_id and all(f"-{first_id}" in r.name for r in runs)
    log = b"".join(f.read_bytes() for r in runs for f in r.glob("run-*.wandb"))
    assert b"val_loss" in log and b"grad_norm" in log  # our metrics went through wandb


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_block_order_is_a_fresh_permutation_each_epoch():
    order = BlockOrder(10, seed=1)
    first, second = order.indices(0, 10), order.indices(10, 10)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second
    assert BlockOrder(10, seed=1).indices(13, 4) == order.indices(13, 4)


def test_wandb_online_without_credentials_is_a_clear_error(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(DistillError, match=r"tracking.wandb=online: .*wandb login.*tracking.wandb=offline"):
        train(job(prepared, tmp_path / "out", tracking="online"))


def test_resume_refuses_changed_settings(prepared, tmp_path, monkeypatch):
    real_save = train_mod.save_checkpoint

    def save_then_die(accelerator, out_dir, state, keep_last):
        real_save(accelerator, out_dir, state, keep_last)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(job(prepared, tmp_path))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    with pytest.raises(DistillError, match="cannot resume from .*step-000003: the training settings"):
        train(job(prepared, tmp_path, resume=True, lr=1e-4))
    train(job(prepared, tmp_path, resume=True, log_every=2))  # bookkeeping may change


def test_kd_accumulation_matches_a_larger_batch_with_ragged_rows(prepared, tmp_path):
    import numpy as np

    from .test_store import make_store, random_capture

    rng = np.random.default_rng(0)
    captures = [
        random_capture(rng, f"r{i}", length=20 + 3 * i, start=2 + i, vocab=4096, k=8) for i in range(8)
    ]
    identity = {"mode": "sample", "k": 8, "vocab_size": 4096, "encoding": {"id_bits": 12}}
    store = make_store(tmp_path / "store", captures, identity=identity).root
    for name, batch, accum in (("b4", 4, 1), ("b2x2", 2, 2), ("b1x4", 1, 4)):
        kd = job(
            prepared,
            tmp_path / name,
            max_steps=3,
            batch_size=batch,
            grad_accum=accum,
            loss="jsd",
            ce_weight=0.5,
        )
        kd.store = store
        train(kd)
    assert losses(tmp_path / "b4") == pytest.approx(losses(tmp_path / "b2x2"), rel=1e-5)
    assert losses(tmp_path / "b4") == pytest.approx(losses(tmp_path / "b1x4"), rel=1e-5)


def _draw_store(tmp_path, temperature):
    import numpy as np

    from .test_store import make_store, random_capture

    rng = np.random.default_rng(1)
    captures = [
        random_capture(rng, f"r{i}", length=20 + 3 * i, start=2 + i, vocab=4096, k=8) for i in range(8)
    ]
    identity = {
        "mode": "sample",
        "k": 8,
        "vocab_size": 4096,
        "encoding": {"id_bits": 12},
        "capture": {"backend": "hf", "temperature": temperature, "top_p": 1.0},
    }
    return make_store(tmp_path / f"store-{temperature}", captures, identity=identity).root


def test_sampled_tail_trains_and_accumulation_matches_a_larger_batch(prepared, tmp_path):
    store = _draw_store(tmp_path, 1.0)
    for name, batch, accum in (("b4", 4, 1), ("b1x4", 1, 4)):
        kd = job(prepared, tmp_path / name, max_steps=3, batch_size=batch, grad_accum=accum, loss="forward_kl",
                 tail="sample")  # fmt: skip
        kd.store = store
        train(kd)
    assert losses(tmp_path / "b4") == pytest.approx(losses(tmp_path / "b1x4"), rel=1e-5)
    bucket = job(prepared, tmp_path / "bucket", max_steps=3, batch_size=4, loss="forward_kl", tail="bucket")
    bucket.store = store
    train(bucket)
    assert losses(tmp_path / "b4")[0] != pytest.approx(losses(tmp_path / "bucket")[0], rel=1e-3)
    # auto: the sampled tail on a store of teacher draws at T = 1 ...
    auto = job(prepared, tmp_path / "auto", max_steps=3, batch_size=4, loss="forward_kl")
    auto.store = store
    assert train(auto).tail == "sample" and losses(tmp_path / "auto") == pytest.approx(
        losses(tmp_path / "b4")
    )
    # ... and the bucket for an objective it cannot estimate, or a store of other tokens
    jsd = job(prepared, tmp_path / "jsd", max_steps=1, batch_size=4, loss="jsd")
    jsd.store = store
    other = job(prepared, tmp_path / "other", max_steps=1, batch_size=4, loss="forward_kl")
    other.store = _draw_store(tmp_path, 0.7)
    mixed = job(prepared, tmp_path / "mixed", max_steps=1, batch_size=4, loss="forward_kl", ce_weight=0.5)
    mixed.store = store
    assert train(jsd).tail == "bucket" and train(other).tail == "bucket" and train(mixed).tail == "bucket"


def test_sampled_tail_refuses_a_store_sampled_at_another_temperature(prepared, tmp_path):
    kd = job(prepared, tmp_path / "out", max_steps=1, batch_size=4, loss="forward_kl", tail="sample")
    kd.store = _draw_store(tmp_path, 0.7)
    with pytest.raises(
        DistillError, match="train.tail=sample needs a store whose tokens the teacher sampled"
    ):
        train(kd)


def test_validation_reports_held_out_bits_per_byte_and_the_full_vocabulary_kl(prepared, tmp_path):
    from transformers import AutoModelForCausalLM

    from distill.heldout import Documents, measure, outside_documents, summarize

    tok = load_tokenizer(prepared.tokenizer_dir)
    teacher = tmp_path / "teacher"
    build_tiny_llama(MODEL, tok, seed=9).save_pretrained(teacher)
    j = job(prepared, tmp_path / "out", max_steps=4, eval_every=4)
    j.heldout = {
        "val": prepared.corpus.texts("validation")[:8],
        "outside": [d["text"] for d in outside_documents()][:8],
    }
    j.heldout_teacher = teacher
    result = train(j)
    row = read_metrics(tmp_path / "out" / "metrics.jsonl")[-1]
    for name in ("val", "outside"):
        assert row[f"{name}_bpb"] > 1 and row[f"{name}_kl_full"] > 0 and 0 <= row[f"{name}_top1"] <= 1
    assert result.heldout == {key: row[key] for key in result.heldout} and len(result.heldout) == 6
    # the figure is the exported student's own NLL per byte, recomputed here independently of the loop
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    docs = Documents.encode(j.heldout["val"], tok, j.seq_len, j.cfg.eval_batches * j.cfg.batch_size)
    assert summarize(measure(model, None, docs))["bits_per_byte"] == pytest.approx(row["val_bpb"], rel=1e-4)


def test_fused_output_layer_and_loss_trains_the_same_student_as_the_full_logits(
    prepared, tmp_path, monkeypatch
):
    """train.fused_loss auto (the default) computes the logits a chunk at a time in the loop itself, and the
    student is the one the full logits train: same losses and weights, for CE and for KD with CE mixed in."""
    import numpy as np
    from safetensors.torch import load_file

    from .test_store import make_store, random_capture

    rng = np.random.default_rng(2)
    captures = [random_capture(rng, f"r{i}", length=24 + i, start=2 + i, vocab=4096, k=8) for i in range(8)]
    identity = {"mode": "sample", "k": 8, "vocab_size": 4096, "encoding": {"id_bits": 12}}
    store = make_store(tmp_path / "store", captures, identity=identity).root
    fused_calls = []
    real = train_mod.fused_kd_loss
    monkeypatch.setattr(train_mod, "fused_kd_loss", lambda *a, **k: fused_calls.append(1) or real(*a, **k))
    for loss in ("ce", "jsd"):
        for mode in ("off", "auto"):
            kd = job(
                prepared, tmp_path / f"{loss}-{mode}", max_steps=4, loss=loss, ce_weight=0.5, fused_loss=mode
            )
            kd.store = store if loss != "ce" else None
            before = len(fused_calls)
            train(kd)
            assert (len(fused_calls) > before) == (mode == "auto")
        off, fused = tmp_path / f"{loss}-off", tmp_path / f"{loss}-auto"
        assert losses(fused) == pytest.approx(losses(off), rel=1e-5)
        a, b = (load_file(d / "final" / "model.safetensors") for d in (off, fused))
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_fused_loss_is_refused_or_left_off_where_the_logits_are_not_the_output_layers(prepared, tmp_path):
    """A student whose forward scales the logits after its output layer (as Cohere's logit_scale does):
    `on` is refused in one line, `auto` says it trains on the full logits, and does."""
    from distill.training.head import fused_output_layer

    tok = load_tokenizer(prepared.tokenizer_dir)
    student = build_tiny_llama(MODEL, tok, seed=5)
    plain = fused_output_layer(student, "auto")
    assert plain is not None and plain.module is student.get_output_embeddings()
    plain.remove()

    capped = build_tiny_llama(MODEL, tok, seed=5)
    forward = capped.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 0.5 * out.logits
        return out

    capped.forward = scaled
    with pytest.raises(DistillError, match="train.fused_loss: on, but .* not exact here: its logits are not"):
        fused_output_layer(capped, "on")
    said = []
    assert fused_output_layer(capped, "auto", log=said.append) is None
    assert said == [
        "fused output layer + loss off: its logits are not the output layer's output (soft-capping or scaling "
        "after it); training on the full logits"
    ]
    assert not capped.get_output_embeddings()._forward_pre_hooks  # nothing left on the model
