"""Drafter variants of the published z-lab drafters: sliding-window layers (Qwen3.5 / Qwen3-Coder layout: four
sliding-attention layers, then one full-attention layer) and Qwen3.5's 248320-token vocabulary."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import COMMON, VOCAB, Script, make_target
from safetensors.torch import save_file
from test_checkpoints_and_dispatch import zlab_tensors
from test_hybrid_targets import make_hybrid
from transformers import AutoModel, Qwen3Config, Qwen3ForCausalLM

from dflash_hf import DFlashConfig, DFlashDraftModel
from dflash_hf.core.draft_dflash import DraftSession
from dflash_hf.core.modeling_dflash import DraftCache
from dflash_hf.core.pair_dflash import validate_pair
from dflash_hf.training.trainer import block_attention_mask

WINDOW = 6
BLOCK = 4
SLIDING_LAYOUT = ["sliding_attention"] * 4 + ["full_attention"]
SLIDING_LAYERS = range(4)
FULL_LAYER = 4


def make_sliding_drafter(target, seed: int = 1, **overrides) -> DFlashDraftModel:
    torch.manual_seed(seed)
    values = dict(num_hidden_layers=5, block_size=BLOCK, layer_types=SLIDING_LAYOUT, sliding_window=WINDOW,
                  use_sliding_window=True)
    values.update(overrides)
    drafter = DFlashDraftModel.from_target(target, **values).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # sharper attention than the 0.02 init, so that what a layer sees shows in its output
        for param in drafter.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64) * 0.3)
    return drafter


def draft_inputs(drafter: DFlashDraftModel, anchor: int, seed: int = 3):
    """Random block embeddings and taps for a context of positions 0 … anchor-1 and a block from ``anchor``."""
    cfg = drafter.config
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, cfg.block_size, cfg.hidden_size, generator=g, dtype=torch.float64)
    taps = torch.randn(1, anchor, cfg.num_taps * cfg.target_hidden_size, generator=g, dtype=torch.float64)
    block_positions = torch.arange(anchor, anchor + cfg.block_size)[None]
    return embeds, taps, block_positions, torch.arange(anchor)[None]


def spy_sessions(monkeypatch) -> list:
    """Record every DraftSession generate creates, so its draft cache can be inspected afterwards."""
    sessions = []
    original = DraftSession.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sessions.append(self)

    monkeypatch.setattr(DraftSession, "__init__", init)
    return sessions


def assert_window_trimmed(cache: DraftCache, anchor: int) -> None:
    """After a draft for ``anchor``: sliding layers hold exactly the window-1 newest positions, the full layer all."""
    assert len(cache.keys) == len(SLIDING_LAYOUT)
    assert torch.equal(cache.positions[FULL_LAYER], torch.arange(anchor)[None])
    assert cache.keys[FULL_LAYER].shape[2] == anchor
    for i in SLIDING_LAYERS:
        kept = torch.arange(max(0, anchor - WINDOW + 1), anchor)[None]
        assert torch.equal(cache.positions[i], kept), (i, anchor, cache.positions[i])
        assert cache.keys[i].shape[2] == cache.values[i].shape[2] == kept.shape[1] <= WINDOW - 1


# ---------------------------------------------------------------------------------------------------------------
# Sliding-window drafters
# ---------------------------------------------------------------------------------------------------------------
def test_sliding_drafter_save_and_reload_keep_layout_and_weights(tmp_path):
    target = make_target("qwen3")
    drafter = make_sliding_drafter(target)
    assert [layer.self_attn.sliding_window for layer in drafter.layers] == [WINDOW] * 4 + [None]
    drafter.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["layer_types"] == SLIDING_LAYOUT and on_disk["sliding_window"] == WINDOW
    assert on_disk["use_sliding_window"] is True and on_disk["num_hidden_layers"] == 5

    ours = DFlashDraftModel.from_pretrained(tmp_path, dtype=torch.float64)
    remote = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float64)
    assert type(remote) is not DFlashDraftModel  # the saved portable copy, not this package
    # a context 3 windows long: a reload that lost the window (or put it on the wrong layers) drafts differently
    inputs = draft_inputs(drafter, anchor=3 * WINDOW)
    with torch.no_grad():
        expected = drafter(*inputs)
    for loaded in (ours, remote):
        assert loaded.config.layer_types == SLIDING_LAYOUT and loaded.config.sliding_window == WINDOW
        assert [layer.self_attn.sliding_window for layer in loaded.layers] == [WINDOW] * 4 + [None]
        state = loaded.state_dict()
        assert state.keys() == drafter.state_dict().keys()
        for key, value in drafter.state_dict().items():
            assert torch.equal(state[key], value), key
        with torch.no_grad():
            torch.testing.assert_close(loaded(*inputs), expected)


@pytest.mark.parametrize("generation_loop", ["dflash", "transformers"])
def test_sliding_drafter_generates_losslessly_with_a_bounded_draft_cache(monkeypatch, generation_loop):
    target = make_target("qwen3")
    drafter = make_sliding_drafter(target)
    drafter.generation_loop = generation_loop
    sessions = spy_sessions(monkeypatch)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(7))
    plain = target.generate(prompt, max_new_tokens=40, do_sample=False)
    fast = target.generate(prompt, max_new_tokens=40, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)
    assert len(sessions) == 1 and drafter.last_stats.new_tokens == 40
    cache = sessions[0].cache
    # The full-attention layer holds every position before the last anchor, which lies in the last block.
    last_anchor = cache.length(FULL_LAYER)
    assert plain.shape[1] - BLOCK <= last_anchor < plain.shape[1]
    assert last_anchor > 5 * WINDOW  # the window was overrun many times over
    assert_window_trimmed(cache, last_anchor)
    if generation_loop == "dflash":
        assert drafter.last_stats.draft_cache_bytes == cache.nbytes()


@pytest.mark.parametrize("generation_loop", ["dflash", "transformers"])
def test_sliding_draft_cache_under_every_acceptance_count(monkeypatch, generation_loop):
    """The real sliding drafter runs at every step (its verdict replaced by a script, so that 0 … B-1 drafts are
    accepted and the draft cache receives contexts of 1 … B positions): each cached, trimmed draft equals an
    uncached draft over the whole context, the cache stays bounded, and the output is plain generate's."""
    target = make_target("qwen3")
    drafter = make_sliding_drafter(target)
    drafter.generation_loop = generation_loop
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(8))
    plain = target.generate(prompt, max_new_tokens=48, do_sample=False)
    errors = [None, 1, 3, None, 2, None, None, 1, 1, 3, None, 2, None, None, None]
    script = Script(plain, errors, VOCAB)
    real_propose = DraftSession.propose
    seen = {"taps": [], "positions": [], "steps": 0}

    def propose(session, anchor, anchor_position, context_taps, context_positions, num_drafts=None):
        cached = real_propose(session, anchor, anchor_position, context_taps, context_positions, num_drafts)
        seen["taps"].append(context_taps)
        seen["positions"].append(context_positions)
        all_positions = torch.cat(seen["positions"], dim=1)
        assert torch.equal(all_positions, torch.arange(int(anchor_position[0]))[None])
        block = torch.full((1, BLOCK), session.mask_token_id)
        block[0, 0] = anchor[0]
        with torch.no_grad():  # no cache at all: the window is applied by the attention mask alone
            hidden = session.drafter(session.embed(block), torch.cat(seen["taps"], dim=1),
                                     anchor_position[:, None] + torch.arange(BLOCK), all_positions)
            recomputed = session.lm_head(hidden[:, 1 : 1 + cached.shape[1]])  # the slots this step verifies
        torch.testing.assert_close(cached, recomputed)
        assert_window_trimmed(session.cache, int(anchor_position[0]))
        seen["steps"] += 1
        return script.propose(session, anchor, anchor_position, context_taps, context_positions, num_drafts)

    monkeypatch.setattr(DraftSession, "propose", propose)
    fast = target.generate(prompt, max_new_tokens=48, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)
    expected = [slot if slot is not None else BLOCK for slot in errors]
    assert drafter.last_stats.acceptance_lengths[: len(errors)] == expected
    assert max(p.shape[1] for p in seen["positions"][1:]) == BLOCK  # whole accepted blocks reached the cache
    assert seen["steps"] >= len(errors) and int(seen["positions"][-1][0, -1]) > 5 * WINDOW


def test_trimmed_draft_cache_drafts_exactly_what_a_full_recompute_drafts():
    """Context arriving in chunks of 1…B committed tokens (every acceptance count): after each chunk the cached,
    trimmed forward equals an uncached forward over the whole context, and the sliding layers hold window-1
    positions."""
    target = make_target("qwen3")
    drafter = make_sliding_drafter(target)
    embeds, taps, _, _ = draft_inputs(drafter, anchor=60)
    cache = DraftCache()
    start, anchor = 0, 5  # a 5-token prompt, then the accepted prefixes of successive blocks
    for chunk in [1, 4, 1, 2, 3, 1, 1, 4, 4, 2, 1, 3, 1]:
        block_positions = torch.arange(anchor, anchor + BLOCK)[None]
        with torch.no_grad():
            cached = drafter(embeds, taps[:, start:anchor], block_positions, torch.arange(start, anchor)[None],
                             cache=cache)
            full = drafter(embeds, taps[:, :anchor], block_positions, torch.arange(anchor)[None])
        torch.testing.assert_close(cached, full)
        assert_window_trimmed(cache, anchor)
        start, anchor = anchor, anchor + chunk
    assert anchor > 4 * WINDOW


def test_append_to_cache_keeps_what_the_slowest_row_still_needs():
    """Rows of a batch at different anchors (left padding and holes are position -1): leading slots are dropped
    only when no row can attend to them again."""
    drafter = make_sliding_drafter(make_target("qwen3"))
    attention = drafter.layers[0].self_attn
    assert attention.sliding_window == WINDOW
    cache = DraftCache()
    g = torch.Generator().manual_seed(0)

    def append(positions: list[list[int]], anchors: list[int]) -> torch.Tensor:
        pos = torch.tensor(positions)
        keys = torch.randn(2, 2, pos.shape[1], 8, generator=g, dtype=torch.float64)
        k, v, p = attention._append_to_cache(cache, keys, keys + 1, pos, torch.tensor(anchors))
        assert k is cache.keys[0] and v is cache.values[0] and p is cache.positions[0]
        return keys

    first = append([list(range(10)), [-1, -1, -1, *range(7)]], anchors=[10, 7])
    # row 0 needs positions > 4, row 1 positions > 1: the first 5 slots go for both
    assert cache.positions[0].tolist() == [[5, 6, 7, 8, 9], [2, 3, 4, 5, 6]]
    assert torch.equal(cache.keys[0], first[:, :, 5:]) and torch.equal(cache.values[0], first[:, :, 5:] + 1)

    second = append([[10, 11, 12], [7, -1, -1]], anchors=[13, 8])
    # row 0 alone could drop 3 more slots (needs > 7), but row 1 still needs 3…7: only one slot goes
    assert cache.positions[0].tolist() == [[6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7, -1, -1]]
    assert torch.equal(cache.keys[0], torch.cat((first[:, :, 6:], second), dim=2))

    full_layer = drafter.layers[FULL_LAYER].self_attn
    full_cache = DraftCache(keys=[None] * FULL_LAYER, values=[None] * FULL_LAYER, positions=[None] * FULL_LAYER)
    keys = torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64)
    full_layer._append_to_cache(full_cache, keys, keys, torch.arange(30)[None], torch.tensor([30]))
    assert full_cache.length(FULL_LAYER) == 30  # full attention keeps everything


def test_window_changes_drafts_only_once_the_context_outgrows_it():
    """Same weights with full attention everywhere: identical drafts while every key is within the window of every
    query, different ones once the context is longer than the window. (is_causal=False keeps the sliding layers'
    block non-causal, so that only the window differs.)"""
    target = make_target("qwen3")
    sliding = make_sliding_drafter(target, is_causal=False)
    full = make_sliding_drafter(target, layer_types=["full_attention"] * 5, is_causal=False)
    full.load_state_dict(sliding.state_dict())
    assert all(layer.self_attn.sliding_window is None for layer in full.layers)
    short_anchor = WINDOW - BLOCK  # the last block slot is window-1 positions after position 0
    with torch.no_grad():
        short = draft_inputs(sliding, anchor=short_anchor)
        torch.testing.assert_close(sliding(*short), full(*short))
        long = draft_inputs(sliding, anchor=4 * WINDOW)
        out_sliding, out_full = sliding(*long), full(*long)
    assert (out_sliding - out_full).abs().max() > 1e-2
    logits_sliding, logits_full = target.lm_head(out_sliding), target.lm_head(out_full)
    assert not torch.allclose(logits_sliding, logits_full)


# ---------------------------------------------------------------------------------------------------------------
# Qwen3.5's vocabulary: 248320 rows, mask token 248070
# ---------------------------------------------------------------------------------------------------------------
QWEN35_VOCAB = 248320
QWEN35_MASK = 248070


def qwen35_zlab_config(mask_token_id: int = QWEN35_MASK) -> dict:
    """config.json in the shape of z-lab's Qwen3.5 drafters (5 layers, 4 sliding + 1 full), shrunk to hidden 32."""
    return {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "attention_bias": False,
        "block_size": 8,
        "num_target_layers": 4,
        "dflash_config": {"mask_token_id": mask_token_id, "target_layer_ids": [1, 2]},
        "dtype": "bfloat16",
        "head_dim": 8,
        "hidden_act": "silu",
        "hidden_size": 32,
        "intermediate_size": 64,
        "layer_types": SLIDING_LAYOUT,
        "max_position_embeddings": 262144,
        "max_window_layers": 5,
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000000,
        "rope_scaling": None,
        "sliding_window": WINDOW,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": True,
        "vocab_size": QWEN35_VOCAB,
    }


def write_zlab_drafter(folder, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {name: t.to(torch.bfloat16) for name, t in zlab_tensors(config["num_hidden_layers"], scale=0.3).items()}
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def big_vocab_qwen3() -> torch.nn.Module:
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **{**COMMON, "vocab_size": QWEN35_VOCAB}))
    model = model.to(torch.float64).eval()
    model.generation_config.pad_token_id = None
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def qwen35_drafter(tmp_path_factory) -> DFlashDraftModel:
    folder = tmp_path_factory.mktemp("qwen35") / "drafter"
    write_zlab_drafter(folder, qwen35_zlab_config())
    return DFlashDraftModel.from_pretrained(folder, dtype=torch.float64)


def big_prompt(length: int, seed: int) -> torch.Tensor:
    ids = torch.randint(0, QWEN35_VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
    ids[0, -2:] = torch.tensor([QWEN35_VOCAB - 1, QWEN35_MASK + 5])  # ids beyond any 16-bit or 2^17 range
    return ids


def test_qwen35_zlab_config_loads_with_its_mask_token(qwen35_drafter, big_vocab_qwen3):
    cfg = qwen35_drafter.config
    assert cfg.mask_token_id == QWEN35_MASK and cfg.vocab_size == QWEN35_VOCAB
    assert cfg.dflash_config == {"mask_token_id": QWEN35_MASK, "target_layer_ids": [1, 2]}
    assert cfg.block_size == 8 and cfg.num_target_layers == 4
    assert cfg.layer_types == SLIDING_LAYOUT and cfg.sliding_window == WINDOW
    assert qwen35_drafter.fc.in_features == 64
    validate_pair(big_vocab_qwen3, qwen35_drafter)  # accepted: no exception
    # the same drafter against a 96-token target: its mask token is no row there
    with pytest.raises(ValueError, match=f"mask_token_id={QWEN35_MASK}"):
        validate_pair(make_target("qwen3"), qwen35_drafter)


def test_mask_token_outside_the_vocabulary_is_refused(tmp_path, qwen35_drafter, big_vocab_qwen3):
    write_zlab_drafter(tmp_path / "bad", qwen35_zlab_config(mask_token_id=QWEN35_VOCAB))
    with pytest.raises(ValueError, match=f"mask_token_id {QWEN35_VOCAB} is outside the vocabulary"):
        DFlashDraftModel.from_pretrained(tmp_path / "bad", dtype=torch.float64)
    original = qwen35_drafter.config.mask_token_id
    try:
        qwen35_drafter.config.mask_token_id = QWEN35_VOCAB  # a config edited after loading
        with pytest.raises(ValueError, match=f"mask_token_id={QWEN35_VOCAB}"):
            validate_pair(big_vocab_qwen3, qwen35_drafter)
        prompt = big_prompt(4, 0)
        with pytest.raises(ValueError, match="mask_token_id"):
            big_vocab_qwen3.generate(prompt, max_new_tokens=3, do_sample=False, assistant_model=qwen35_drafter)
    finally:
        qwen35_drafter.config.mask_token_id = original


def test_qwen35_vocab_pair_is_lossless_on_qwen3(qwen35_drafter, big_vocab_qwen3, monkeypatch):
    sessions = spy_sessions(monkeypatch)
    prompt = big_prompt(6, 1)
    plain = big_vocab_qwen3.generate(prompt, max_new_tokens=12, do_sample=False)
    fast = big_vocab_qwen3.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=qwen35_drafter)
    assert torch.equal(plain, fast)
    assert qwen35_drafter.last_stats.new_tokens == 12
    assert sessions[0].mask_token_id == QWEN35_MASK


def test_qwen35_vocab_pair_is_lossless_on_a_hybrid_qwen3_5_target(qwen35_drafter):
    target = make_hybrid("qwen3_5", vocab=QWEN35_VOCAB)
    assert target.get_input_embeddings().weight.shape[0] == QWEN35_VOCAB
    validate_pair(target, qwen35_drafter)
    prompt = big_prompt(6, 2)
    plain = target.generate(prompt, max_new_tokens=12, do_sample=False)
    fast = target.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=qwen35_drafter)
    assert torch.equal(plain, fast)
    assert qwen35_drafter.last_stats.new_tokens == 12


# ---------------------------------------------------------------------------------------------------------------
# In-block causality: z-lab's rule (sliding layers causal inside the block unless is_causal says otherwise)
# ---------------------------------------------------------------------------------------------------------------
def test_sliding_layers_are_causal_inside_the_block_by_default():
    target = make_target("qwen3")
    assert [layer.self_attn.block_causal for layer in make_sliding_drafter(target).layers] == [True] * 4 + [False]
    causal = make_sliding_drafter(target, is_causal=True)
    non_causal = make_sliding_drafter(target, is_causal=False)
    assert all(layer.self_attn.block_causal for layer in causal.layers)
    assert not any(layer.self_attn.block_causal for layer in non_causal.layers)
    embeds, taps, block_positions, context_positions = draft_inputs(causal, anchor=3)
    changed = embeds.clone()
    changed[:, -1] += 1.0  # only the last block slot changes
    with torch.no_grad():
        a, b = (causal(e, taps, block_positions, context_positions) for e in (embeds, changed))
        c, d = (non_causal(e, taps, block_positions, context_positions) for e in (embeds, changed))
    torch.testing.assert_close(a[:, :-1], b[:, :-1])  # earlier slots cannot see it through causal layers
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3
    assert (c[:, 0] - d[:, 0]).abs().max() > 1e-3  # a non-causal block lets slot 0 see it


def test_training_mask_applies_each_layers_rules_like_inference():
    """The trainer's one-forward-for-all-blocks mask plus the layer rules gives, for every block, what inference
    computes for that block alone: sliding windows and in-block causality included."""
    from dflash_hf.training.trainer import block_attention_mask

    target = make_target("qwen3")
    drafter = make_sliding_drafter(target)  # 4 sliding (causal in block) + 1 full
    cfg = drafter.config
    g = torch.Generator().manual_seed(5)
    seq_len = 30
    taps = torch.randn(1, seq_len, cfg.num_taps * cfg.target_hidden_size, generator=g, dtype=torch.float64)
    anchors = torch.tensor([4, 13, 22])
    embeds = torch.randn(1, len(anchors) * cfg.block_size, cfg.hidden_size, generator=g, dtype=torch.float64)
    positions = (anchors[:, None] + torch.arange(cfg.block_size)).reshape(1, -1)
    visible = block_attention_mask(anchors, cfg.block_size, seq_len)
    bias = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float64).min)
    with torch.no_grad():
        joint = drafter(embeds, taps, positions, torch.arange(seq_len)[None], cache=None, attention_bias=bias[None, None])
        for j, anchor in enumerate(anchors.tolist()):
            rows = slice(j * cfg.block_size, (j + 1) * cfg.block_size)
            alone = drafter(embeds[:, rows], taps[:, :anchor], positions[:, rows], torch.arange(anchor)[None])
            torch.testing.assert_close(joint[:, rows], alone)


def small_config(dflash_config: dict) -> DFlashConfig:
    return DFlashConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=96,
                        num_target_layers=4, dflash_config=dflash_config)


@pytest.mark.parametrize("option", [{"output_multiplier": 2.0}, {"final_logit_softcapping": 30.0},
                                    {"input_embedding_scale": 0.5}])
def test_unimplemented_dflash_options_are_refused(option):
    with pytest.raises(ValueError, match="does not implement"):
        small_config({"mask_token_id": 1, "target_layer_ids": [1], **option})
    config = small_config({"mask_token_id": 1, "target_layer_ids": [1], "output_multiplier": 1.0, "is_causal": True})
    assert config.is_causal is True


@pytest.mark.parametrize("layout, is_causal", [
    (["sliding_attention"] * 5, None),  # the last layer slides and is causal inside the block
    (SLIDING_LAYOUT, True),  # the last layer sees everything but is block-causal
    (["full_attention"] * 5, False),  # no mask at all: the default layout of the shipped drafters
])
def test_output_slots_give_the_states_of_a_full_block_forward(layout, is_causal):
    """``output_slots`` runs the last layer's queries, MLP and norm on fewer slots; every layer still sees the whole
    block as keys, so the kept slots' states equal the full forward's, with and without a draft cache, with padded
    context rows and with a training mask."""
    target = make_target("qwen3")
    drafter = make_sliding_drafter(target, layer_types=layout, is_causal=is_causal).double()
    cfg = drafter.config
    g = torch.Generator().manual_seed(5)
    anchor = 3 * WINDOW
    embeds = torch.randn(2, BLOCK, cfg.hidden_size, generator=g, dtype=torch.float64)
    taps = torch.randn(2, anchor, cfg.num_taps * cfg.target_hidden_size, generator=g, dtype=torch.float64)
    context_positions = torch.arange(anchor).repeat(2, 1)
    context_positions[0, :4] = -1  # row 0 is left-padded, as in a batch
    block_positions = torch.arange(anchor, anchor + BLOCK).repeat(2, 1)
    kept = slice(1, BLOCK - 1)
    with torch.no_grad():
        full = drafter(embeds, taps, block_positions, context_positions)
        torch.testing.assert_close(drafter(embeds, taps, block_positions, context_positions, output_slots=kept),
                                   full[:, kept])
        caches = DraftCache(), DraftCache()
        for step in range(2):  # the second call reads the context from the cache
            shift = step * BLOCK
            new_taps = taps[:, :anchor] if step == 0 else taps[:, :BLOCK]
            new_positions = context_positions if step == 0 else block_positions
            args = (embeds, new_taps, block_positions + shift, new_positions)
            torch.testing.assert_close(drafter(*args, cache=caches[1], output_slots=kept),
                                       drafter(*args, cache=caches[0])[:, kept])
        visible = block_attention_mask(torch.tensor([anchor]), BLOCK, anchor)
        bias = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float64).min)
        one = (embeds[:1], taps[:1], block_positions[:1], torch.arange(anchor)[None])
        torch.testing.assert_close(drafter(*one, attention_bias=bias[None, None], output_slots=kept),
                                   drafter(*one, attention_bias=bias[None, None])[:, kept])
