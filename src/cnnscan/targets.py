"""Turn what a user says about target classes into a (n_images, n_targets) LongTensor."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import torch

from cnnscan.errors import TargetError

Targets = str | int | Sequence[int] | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor | None

_TOP_K = re.compile(r"^top[-_ ]?(\d+)$", re.IGNORECASE)


def resolve_targets(targets: Targets, logits: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """Targets as class ids per image.

    Accepts "topK" (per image, by logit), an int, a list of ints or class names shared by
    the batch, a list of lists (one per image), or a LongTensor (n_images, n_targets).
    None means "top1".
    """
    n_images, n_classes = logits.shape
    device = logits.device
    if targets is None:
        targets = "top1"
    if isinstance(targets, str) and (match := _TOP_K.match(targets.strip())):
        k = int(match.group(1))
        if not 1 <= k <= n_classes:
            raise TargetError(f"{targets!r}: k must be between 1 and {n_classes} (the classes)")
        return logits.detach().topk(k, dim=1).indices
    if isinstance(targets, str | int):
        targets = [targets]
    if isinstance(targets, torch.Tensor):
        ids = targets.to(device=device, dtype=torch.long)
        if ids.ndim == 0:
            ids = ids.view(1)
    else:
        targets = list(targets)
        if targets and all(isinstance(t, Sequence) and not isinstance(t, str) for t in targets):
            ids = torch.tensor([[_class_id(t, labels) for t in row] for row in targets])
        else:
            ids = torch.tensor([_class_id(t, labels) for t in targets], dtype=torch.long)
        ids = ids.to(device)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0).expand(n_images, -1)
    if ids.ndim != 2 or ids.shape[0] != n_images or ids.shape[1] == 0:
        raise TargetError(
            f"targets must give at least one class per image ({n_images} images); got shape "
            f"{tuple(ids.shape)}"
        )
    bad = ids[(ids < 0) | (ids >= n_classes)]
    if bad.numel():
        raise TargetError(
            f"target class {int(bad[0])} is out of range: the model has {n_classes} classes "
            f"(0..{n_classes - 1})"
        )
    return ids.contiguous()


def _class_id(target: int | str, labels: Sequence[str]) -> int:
    if isinstance(target, bool):
        raise TargetError(f"target {target!r} is not a class id or name")
    if isinstance(target, int):
        return target
    if isinstance(target, str):
        text = target.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        lowered = [label.lower() for label in labels]
        if text.lower() in lowered:
            return lowered.index(text.lower())
        close = difflib.get_close_matches(text.lower(), lowered, n=5, cutoff=0.6)
        hint = (
            f" Close matches: {', '.join(labels[lowered.index(c)] for c in close)}."
            if close
            else ""
        )
        raise TargetError(f"unknown class name {target!r}.{hint}")
    raise TargetError(f"target {target!r} is not a class id or name")
