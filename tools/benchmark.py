#!/usr/bin/env python3
"""Speed and memory of CRM inference: exact vs the fast path and each of its switches.

Every case runs in a fresh subprocess (peak RSS = that process's ``ru_maxrss``: model, image and
activations), in an interleaved order; the parent prints one table and writes it, with the
machine and the command, to ``--output`` (BENCHMARKS.md). Cases:

1. ``img1``: the demo photo (``highres_demo/aeroplane.jpg``) and its coarse mask resized to
   2560x1706, 4 scales, with the official ResNet-50 architecture (random weights in the official
   format, calibrated so that logits are not saturated: there are no official weights here) and
   with the shipped weights (``--img1-modes``). Modes: ``exact`` (the authors' arithmetic),
   ``default`` (the library's default for the schedule, :meth:`FastOptions.default_for`: dense
   decoding with a 1-GiB encoder budget over several scales, band decoding at one, the fusion in
   bf16 where the CPU computes it natively), ``dense`` (every pixel from
   one whole-image encoder pass; equals exact to ~1e-5), ``dense-1g`` (the same within a 1-GiB
   encoder budget: exact windows beyond it), ``band`` (``FastOptions()``: band
   decoding + windowed encoder), ``stride4`` (strided decoding alone), ``band+stride2``.
   Suffixes change the precision or layout of any mode but exact: ``+fp32`` (no autocast),
   ``+bf16`` (the fusion in bf16), ``+bf16t`` (the trunk too), ``+nocl`` (no channels-last).
2. ``big``: 6000x4000 (and 3000x2000 for the growth with pixels), ``--big-modes`` (default:
   the band path) at ``--big-scales``.
3. ``coco``: the segments of a COCO panoptic image through ``crm_d2.segments.refine_segments``
   (shipped weights), and the inner Panoptic FPN R50 (random weights) on the same image when
   detectron2 imports.
4. ``cascadepsp``: CascadePSP (:class:`crm_d2.CascadePSPRefiner`) on image 1, global + local
   step (L = 900) and fast mode (global step only), with random weights in the released format
   (calibrated as in ``tools/compare_cascadepsp.py``: there are no released weights here).
5. MACs of each case next to the machine's measured fp32 matmul rate.

Quality of the fast modes vs dense (= exact) on held-out real images (DAVIS, ECSSD; the shipped
weights' validation split) is measured by the ``heldout`` case.

Example::

    python tools/benchmark.py --data ../shared/data --output BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning threads

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODES = {  # FastOptions from its class; None = exact=True; "library" = the refiner's own default
    "exact": None,
    "default": "library",
    "dense": lambda F: F.dense(float("inf")),  # one whole-image encoder pass per scale
    "dense-1g": lambda F: F.dense(),  # 1-GiB budget, exact windows beyond it
    "band": lambda F: F(),
    "stride4": lambda F: F(band=None, stride=4),
    "band+stride2": lambda F: F(stride=2),
}
SCALES4 = (0.125, 0.25, 0.5, 1.0)
IMG1_MODES = ("r50:exact", "r50:default", "r50:band", "lite:dense", "lite:default", "lite:band")
CANONICAL = (64, 96, 128, 192, 256, 384, 512, 768, 1024)  # ROI sides of cross-size batching


# --------------------------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------------------------
def _refiner(weights: str):
    from crm_d2 import CRMRefiner
    from crm_d2.modeling import CRMNet

    if weights == "lite":
        return CRMRefiner.from_checkpoint(None)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from compare_official import random_official_state_dict

    sd = random_official_state_dict(0)
    net = CRMNet()
    net.load_state_dict({k[len("module."):]: v for k, v in sd.items()})
    return CRMRefiner(net)


# Device-knob suffixes of a mode (any mode but exact): "default+nocl" is the library default
# without channels-last, "band+bf16" the band path with the fusion under bf16 autocast,
# "+bf16t" the trunk too, "+fp32" no autocast. Longer suffixes first ("+bf16t" before "+bf16").
KNOBS = {"+cl": {"channels_last": True}, "+nocl": {"channels_last": False},
         "+bf16t": {"autocast": "bf16", "autocast_trunk": True},
         "+bf16": {"autocast": "bf16"}, "+fp32": {"autocast": None}}


def _split_knobs(mode: str) -> tuple[str, dict]:
    changes: dict = {}
    for suffix, change in KNOBS.items():
        if suffix in mode:
            mode = mode.replace(suffix, "")
            changes.update(change)
    return mode, changes


def _fast(mode: str, scales=None):
    """The FastOptions of a mode (None: exact); ``default`` needs the ``scales`` it decodes."""
    from crm_d2.sparse import FastOptions

    mode, changes = _split_knobs(mode)
    spec = MODES[mode]
    if spec is None:
        return None
    opts = FastOptions.default_for(scales) if spec == "library" else spec(FastOptions)
    return opts.with_(**changes)


def _demo(data: str, size: tuple[int, int]):
    from PIL import Image

    from crm_d2.io import read_image, read_mask

    img = Image.fromarray(read_image(os.path.join(data, "highres_demo", "aeroplane.jpg")))
    msk = Image.fromarray(read_mask(os.path.join(data, "highres_demo", "aeroplane.png")))
    w, h = size
    return (np.asarray(img.resize((w, h), Image.BILINEAR)),
            np.asarray(msk.resize((w, h), Image.BILINEAR)))


def _mac_counts(refiner) -> dict:
    """Encoder MACs per input pixel and decoder MACs per query (exact and fast forms)."""
    net = refiner.model
    refiner._use_channels_last(False)  # plain modules, so that every convolution's hook fires
    macs = [0]

    def hook(mod, inp, out):
        k = mod.weight[0].numel()  # cin/groups * kh * kw
        macs[0] += out.numel() * k

    hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net.encode(torch.zeros(1, 3, 256, 256), torch.zeros(1, 1, 256, 256))
    for h in hs:
        h.remove()
    lin = [m for m in net.imnet.layers if isinstance(m, torch.nn.Linear)]
    tail = sum(m.in_features * m.out_features for m in lin[1:])
    d = lin[0].out_features
    # once per query, shared by the corners (4 inputs, 5 with the guided filter)
    skip = net.pixel_skip.in_features * d if net.pixel_skip is not None else 0
    return {
        "enc_per_px": macs[0] / 256**2,
        "dec_exact": 4 * (lin[0].in_features * d + tail) + skip,
        "dec_fast": 4 * (6 * d + tail) + skip,
        "proj_per_cell": net.arch.feat_dim * d,
    }


def _case_refine(args) -> dict:
    from crm_d2.inference import PAD, prepare_inputs

    refiner = _refiner(args.weights)
    if "+alone" in args.mode:  # CRM without the shipped file's guided-filter blend
        refiner.guided_blend = 0.0
    mode = args.mode.replace("+alone", "")
    w, h = (int(v) for v in args.size.split("x"))
    image, mask = _demo(args.data, (w, h))
    img_t, msk_t = prepare_inputs(image, mask)
    stats: dict = {}
    t0 = time.perf_counter()
    scales = tuple(args.scales or SCALES4)
    prob = refiner.refine_tensors(img_t, msk_t, scales=scales, exact=mode == "exact",
                                  fast=_fast(mode, scales), stats=stats)[0].numpy()
    seconds = time.perf_counter() - t0
    mc = _mac_counts(refiner)
    hp, wp = h + 2 * PAD, w + 2 * PAD
    if mode == "exact":
        enc_px = [max(1, round(hp * s)) * max(1, round(wp * s)) for s in scales]
        queries = [hp * wp] * len(scales)
        dec = mc["dec_exact"]
        proj = 0
    else:
        enc_px, queries = stats["encoder_pixels"], stats["queries"]
        dec = mc["dec_fast"]
        proj = sum(enc_px) / 4 * mc["proj_per_cell"]
    macs = sum(enc_px) * mc["enc_per_px"] + sum(queries) * dec + proj
    np.save(args.out, prob > 0.5)
    return {"seconds": seconds, "macs": macs, "queries": sum(queries),
            "encoder_pixels": sum(enc_px)}


COCO_IMAGE, COCO_WARMUP = "000000439180", "000000142238"  # timed image, warm-up image


def _coco_segments(data: str, name: str):
    """RGB (H, W, 3) uint8 and (N, H, W) bool ground-truth segments of a panoptic sample."""
    from PIL import Image

    from crm_d2.evaluation.panoptic import rgb2id

    root = os.path.join(data, "coco_panoptic_sample")
    rgb = np.asarray(Image.open(os.path.join(root, "input_images", name + ".jpg")).convert("RGB"))
    ids = rgb2id(np.asarray(Image.open(os.path.join(root, "panoptic_examples", name + ".png"))))
    segs = [i for i in np.unique(ids) if i != 0]
    return rgb, torch.from_numpy(np.stack([ids == i for i in segs]))


def _case_coco(args) -> dict:
    from crm_d2 import CRMRefiner
    from crm_d2.segments import ROIOptions, refine_segments

    refiner = CRMRefiner.from_checkpoint(None, flip="+flip" in args.mode)
    if "+alone" in args.mode:
        refiner.guided_blend = 0.0
    scales = SCALES4 if "-4s" in args.mode else None
    roi = ROIOptions(canonical_sizes=CANONICAL) if "+canon" in args.mode else ROIOptions()
    mode = (args.mode.replace("-4s", "").replace("+canon", "").replace("+flip", "")
            .replace("+alone", ""))
    fast = _fast(mode, scales or refiner.scales) if mode != "exact" else None

    def run(name: str):
        rgb, masks = _coco_segments(args.data, name)
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        t0 = time.perf_counter()
        out = refine_segments(refiner, image, masks, roi, scales=scales, exact=mode == "exact",
                              fast=fast)
        return rgb, masks, out, time.perf_counter() - t0

    # warm up on the other image, as the inner model is (its ROI shapes differ from the timed
    # image's, so per-shape set-up costs are still paid, as on a stream of images)
    warm = run(COCO_WARMUP)[3]
    rgb, masks, out, seconds = run(COCO_IMAGE)
    if args.out:  # each refined segment pasted into a full-image binary mask
        full = np.zeros((len(out), *rgb.shape[:2]), dtype=bool)
        for j, r in enumerate(out):
            x0, y0, x1, y1 = r.box
            full[j, y0:y1, x0:x1] = r.prob.cpu().numpy() > 0.5
        np.save(args.out, full)
    return {"seconds": seconds, "segments": len(out), "all_segments": len(masks),
            "scales": list(scales or refiner.scales), "image": f"{rgb.shape[1]}x{rgb.shape[0]}",
            "warmup_s": warm}


def _case_d2(args) -> dict:
    try:
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model

        import crm_d2.d2.meta_arch  # noqa: F401  (registers CRMRefinedModel)
        from crm_d2.d2.config import add_crm_config, merge_config_file
    except ImportError as err:
        return {"skipped": f"detectron2 does not import: {err}"}
    from PIL import Image

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = get_cfg()
    add_crm_config(cfg)
    merge_config_file(cfg, os.path.join(repo, "configs", "panoptic_fpn_R_50_1x_crm.yaml"))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
                         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                         "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH", "0.0",
                         "TEST.DETECTIONS_PER_IMAGE", "30", "MODEL.CRM.EVAL_BOTH", "False"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    def inputs_of(name: str) -> list[dict]:
        path = os.path.join(args.data, "coco_panoptic_sample", "input_images", name + ".jpg")
        rgb = np.asarray(Image.open(path).convert("RGB"))
        h, w = rgb.shape[:2]
        short, long_ = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
        s = min(short / min(h, w), long_ / max(h, w))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        net_in = torch.nn.functional.interpolate(
            torch.from_numpy(bgr).permute(2, 0, 1)[None].float(),
            size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)[0]
        return [{"image": net_in, "height": h, "width": w,
                 "original_image": torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)}]

    inputs = inputs_of(COCO_IMAGE)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(inputs_of(COCO_WARMUP))  # warm-up on the other image, as the coco case
        warm = time.perf_counter() - t0
        model.reset_timing()
        t0 = time.perf_counter()
        out = model(inputs)
        total = time.perf_counter() - t0
    timing = model.timing.summary()
    n_seg = len(out[0]["panoptic_seg"][1]) if "panoptic_seg" in out[0] else -1
    return {"seconds": total, "inner_s": timing["inner_s_per_image"],
            "refine_s": timing["refine_s_per_image"], "warmup_s": warm,
            "panoptic_segments": n_seg, "instances": len(out[0]["instances"])}


def _case_heldout(args) -> dict:
    from crm_d2.coarse.perturb import perturb_mask, random_iou_target
    from crm_d2.evaluation.binary import boundary_accuracy, iou
    from crm_d2.training.sources import build_source

    refiner = _refiner(args.weights)
    refiner.guided_blend = 0.0  # the modes' decoding against exact: CRM alone
    rows = []
    specs = [f"davis:{os.path.join(args.data, 'davis')}",
             f"folder:{os.path.join(args.data, 'ecssd')}"]
    per = {"davis": args.heldout_davis, "folder": args.heldout_ecssd}
    for spec in specs:
        kind, _train, val = build_source(spec, 0.05, 0)
        step = max(1, len(val) // per[kind])
        for i in range(0, len(val), step)[: per[kind]]:
            image, mask, _ = val.load(i)
            fg = mask > 127
            if not fg.any():
                continue
            rng = np.random.default_rng([0, i])
            coarse = perturb_mask(np.where(fg, 255, 0).astype(np.uint8), random_iou_target(rng),
                                  rng)
            res = {"source": kind, "size": f"{image.shape[1]}x{image.shape[0]}"}
            ref = None
            for mode in ("dense", "band", "stride4", "band+stride2"):
                t0 = time.perf_counter()
                prob = refiner.refine(image, coarse, scales=SCALES4, fast=_fast(mode))
                pred = prob > 0.5
                if mode == "dense":
                    ref = pred
                res[mode] = {"seconds": time.perf_counter() - t0, "iou_gt": iou(pred, fg),
                             "mba_gt": boundary_accuracy(pred, fg),
                             "iou_vs_dense": iou(pred, ref), "mba_vs_dense":
                             boundary_accuracy(pred, ref)}
            res["coarse"] = {"iou_gt": iou(coarse > 127, fg),
                             "mba_gt": boundary_accuracy(coarse > 127, fg)}
            rows.append(res)
    return {"rows": rows}


def _case_cascadepsp(args) -> dict:
    from crm_d2 import CascadePSPRefiner

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from compare_cascadepsp import random_calibrated_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "model")
        torch.save(random_calibrated_state_dict(0), ckpt)
        refiner = CascadePSPRefiner.from_checkpoint(ckpt, L=900)
    w, h = (int(v) for v in args.size.split("x"))
    image, mask = _demo(args.data, (w, h))
    t0 = time.perf_counter()
    prob = refiner.refine(image, mask, fast=args.mode == "fast")
    seconds = time.perf_counter() - t0
    np.save(args.out, prob > 0.5)
    return {"seconds": seconds}


def _child(args) -> None:
    torch.set_num_threads(args.threads)
    fn = {"refine": _case_refine, "coco": _case_coco, "d2": _case_d2,
          "heldout": _case_heldout, "cascadepsp": _case_cascadepsp}[args.case]
    result = fn(args)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------
def _run(argv: list[str], timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *argv]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout:.0f} s time limit"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            out["process_s"] = time.perf_counter() - t0
            return out
    return {"error": (proc.stderr or proc.stdout)[-600:]}


def _matmul_rate(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 2.0:
        a @ b
        n += 1
    return n * 1024**3 / (time.perf_counter() - t0)  # MAC/s


def _machine() -> str:
    cpu = platform.processor() or "x86-64"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def _iou_mba(a_path: str, b_path: str) -> tuple[float, float]:
    from crm_d2.evaluation.binary import boundary_accuracy, iou

    a, b = np.load(a_path), np.load(b_path)
    return iou(a, b), boundary_accuracy(a, b)


def _segments_iou_mba(a_path: str, b_path: str) -> tuple[float, float]:
    """Mean IoU / mBA over segments of two (N, H, W) stacks of pasted binary masks."""
    from crm_d2.evaluation.binary import boundary_accuracy, iou

    a, b = np.load(a_path), np.load(b_path)
    if a.shape != b.shape:
        return float("nan"), float("nan")
    return (float(np.mean([iou(x, y) for x, y in zip(a, b)])),
            float(np.nanmean([boundary_accuracy(x, y) for x, y in zip(a, b)])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                   "shared", "data"))
    ap.add_argument("--output", default="BENCHMARKS.md")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--timeout", type=float, default=1500)
    ap.add_argument("--skip", nargs="*", default=[],
                    help="case groups to skip: img1 exact big coco d2 switches heldout "
                         "cascadepsp")
    ap.add_argument("--img1", default="2560x1706", help="WxH of image 1")
    ap.add_argument("--img1-modes", nargs="+", default=list(IMG1_MODES), metavar="WEIGHTS:MODE",
                    help="cases of image 1, in order (r50:exact is the reference; skipped with "
                         "--skip exact); modes take the +fp32 / +bf16 / +bf16t / +nocl knobs")
    ap.add_argument("--big", nargs="*", default=["3000x2000", "6000x4000"],
                    help="WxH sizes of case 2 (r50; lite at the last one)")
    ap.add_argument("--big-modes", nargs="+", default=["band"],
                    help="modes of case 2")
    ap.add_argument("--big-scales", type=float, nargs="+", default=list(SCALES4),
                    help="scales of case 2")
    ap.add_argument("--big-weights", nargs="+", default=["r50", "lite"],
                    help="weights of case 2: r50 at every size, lite at the last (at every "
                         "size when alone)")
    ap.add_argument("--coco-modes", nargs="+",
                    default=["default", "dense", "band", "band+canon", "dense+canon"],
                    help="modes of the COCO case; suffixes +cl / +nocl / +bf16 change the "
                         "device knobs of any mode but exact, +flip turns on flip test-time "
                         "augmentation, +alone is CRM without the shipped file's guided-filter "
                         "blend (each compared with the mode without them)")
    ap.add_argument("--heldout-davis", type=int, default=3)
    ap.add_argument("--heldout-ecssd", type=int, default=5)
    # child-only arguments
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--scales", type=float, nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    img1_modes = []
    for case in args.img1_modes:
        weights, _, mode = case.partition(":")
        if weights not in ("r50", "lite"):
            ap.error(f"--img1-modes {case!r}: expected r50:MODE or lite:MODE")
        img1_modes.append(mode)
    for mode in [*img1_modes, *args.big_modes, *args.coco_modes]:
        base, knobs = _split_knobs(mode)
        if "+flip" in base and mode not in args.coco_modes:
            ap.error(f"mode {mode!r}: +flip is a suffix of --coco-modes only")
        if (base.replace("+canon", "").replace("+flip", "").replace("+alone", "")
                .replace("-4s", "") not in MODES):
            ap.error(f"mode {mode!r}: expected one of {', '.join(MODES)} (+ knobs)")
        if knobs and base == "exact":
            ap.error(f"mode {mode!r}: exact runs the authors' arithmetic, it takes no knobs")
    if args.child:
        _child(args)
        return 0

    common = ["--data", args.data, "--threads", str(args.threads)]
    tmp = tempfile.mkdtemp(prefix="crm_bench_")
    rate = _matmul_rate(args.threads)
    results: list[tuple[str, dict]] = []

    def refine_case(weights: str, mode: str, size: str, scales=SCALES4) -> None:
        out = os.path.join(tmp, f"{weights}_{mode}_{size}_{len(scales)}.npy")
        res = _run(common + ["--case", "refine", "--weights", weights, "--mode", mode,
                             "--size", size, "--out", out,
                             "--scales", *map(str, scales)], args.timeout)
        res["mask"] = out
        label = f"{size} {weights} {mode}" + ("" if tuple(scales) == SCALES4 else
                                              f" ({len(scales)} scale{'s' * (len(scales) > 1)})")
        results.append((label, res))
        print(f"{label}: {res}", flush=True)

    img1 = args.img1
    if "img1" not in args.skip:
        for case in args.img1_modes:
            weights, _, mode = case.partition(":")
            if mode == "exact" and "exact" in args.skip:
                continue
            refine_case(weights, mode, img1)
    if "big" not in args.skip:
        lite_sizes = args.big if args.big_weights == ["lite"] else args.big[-1:]
        cases = [("r50", s) for s in args.big] * ("r50" in args.big_weights) + [
            ("lite", s) for s in lite_sizes] * ("lite" in args.big_weights)
        for weights, size in cases:
            for mode in args.big_modes:
                refine_case(weights, mode, size, tuple(args.big_scales))
    if "coco" not in args.skip:
        for mode in args.coco_modes:
            out = os.path.join(tmp, f"coco_{mode}.npy")
            res = _run(common + ["--case", "coco", "--mode", mode, "--out", out], args.timeout)
            res["mask"] = out
            results.append((f"coco refine_segments lite {mode}", res))
            print(results[-1], flush=True)
    if "d2" not in args.skip:
        res = _run(common + ["--case", "d2"], args.timeout)
        results.append(("coco Panoptic FPN R50 + CRM wrapper", res))
        print(results[-1], flush=True)
    if "switches" not in args.skip:
        for weights, mode in (("r50", "stride4"), ("lite", "stride4"), ("r50", "band+stride2"),
                              ("lite", "band+stride2")):
            refine_case(weights, mode, img1)
    if "cascadepsp" not in args.skip:
        for mode in ("global+local", "fast"):
            out = os.path.join(tmp, f"cascadepsp_{mode}.npy")
            res = _run(common + ["--case", "cascadepsp", "--mode", mode, "--size", img1,
                                 "--out", out], args.timeout)
            res["mask"] = out
            results.append((f"{img1} cascadepsp {mode}", res))
            print(results[-1], flush=True)
    heldout = None
    if "heldout" not in args.skip:
        heldout = _run(common + ["--case", "heldout", "--weights", "lite"], args.timeout)
        print("heldout", heldout, flush=True)

    text = _report(args, results, heldout, rate, img1)
    print(text)
    with open(args.output, "w") as f:
        f.write(text)
    return 0


def _report(args, results, heldout, rate, img1) -> str:
    by = dict(results)
    lines = ["# Benchmarks", "",
             f"Machine: {_machine()}; {args.threads} intra-op threads, OMP_WAIT_POLICY="
             f"{os.environ.get('OMP_WAIT_POLICY')}. Measured fp32 matmul rate: "
             f"{rate / 1e9:.1f} GMAC/s (1024x1024).", "",
             "Command: `python " + " ".join(["tools/benchmark.py", *sys.argv[1:]]) + "`", "",
             "Each row is one fresh process (peak RSS includes Python, torch, the model and the "
             "image). r50 = official ResNet-50 architecture with random weights in the official "
             "format (calibrated logits; there are no official weights here), lite = the shipped "
             "default weights (crm_d2/weights/). 4 scales (0.125, 0.25, 0.5, 1). IoU/mBA are of "
             "the binary "
             "mask vs the reference row's mask (exact for r50, dense = exact to 1e-5 for lite). "
             "MAC-bound time = MACs / measured matmul rate.", "",
             "| case | time s | ratio vs ref | peak RSS GiB | GMAC | MAC-bound s | decoded "
             "px (M) | encoder px (M) | IoU vs ref | mBA vs ref |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, res in results:
        if "seconds" not in res or "macs" not in res:
            continue
        size, weights, mode = label.split(" ", 2)
        ref_label = f"{size} {weights} {'exact' if weights == 'r50' else 'dense'}"
        ref = None if "scale" in mode else by.get(ref_label)  # other schedules: no reference
        ratio = iou = mba = ""
        if ref and "seconds" in ref and ref_label != label:
            ratio = f"{ref['seconds'] / res['seconds']:.1f}x faster"
            if size == img1:
                i, m = _iou_mba(res["mask"], ref["mask"])
                iou, mba = f"{i:.4f}", f"{m:.4f}"
        lines.append(
            f"| {label} | {res['seconds']:.1f} | {ratio} | {res['peak_rss_gib']:.2f} | "
            f"{res['macs'] / 1e9:.0f} | {res['macs'] / rate:.1f} | {res['queries'] / 1e6:.2f} | "
            f"{res['encoder_pixels'] / 1e6:.2f} | {iou} | {mba} |")
    errs = [(label, res) for label, res in results
            if "seconds" not in res and "cascadepsp" not in label]
    for label, res in errs:
        lines.append(f"| {label} | {res.get('error') or res.get('skipped')} | | | | | | | | |")
    lines += ["", "## COCO image: refinement vs the inner model", "",
              "| case | seconds | segments refined | s/segment | peak RSS GiB | notes |",
              "|---|---|---|---|---|---|"]
    for label, res in results:
        if not label.startswith("coco") or "seconds" not in res:
            continue
        if "segments" in res:
            note = ""
            base = _split_knobs(label.replace("+canon", "").replace("+flip", "")
                                .replace("+alone", ""))[0]
            ref = by.get(base)
            if base != label and ref and "seconds" in ref:
                i, m = _segments_iou_mba(res["mask"], ref["mask"])
                what = ("per-size batching" if "+canon" in label
                        else "one pass" if "+flip" in label
                        else "the blend" if "+alone" in label
                        else f"`{base.rsplit(' ', 1)[-1]}`")
                note = (f"; {ref['seconds'] / res['seconds']:.2f}x vs {what}, "
                        f"mean IoU {i:.4f} / mBA {m:.4f} vs it")
            lines.append(f"| {label} | {res['seconds']:.2f} | {res['segments']} of "
                         f"{res['all_segments']} | {res['seconds'] / max(res['segments'], 1):.3f}"
                         f" | {res['peak_rss_gib']:.2f} | scales {res['scales']}, "
                         f"{res['image']}; warm-up on {COCO_WARMUP}: {res['warmup_s']:.2f} s"
                         f"{note} |")
        else:
            lines.append(f"| {label} | {res['seconds']:.2f} | | | {res['peak_rss_gib']:.2f} | "
                         f"inner {res['inner_s']:.2f} s, refinement {res['refine_s']:.2f} s "
                         f"({res['panoptic_segments']} panoptic segments, {res['instances']} "
                         f"instances; warm-up on {COCO_WARMUP}: {res['warmup_s']:.2f} s) |")
    if heldout and "rows" in heldout:
        lines += ["", "## Held-out real images (lite weights, perturbed GT masks, 4 scales)", "",
                  "Mean over images; `vs dense` compares the binary masks with the dense "
                  "(= exact) path's.", "",
                  "| mode | images | s/image | IoU vs GT | mBA vs GT | IoU vs dense | "
                  "mBA vs dense |", "|---|---|---|---|---|---|---|"]
        rows = heldout["rows"]
        c_iou = np.mean([r["coarse"]["iou_gt"] for r in rows])
        c_mba = np.mean([r["coarse"]["mba_gt"] for r in rows])
        lines.append(f"| coarse input | {len(rows)} | | {c_iou:.4f} | {c_mba:.4f} | | |")
        for mode in ("dense", "band", "stride4", "band+stride2"):
            vals = {k: np.mean([r[mode][k] for r in rows]) for k in rows[0][mode]}
            worst = min(r[mode]["iou_vs_dense"] for r in rows)
            lines.append(f"| {mode} | {len(rows)} | {vals['seconds']:.2f} | {vals['iou_gt']:.4f}"
                         f" | {vals['mba_gt']:.4f} | {vals['iou_vs_dense']:.4f} (min "
                         f"{worst:.4f}) | {vals['mba_vs_dense']:.4f} |")
        sizes = sorted({r["size"] for r in rows})
        lines.append("")
        lines.append(f"Images: {len(rows)} ({', '.join(sizes)}), spread over the held-out "
                     "split of DAVIS and ECSSD (seed 0, 5%).")
    elif heldout:
        lines += ["", f"Held-out case failed: {heldout.get('error')}"]
    psp = [(label, res) for label, res in results if " cascadepsp " in label]
    if psp:
        ref = by.get(f"{img1} r50 exact")
        lines += ["", f"## CascadePSP on image 1 ({img1})", "",
                  "Random weights in the released format (calibrated as in "
                  "`tools/compare_cascadepsp.py`), L = 900. The ratio is against the CRM r50 "
                  "exact row of this run; IoU/mBA are vs the CascadePSP global+local mask (the "
                  "weights are random, so they say nothing about quality).", "",
                  "| case | time s | vs CRM r50 exact | peak RSS GiB | IoU vs global+local | "
                  "mBA vs global+local |", "|---|---|---|---|---|---|"]
        full = dict(psp).get(f"{img1} cascadepsp global+local")
        for label, res in psp:
            if "seconds" not in res:
                lines.append(f"| {label} | {res.get('error')} | | | | |")
                continue
            ratio = (f"{ref['seconds'] / res['seconds']:.1f}x faster"
                     if ref and "seconds" in ref else "")
            iou = mba = ""
            if full and "seconds" in full and res is not full:
                i, m = _iou_mba(res["mask"], full["mask"])
                iou, mba = f"{i:.4f}", f"{m:.4f}"
            lines.append(f"| {label} | {res['seconds']:.1f} | {ratio} | "
                         f"{res['peak_rss_gib']:.2f} | {iou} | {mba} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
