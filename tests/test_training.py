"""The trainer: block mask, loss weights, anchors, end-to-end improvement, interrupt/resume equality."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from conftest import VOCAB, make_target
from safetensors.torch import load_file

from dflash_hf import DFlashDraftModel
from dflash_hf.training.data import load_records, write_shards
from dflash_hf.training.trainer import (
    FeatureDataset,
    TrainConfig,
    block_attention_mask,
    extract_features,
    loss_weights,
    sample_anchors,
    train_drafter,
)


def test_block_mask_matches_brute_force():
    anchors = torch.tensor([3, 5, 9])
    block, context = 4, 12
    mask = block_attention_mask(anchors, block, context)
    assert mask.shape == (12, 12 + 12)
    for q in range(12):
        j = q // block
        for k in range(context):
            assert mask[q, k] == (k < anchors[j]), (q, k)
        for k in range(12):
            assert mask[q, context + k] == (k // block == j), (q, k)


def test_loss_weights_decay():
    w = loss_weights(8)
    assert w.shape == (7,) and w[0] == 1.0
    torch.testing.assert_close(w, torch.exp(-torch.arange(7.0) / 4.0))
    assert torch.all(w[1:] < w[:-1])
    torch.testing.assert_close(loss_weights(16)[1], torch.exp(torch.tensor(-1 / 7.0)))


@pytest.mark.parametrize("prompt_len, seq_len", [(5, 40), (30, 33), (10, 11), (10, 12)])
def test_anchors_stay_in_the_response(prompt_len, seq_len):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        anchors = sample_anchors(prompt_len, seq_len, 8, g)
        assert torch.all(anchors >= prompt_len) and torch.all(anchors <= seq_len - 2)
        assert anchors.unique().numel() == anchors.numel()
    assert sample_anchors(10, 11, 8, g).numel() == 0


def _target_records(target, num, seed, new_tokens=40):
    g = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(num):
        prompt = torch.randint(0, VOCAB, (1, 6), generator=g)
        out = target.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        records.append({"prompt": "", "input_ids": out[0].tolist(), "prompt_len": 6})
    return records


@pytest.fixture(scope="module")
def trained_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    target = make_target("qwen3", dtype=torch.float32)
    write_shards(_target_records(target, 24, seed=0), root / "data", shard_size=8)
    torch.manual_seed(0)
    drafter = DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=4, target_layer_ids=[1, 2])
    extract_features(target, root / "data", root / "features", drafter.config.target_layer_ids)
    return root, target, drafter


def test_features_are_the_tapped_layer_outputs(trained_setup):
    root, target, drafter = trained_setup
    record = load_records(root / "data")[0]
    shard = load_file(str(root / "features" / "features-00000.safetensors"))
    ids = torch.tensor(record["input_ids"])
    assert torch.equal(shard["ids_0"], ids)
    with torch.no_grad():
        hidden = target(ids[None], output_hidden_states=True).hidden_states
    expected = torch.cat([hidden[2][0], hidden[3][0]], dim=-1).half()  # layers 1 and 2 -> hidden_states[i+1]
    torch.testing.assert_close(shard["taps_0"], expected, rtol=1e-3, atol=1e-3)


def _acceptance(target, drafter, seeds):
    lengths = []
    for seed in seeds:
        prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(seed))
        plain = target.generate(prompt, max_new_tokens=30, do_sample=False)
        out = target.generate(prompt, max_new_tokens=30, do_sample=False, assistant_model=drafter)
        assert torch.equal(plain, out)
        lengths.extend(drafter.last_stats.acceptance_lengths)
    return sum(lengths) / len(lengths)


def test_training_improves_acceptance_on_held_out_prompts(trained_setup):
    root, target, drafter = trained_setup
    held_out = range(1000, 1006)
    before = _acceptance(target, drafter.eval(), held_out)
    config = TrainConfig(steps=150, batch_size=2, num_anchors=8, lr=3e-3, save_every=1000, warmup_ratio=0.05)
    train_drafter(drafter, target, FeatureDataset(root / "features"), root / "run", config)
    after = _acceptance(target, drafter.eval(), held_out)
    assert after > before + 0.08, (before, after)  # a random tiny target is hard to predict; gains are small


def test_interrupted_training_resumes_to_identical_weights(trained_setup, tmp_path):
    root, target, _ = trained_setup
    dataset = FeatureDataset(root / "features")
    config = TrainConfig(steps=12, batch_size=2, num_anchors=4, lr=1e-3, save_every=5)

    def fresh():
        torch.manual_seed(123)
        return DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=4, target_layer_ids=[1, 2])

    straight = fresh()
    train_drafter(straight, target, dataset, tmp_path / "straight", config)
    interrupted = fresh()
    train_drafter(interrupted, target, dataset, tmp_path / "interrupted", config, stop_after=7)
    # step 7 is not a multiple of save_every: the stop itself leaves a checkpoint at 7 (as Ctrl-C handling would)
    progress = json.loads((tmp_path / "interrupted" / "checkpoint-7" / "progress.json").read_text())
    assert progress["step"] == 7
    resumed = fresh()  # a new process would start from fresh weights and load the checkpoint
    train_drafter(resumed, target, dataset, tmp_path / "interrupted", config)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


def test_bf16_mixed_precision_training_learns_like_fp32_and_keeps_fp32_weights(trained_setup, tmp_path):
    root, target, _ = trained_setup
    dataset = FeatureDataset(root / "features")
    losses = {}
    for precision in ("no", "bf16"):
        torch.manual_seed(0)
        drafter = DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=4, target_layer_ids=[1, 2])
        config = TrainConfig(steps=60, batch_size=2, num_anchors=8, lr=3e-3, save_every=1000, mixed_precision=precision)
        history = train_drafter(drafter, target, dataset, tmp_path / precision, config)["history"]
        losses[precision] = [sum(h["loss"] for h in part) / 10 for part in (history[:10], history[-10:])]
        assert all(p.dtype == torch.float32 for p in drafter.parameters())  # bf16 only inside the autocast region
    (bf16_first, bf16_last), (_, fp32_last) = losses["bf16"], losses["no"]
    assert bf16_last < bf16_first - 0.05, losses  # 60 steps on a random tiny target: ~0.08 measured
    assert abs(bf16_last - fp32_last) < 0.1, losses


def test_unsupported_mixed_precision_is_refused(trained_setup, tmp_path):
    root, target, drafter = trained_setup
    with pytest.raises(ValueError, match="fp16"):
        train_drafter(drafter, target, FeatureDataset(root / "features"), tmp_path,
                      TrainConfig(steps=1, mixed_precision="fp16"))


# ---------------------------------------------------------------------------------------------------------------
# Interrupted runs: the per-step log survives a kill; a checkpoint resumes only with the settings that made it
# ---------------------------------------------------------------------------------------------------------------
class Killed(BaseException):
    """Stands for a kill of the process (not an Exception: nothing in the trainer may swallow it)."""


def _new_drafter(target, layers=1, block_size=4):
    torch.manual_seed(123)
    return DFlashDraftModel.from_target(target, num_hidden_layers=layers, block_size=block_size,
                                        target_layer_ids=[1, 2])


def _history(folder):
    return [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kill", ["after checkpoint-5", "before checkpoint-10"])
def test_a_killed_run_keeps_the_log_of_every_step_once_resumed(trained_setup, tmp_path, monkeypatch, kill):
    """Killed right after checkpoint-5 is saved, or after the log of steps 6-10 is written but before checkpoint-10:
    once resumed, history.jsonl holds every step once, as an uninterrupted run's."""
    import dflash_hf.training.trainer as training

    root, target, _ = trained_setup
    dataset = FeatureDataset(root / "features")
    config = TrainConfig(steps=12, batch_size=2, num_anchors=4, lr=1e-3, save_every=5)
    straight = train_drafter(_new_drafter(target), target, dataset, tmp_path / "straight", config)["history"]
    assert [row["step"] for row in _history(tmp_path / "straight")] == list(range(1, 13))

    save = training._save_checkpoint

    def killed_at(accelerator, out_dir, step, *args, **kwargs):
        if kill == "before checkpoint-10" and step == 10:
            raise Killed
        save(accelerator, out_dir, step, *args, **kwargs)
        if kill == "after checkpoint-5" and step == 5:
            raise Killed

    monkeypatch.setattr(training, "_save_checkpoint", killed_at)
    with pytest.raises(Killed):
        train_drafter(_new_drafter(target), target, dataset, tmp_path / "killed", config)
    assert [row["step"] for row in _history(tmp_path / "killed")] == list(range(1, 6 if "5" in kill else 11))
    monkeypatch.setattr(training, "_save_checkpoint", save)
    train_drafter(_new_drafter(target), target, dataset, tmp_path / "killed", config)
    assert _history(tmp_path / "killed") == straight


def test_a_run_started_over_replaces_the_earlier_checkpoints_and_log(trained_setup, tmp_path):
    root, target, _ = trained_setup
    dataset = FeatureDataset(root / "features")
    train_drafter(_new_drafter(target), target, dataset, tmp_path,
                  TrainConfig(steps=6, batch_size=2, num_anchors=4, save_every=3))
    train_drafter(_new_drafter(target), target, dataset, tmp_path,
                  TrainConfig(steps=2, batch_size=2, num_anchors=4, lr=1e-3, save_every=3), resume=False)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]  # checkpoint-6 is gone
    assert [row["step"] for row in _history(tmp_path)] == [1, 2]


@pytest.mark.parametrize(("layers", "block_size", "said"), [
    (2, 4, "num_hidden_layers 1 (this run: 2)"),
    (1, 8, "block_size 4 (this run: 8)"),
])
def test_resuming_with_a_drafter_of_another_shape_says_the_checkpoint_s_shape_and_the_ways_out(
        trained_setup, tmp_path, layers, block_size, said):
    root, target, _ = trained_setup
    dataset = FeatureDataset(root / "features")
    config = TrainConfig(steps=2, batch_size=2, num_anchors=4, save_every=2)
    train_drafter(_new_drafter(target), target, dataset, tmp_path, config)
    with pytest.raises(ValueError) as info:
        train_drafter(_new_drafter(target, layers, block_size), target, dataset, tmp_path, config)
    message = str(info.value)
    assert "checkpoint-2 holds a drafter of 1 layer, block size 4, taps [1, 2]" in message and said in message
    assert "rerun with the checkpoint's values" in message and "resume=False" in message


def test_a_checkpoint_saved_without_its_shape_still_names_its_layer_count(trained_setup, tmp_path):
    """A checkpoint written before shapes were saved with it: loading fails in load_state, and is reported so."""
    root, target, _ = trained_setup
    dataset = FeatureDataset(root / "features")
    config = TrainConfig(steps=2, batch_size=2, num_anchors=4, save_every=2)
    train_drafter(_new_drafter(target), target, dataset, tmp_path, config)
    progress_path = tmp_path / "checkpoint-2" / "progress.json"
    progress = json.loads(progress_path.read_text())
    progress_path.write_text(json.dumps({"step": progress["step"], "config": progress["config"]}))
    with pytest.raises(ValueError, match=r"num_hidden_layers 1 \(this run: 2\)"):
        train_drafter(_new_drafter(target, layers=2), target, dataset, tmp_path, config)


def test_a_checkpoint_resumes_only_with_its_settings_and_steps_may_grow(trained_setup, tmp_path):
    from dflash_hf.training.trainer import ResumeMismatch

    root, target, _ = trained_setup
    dataset = FeatureDataset(root / "features")
    config = TrainConfig(steps=2, batch_size=2, num_anchors=4, lr=1e-3, save_every=2)
    train_drafter(_new_drafter(target), target, dataset, tmp_path, config, recipe={"data": "a"})
    for changed, said in ((dict(lr=1e-2), "lr 0.001 (this run: 0.01)"), (dict(steps=1), "steps 2 (this run: 1)"),
                          (dict(seed=3), "seed 0 (this run: 3)")):
        with pytest.raises(ResumeMismatch, match=re.escape(said)):
            train_drafter(_new_drafter(target), target, dataset, tmp_path, dataclasses.replace(config, **changed),
                          recipe={"data": "a"})
    with pytest.raises(ResumeMismatch, match=re.escape("data a (this run: b)")):
        train_drafter(_new_drafter(target), target, dataset, tmp_path, config, recipe={"data": "b"})
    grown = train_drafter(_new_drafter(target), target, dataset, tmp_path,
                          dataclasses.replace(config, steps=4, save_every=1), recipe={"data": "a"})
    assert [row["step"] for row in grown["history"]] == [3, 4]
