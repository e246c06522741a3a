"""Peak-memory estimate of a CRM refinement, checked before any work starts.

Shape shorthand: H, W size of the refined image (or ROI); Hp, Wp = H + 64, W + 64 (the 32-px
reflect padding on each side).

Inference keeps several full-size maps in memory at once, and the encoder's activations of one
pass: the whole image at a scale when they fit the decoding's budget (``FastOptions.memory_mb``,
1 GiB for dense decoding), windows of it otherwise (:mod:`crm_d2.sparse`). The peak therefore
grows linearly with the padded pixel count, with an encoder term capped by the budget.
:func:`estimate_refine_bytes` models the uncapped encoder term with one number per
architecture, measured on a 2-core x86-64 CPU with torch 2.14 (peak RSS minus the RSS before
the call: lite weights 706 and 663 bytes per padded pixel at scale 1 on 1000x750 and 2000x1500
random images, 765 with the four default scales on 2000x1500; the official architecture 1654
and 1382 with the default scales on 1000x750 and 2000x1500; see :data:`BYTES_PER_PIXEL`).
When inference changes, update the model here: the CLIs only call :func:`check_memory`.

Long runs: memory grows with the number of distinct ROI shapes a process has refined (issue 13
measured 281 -> 547 MiB over 300 API calls with random ROI sizes, then flat; fixed sizes stay
flat): the allocator and oneDNN keep buffers and kernels per shape. ``crm-eval`` and the
detectron2 layer meet many ROI sizes and grow the same way until it levels off; rounding ROI
sizes (``--size-multiple 32``, ``ROIOptions(size_multiple=32)``, ``MODEL.CRM.ROI_SIZE_MULTIPLE``)
reduces the number of distinct shapes.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import torch

from .modeling.crm import CRMArch
from .sparse import DENSE_MEMORY_MB

__all__ = ["BYTES_PER_PIXEL", "available_bytes", "check_memory", "estimate_refine_bytes"]

logger = logging.getLogger(__name__)

#: Peak bytes per padded pixel at the finest scale, keyed on (block, layers, width, feat_dim)
#: (measured, see the module docstring; the decoder widths and layer4 do not matter).
BYTES_PER_PIXEL: dict[tuple[str, tuple[int, ...], int, int], float] = {
    ("bottleneck", (3, 4, 6, 3), 64, 256): 1600.0,  # the official model_45705
    ("basic", (2, 2, 2, 2), 64, 128): 700.0,  # crm_d2_lite.pth
}
#: Other architectures: bytes per padded pixel per fused feature channel.
_PER_FEATURE_CHANNEL = 6.0
#: Full-resolution maps kept at every scale (image, mask, logits, probabilities), per pixel.
_FULL_RES_BYTES = 64.0
_FIXED_BYTES = 64 * 2**20  # allocator slack


def _per_pixel(arch: CRMArch) -> float:
    if arch.encoder != "resnet":  # the table holds ResNet trunks only
        return _PER_FEATURE_CHANNEL * arch.feat_dim
    key = (arch.block, tuple(arch.layers), arch.width, arch.feat_dim)
    return BYTES_PER_PIXEL.get(key, _PER_FEATURE_CHANNEL * arch.feat_dim)


def estimate_refine_bytes(
    height: int, width: int, arch: CRMArch, scales: Sequence[float], batch: int = 1,
    memory_mb: float = DENSE_MEMORY_MB,
) -> int:
    """Estimated peak memory of refining ``batch`` (H, W) inputs with ``scales``.

    Args:
        height, width: size of the image (or ROI) given to the refiner.
        arch: the network's architecture.
        scales: the inference scales (the finest one sets the peak).
        batch: same-size inputs refined in one call.
        memory_mb: the decoding's encoder budget (``FastOptions.memory_mb``): beyond it the
            encoder runs on windows, plus one decoder chunk of the same budget at most
            (``math.inf``: the whole image in one pass, as ``exact=True``).

    Returns:
        Bytes, an estimate (within about 20% on the machines measured).
    """
    finest = max(scales) if scales else 1.0
    padded = (height + 64) * (width + 64)
    encoder = min(batch * padded * _per_pixel(arch) * finest**2, 1.25 * memory_mb * 2**20)
    return int(_FIXED_BYTES + batch * padded * _FULL_RES_BYTES + encoder)


def available_bytes(device: torch.device | str) -> int | None:
    """Memory that the refinement may use on ``device``: free GPU memory for CUDA, the kernel's
    ``MemAvailable`` for the CPU (Linux); None when unknown (the check is then skipped)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type != "cpu" or not os.path.isfile("/proc/meminfo"):
        return None
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_memory(
    height: int,
    width: int,
    arch: CRMArch,
    scales: Sequence[float],
    device: torch.device | str,
    *,
    what: str,
    helps: str,
    batch: int = 1,
    exact: bool = False,
) -> int:
    """Refuse a refinement that would not fit in memory, before it starts.

    Args:
        height, width, arch, scales, batch: as in :func:`estimate_refine_bytes`.
        exact: the authors' schedule (``exact=True``): the whole image is encoded, no budget.
        device: where the refinement runs.
        what: what is refined, for the message (e.g. ``"photo.jpg (12000x8000)"``).
        helps: the options that reduce the need, for the message.

    Returns:
        The estimate in bytes.

    Raises:
        MemoryError: when the estimate exceeds :func:`available_bytes`.
    """
    need = estimate_refine_bytes(height, width, arch, scales, batch,
                                 memory_mb=math.inf if exact else DENSE_MEMORY_MB)
    have = available_bytes(device)
    if have is not None and need > have:
        raise MemoryError(
            f"refining {what} needs about {need / 2**30:.1f} GiB of memory on {device} "
            f"(about {(need - _FIXED_BYTES) / batch / ((height + 64) * (width + 64)):.0f} bytes "
            f"per padded pixel with scales {tuple(scales)}), but only {have / 2**30:.1f} GiB "
            "are available. "
            f"{helps}"
        )
    logger.debug("memory estimate %.2f GiB for %s", need / 2**30, what)
    return need
