"""Fast CRM inference: decode only the pixels that can matter, encode only where they are.

The authors' schedule (:mod:`crm_d2.inference`) decodes every padded full-resolution pixel at
every scale and encodes the whole image at every scale. Most of that work lands on pixels far
from any boundary, whose probability CRM leaves where it was. This module implements, each
switchable through :class:`FastOptions`:

- **band decoding**: at each scale only pixels within a band around the boundary of the current
  mask (``p > 0.5``) are decoded, the band width tied to the scale (``band / s`` full-resolution
  pixels: a fixed number of encoder-input pixels); the other pixels keep the current probability.
  This is the paper's CRM* idea (refine a region of interest only) in its "near contours" form
  (Shen et al., CVPR 2022, Sec. 4; the authors' release has no such path);
- **band growth** (``grow``): where the network moves the boundary to the band's edge, the band
  widens there and the new pixels are decoded, until the new boundary lies inside it;
- **whole-image scan** (``scan``): at coarse scales every pixel gets a new probability (strided
  over the image, the band in full), because the next scale reads the soft far field and the
  network can flip soft regions far from any boundary;
- **strided decoding**: decode every ``stride``-th pixel (rows and columns) first, then only the
  pixels of the lattice cells whose four decoded corners disagree (one above 0.5, one not); the
  others take the bilinear interpolation of the corner logits;
- **sparse fusion**: a ROI encoded whole runs the fusion's 3x3 convolution and the decoder
  projection only at the feature cells the decoded pixels read
  (:meth:`~crm_d2.modeling.crm.CRMNet.project_cells`);
- **bounded memory**: the encoder runs on windows (:func:`crm_d2.tiling.encode_window`) around
  the pixels to decode, each sized from a memory budget, so that peak memory follows the region
  being decoded and windows with nothing to decode are never encoded;
- **device knobs**: precision (``autocast``: the encoder's fusion in bf16 where the device
  computes bf16 natively, by default; the trunk in float32 unless ``autocast_trunk``),
  channels-last for the encoder, and a retry with smaller windows and chunks when CUDA runs out
  of memory.

With ``band=None, stride=1``, no autocast and a budget that holds the whole image, every pixel is
decoded from whole-image features: the same function as the authors' schedule (to ~1e-6).

Shape shorthand: B batch, Hp/Wp padded full-resolution size, h/w encoder input size at a scale,
fh/fw feature size, Q decoded pixels.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.nn import functional as F

from .modeling.crm import CRMNet, GridGeometry
from .morphology import dilate
from .tiling import encode_window, encoder_bytes_per_pixel, feature_size, receptive_radius

__all__ = ["AUTOCAST_MIN_PIXELS", "DEFAULT_AUTOCAST", "FastOptions", "autocast_dtype",
           "boundary_band", "native_bf16", "parse_autocast", "refine_fast"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
_DECODE_BYTES_PER_QUERY = 2048  # live bytes of decode_pixels per query (4 shifts), with margin
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Precision of the library default (:meth:`FastOptions.default_for`): the encoder's fusion in
#: bf16 on large inputs where the device computes it natively, float32 elsewhere (BENCHMARKS.md).
DEFAULT_AUTOCAST = "auto"
#: ``autocast="auto"`` runs bf16 from this many encoder-input pixels on: on the 2-core CPU of
#: BENCHMARKS.md bf16 made 2560x1706 and 6000x4000 inputs 1.2-1.4x faster, while COCO ROIs
#: (about 0.01-0.2 Mpx) were no faster (oneDNN's per-shape bf16 set-up and reorders).
AUTOCAST_MIN_PIXELS = 2**19
_READ_SHARE = 0.7  # dense decoding skips unread pixels when the next scale reads at most this
_DENSE_CELLS = 0.6  # share of a map's cells from which one dense fusion convolution is cheaper
DENSE_MEMORY_MB = 1024.0  # encoder budget of dense decoding (FastOptions.dense)
_EXACT_HALO_MARGIN = 8  # input pixels added to the receptive radius for halo=None


@dataclass(frozen=True)
class FastOptions:
    """Switches of the fast inference path (:func:`refine_fast`).

    Attributes:
        band: half-width of the decoded band around the current mask's boundary, in
            encoder-input pixels of each scale (``band / s`` full-resolution pixels at scale s);
            None decodes every pixel.
        min_band: lower bound of the band half-width in full-resolution pixels.
        grow: rounds of band growth: after the band is decoded, wherever the new boundary
            reaches an undecoded pixel (the network moved the boundary to the band's edge),
            the band grows by its width there and the new pixels are decoded; repeated up to
            ``grow`` times or until no boundary meets undecoded pixels. 0 turns it off.
        scan: at scales ``s <= scan`` every pixel gets a new probability, as in dense
            decoding: the whole image is decoded strided (step ``scan_stride / s``
            full-resolution pixels, i.e. ``scan_stride`` encoder-input pixels; cells whose
            corners disagree in full, the others interpolated) and the band in full. The next
            scale reads the soft probabilities far from the boundary too, and the network can
            flip soft regions far from any boundary; copying them (as outside the band) loses
            both. None turns it off.
        scan_stride: lattice step of ``scan`` in encoder-input pixels.
        stride: strided decoding step in full-resolution pixels; 1 turns it off.
        tile: core size of an encoder window in encoder-input pixels (a multiple of 8); smaller
            windows skip more empty image, larger ones waste less on halos. None: the largest
            that fits ``memory_mb`` with its halo.
        halo: encoder-input pixels of context around each window (see :mod:`crm_d2.tiling`).
            None: the trunk's receptive radius (:func:`crm_d2.tiling.receptive_radius`), so
            that windows give the whole-image features (to float rounding).
        memory_mb: budget for one encoder window and one decoder chunk (activations only);
            windows and chunks shrink to fit it. The whole image is encoded in one pass when it
            fits the budget and most of it has pixels to decode.
        skip_padding: at the last scale, do not decode the reflect padding (it is cropped).
        autocast: None, "bf16", "fp16" or "auto" (bf16 where the device computes it natively,
            :func:`native_bf16`, for encoder inputs of at least :data:`AUTOCAST_MIN_PIXELS`;
            else float32): run the encoder's fusion (and the decoder's feature projection)
            under ``torch.autocast``.
        autocast_trunk: run the trunk under ``autocast`` too (faster, less exact: with the
            shipped EfficientNet-Lite trunk in bf16 the masks agree less with float32; see
            BENCHMARKS.md).
        channels_last: run the encoder on channels-last tensors, with each convolution and
            its batch norm fused (:mod:`crm_d2.modeling.fused`; on by default: the same
            function to float rounding, 1.6x faster on the COCO image of BENCHMARKS.md on the
            2-core CPU). :class:`CRMRefiner` puts the weights in that layout for these calls
            and back for ``exact=True``.
        oom_retry: on a CUDA out-of-memory error, split the window (or chunk) in two and retry.
    """

    band: float | None = 3.0
    min_band: int = 4
    grow: int = 0
    scan: float | None = None
    scan_stride: float = 2.0
    stride: int = 1
    tile: int | None = 96
    halo: int | None = 32
    memory_mb: float = 768.0
    skip_padding: bool = True
    autocast: str | None = None
    autocast_trunk: bool = False
    channels_last: bool = True
    oom_retry: bool = True

    def __post_init__(self) -> None:
        if self.band is not None and not (self.band > 0):
            raise ValueError(f"band must be > 0 or None, got {self.band}")
        if self.min_band < 0:
            raise ValueError(f"min_band must be >= 0, got {self.min_band}")
        if self.grow < 0:
            raise ValueError(f"grow must be >= 0, got {self.grow}")
        if self.scan is not None and not (self.scan > 0):
            raise ValueError(f"scan must be > 0 or None, got {self.scan}")
        if not (self.scan_stride > 0):
            raise ValueError(f"scan_stride must be > 0, got {self.scan_stride}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.tile is not None and (self.tile < 8 or self.tile % 8):
            raise ValueError(f"tile must be a positive multiple of 8 or None, got {self.tile}")
        if self.halo is not None and self.halo < 0:
            raise ValueError(f"halo must be >= 0 or None, got {self.halo}")
        if not (self.memory_mb > 0):
            raise ValueError(f"memory_mb must be > 0, got {self.memory_mb}")
        if self.autocast not in (None, "auto", *_AUTOCAST):
            raise ValueError(f"autocast must be None, 'auto', 'bf16' or 'fp16', got "
                             f"{self.autocast!r}")

    @classmethod
    def dense(cls, memory_mb: float = DENSE_MEMORY_MB) -> FastOptions:
        """Decode every pixel from whole-image features: the authors' function (to ~1e-6).

        An image whose encoder activations exceed ``memory_mb`` at a scale is encoded in
        windows with the trunk's receptive radius as halo, which give the same features, so
        that peak memory follows the budget, not the image (``float("inf")``: one pass).
        """
        return cls(band=None, stride=1, tile=None, halo=None, memory_mb=memory_mb,
                   skip_padding=False)

    @classmethod
    def default_for(cls, scales: Sequence[float],
                    autocast: str | None = DEFAULT_AUTOCAST) -> FastOptions:
        """The default decoding of a schedule: the fastest one measured equal to dense on it.

        ``autocast`` (default ``"auto"``: the fusion in bf16 on large inputs where the device
        computes bf16 natively) is measured within the 0.1-point tolerance of float32 on
        held-out images with the shipped weights at one and four scales; the trunk stays float32.

        One scale: band decoding with growth and a 96-px window halo (``grow=4, halo=96``): with
        the shipped weights' one-scale schedule, identical or nearly so to dense decoding on
        held-out real images (``crm_d2_lite.pth``: identical on 32 images, +0.05 IoU points on
        COCO objects; ``crm_d2_effl0.pth``: IoU 0.9997 (min 0.9952) vs dense on 30 images, +0.03
        IoU points against the ground truth; BENCHMARKS.md,
        ``tools/band_vs_dense.py``). Several scales: dense decoding, because
        the coarse scales rewrite soft regions far from any boundary, which a band copies
        instead (no band variant met the 0.1-point tolerance there).
        """
        opts = cls(grow=4, halo=96) if len(scales) == 1 else cls.dense()
        return opts.with_(autocast=parse_autocast(autocast))

    @property
    def is_dense(self) -> bool:
        """Every pixel decoded from whole-image features (the authors' function)."""
        exact_features = self.halo is None or self.memory_mb == math.inf  # or one pass
        return (self.band is None and self.stride == 1 and exact_features
                and not self.skip_padding and self.autocast is None)

    def describe(self) -> str:
        """``"dense"`` or the fields that differ from :class:`FastOptions`'s defaults."""
        if self.is_dense:
            return "dense"
        if self.with_(autocast=None).is_dense:
            trunk = ", autocast_trunk=True" if self.autocast_trunk else ""
            return f"dense(autocast={self.autocast}{trunk})"
        base = FastOptions()
        diff = [f"{k}={getattr(self, k)}" for k in self.__dataclass_fields__
                if getattr(self, k) != getattr(base, k)]
        kind = "band" if self.band is not None else "all pixels"
        return kind + (f"({', '.join(diff)})" if diff else "")

    def with_(self, **changes) -> FastOptions:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def resolved(self, device: torch.device | str) -> FastOptions:
        """The options as they run on ``device``: ``autocast="auto"`` becomes None where the
        device has no native bf16 (and stays "auto", bf16 on large inputs, where it has)."""
        if self.autocast != "auto" or native_bf16(device):
            return self
        return self.with_(autocast=None)

    def band_width(self, scale: float) -> int | None:
        """Band half-width in full-resolution pixels at ``scale`` (None: everything)."""
        if self.band is None:
            return None
        return max(int(self.min_band), int(math.ceil(self.band / scale)))


# --------------------------------------------------------------------------------------------
# Which pixels
# --------------------------------------------------------------------------------------------
def native_bf16(device: torch.device | str) -> bool:
    """Does ``device`` compute bfloat16 natively (CUDA with bf16; a CPU with AVX512-BF16 or
    AMX, where oneDNN runs bf16 convolutions several times faster than float32)?"""
    device = torch.device(device)
    if device.type == "cuda":  # Ampere and later; older GPUs only emulate bf16
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def parse_autocast(value: str | None) -> str | None:
    """A user's autocast setting -> :attr:`FastOptions.autocast`: ``"auto"``, ``"bf16"``,
    ``"fp16"``, or None for ``None`` / ``"none"`` / ``"off"`` / ``""`` (float32)."""
    text = "" if value is None or value is False else str(value).strip().lower()
    if text in ("", "none", "off", "fp32", "float32"):
        return None
    if text not in ("auto", *_AUTOCAST):
        raise ValueError(f"autocast must be 'auto', 'bf16', 'fp16' or 'none', got {value!r}")
    return text


def autocast_dtype(name: str | None, device: torch.device | str,
                   pixels: int | None = None) -> torch.dtype | None:
    """The dtype of :attr:`FastOptions.autocast` ``name`` on ``device`` for an encoder input of
    ``pixels`` pixels (None: any size); None means float32."""
    if name == "auto":
        large = pixels is None or pixels >= AUTOCAST_MIN_PIXELS
        return torch.bfloat16 if large and native_bf16(device) else None
    return None if name is None else _AUTOCAST[name]


def _cells_any(mask: Tensor, c: int) -> Tensor:
    """(B, H, W) bool -> (B, ceil(H/c), ceil(W/c)) bool: does each c x c cell hold a True pixel."""
    if c == 1:
        return mask
    bsz, h, w = mask.shape
    ph, pw = -(-h // c) * c, -(-w // c) * c
    padded = F.pad(mask, (0, pw - w, 0, ph - h))  # False outside
    return padded.view(bsz, ph // c, c, pw // c, c).any(dim=4).any(dim=2)


def boundary_band(prob: Tensor, width: int) -> Tensor:
    """Pixels near the boundary of ``prob > 0.5``.

    Computed on cells of ``c = max(1, width // 2)`` pixels: a pixel is in the band when its cell
    lies within ``ceil(width / c) + 1`` cells of a cell holding foreground and of one holding
    background. The band therefore contains every pixel within ``width`` pixels (Chebyshev) of
    a pixel of the other class, and is at most about ``2 * width + 3 * c`` wide.

    Args:
        prob: (B, 1, H, W) probabilities.
        width: band half-width in pixels (>= 0).

    Returns:
        (B, H, W) bool.

    Not the exact band of :func:`crm_d2.band.boundary_band` (dilation minus erosion, which
    decides which refined pixels are kept): this one only chooses the pixels to decode, so it
    may be wider, and working on cells keeps it cheap on large images. It contains the exact
    band of the same ``width``.
    """
    h, w = prob.shape[-2:]
    c = max(1, width // 2)
    fg = prob[:, 0] > 0.5
    # the padding of the cells counts as neither foreground nor background
    fg_cells, bg_cells = _cells_any(fg, c), _cells_any(~fg, c)
    r = -(-width // c) + 1
    band = dilate(fg_cells, r) & dilate(bg_cells, r)
    band = band.repeat_interleave(c, dim=1).repeat_interleave(c, dim=2)
    return band[:, :h, :w]


# --------------------------------------------------------------------------------------------
# Decoding a set of pixels at one scale
# --------------------------------------------------------------------------------------------
def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


class _ScaleDecoder:
    """Decodes chosen pixels of the padded grid at one scale, encoding windows on demand."""

    def __init__(
        self,
        net: CRMNet,
        image: Tensor,
        mask: Tensor,
        grid_size: tuple[int, int],
        opts: FastOptions,
        chunk: int,
        pixels: tuple[Tensor, ...] | None = None,
    ) -> None:
        self.net, self.image, self.mask, self.opts = net, image, mask, opts
        # (image, mask[, guide]) of the grid itself (Hp x Wp), for CRMArch.pixel_skip networks
        self.pixels = pixels
        self.grid_size = grid_size
        bsz = image.shape[0]
        h, w = image.shape[-2:]
        self.fsize = feature_size((h, w))
        self.geom = GridGeometry(grid_size, self.fsize, image.device)
        budget = opts.memory_mb * 2**20
        self.dtype = autocast_dtype(opts.autocast, image.device, h * w)  # None: float32
        itemsize = 2 if self.dtype is not None and opts.autocast_trunk else 4
        self.bpp = encoder_bytes_per_pixel(net, bsz, itemsize)
        self.whole_fits = h * w * self.bpp <= budget
        self.halo = (receptive_radius(net.arch) + _EXACT_HALO_MARGIN if opts.halo is None
                     else opts.halo)
        halo = math.ceil(self.halo / 8) * 8
        if opts.tile is None:  # the largest square core that fits the budget with its halo
            tile = int(math.sqrt(budget / self.bpp)) - 2 * halo if budget < math.inf else h + w
        else:
            tile = opts.tile
            while tile > 8 and (tile + 2 * halo) ** 2 * self.bpp > budget:
                tile //= 2
        self.tile = max(8, tile // 8 * 8)
        self.chunk = max(1024, int(min(chunk, budget // _DECODE_BYTES_PER_QUERY)))
        self.whole: Tensor | None = None  # (B, fh, fw, D) whole-map projection
        self.rows: Tensor | None = None  # CRMNet.fusion_rows of the whole input
        self.cells_done: Tensor | None = None  # (B, fh, fw) cells of self.whole computed
        self.cache: dict[tuple[int, int], Tensor] = {}
        self.cache_bytes = 0
        self.cache_limit = budget / 2
        self.encoded_pixels = 0  # encoder input pixels run (windows with their halos)
        self.queries = 0

    # ---------------------------------------------------------------- encoder
    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.image.device.type, dtype=self.dtype)

    def _encode(self, rows: tuple[int, int], cols: tuple[int, int], whole: bool,
                fixed_shape: bool = False) -> Tensor:
        """(B, ph, pw, D) float32 projected features of a window, with OOM retry."""
        try:
            with self._autocast():
                if whole:
                    proj = self.net.project_features(
                        self.net.encode(*self._whole_inputs(), self.opts.autocast_trunk))
                    self.encoded_pixels += self.image.shape[-2] * self.image.shape[-1]
                else:  # only the window's crop changes layout
                    proj = encode_window(self.net, self.image, self.mask, rows, cols, self.halo,
                                         stats=self, fixed_shape=fixed_shape,
                                         channels_last=self.opts.channels_last,
                                         autocast_trunk=self.opts.autocast_trunk)
            return proj.float()
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not (self.opts.oom_retry and _is_oom(err)):
                raise
            (a, b), (c, d) = rows, cols
            if b - a < 2 and d - c < 2:
                raise
            if self.image.device.type == "cuda":
                torch.cuda.empty_cache()
            logger.warning("out of memory encoding a %dx%d-cell window: splitting it", b - a,
                           d - c)
            if b - a >= d - c:
                m = (a + b) // 2
                return torch.cat([self._encode((a, m), cols, False),
                                  self._encode((m, b), cols, False)], dim=1)
            m = (c + d) // 2
            return torch.cat([self._encode(rows, (c, m), False),
                              self._encode(rows, (m, d), False)], dim=2)

    def _whole_inputs(self) -> tuple[Tensor, Tensor]:
        """The scale's image and mask in the encoder's layout (``opts.channels_last``)."""
        if not self.opts.channels_last:
            return self.image, self.mask
        return (self.image.contiguous(memory_format=torch.channels_last),
                self.mask.contiguous(memory_format=torch.channels_last))

    def _whole_proj(self, pb: Tensor, py: Tensor, px: Tensor) -> Tensor:
        """(B, fh, fw, D) projected features of the whole map, valid at the cells these pixels
        read (and those of earlier calls).

        The trunk and the fusion's branches run once on the whole input; the fusion's 3x3
        convolution and the projection run only at the cells needed
        (:meth:`CRMNet.project_cells`), unless the first call already needs most of the map
        (then one dense convolution). The branches' output (``feat_dim`` values per feature
        cell) is kept for the scale's later calls (band growth).
        """
        bsz = self.image.shape[0]
        fh, fw = self.fsize
        if self.cells_done is None:
            self.cells_done = torch.zeros(bsz, fh, fw, dtype=torch.bool, device=pb.device)
        need = torch.zeros_like(self.cells_done)
        for iy in self.geom.iy:
            for ix in self.geom.ix:
                need[pb, iy[py], ix[px]] = True
        need &= ~self.cells_done
        n_new = int(need.sum())
        if n_new == 0:
            return self.whole
        if self.rows is None and n_new >= _DENSE_CELLS * bsz * fh * fw:
            return self._whole_dense()  # most cells: one dense convolution is cheaper
        oom = False
        try:
            if self.rows is None:
                with self._autocast():
                    self.rows = self.net.fusion_rows(*self._whole_inputs(),
                                                     self.opts.autocast_trunk)
                self.encoded_pixels += self.image.shape[-2] * self.image.shape[-1]
                d = self.net.imnet.layers[0].weight.shape[0]
                self.whole = torch.zeros(bsz, fh, fw, d, device=pb.device)
            nb, cy, cx = need.nonzero(as_tuple=True)
            with self._autocast():
                self.whole[nb, cy, cx] = self.net.project_cells(self.rows, nb, cy, cx).float()
        except RuntimeError as err:
            if not (self.opts.oom_retry and _is_oom(err)):
                raise
            oom = True  # handled outside the except block, whose traceback pins memory
        if oom:
            logger.warning("out of memory in the sparse fusion convolution: encoding in full")
            return self._whole_dense()
        self.cells_done |= need
        return self.whole

    def _whole_dense(self) -> Tensor:
        self.rows = self.whole = None
        if self.image.device.type == "cuda":
            torch.cuda.empty_cache()
        self.whole = self._encode((0, self.fsize[0]), (0, self.fsize[1]), True)
        self.cells_done.fill_(True)
        return self.whole

    def _tile_proj(self, key: tuple[int, int], rows, cols) -> Tensor:
        proj = self.cache.get(key)
        if proj is None:
            proj = self._encode(rows, cols, False)
            size = proj.numel() * proj.element_size()
            if self.cache_bytes + size <= self.cache_limit:
                self.cache[key] = proj
                self.cache_bytes += size
        return proj

    # ---------------------------------------------------------------- decoder
    def _decode_chunks(self, proj, pb, py, px, origin, out: Tensor) -> None:
        start, n = 0, pb.numel()
        chunk = self.chunk
        while start < n:
            end = min(n, start + chunk)
            try:
                logits = self.net.decode_pixels(proj, self.geom, pb[start:end], py[start:end],
                                                px[start:end], origin, self.pixels)
            except RuntimeError as err:
                if not (self.opts.oom_retry and _is_oom(err)) or chunk <= 1024:
                    raise
                chunk //= 2
                logger.warning("out of memory decoding: chunk size down to %d", chunk)
                continue
            out[pb[start:end], py[start:end], px[start:end]] = logits
            self.queries += end - start
            start = end

    def blocks(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Pixel rows and columns of the grid blocks: ``tile // 2`` feature cells each way."""
        fh, fw = self.fsize
        iy0, ix0 = self.geom.iy[0], self.geom.ix[0]

        def edges(n: int, index: Tensor) -> list[int]:
            # cores of (nearly) equal size: ceil(n / k) cells, k = ceil(n / (tile / 2))
            k = -(-n // (self.tile // 2))
            step = -(-n // k)
            starts = torch.arange(0, n + step, step, device=index.device).clamp(max=n)
            return torch.searchsorted(index, starts).tolist()

        er, ec = edges(fh, iy0), edges(fw, ix0)
        return [((er[i], er[i + 1]), (ec[j], ec[j + 1]))
                for i in range(len(er) - 1) if er[i] < er[i + 1]
                for j in range(len(ec) - 1) if ec[j] < ec[j + 1]]

    def decode(self, todo: Tensor, out: Tensor) -> int:
        """Write the logits of the pixels ``todo`` (B, Hp, Wp) bool into ``out`` (B, Hp, Wp).

        Returns:
            the number of decoded pixels.
        """
        hp, wp = self.grid_size
        fh, fw = self.fsize
        tc = self.tile // 2  # window core in feature cells
        iy0, ix0 = self.geom.iy[0], self.geom.ix[0]
        edges_r = torch.searchsorted(iy0, torch.arange(0, fh + tc, tc, device=iy0.device))
        edges_c = torch.searchsorted(ix0, torch.arange(0, fw + tc, tc, device=ix0.device))
        edges_r, edges_c = edges_r.tolist(), edges_c.tolist()
        blocks = []
        for i in range(len(edges_r) - 1):
            r0, r1 = edges_r[i], edges_r[i + 1]
            if r0 >= r1:
                continue
            row_any = todo[:, r0:r1].any(dim=1).any(dim=0)  # (Wp,)
            col_counts = torch.cumsum(row_any.long(), 0)
            for j in range(len(edges_c) - 1):
                c0, c1 = edges_c[j], edges_c[j + 1]
                if c0 >= c1:
                    continue
                hits = int(col_counts[c1 - 1]) - (int(col_counts[c0 - 1]) if c0 > 0 else 0)
                if hits:
                    blocks.append((i, j, r0, r1, c0, c1))
        if not blocks:
            return 0
        h, w = self.image.shape[-2:]
        win = self.tile + 2 * math.ceil(self.halo / 8) * 8
        use_whole = self.whole is not None or (
            self.whole_fits and len(blocks) * win * win >= 0.8 * h * w
        )
        if use_whole:  # one projection of the whole map, all pixels at once
            pb, py, px = todo.nonzero(as_tuple=True)
            self._decode_chunks(self._whole_proj(pb, py, px), pb, py, px, (0, 0), out)
            return pb.numel()
        done = 0
        for i, j, r0, r1, c0, c1 in blocks:
            sel = todo[:, r0:r1, c0:c1].nonzero()
            if sel.numel() == 0:
                continue
            pb, py, px = sel[:, 0], sel[:, 1] + r0, sel[:, 2] + c0
            rows = self.geom.cell_span_rows(r0, r1)
            cols = self.geom.cell_span_cols(c0, c1)
            proj, origin = self._tile_proj((i, j), rows, cols), (rows[0], cols[0])
            self._decode_chunks(proj, pb, py, px, origin, out)
            done += pb.numel()
        return done


def _strided_decode(dec: _ScaleDecoder, cand: Tensor, n: int, out: Tensor) -> Tensor:
    """Strided decoding of the candidate pixels ``cand`` (B, Hp, Wp); returns their logits.

    Lattice rows are ``0, n, 2n, ...`` clamped to the last row (columns alike); a lattice cell
    holds the pixels between two lattice rows and two lattice columns. Corners of cells with
    candidates are decoded; cells whose corners disagree about ``p > 0.5`` are decoded in full,
    the others interpolated bilinearly from their corner logits.
    """
    bsz, hp, wp = cand.shape
    dev = cand.device
    nr, nc = -(-hp // n), -(-wp // n)
    cell_any = _cells_any(cand, n)  # (B, nr, nc)
    lat_r = torch.clamp(torch.arange(nr + 1, device=dev) * n, max=hp - 1)
    lat_c = torch.clamp(torch.arange(nc + 1, device=dev) * n, max=wp - 1)
    # lattice points (B, nr+1, nc+1) at a corner of a cell with candidates
    p = F.pad(cell_any, (1, 1, 1, 1))
    need = p[:, :-1, :-1] | p[:, 1:, :-1] | p[:, :-1, 1:] | p[:, 1:, 1:]
    lattice = torch.zeros_like(cand)
    nb, kr, kc = need.nonzero(as_tuple=True)
    lattice[nb, lat_r[kr], lat_c[kc]] = True
    dec.decode(lattice, out)
    corners = out[:, lat_r][:, :, lat_c]  # (B, nr+1, nc+1)
    pos = corners > 0
    quad = (pos[:, :-1, :-1], pos[:, 1:, :-1], pos[:, :-1, 1:], pos[:, 1:, 1:])
    any_pos = quad[0] | quad[1] | quad[2] | quad[3]
    all_pos = quad[0] & quad[1] & quad[2] & quad[3]
    disagree = cell_any & any_pos & ~all_pos
    cell_r = torch.arange(hp, device=dev) // n
    cell_c = torch.arange(wp, device=dev) // n
    full = disagree[:, cell_r][:, :, cell_c] & cand & ~lattice
    dec.decode(full, out)

    def weights(cells: Tensor, lat: Tensor, length: int) -> Tensor:
        pos_ = torch.arange(length, device=dev, dtype=torch.float32)
        lo, hi = lat[cells].float(), lat[cells + 1].float()
        return (pos_ - lo) / torch.clamp(hi - lo, min=1)

    tr = weights(cell_r, lat_r, hp).view(1, hp, 1)
    tc = weights(cell_c, lat_c, wp).view(1, 1, wp)
    rows = corners[:, cell_r] * (1 - tr) + corners[:, cell_r + 1] * tr  # (B, Hp, nc+1)
    interp = rows[:, :, cell_c] * (1 - tc) + rows[:, :, cell_c + 1] * tc
    return torch.where(lattice | full, out, interp)


def resize_reads(n_in: int, n_out: int, device=None) -> Tensor:
    """The input samples a bilinear ``align_corners=True`` resize of ``n_in`` -> ``n_out``
    samples reads (both neighbours of every output sample), increasing."""
    if n_in == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    # the kernel's arithmetic: a float32 scale (0 for one output sample) times the output index
    scale = torch.tensor(n_in - 1 if n_out > 1 else 0, dtype=torch.float32) / max(1, n_out - 1)
    lo = (torch.arange(n_out, dtype=torch.float32) * scale).long().clamp(max=n_in - 1)
    return torch.unique(torch.cat((lo, (lo + 1).clamp(max=n_in - 1)))).to(device)


def _dense_decode(dec: _ScaleDecoder, reads: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Every pixel with the grid decoder, from whole-image features (row spans per call) or, when
    they do not fit the budget, from one encoder window per block of pixels; ``dec.chunk`` queries
    per decoder call.

    ``reads`` = (rows, cols): decode only their cross product (the pixels the next scale's
    resize reads, :func:`resize_reads`); the other logits are 0, which only the next scale's
    empty-mask rule sees (:func:`refine_fast` decodes everything when that rule could fire).
    """
    hp, wp = dec.grid_size
    bsz = dec.image.shape[0]
    dev = dec.image.device
    if reads is None:  # every pixel: each is written once below
        reads = (torch.arange(hp, device=dev), torch.arange(wp, device=dev))
        logits = torch.empty(bsz, hp, wp, device=dev)
    else:
        logits = torch.zeros(bsz, hp, wp, device=dev)
    for rows, cols in [((0, hp), (0, wp))] if dec.whole_fits else dec.blocks():
        sel_r, sel_c = (r[(r >= a) & (r < b)] for r, (a, b) in zip(reads, (rows, cols)))
        if sel_r.numel() == 0 or sel_c.numel() == 0:
            continue
        if dec.whole_fits:  # one block: the whole image
            proj, origin = dec._encode((0, dec.fsize[0]), (0, dec.fsize[1]), True), (0, 0)
        else:
            span_r = dec.geom.cell_span_rows(*rows)
            span_c = dec.geom.cell_span_cols(*cols)
            proj = dec._encode(span_r, span_c, False, fixed_shape=True)
            origin = (span_r[0], span_c[0])
        step = max(1, dec.chunk // sel_c.numel())
        for a in range(0, sel_r.numel(), step):
            r = sel_r[a : a + step]
            logits[:, r[:, None], sel_c] = dec.net.decode_grid_window(
                proj, (hp, wp), dec.fsize, r, sel_c, origin, dec.pixels)
        dec.queries += sel_r.numel() * sel_c.numel()
        del proj
    return logits


def _decode_into(dec: _ScaleDecoder, todo: Tensor, stride: int, logits: Tensor) -> None:
    """Logits of the pixels ``todo`` (B, Hp, Wp) into ``logits``, strided when ``stride > 1``."""
    if stride > 1:
        logits.copy_(torch.where(todo, _strided_decode(dec, todo, stride, logits), logits))
    else:
        dec.decode(todo, logits)


def _surely_nonempty(logits: Tensor, reads: tuple[Tensor, Tensor]) -> bool:
    """Do the probabilities of the decoded pixels ``reads`` alone sum to more than 1 in every
    mask of the batch? Then the next scale's empty-mask rule (:func:`_empty_masks`, a sum over
    all pixels, none negative) cannot fire, whatever the pixels left undecoded hold."""
    rows, cols = reads
    part = torch.sigmoid(logits[:, rows][:, :, cols]).flatten(1).sum(dim=1, dtype=torch.float64)
    return bool((part > 1.0 + 1e-3).all())


def _empty_masks(seg: Tensor) -> Tensor:
    """(B,) bool: the authors' rule ``(seg + 1).sum() < 2`` of an (essentially) empty input
    mask, whose output is empty; summed without a full-size temporary where float64 exists."""
    if seg.device.type == "mps":  # no float64 there
        return (seg + 1).flatten(1).sum(dim=1) < 2
    return seg.flatten(1).sum(dim=1, dtype=torch.float64) + seg.shape[-2] * seg.shape[-1] < 2


def _grow(dec: _ScaleDecoder, prob: Tensor, cand: Tensor, width: int, opts: FastOptions,
          allowed: Tensor | None, logits: Tensor) -> Tensor:
    """Grow the decoded set where the new boundary meets undecoded pixels (see ``grow``).

    Returns:
        (B, Hp, Wp) bool: the decoded pixels, ``cand`` included; their logits are in ``logits``.
    """
    done = cand.clone()
    old = prob[:, 0] > 0.5
    for _ in range(opts.grow):
        cls = torch.where(done, logits > 0, old)
        edge = torch.where(cls, dilate(~cls, 1), dilate(cls, 1))
        front = edge & ~done
        if allowed is not None:
            front &= allowed
        if not bool(front.any()):
            break
        add = dilate(front, width) & ~done
        if allowed is not None:
            add &= allowed
        _decode_into(dec, add, opts.stride, logits)
        done |= add
    return done


# --------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def refine_fast(
    net: CRMNet,
    image: Tensor,
    seg: Tensor,
    scales: Sequence[float],
    opts: FastOptions,
    *,
    crop: int = 0,
    chunk: int = 32_768,
    progress: ProgressFn | None = None,
    stats: dict | None = None,
    guide: Tensor | None = None,
) -> Tensor:
    """The coarse-to-fine schedule on padded inputs, decoding only what ``opts`` selects.

    Args:
        net: the CRM network (eval mode).
        image: (B, 3, Hp, Wp) normalised, already padded image.
        seg: (B, 1, Hp, Wp) mask in [-1, 1], padded the same way.
        scales: input scales, coarse to fine.
        opts: see :class:`FastOptions`.
        crop: padding width that the caller crops from the answer (not decoded at the last
            scale when ``opts.skip_padding``).
        chunk: most queries per decoder call.
        progress: optional ``progress(stage, done, total)``.
        stats: if given, receives per-scale lists ``"queries"`` (decoded pixels),
            ``"encoder_pixels"`` (encoder input pixels run, halos included) and
            ``"candidates"`` (pixels in the band).
        guide: (B, 1, Hp, Wp) guided filter of the coarse mask in [-1, 1], padded the same way
            (:func:`~crm_d2.guided_filter.guide_channel`): read at every scale by
            :attr:`CRMArch.guided_skip` networks, required by them.

    Returns:
        (B, 1, Hp, Wp) float32 probabilities.
    """
    bsz, _, hp, wp = seg.shape
    prob = seg * 0.5 + 0.5
    totals: dict[str, list[int]] = {}
    for si, s in enumerate(scales):
        size = (max(1, round(hp * s)), max(1, round(wp * s)))
        if size == (hp, wp):  # bilinear align-corners to the same size is the identity
            img_s, seg_s = image, seg
        else:
            img_s = F.interpolate(image, size=size, mode="bilinear", align_corners=True)
            seg_s = F.interpolate(seg, size=size, mode="bilinear", align_corners=True)
        width = opts.band_width(s)
        allowed = None  # pixels that may be decoded (None: all)
        if si == len(scales) - 1 and opts.skip_padding and crop > 0:
            allowed = torch.zeros(hp, wp, dtype=torch.bool, device=seg.device)
            allowed[crop:-crop, crop:-crop] = True
        if width is None:
            cand = torch.ones(bsz, hp, wp, dtype=torch.bool, device=seg.device)
        else:
            cand = boundary_band(prob, width)
        if allowed is not None:
            cand &= allowed
        stage = f"scale {s:g} ({si + 1}/{len(scales)})"
        if progress is not None:
            progress(stage, 0, 1)  # the scale starts: encoding
        pixels = None  # the grid's own image and mask, read by CRMArch.pixel_skip networks
        if net.pixel_skip is not None:  # read in place: no full-size copy
            pixels = (image, seg) if guide is None else (image, seg, guide)
        dec = _ScaleDecoder(net, img_s, seg_s, (hp, wp), opts, chunk, pixels)
        if width is None and opts.stride == 1 and (dec.whole_fits or opts.halo is None):
            reads = None
            # only what the next scale's resize reads (a pixel_skip network reads every pixel)
            if si < len(scales) - 1 and net.pixel_skip is None:
                nxt = scales[si + 1]
                rows = resize_reads(hp, max(1, round(hp * nxt)), seg.device)
                cols = resize_reads(wp, max(1, round(wp * nxt)), seg.device)
                if rows.numel() * cols.numel() <= _READ_SHARE * hp * wp:
                    reads = (rows, cols)
            logits = _dense_decode(dec, reads)
            if reads is not None and not _surely_nonempty(logits, reads):
                # the next scale's empty-mask rule sums every pixel: decode them all
                logits = _dense_decode(dec)
        else:
            logits = torch.zeros(bsz, hp, wp, device=seg.device)
            if width is not None and opts.scan is not None and s <= opts.scan:
                # every pixel: strided over the whole image, the band decoded in full
                step = max(1, round(opts.scan_stride / s))
                everything = torch.ones_like(cand) if allowed is None else (
                    allowed.expand_as(cand).clone())
                logits = _strided_decode(dec, everything, step, logits)
                dec.decode(cand, logits)
                cand = everything
            else:
                _decode_into(dec, cand, opts.stride, logits)
                if width is not None and opts.grow:
                    cand = _grow(dec, prob, cand, width, opts, allowed, logits)
        for key, value in (("queries", dec.queries), ("encoder_pixels", dec.encoded_pixels),
                           ("candidates", int(cand.sum()))):
            totals.setdefault(key, []).append(value)
        del dec, img_s, seg_s, pixels
        empty = _empty_masks(seg)
        # full-size maps are dropped before their successors are allocated (peak memory)
        seg = None
        prob = torch.where(cand[:, None], logits.sigmoid_()[:, None], prob)
        logits = cand = None
        prob[empty] = 0
        seg = torch.sub(prob, 0.5).mul_(2)
        if progress is not None:
            progress(stage, 1, 1)
    if stats is not None:
        stats.update(totals)
    return prob
