"""The DFlash block-diffusion drafter.

Portable core: imports only torch, transformers and sibling modules. Copied into every published drafter.

One forward drafts a whole block. Queries come from the block ``[anchor, MASK × (B-1)]`` embedded with the
TARGET's embedding table; keys and values are the block's own plus the "context": ``hidden_norm(fc(taps))`` of
every committed position, where ``taps`` concatenates the outputs of ``target_layer_ids`` decoder layers of the
target. Attention is non-causal inside the block. The drafter owns no embedding and no LM head; both are the
target's, bound at generate time and never saved.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from .cache_dflash import DraftCache
from .configuration_dflash import DFlashConfig, default_target_layer_ids, describe_config_weight_disagreement
from .generation_dflash import DFlashStats, run_dflash_decoding
from .matmul_dflash import FewRowLinear
from .pair_dflash import DFlashOptions, check_target_family, target_decoder_layers, validate_pair
from .patch_dflash import install_generate_patch


class DFlashRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        single = dtype == torch.float32  # no casts to dispatch: a draft runs ten of these norms on a few rows
        x = hidden_states if single else hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * (x if single else x.to(dtype))


class DFlashRotaryEmbedding(nn.Module):
    """Standard RoPE (``rope_type: default`` and ``linear``; the config rejects other scalings).

    The inverse frequencies are computed on first use per device, never held in a buffer: ``from_pretrained``
    builds models on the meta device and does not restore non-persistent buffers of custom modules, which would
    leave RoPE running on uninitialised memory.
    """

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        params = config.rope_parameters
        self.head_dim = config.head_dim
        self.theta = float(params["rope_theta"])
        self.factor = float(params["factor"]) if params.get("rope_type", "default") == "linear" else 1.0
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
            self._inv_freq[device] = 1.0 / (self.theta**exponents) / self.factor
        return self._inv_freq[device]

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: [B, S] -> cos, signed_sin: [B, S, head_dim], the tables of :func:`apply_rotary`;
        ``signed_sin`` is the sine with its first half negated."""
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)  # [B, S, head_dim / 2]
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half convention: ``x * cos + cat(-x2, x1) * sin`` (x1, x2 the halves of the last dim),
    computed as ``x * cos + roll(x, half) * signed_sin``, which is the same product in fewer ops.
    x: [B, heads, S, D]; cos, signed_sin: [B, S, D]."""
    return x * cos.unsqueeze(1) + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin.unsqueeze(1)


class DFlashAttention(nn.Module):
    def __init__(self, config: DFlashConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = FewRowLinear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = FewRowLinear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = FewRowLinear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = FewRowLinear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = DFlashRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = DFlashRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if is_sliding else None
        # z-lab's rule: sliding layers are causal inside the block, full layers see the whole block, unless the
        # config's ``is_causal`` says otherwise for every layer.
        self.block_causal = is_sliding if config.is_causal is None else config.is_causal

    def _project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, S, H] -> k, v: [B, kv_heads, S, head_dim]
        bsz, seq, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(k, cos, sin), v

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        rope_block: tuple[torch.Tensor, torch.Tensor],
        rope_keys: tuple[torch.Tensor, torch.Tensor],
        block_positions: torch.Tensor,
        context_positions: torch.Tensor,
        cache: DraftCache | None,
        attention_bias: torch.Tensor | None = None,
        query_slots: slice | None = None,
    ) -> torch.Tensor:
        """hidden_states: [B, Q, H] (normed block); context: [B, C, H] new context features (C may be 0).
        rope_block: cos, signed_sin [B, Q, head_dim] of the block (``DFlashRotaryEmbedding``); rope_keys: the
        same over ``cat(context, block)``.

        With ``attention_bias`` given (training), it is an additive [B or 1, 1, Q, C+Q] mask over
        ``cat(context, block)`` keys and the cache is not used. ``query_slots``: only these block slots query (all
        Q slots still give keys and values); the output is then [B, len(slots), H].
        """
        bsz = hidden_states.shape[0]
        slots = query_slots if query_slots is not None else slice(None)
        queries = hidden_states[:, slots]
        query_positions = block_positions[:, slots]
        q_len = queries.shape[1]
        q = self.q_norm(self.q_proj(queries).view(bsz, q_len, self.num_heads, self.head_dim)).transpose(1, 2)
        q = apply_rotary(q, rope_block[0][:, slots], rope_block[1][:, slots])
        # The new context and the block in one product each for k and v (the context is often a single row)
        k_new, v_new = self._project_kv(torch.cat((context, hidden_states), dim=1), *rope_keys)
        n_ctx = context.shape[1]
        k_ctx, k_blk = k_new[:, :, :n_ctx], k_new[:, :, n_ctx:]
        v_ctx, v_blk = v_new[:, :, :n_ctx], v_new[:, :, n_ctx:]

        if cache is not None:
            _, _, context_positions = self._append_to_cache(
                cache, k_ctx, v_ctx, context_positions, block_positions[:, 0], room=k_blk.shape[2]
            )
            k, v = cache.with_block(self.layer_idx, k_blk, v_blk)
        else:
            k = torch.cat((k_ctx, k_blk), dim=2)
            v = torch.cat((v_ctx, v_blk), dim=2)
        if attention_bias is None:
            attention_bias = self._inference_bias(query_positions, context_positions, block_positions, q.dtype)
        else:
            attention_bias = attention_bias[:, :, slots]
            if self.sliding_window is not None or self.block_causal:
                key_positions = torch.cat((context_positions, block_positions), dim=1)  # [B, C+Q]
                hidden = ~self._layer_visibility(query_positions, key_positions)
                attention_bias = attention_bias.masked_fill(hidden[:, None], torch.finfo(attention_bias.dtype).min)
        out = self._grouped_attention(q, k, v, attention_bias)  # [B, heads, Q, head_dim]
        out = out.transpose(1, 2).reshape(bsz, q_len, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def _grouped_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
        """SDPA of q [B, heads, Q, D] over k, v [B, kv_heads, K, D] without repeating k and v per query head: the
        query heads sharing a kv head are stacked as extra query rows of it (head h reads kv head h // groups)."""
        bsz, _, q_len, dim = q.shape
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(bsz, self.num_kv_heads, groups * q_len, dim)
        if bias is not None and groups > 1:
            bias = bias.repeat(1, 1, groups, 1)  # [B or 1, 1, groups * Q, K]: every group sees the same mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scaling)
        return out.reshape(bsz, self.num_heads, q_len, dim)

    def _append_to_cache(
        self,
        cache: DraftCache,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        pos_new: torch.Tensor,
        anchor_positions: torch.Tensor,
        room: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = self.layer_idx
        cache.append(i, k_new, v_new, pos_new, room=room)
        if self.sliding_window is not None and cache.keys[i].shape[2] >= self.sliding_window:
            # Queries only move forward (the earliest is each row's anchor), so an entry at or before
            # anchor - window is never attended again. Drop the leading slots that no row still needs.
            needed = (cache.positions[i] > (anchor_positions - self.sliding_window)[:, None]).any(dim=0)  # [C]
            # index of the first needed slot, or C when none is (the appended True makes argmax total): one sync
            first = int(torch.cat((needed, needed.new_ones(1))).int().argmax())
            if first:
                cache.keys[i] = cache.keys[i][:, :, first:]
                cache.values[i] = cache.values[i][:, :, first:]
                cache.positions[i] = cache.positions[i][:, first:]
        return cache.keys[i], cache.values[i], cache.positions[i]

    def _inference_bias(
        self, query_positions: torch.Tensor, context_positions: torch.Tensor, block_positions: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """Additive mask [B, 1, Q, C + block] over ``cat(context, block)`` keys for the ``query_positions`` slots:
        padding (position -1) is hidden, and this layer's rules apply; None when nothing is hidden."""
        has_padding = bool((context_positions < 0).any()) if context_positions.numel() else False
        if self.sliding_window is None and not self.block_causal and not has_padding:
            return None
        key_positions = torch.cat((context_positions, block_positions), dim=1)  # [B, C + block]
        visible = (key_positions >= 0)[:, None, :] & self._layer_visibility(query_positions, key_positions)
        bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        bias.masked_fill_(~visible, torch.finfo(dtype).min)
        return bias[:, None]

    def _layer_visibility(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """[B, Q, K] keys this layer may see by position: the window on sliding layers (both ways when the block
        is non-causal), and no later block slot on block-causal layers."""
        distance = query_positions[:, :, None] - key_positions[:, None, :]  # [B, Q, K]
        visible = torch.ones_like(distance, dtype=torch.bool)
        if self.sliding_window is not None:
            visible &= (distance if self.block_causal else distance.abs()) < self.sliding_window
        if self.block_causal:
            visible &= distance >= 0
        return visible


class DFlashMLP(nn.Module):
    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        self.gate_proj = FewRowLinear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = FewRowLinear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = FewRowLinear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config: DFlashConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DFlashAttention(config, layer_idx)
        self.mlp = DFlashMLP(config)
        self.input_layernorm = DFlashRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DFlashRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor, query_slots: slice | None = None,
                **attn_kwargs) -> torch.Tensor:
        """hidden_states: [B, Q, H] -> [B, Q, H], or [B, len(query_slots), H]: every slot gives keys and values,
        only ``query_slots`` go on through attention's output, the MLP and the residual."""
        residual = hidden_states if query_slots is None else hidden_states[:, query_slots]
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), context, query_slots=query_slots,
                                       **attn_kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class DFlashPreTrainedModel(PreTrainedModel):
    config_class = DFlashConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = False
    _no_split_modules = ["DFlashDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, DFlashRMSNorm):
            nn.init.ones_(module.weight)


class DFlashDraftModel(DFlashPreTrainedModel):
    """DFlash drafter. Use it as ``target.generate(..., assistant_model=drafter)``.

    ``last_stats`` holds the statistics of the last generate call that used this drafter.
    """

    # Duck-typed marker the generate patch dispatches on: a drafter loaded as remote code is a different class
    # object from ``dflash_hf.DFlashDraftModel``, so ``isinstance`` cannot be used.
    is_dflash_drafter = True

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__(config)
        target_width = config.num_taps * config.target_hidden_size
        self.fc = FewRowLinear(target_width, config.hidden_size, bias=False)
        self.hidden_norm = DFlashRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DFlashRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DFlashRotaryEmbedding(config)
        self.last_stats: DFlashStats | None = None
        # How `generate(assistant_model=self)` decodes: "dflash" (our loop: fused verification, exact stopping)
        # or "transformers" (the stock assisted loop driving DFlashCandidateGenerator).
        self.generation_loop = "dflash"
        # Lossless sampling rule when do_sample=True: "strict" (sample the target at every slot, accept while it
        # equals the draft), "ratio" (speculative sampling with the drafter's distribution; needs dflash_hf) or
        # "auto" (ratio where dflash_hf is installed, strict otherwise).
        self.sampling_mode = "auto"
        # Drafts verified per step: None = all block_size - 1 slots. Fewer makes each step cheaper (the LM head
        # and the verify forward shrink) at the cost of a shorter maximum acceptance; useful for weak drafters.
        # The checkpoint's config may carry a default.
        self.num_speculative_tokens: int | None = config.num_speculative_tokens
        # On CPU, verify forwards and drafts may compute float32 linear layers over 2-16 rows as weight @ x^T,
        # which CPU BLAS often runs far faster than its own few-row product (see matmul_dflash). True: where
        # this process's timings favour it; "always": for every such product; False: BLAS's own products.
        self.few_row_matmul_on_cpu = True
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained``, strict: safetensors only, and every tensor present and used.

        transformers would silently initialise a missing tensor at random (a drafter whose drafts are never
        accepted) and ignore unexpected ones; for a drafter both mean the checkpoint is not what it claims.
        """
        kwargs.setdefault("use_safetensors", True)
        if kwargs["use_safetensors"] is not True:
            raise ValueError("DFlash drafters load from safetensors only (pickled .bin weights are refused).")
        want_info = kwargs.pop("output_loading_info", False)
        folder = Path(str(pretrained_model_name_or_path))
        if folder.is_dir() and not (folder / "config.json").is_file():
            raise OSError(
                f"{folder} has no config.json: it is not a complete drafter checkpoint (download it again, or point "
                "at the folder that holds config.json and model.safetensors)."
            )
        # Mismatched shapes are loaded (and refused below) rather than raised by transformers: its error does not
        # say which config field disagrees with which tensor, and would read as a corrupt download.
        kwargs["ignore_mismatched_sizes"] = True
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except (OSError, ValueError):
            raise
        except Exception as error:  # a truncated or corrupt safetensors file surfaces here
            raise ValueError(
                f"Could not read the drafter weights in {pretrained_model_name_or_path!s}: {error}. The checkpoint "
                "looks incomplete or corrupt; download it again."
            ) from error
        if info.get("mismatched_keys"):
            raise ValueError(describe_config_weight_disagreement(
                model.config, info["mismatched_keys"], str(pretrained_model_name_or_path)))
        problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys")}
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            details = "; ".join(f"{k.replace('_', ' ')}: {v[:6]}{' …' if len(v) > 6 else ''}" for k, v in problems.items())
            raise ValueError(
                f"The checkpoint in {pretrained_model_name_or_path!s} does not match its DFlash config ({details}). "
                "It is incomplete or belongs to another model; use a complete DFlash drafter checkpoint."
            )
        return (model, info) if want_info else model

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def target_layer_ids(self) -> list[int]:
        return list(self.config.target_layer_ids)

    @property
    def mask_token_id(self) -> int | None:
        return self.config.mask_token_id

    def project_context(self, taps: torch.Tensor) -> torch.Tensor:
        """taps: [B, C, K * target_hidden] -> context features [B, C, hidden]."""
        return self.hidden_norm(self.fc(taps.to(self.fc.weight.dtype)))

    def forward(
        self,
        block_embeds: torch.Tensor,
        taps: torch.Tensor,
        block_positions: torch.Tensor,
        context_positions: torch.Tensor,
        cache: DraftCache | None = None,
        attention_bias: torch.Tensor | None = None,
        output_slots: slice | None = None,
    ) -> torch.Tensor:
        """Run the drafter over one block (inference) or many blocks at once (training).

        block_embeds: [B, Q, H] target embeddings of the block tokens.
        taps: [B, C, K * target_hidden] tapped target states of the C context positions not yet in ``cache``.
        block_positions: [B, Q] and context_positions: [B, C] absolute positions (``-1`` = padding).
        output_slots: the block slots whose states are wanted (default: all). The last layer then runs its queries,
        MLP and norm on those slots only; earlier layers need every slot, since the last one attends to all.
        Returns the final-normed hidden states [B, Q, H] (or [B, len(output_slots), H]); the caller applies the
        target's LM head.
        """
        dtype = self.fc.weight.dtype
        hidden = block_embeds.to(dtype)
        context = self.project_context(taps)
        # One table over cat(context, block) positions: the keys use all of it, the block's queries its tail.
        key_positions = torch.cat((context_positions, block_positions), dim=1).clamp(min=0)
        rope_keys = self.rotary_emb(key_positions, dtype)
        n_ctx = context_positions.shape[1]
        attn_kwargs = dict(
            rope_block=tuple(table[:, n_ctx:] for table in rope_keys),
            rope_keys=rope_keys,
            block_positions=block_positions,
            context_positions=context_positions,
            cache=cache,
            attention_bias=attention_bias,
        )
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, context, query_slots=output_slots if i == last else None, **attn_kwargs)
        return self.norm(hidden)

    # ----------------------------------------------------------------------------------------------------------
    # Building a drafter for a target
    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_target(
        cls,
        target: PreTrainedModel,
        num_hidden_layers: int = 1,
        block_size: int = 16,
        target_layer_ids: list[int] | None = None,
        mask_token_id: int | None = None,
        init_from_target: bool = False,
        num_taps: int | None = None,
        **config_overrides,
    ) -> "DFlashDraftModel":
        """An untrained drafter sized from ``target``'s config, on the target's device and dtype.

        ``target_layer_ids`` default to ``num_taps`` distinct layers spread evenly over ``1 … L-3`` (default
        ``max(1, min(5, L // 4))`` taps; one in the middle for a single tap or a target under 5 layers). ``mask_token_id`` defaults to the tokenizer-independent choice of the target's pad or
        last vocabulary row. ``init_from_target=True`` copies the matching weights of evenly spaced target
        decoder layers into the drafter layers (attention, MLP and norms), which speeds up training.
        """
        tcfg = check_target_family(target)
        num_layers = tcfg.num_hidden_layers
        if target_layer_ids is None:
            taps = num_taps if num_taps is not None else max(1, min(5, num_layers // 4))
            target_layer_ids = default_target_layer_ids(num_layers, taps)
        if mask_token_id is None:
            pad = getattr(tcfg, "pad_token_id", None)
            mask_token_id = pad if isinstance(pad, int) else tcfg.vocab_size - 1
        heads = tcfg.num_attention_heads
        head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // heads
        rope = getattr(tcfg, "rope_parameters", None) or {}
        rope_theta = rope.get("rope_theta", getattr(tcfg, "rope_theta", 1_000_000.0))
        values = dict(
            vocab_size=tcfg.vocab_size,
            hidden_size=tcfg.hidden_size,
            intermediate_size=tcfg.intermediate_size if isinstance(tcfg.intermediate_size, int) else 4 * tcfg.hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(tcfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            hidden_act=getattr(tcfg, "hidden_act", "silu"),
            max_position_embeddings=getattr(tcfg, "max_position_embeddings", 40960),
            rms_norm_eps=getattr(tcfg, "rms_norm_eps", 1e-6),
            rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
            block_size=block_size,
            num_target_layers=num_layers,
            target_hidden_size=tcfg.hidden_size,
            dflash_config={"mask_token_id": mask_token_id, "target_layer_ids": list(target_layer_ids)},
        )
        values.update(config_overrides)
        config = DFlashConfig(**values)
        param = next(target.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        drafter = cls(config).to(device=_home_device(target), dtype=dtype)
        validate_pair(target, drafter)
        if init_from_target:
            drafter._copy_layers_from(target_decoder_layers(target))
        return drafter

    @torch.no_grad()
    def _copy_layers_from(self, target_layers) -> None:
        """Initialise drafter layer j from target layer round(j·(L-1)/(n-1)) where tensor shapes agree."""
        n, total = len(self.layers), len(target_layers)
        for j, layer in enumerate(self.layers):
            src = target_layers[round(j * (total - 1) / max(1, n - 1))] if n > 1 else target_layers[total // 2]
            src_state = src.state_dict()
            for name, tensor in layer.state_dict().items():
                if name in src_state and src_state[name].shape == tensor.shape and src_state[name].is_floating_point():
                    tensor.copy_(src_state[name].to(tensor.dtype))

    # Generation ----------------------------------------------------------------------------------------------
    def _dflash_decode(self, target: PreTrainedModel, *args, **kwargs):
        """Entry point of the generate patch: run DFlash decoding of ``target`` with this drafter."""
        return run_dflash_decoding(target, self, *args, **kwargs)

    def _dflash_validate(self, target: PreTrainedModel) -> None:
        validate_pair(target, self)
        DFlashOptions.from_drafter(self)


def _home_device(target: PreTrainedModel) -> torch.device:
    """Where the drafter should live: the device of the target's input embedding (first device of a map)."""
    emb = target.get_input_embeddings()
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    for param in target.parameters():
        if param.device.type != "meta":
            return param.device
    raise ValueError(
        f"Every weight of this {type(target).__name__} is on the meta device (built without weights, e.g. under "
        "init_empty_weights). Load the target with its weights (from_pretrained) before building a drafter for it."
    )


DFlashConfig.register_for_auto_class()
DFlashDraftModel.register_for_auto_class("AutoModel")
install_generate_patch()

__all__ = ["DFlashDraftModel", "DFlashPreTrainedModel", "DraftCache"]
