"""``TransformerConfig`` attention features the helix attention does not build.

One table for both places that refuse them: the Megatron-LM argument check (by flag, before any
process group exists) and ``HelixSelfAttention``'s constructor (by config, for users of the
layer spec). A field an older megatron-core lacks reads as unset, so the table serves every
supported release.
"""

from __future__ import annotations

from typing import List, Tuple

#: (``TransformerConfig`` field, why helix refuses it). Set means anything but the default
#: (``None`` / ``False``); the Megatron-LM flag is the field with dashes.
UNSUPPORTED_ATTENTION_FEATURES: Tuple[Tuple[str, str], ...] = (
    ("attention_output_gate", "the helix attention has no output gate"),
    ("fused_single_qkv_rope", "the helix slices take RoPE after the QKV split"),
    ("multi_latent_attention", "MLA has its own projections"),
    ("qk_l2_norm", "the head-dim-sliced q/k norm supports LayerNorm and RMSNorm only"),
    ("qk_clip", "QK-clip rescales linear_qkv rows in Megatron's standard order and reads a "
                "max logit the helix core attention does not record"),
    ("log_max_attention_logit", "the helix core attention does not record the max logit"),
    ("batch_invariant_mode", "the helix block kernels make no batch-invariance promise"),
    ("flash_attention_version", "the helix block kernels choose their own kernel by device "
                                "(attention/block_kernel.py)"),
    ("use_mup", "muP has not been tested with helix attention"),
)


def flag(field: str) -> str:
    """The Megatron-LM flag of a ``TransformerConfig`` field: ``qk_clip`` -> ``--qk-clip``."""
    return "--" + field.replace("_", "-")


def unsupported_attention_features(settings: object) -> List[str]:
    """``"--flag (why)"`` for every feature of the table set on ``settings`` (a
    ``TransformerConfig`` or Megatron-LM's parsed args)."""
    return [
        f"{flag(field)} ({why})"
        for field, why in UNSUPPORTED_ATTENTION_FEATURES
        if getattr(settings, field, None) not in (None, False)
    ]
