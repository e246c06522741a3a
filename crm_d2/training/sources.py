"""Training data sources given as ``KIND:PATH`` specs, with their held-out splits.

Shared by ``tools/train_crm.py`` and ``tools/eval_crm_heldout.py`` so that evaluation sees
exactly the images training held out.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["KINDS", "build_source", "parse_data_spec"]

KINDS = ("folder", "davis", "coco")


class Subset:
    """The samples ``indices`` of a pair source (``__len__`` + ``load``)."""

    def __init__(self, source, indices: Sequence[int]) -> None:
        self.source = source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, idx: int):
        return self.source.load(self.indices[idx])


def parse_data_spec(spec: str) -> tuple[str, list[str]]:
    """``KIND:PATH`` (or ``coco:JSON:IMAGEDIR``) -> (kind, paths)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise ValueError(f"--data {spec!r}: expected folder:DIR, davis:ROOT or coco:JSON:IMAGEDIR")
    if kind == "coco":
        json_path, sep, image_dir = rest.partition(":")
        if not sep or not json_path or not image_dir:
            raise ValueError(f"--data {spec!r}: COCO needs coco:JSON:IMAGEDIR")
        return kind, [json_path, image_dir]
    return kind, [rest]


def build_source(spec: str, val_fraction: float, seed: int):
    """One ``--data`` source -> (kind, train source, validation source).

    Sources are pair lists (folder, davis) or :class:`Subset` of COCO objects.
    """
    from crm_d2.training.datasets import (
        CocoObjectPairs,
        ImageMaskPairs,
        list_image_mask_pairs,
        split_pairs,
    )

    kind, paths = parse_data_spec(spec)
    if kind in ("folder", "davis"):
        pairs = list_image_mask_pairs(paths[0])
        group = "sequence" if kind == "davis" else "name"
        train_pairs, val_pairs = split_pairs(pairs, val_fraction, seed, group_by=group)
        return kind, train_pairs, ImageMaskPairs(val_pairs)
    objects = CocoObjectPairs(paths[0], paths[1])
    # One key per object, grouped by image id, through the same hash split.
    keys = [(str(a["image_id"]), str(i)) for i, a in enumerate(objects.annotations)]
    train_keys, val_keys = split_pairs(keys, val_fraction, seed, group_by=lambda k: k)
    return (
        kind,
        Subset(objects, [int(k[1]) for k in train_keys]),
        Subset(objects, [int(k[1]) for k in val_keys]),
    )
