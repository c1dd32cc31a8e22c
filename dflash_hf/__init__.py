"""dflash-hf: DFlash block-diffusion speculative decoding for transformers.

    import dflash_hf
    drafter = dflash_hf.DFlashDraftModel.from_pretrained("z-lab/Qwen3-8B-DFlash-b16")
    out = target.generate(input_ids, assistant_model=drafter, max_new_tokens=256)   # same tokens, faster

Importing the package installs the (idempotent) generate patch; so does loading a drafter's remote code.
"""

from .configuration_dflash import DFlashConfig, default_target_layer_ids
from .default_pair import load_default_pair
from .generation_dflash import DFlashCandidateGenerator, DFlashStats, install_generate_patch
from .modeling_dflash import DFlashDraftModel

install_generate_patch()

__version__ = "0.1.0"

__all__ = [
    "DFlashCandidateGenerator",
    "DFlashConfig",
    "DFlashDraftModel",
    "DFlashStats",
    "default_target_layer_ids",
    "install_generate_patch",
    "load_default_pair",
]
