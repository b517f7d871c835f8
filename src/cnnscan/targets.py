"""Turn what a user says about target classes into a (n_images, n_targets) LongTensor: the
one parser of targets for the library, the command line and batch runs."""

from __future__ import annotations

import difflib
import numbers
import re
from collections.abc import Sequence

import numpy as np
import torch

from cnnscan.errors import TargetError

Targets = str | int | Sequence[int] | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor | None

_TOP_K = re.compile(r"^top[-_ ]?(\d+)$", re.IGNORECASE)


def top_k(targets: object) -> int | None:
    """K of a "topK" target ("top5", "top-3"), else None."""
    if isinstance(targets, str) and (match := _TOP_K.match(targets.strip())):
        return int(match.group(1))
    return None


def checked_top_k(k: int | None, n_classes: int, default: int = 5) -> int:
    """How many of the most probable classes to show or explain: `k` (1 to the number of
    classes; more is an error, not silently the number of classes), or None for `default`
    (at most every class: a 3-class model has no top 5)."""
    if k is None:
        return min(default, n_classes)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n_classes:
        raise TargetError(
            f"top_k must be a whole number from 1 to {n_classes} (the model's classes), got {k!r}"
        )
    return int(k)


def parse_targets(text: str) -> str | list[int | str]:
    """Targets as typed on a command line: "top3" as it is, else comma-separated class ids
    and names ("285,tiger cat" -> [285, "tiger cat"])."""
    if top_k(text) is not None:
        return text.strip()
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise TargetError(f"no targets in {text!r}; use topK or comma-separated class ids/names")
    return [int(p) if p.lstrip("-").isdigit() else p for p in parts]


def class_ids(targets: Targets, labels: Sequence[str]) -> torch.Tensor:
    """Fixed class ids (T,) for targets that name classes (ids, names), checked against the
    labels without a forward; "topK" depends on the logits: use `resolve_targets`."""
    if top_k(targets) is not None:
        raise TargetError(f"{targets!r} depends on each image's logits; name classes instead")
    listed = [targets] if isinstance(targets, str | numbers.Integral) else list(targets)
    ids = torch.tensor([class_id_of(t, labels) for t in listed], dtype=torch.long)
    if not len(ids):
        raise TargetError("no target classes given")
    _check_range(ids, len(labels))
    _check_distinct(ids.view(1, -1), listed, labels)
    return ids


def resolve_targets(targets: Targets, logits: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """Targets as class ids per image.

    Accepts "topK" (per image, by logit), an int, a list of ints or class names shared by
    the batch, a list of lists (one per image), or a LongTensor (n_images, n_targets).
    None means "top1". A class named twice for an image is a TargetError (a LongTensor is
    taken as it is).
    """
    n_images, n_classes = logits.shape
    device = logits.device
    if targets is None:
        targets = "top1"
    if (k := top_k(targets)) is not None:
        if not 1 <= k <= n_classes:
            raise TargetError(f"{targets!r}: k must be between 1 and {n_classes} (the classes)")
        return logits.detach().topk(k, dim=1).indices
    if isinstance(targets, np.ndarray):
        targets = torch.from_numpy(targets)
    if isinstance(targets, str | numbers.Integral):
        targets = [targets]
    if isinstance(targets, torch.Tensor):
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise TargetError(
                f"target tensor has dtype {targets.dtype}; class ids must be integers "
                "(a LongTensor (n_images, n_targets))"
            )
        ids = targets.to(device=device, dtype=torch.long)
        if ids.ndim == 0:
            ids = ids.view(1)
    elif isinstance(targets, Sequence):
        targets = list(targets)
        if targets and all(_is_row(t) for t in targets):
            rows = [[class_id_of(t, labels) for t in row] for row in targets]
            if len({len(row) for row in rows}) > 1:
                raise TargetError(
                    "each image needs the same number of targets; got rows of lengths "
                    f"{[len(row) for row in rows]}"
                )
            ids = torch.tensor(rows, dtype=torch.long)
        else:
            ids = torch.tensor([class_id_of(t, labels) for t in targets], dtype=torch.long)
        ids = ids.to(device)
    else:
        raise TargetError(
            f"targets {targets!r} are not understood; use 'top5', a class id, class names, a "
            "list of them, or a LongTensor (n_images, n_targets)"
        )
    if ids.ndim == 1:
        ids = ids.unsqueeze(0).expand(n_images, -1)
    if ids.ndim != 2 or ids.shape[0] != n_images or ids.shape[1] == 0:
        raise TargetError(
            f"targets must give at least one class per image ({n_images} images); got shape "
            f"{tuple(ids.shape)}"
        )
    _check_range(ids, n_classes)
    if not isinstance(targets, torch.Tensor):  # a tensor is taken as it is (metrics' draws)
        _check_distinct(ids, targets, labels)
    return ids.contiguous()


def _check_range(ids: torch.Tensor, n_classes: int) -> None:
    bad = ids[(ids < 0) | (ids >= n_classes)]
    if bad.numel():
        raise TargetError(
            f"target class {int(bad[0])} is out of range: the model has {n_classes} classes "
            f"(0..{n_classes - 1})"
        )


def _check_distinct(ids: torch.Tensor, given: object, labels: Sequence[str]) -> None:
    """Each class once per image: "285,tiger cat,285" would compute (and count) 285 twice."""
    ordered = ids.sort(dim=1).values
    repeated = ordered[:, 1:][ordered[:, 1:] == ordered[:, :-1]]
    if repeated.numel():
        class_id = int(repeated[0])
        name = f" ({labels[class_id]})" if class_id < len(labels) else ""
        raise TargetError(
            f"target class {class_id}{name} is named twice in {given!r}; name each class once"
        )


def _is_row(target: object) -> bool:
    if isinstance(target, torch.Tensor | np.ndarray):
        return target.ndim == 1
    return isinstance(target, Sequence) and not isinstance(target, str)


def class_id_of(target: object, labels: Sequence[str]) -> int:
    """One class id from an id or a class name (exact spelling first, then any case)."""
    if isinstance(target, bool | np.bool_):
        raise TargetError(f"target {target!r} is not a class id or name")
    if isinstance(target, torch.Tensor | np.ndarray) and target.ndim == 0:
        target = target.item()
    if isinstance(target, numbers.Integral):
        return int(target)
    if isinstance(target, str):
        text = target.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        if text in labels:  # exact spelling wins ("Cardigan" the corgi, "cardigan" the jacket)
            return list(labels).index(text)
        lowered = [label.lower() for label in labels]
        matches = [i for i, label in enumerate(lowered) if label == text.lower()]
        if len(matches) > 1:
            listing = ", ".join(f"{i} {labels[i]!r}" for i in matches)
            raise TargetError(f"class name {target!r} is ambiguous: {listing}; use the class id")
        if matches:
            return matches[0]
        close = difflib.get_close_matches(text.lower(), lowered, n=5, cutoff=0.6)
        hint = (
            f" Close matches: {', '.join(labels[lowered.index(c)] for c in close)}."
            if close
            else ""
        )
        raise TargetError(f"unknown class name {target!r}.{hint}")
    raise TargetError(f"target {target!r} is not a class id or name")
