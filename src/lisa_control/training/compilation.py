"""``torch.compile`` for dual-branch training, one block at a time.

Blocks, not whole models: the shared-encoder prior calls a UNet's down, mid and up blocks
directly (so a compiled top-level ``forward`` would never run), and regularizers read features
through forward hooks, which must stay in eager mode to see every call. A block that holds a
hooked module is therefore left uncompiled.

Shapes are static: the instances of one block class share their code object, so after the
second instance dynamo would switch to dynamic shapes and generate slower kernels; each
(instance, shape, grad mode) gets its own graph instead, hence the raised recompile limit.
Which blocks are heavy comes from each network's registered layout (``core.hooks``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.hooks import heavy_blocks

def check_backend(backend: str, flag: str = "--torch_compile_backend") -> None:
    """Refuse a backend name torch.compile does not know, listing the ones it does."""
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ConfigError(
            f"{flag} {backend!r} is not a torch.compile backend here; use one of "
            f"{', '.join(sorted(backends))}."
        )


def _has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def compile_blocks(model: nn.Module, backend: str = "inductor") -> dict[str, int]:
    """Compile ``model``'s heavy blocks in place; blocks holding a hooked module stay eager.

    Call it after the regularizers have registered their hooks. Returns how many blocks were
    compiled and how many were left eager because of a hook, so callers can report it.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = skipped = 0
    for block in heavy_blocks(model):
        if _has_hooks(block):
            skipped += 1
            continue
        block.compile(backend=backend, dynamic=False)
        compiled += 1
    return {"compiled": compiled, "left_eager": skipped}
