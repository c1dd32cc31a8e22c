"""Recipe switches of the trainer: distillation against the target's distribution, and a reduced draft vocabulary
(its training, its decoding, its checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, make_target
from test_training import _acceptance  # the trainer tests' tiny runs
from test_training import _target_records as _records

from dflash_hf import DFlashConfig, DFlashDraftModel
from dflash_hf.core.draft_dflash import DraftSession
from dflash_hf.training.data import load_records, write_shards
from dflash_hf.training.trainer import (
    DraftHead,
    FeatureDataset,
    TrainConfig,
    block_loss,
    draft_vocabulary,
    extract_features,
    loss_weights,
    teacher_forced_acceptance,
    train_drafter,
    vocabulary_coverage,
)

TAPS = [1, 2]


def _drafter(target, seed=0, **config):
    torch.manual_seed(seed)
    drafter = DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=4, target_layer_ids=TAPS)
    for key, value in config.items():
        setattr(drafter.config, key, value)
    return drafter


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    target = make_target("qwen3", dtype=torch.float32)
    write_shards(_records(target, 24, seed=0), root / "data", shard_size=8)
    extract_features(target, root / "data", root / "features", TAPS, teacher_top_k=8)
    return root, target


def _one_sequence(run):
    root, target = run
    dataset = FeatureDataset(root / "features")
    ids, taps, prompt_len = dataset[0]
    anchors = torch.tensor([prompt_len, prompt_len + 5, prompt_len + 11])
    return dataset, ids, taps, anchors


def test_teacher_files_hold_the_targets_top_k(run):
    root, target = run
    dataset = FeatureDataset(root / "features")
    assert dataset.has_teacher
    ids, _, _ = dataset[3]
    top_ids, top_logprobs = dataset.teachers[3]
    with torch.no_grad():
        logprobs = target(ids[None]).logits[0].float().log_softmax(-1)
    expected_lp, expected_ids = logprobs.topk(8, dim=-1)
    assert torch.equal(top_ids, expected_ids)
    torch.testing.assert_close(top_logprobs, expected_lp, rtol=0, atol=2e-3)  # stored as float16
    # greedy regeneration: the target's top-1 is the next token of its own response
    assert torch.equal(top_ids[6 - 1 : -1, 0], ids[6:])


def test_distillation_equals_cross_entropy_for_a_one_hot_teacher(run):
    _, target = run
    dataset, ids, taps, anchors = _one_sequence(run)
    drafter = _drafter(target)
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    weights = loss_weights(4)
    one_hot_ids = torch.zeros(ids.shape[0], 8, dtype=torch.long)
    one_hot_ids[:-1, 0] = ids[1:]  # row p predicts token p+1, with all its mass
    one_hot_ids[:, 1:] = (one_hot_ids[:, :1] + torch.arange(1, 8)) % VOCAB
    one_hot_lp = torch.full((ids.shape[0], 8), -1e4)
    one_hot_lp[:, 0] = 0.0
    ce, _ = block_loss(drafter, embed, head, ids, taps, anchors, weights)
    kd, _ = block_loss(drafter, embed, head, ids, taps, anchors, weights, teacher=(one_hot_ids, one_hot_lp),
                       distill=1.0)
    torch.testing.assert_close(kd, ce)
    soft, _ = block_loss(drafter, embed, head, ids, taps, anchors, weights, teacher=dataset.teachers[0], distill=1.0)
    assert not torch.isclose(soft, ce)  # the real teacher is not one-hot: the term is really used


def test_distillation_gradient_reaches_only_the_drafter(run):
    _, target = run
    dataset, ids, taps, anchors = _one_sequence(run)
    drafter = _drafter(target)
    embed = target.get_input_embeddings().requires_grad_(False)
    head = target.get_output_embeddings().requires_grad_(False)
    teacher = tuple(t.clone() for t in dataset.teachers[0])
    loss, _ = block_loss(drafter, embed, head, ids, taps, anchors, loss_weights(4), teacher=teacher, distill=0.7)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in drafter.named_parameters()
               if n.startswith(("fc", "layers.0.self_attn.q_proj")))
    assert all(p.grad is None for p in target.parameters())
    assert not any(t.requires_grad for t in teacher)


def test_draft_vocabulary_is_the_most_frequent_response_tokens():
    records = [
        {"input_ids": [9, 9, 9, 1, 1, 2, 3], "prompt_len": 3},  # the prompt's 9s do not count
        {"input_ids": [5, 1, 2, 2, 4], "prompt_len": 1},
    ]
    assert draft_vocabulary(records, 2) == [1, 2]
    assert draft_vocabulary(records, 2, always=(7,)) == [1, 2, 7]
    assert vocabulary_coverage(records, [1, 2]) == pytest.approx(6 / 8)


def test_reduced_head_trains_only_on_labels_it_holds(run):
    _, target = run
    _, ids, taps, anchors = _one_sequence(run)
    drafter = _drafter(target)
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    vocab = sorted(set(ids[6:].tolist()))[::2]  # half of the response's tokens
    head = DraftHead(lm_head, vocab)
    assert head.weight.shape[0] == len(vocab)
    assert torch.equal(head.index[torch.tensor(vocab)], torch.arange(len(vocab)))
    assert int((head.index >= 0).sum()) == len(vocab)
    loss, metrics = block_loss(drafter, embed, head, ids, taps, anchors, loss_weights(4))
    assert torch.isfinite(loss)
    full_vocab = DraftHead(lm_head, list(range(VOCAB)))  # the whole vocabulary as a "subset": plain CE
    a, _ = block_loss(drafter, embed, full_vocab, ids, taps, anchors, loss_weights(4))
    b, _ = block_loss(drafter, embed, lm_head, ids, taps, anchors, loss_weights(4))
    torch.testing.assert_close(a, b)


def test_draft_vocab_config_is_validated_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match="increasing order"):
        DFlashConfig(vocab_size=100, draft_vocab=[3, 2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        DFlashConfig(vocab_size=100, draft_vocab=[3, 100])
    with pytest.raises(ValueError, match="non-empty"):
        DFlashConfig(vocab_size=100, draft_vocab=[])
    assert "draft_vocab" not in DFlashConfig(vocab_size=100).to_dict()  # absent stays absent on disk
    target = make_target("qwen3", dtype=torch.float32)
    drafter = _drafter(target, draft_vocab=[1, 5, 7])
    drafter.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["draft_vocab"] == [1, 5, 7]
    assert DFlashDraftModel.from_pretrained(tmp_path).config.draft_vocab == [1, 5, 7]


def test_reduced_vocab_drafts_only_its_tokens_and_stays_lossless():
    target = make_target("qwen3", dtype=torch.float32)
    vocab = list(range(0, VOCAB, 3))
    drafter = _drafter(target, draft_vocab=vocab).eval()
    session = DraftSession(target, drafter)
    hidden = torch.randn(2, 3, drafter.config.hidden_size)
    logits = session.draft_logits(hidden)
    assert logits.shape == (2, 3, VOCAB)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[vocab] = False
    assert torch.all(logits[..., outside] == float("-inf"))
    full = target.get_output_embeddings()(hidden)
    torch.testing.assert_close(logits[..., vocab], full[..., vocab])
    fewer = session.draft_logits(hidden[:1, :2])  # a later block with fewer rows reuses the session's buffer
    assert fewer.data_ptr() == logits.data_ptr() and torch.all(fewer[..., outside] == float("-inf"))
    torch.testing.assert_close(fewer[..., vocab], full[:1, :2, vocab])
    for seed in range(3):
        prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(seed))
        plain = target.generate(prompt, max_new_tokens=24, do_sample=False)
        out = target.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=drafter)
        assert torch.equal(plain, out)


@pytest.mark.parametrize("switch", ["distill", "draft_vocab"])
def test_each_recipe_switch_trains_resumes_and_beats_the_untrained_drafter(run, tmp_path, switch):
    root, target = run
    dataset = FeatureDataset(root / "features")
    extra = {"draft_vocab": draft_vocabulary(load_records(root / "data"), VOCAB // 2)} if switch == "draft_vocab" else {}
    config = TrainConfig(steps=150, batch_size=2, num_anchors=8, lr=3e-3, save_every=50, warmup_ratio=0.05,
                         distill=0.5 if switch == "distill" else 0.0)
    held_out = range(1000, 1006)
    before = _acceptance(target, _drafter(target, **extra).eval(), held_out)
    straight = _drafter(target, **extra)
    train_drafter(straight, target, dataset, tmp_path / "straight", config)
    interrupted = _drafter(target, **extra)
    train_drafter(interrupted, target, dataset, tmp_path / "resumed", config, stop_after=70)
    resumed = _drafter(target, **extra)
    train_drafter(resumed, target, dataset, tmp_path / "resumed", config)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)
    after = _acceptance(target, straight.eval(), held_out)
    assert after > before + 0.08, (before, after)


def test_distillation_without_teacher_files_is_refused(tmp_path):
    target = make_target("qwen3", dtype=torch.float32)
    write_shards(_records(target, 2, seed=5, new_tokens=10), tmp_path / "data", shard_size=8)
    extract_features(target, tmp_path / "data", tmp_path / "features", TAPS)
    with pytest.raises(ValueError, match="teacher"):
        train_drafter(_drafter(target), target, FeatureDataset(tmp_path / "features"), tmp_path / "run",
                      TrainConfig(steps=1, distill=0.5))


def test_feature_dataset_keeps_only_the_shards_asked_for(run):
    root, _ = run
    everything = FeatureDataset(root / "features")
    middle = FeatureDataset(root / "features", shards=[1])
    assert len(everything) == 24 and len(middle) == 8  # write_shards put 8 records in each of shards 0, 1, 2
    for i in range(8):
        assert torch.equal(middle[i][0], everything[8 + i][0])
    with pytest.raises(FileNotFoundError, match=r"among shards \[7\]"):
        FeatureDataset(root / "features", shards=[7])


def test_teacher_forced_acceptance_weights_examples_by_anchors_and_tracks_training(run, tmp_path):
    root, target = run
    drafter = _drafter(target)
    parts = [teacher_forced_acceptance(drafter, target, FeatureDataset(root / "features", shards=[k]), 8)
             for k in (0, 1)]
    both = teacher_forced_acceptance(drafter, target, FeatureDataset(root / "features", shards=[0, 1]), 8)
    assert both["blocks"] == parts[0]["blocks"] + parts[1]["blocks"]
    expected = sum(p["accept_len"] * p["blocks"] for p in parts) / both["blocks"]
    assert both["accept_len"] == pytest.approx(expected)
    assert 1.0 <= both["accept_len"] <= drafter.config.block_size
    assert 1.0 <= both["decode_weighted_accept_len"] <= both["accept_len"]  # a harmonic mean never exceeds the mean

    seen = FeatureDataset(root / "features", shards=[0, 1])
    before = {n: p.clone() for n, p in drafter.named_parameters()}
    train_drafter(drafter.train(), target, seen, tmp_path / "run",
                  TrainConfig(steps=120, batch_size=2, num_anchors=8, lr=3e-3, save_every=1000, warmup_ratio=0.05))
    trained = {n: p.clone() for n, p in drafter.named_parameters()}
    after = teacher_forced_acceptance(drafter.train(), target, seen, 8)
    assert drafter.training  # the evaluation hands the drafter back in the mode it got it
    assert all(torch.equal(p, trained[n]) for n, p in drafter.named_parameters())  # and changes no weight
    assert any(not torch.equal(p, before[n]) for n, p in drafter.named_parameters())
    assert after["accept_len"] > both["accept_len"] + 0.1, (both, after)
    assert after["decode_weighted_accept_len"] < after["accept_len"]  # a trained drafter's τ varies by position
