"""Which dtype a drafter drafts fastest in on this machine, by measurement.

Drafts are proposals: the target verifies every token in its own dtype, so a bfloat16 drafter of a float32 target
changes speed and perhaps acceptance, never the output. On a CPU with native bfloat16 matmuls (``avx512_bf16``,
AMX) a bfloat16 draft streams half the bytes; on one without them bfloat16 products are emulated and slower. No
CPU flag decides: ``fastest_drafter_dtype`` times the same synthetic drafts in each candidate dtype, interleaved,
and keeps float32 unless another is clearly faster.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..core.draft_dflash import DraftSession

CANDIDATES = (torch.float32, torch.bfloat16)
MARGIN = 0.9  # another dtype replaces float32 only when it drafts in under 90 % of float32's time
CONTEXT = 64  # committed positions the synthetic drafts attend to, besides the block
WARM_UP, TIMED = 3, 9  # drafts per candidate: the first ones fill the few-row plan and the caches


def draft_timings(target: nn.Module, drafter: nn.Module, dtypes: tuple[torch.dtype, ...] = CANDIDATES,
                  timed: int = TIMED) -> dict[torch.dtype, float]:
    """Median seconds of one draft (the drafter's layers and its LM head, as the decode loop runs them) of
    ``drafter`` cast to each of ``dtypes``, on random context taps. The candidates take turns draft by draft, so
    a busy neighbour slows them alike. ``drafter`` itself is left as it is."""
    config = drafter.config
    device = drafter.fc.weight.device
    generator = torch.Generator().manual_seed(0)
    tap_width = config.num_taps * config.target_hidden_size
    sessions = {dtype: DraftSession(target, drafter if dtype == drafter.dtype else copy.deepcopy(drafter).to(dtype))
                for dtype in dtypes}
    anchor = torch.tensor([1 if config.mask_token_id == 0 else 0], device=device)  # any token but the mask
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in dtypes}
    for step in range(WARM_UP + timed):
        context = CONTEXT if step == 0 else 1  # one prefill-sized context, then one new position per draft
        start_position = 0 if step == 0 else CONTEXT + step - 1
        taps = torch.randn(1, context, tap_width, generator=generator).to(device)
        positions = torch.arange(start_position, start_position + context, device=device)[None]
        anchor_position = positions[:, -1] + 1
        for dtype, session in sessions.items():
            begin = time.perf_counter()
            session.propose(anchor, anchor_position, taps, positions)
            if step >= WARM_UP:
                times[dtype].append(time.perf_counter() - begin)
    return {dtype: sorted(seconds)[len(seconds) // 2] for dtype, seconds in times.items()}


def fastest_drafter_dtype(target: nn.Module, drafter: nn.Module) -> tuple[torch.dtype, dict[torch.dtype, float]]:
    """``(dtype, timings)``: the dtype ``drafter`` should draft in on this machine and the median seconds per draft
    measured for each candidate. Only a float32 drafter of a float32 target on CPU has a choice (float32 or
    bfloat16); any other pair keeps the drafter's dtype and measures nothing.

        dtype, _ = fastest_drafter_dtype(target, drafter)
        drafter.to(dtype)
    """
    target_dtype = next(target.parameters()).dtype
    on_cpu = drafter.fc.weight.device.type == "cpu"
    if not (on_cpu and drafter.dtype == torch.float32 and target_dtype == torch.float32):
        return drafter.dtype, {}
    timings = draft_timings(target, drafter)
    fastest = min(timings, key=timings.get)
    if fastest != torch.float32 and timings[fastest] >= MARGIN * timings[torch.float32]:
        fastest = torch.float32
    return fastest, timings


__all__ = ["CANDIDATES", "draft_timings", "fastest_drafter_dtype"]
