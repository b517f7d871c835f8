"""Sanity checks (Adebayo et al. 2018, arXiv:1810.03292): does the map depend on the model
and on the class it explains?

- Model randomization, cascading: the layers with parameters are re-initialized from the
  top (the classifier) down, one block at a time, each on top of the previous ones, in a
  private copy of the model (the user's model is never touched); the method is re-run on
  each randomized copy for the same image and class.
- Target randomization: the method is re-run for a random other class (seeded).

Each re-run map is compared with the original through the same relevance reduction as
every metric: Spearman rank correlation of the relevance, and SSIM of the min-max scaled
relevance. A method whose map stays similar when the top layer is randomized cannot be
explaining what the classifier computes: the verdict is "fails model randomization" when
the Spearman correlation after randomizing the top block is at least `THRESHOLD`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnnscan.attribution import Attribution, minmax_maps
from cnnscan.errors import MetricError
from cnnscan.layers import LayerRef
from cnnscan.methods import MethodInfo, get_method, run_method
from cnnscan.methods.options import generator
from cnnscan.metrics.registry import MetricContext, number_text, plain, register_metric
from cnnscan.metrics.relevance import relevance
from cnnscan.metrics.similarity import spearman, ssim
from cnnscan.models import Model
from cnnscan.scan import Scan

# Spearman ρ at or above this after randomizing the top block: "fails model randomization"
# (the map keeps its pixel ranking almost exactly without the classifier's weights; the
# numbers behind the choice are in docs/evaluation.md).
THRESHOLD = 0.9


@dataclass
class Similarity:
    """Spearman ρ and SSIM between original and re-run maps, each (N, T)."""

    spearman: torch.Tensor
    ssim: torch.Tensor


def compare(original: torch.Tensor, other: torch.Tensor) -> Similarity:
    """Similarity of relevance stacks (N, T, H, W)."""
    n, t, h, w = original.shape
    a, b = original.reshape(n * t, h, w), other.reshape(n * t, h, w)
    return Similarity(
        spearman(a, b).view(n, t).cpu(),
        ssim(minmax_maps(a), minmax_maps(b), win_size=min(7, h - 1 + h % 2, w - 1 + w % 2))
        .view(n, t)
        .cpu(),
    )


def parameter_blocks(model: Model, scan: Scan) -> list[tuple[str, list[str]]]:
    """Modules with parameters of their own, grouped into blocks and listed top first.

    A block is a module's name up to its first numeric part (`_blocks.15._project_conv` is
    in `_blocks.15`, `layer4.1.conv2` in `layer4.1`); other modules are blocks of their own.
    Blocks are ordered as the forward runs them, then reversed."""
    modules = dict(model.module.named_modules())
    blocks: dict[str, list[str]] = {}
    for row in scan.layer_table():
        name = LayerRef.parse(row.name).name
        module = modules.get(name)
        if module is None or next(module.parameters(recurse=False), None) is None:
            continue
        members = blocks.setdefault(_block_of(name), [])
        if name not in members:
            members.append(name)
    if not blocks:
        raise MetricError("the model has no parameters to randomize")
    return list(reversed(blocks.items()))


def _block_of(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG of `device` for the block and restore it afterwards."""
    devices = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


def reinitialize(module: nn.Module, seed: int) -> None:
    """Re-initialize the module's own parameters as at construction (`reset_parameters`),
    or from a normal distribution with each parameter's own spread if it has none."""
    first = next(module.parameters(recurse=False))
    with _seeded(seed, first.device), torch.no_grad():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            for p in module.parameters(recurse=False):
                spread = float(p.float().std()) if p.numel() > 1 else 0.0
                p.normal_(0.0, spread or 0.02)


def private_copy(model: Model) -> Model:
    """A deep copy of the model whose parameters cnnscan may change."""
    try:
        module = copy.deepcopy(model.module)
    except (TypeError, copy.Error, RuntimeError, AttributeError) as e:
        raise MetricError(
            "model randomization needs a private copy of the model, but it cannot be "
            f"deep-copied ({type(e).__name__}: {e}); skip the model_randomization metric"
        ) from e
    return Model(module, model.preprocessing, model.labels, f"{model.name} (randomized)")


def method_layer(info: MethodInfo, attr: Attribution) -> str | list[str] | None:
    """The layer(s) the attribution used, to re-run its method on the same layer."""
    if "layer" not in info.options():
        return None
    layers = attr.extras.get("layers")
    return list(layers) if isinstance(layers, list | tuple) else attr.layer


def rerun(
    scan: Scan,
    attrs: Mapping[str, Attribution],
    targets: Mapping[str, torch.Tensor],
    options: Mapping[str, dict[str, Any]],
    reduce: str,
) -> dict[str, torch.Tensor]:
    """Each attribution's method re-run on `scan` for `targets`: relevance (N, T, H, W)."""
    out = {}
    for name, attr in attrs.items():
        info = get_method(attr.method)
        again = run_method(scan, info, targets[name], method_layer(info, attr), options.get(name))
        out[name] = relevance(again, reduce)
    return out


def model_randomization(
    model: Model,
    scan: Scan,
    attrs: Mapping[str, Attribution],
    originals: Mapping[str, torch.Tensor],
    *,
    cascade: bool = False,
    options: Mapping[str, dict[str, Any]] | None = None,
    reduce: str = "abs",
    seed: int = 0,
) -> tuple[list[str], dict[str, list[Similarity]]]:
    """(block names, per attribution one Similarity per block): the top block only, or with
    `cascade=True` every block, cumulatively from the top down."""
    blocks = parameter_blocks(model, scan)
    if not cascade:
        blocks = blocks[:1]
    infos = [get_method(attr.method) for attr in attrs.values()]
    layers = sorted(
        {
            name
            for info, attr in zip(infos, attrs.values(), strict=True)
            for name in _as_list(method_layer(info, attr))
        }
    )
    work = private_copy(model)
    modules = dict(work.module.named_modules())
    targets = {name: attr.targets for name, attr in attrs.items()}
    results: dict[str, list[Similarity]] = {name: [] for name in attrs}
    for step, (_, members) in enumerate(blocks):
        for i, name in enumerate(members):
            reinitialize(modules[name], seed + 1000 * step + i)
        randomized = Scan(  # records only the layers the maps came from
            work,
            scan.inputs,
            layers=layers,
            relu_rules=any(info.relu_rules for info in infos),
            device=scan.device,
        )
        randomized.memory_budget = scan.memory_budget
        maps = rerun(randomized, attrs, targets, options or {}, reduce)
        for name in attrs:
            results[name].append(compare(originals[name], maps[name]))
    return [block for block, _ in blocks], results


def _as_list(layer: str | list[str] | None) -> list[str]:
    return [] if layer is None else [layer] if isinstance(layer, str) else list(layer)


def random_targets(targets: torch.Tensor, classes: int, seed: int = 0) -> torch.Tensor:
    """A uniformly drawn other class for every target (N, T), seeded."""
    if classes < 2:
        raise MetricError("target randomization needs a model with at least two classes")
    draw = torch.randint(classes - 1, targets.shape, generator=generator(seed))
    draw = draw.to(targets.device)
    return draw + (draw >= targets).long()


def target_randomization(
    scan: Scan,
    attrs: Mapping[str, Attribution],
    originals: Mapping[str, torch.Tensor],
    *,
    options: Mapping[str, dict[str, Any]] | None = None,
    reduce: str = "abs",
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, Similarity]]:
    """(the random classes, per attribution the Similarity to the map for them)."""
    classes = scan.logits.shape[1]
    targets = {name: random_targets(a.targets, classes, seed) for name, a in attrs.items()}
    maps = rerun(scan, attrs, targets, options or {}, reduce)
    return targets, {name: compare(originals[name], maps[name]) for name in attrs}


def verdict(
    similarity: torch.Tensor, failure: str, threshold: float = THRESHOLD
) -> list[list[str]]:
    """ "passes" / `failure` per (image, target): `failure` when Spearman ρ ≥ `threshold`;
    a map whose ρ is undefined (a constant map) gets "undefined (constant map)"."""
    return [
        [
            "undefined (constant map)" if rho != rho else failure if rho >= threshold else "passes"
            for rho in row
        ]
        for row in similarity.tolist()
    ]


def _check_text(value: Any) -> str:
    rho = value["spearman"][0] if isinstance(value["spearman"], list) else value["spearman"]
    return f"{number_text(rho, 2)} {value['verdict']}"


@register_metric(
    "model_randomization",
    family="sanity",
    description="Spearman ρ and SSIM between the map and the method's map on a copy whose top "
    "block (with cascade=True, every block from the top down) is re-initialized; "
    "'fails model randomization' when ρ ≥ threshold after the top block.",
    higher_is_better=None,
    reruns_method=True,
    per_row=False,
    title="top-layer rand. ρ",
    show=_check_text,
    cost="the method once more per randomized block",
    paper="Adebayo et al. 2018, arXiv:1810.03292",
)
def model_randomization_metric(ctx: MetricContext) -> dict[str, dict[str, Any]]:
    blocks, sims = model_randomization(
        ctx.model,
        ctx.scan,
        ctx.attrs,
        ctx.rel,
        cascade=ctx.cascade,
        options=ctx.method_options,
        reduce=ctx.reduce,
        seed=ctx.seed,
    )
    return {
        name: {
            "model_randomization": {
                "blocks": blocks,
                "spearman": [plain(s.spearman) for s in sims[name]],
                "ssim": [plain(s.ssim) for s in sims[name]],
                "verdict": plain(
                    verdict(sims[name][0].spearman, "fails model randomization", ctx.threshold)
                ),
            }
        }
        for name in ctx.names
    }


@register_metric(
    "target_randomization",
    family="sanity",
    description="Spearman ρ and SSIM between the map and the method's map for a random other "
    "class; 'fails target randomization' when ρ ≥ threshold.",
    higher_is_better=None,
    reruns_method=True,
    per_row=False,
    title="random class ρ",
    show=_check_text,
    cost="the method once more",
    paper="Adebayo et al. 2018, arXiv:1810.03292",
)
def target_randomization_metric(ctx: MetricContext) -> dict[str, dict[str, Any]]:
    targets, sims = target_randomization(
        ctx.scan, ctx.attrs, ctx.rel, options=ctx.method_options, reduce=ctx.reduce, seed=ctx.seed
    )
    return {
        name: {
            "target_randomization": {
                "targets": plain(targets[name].cpu()),
                "spearman": plain(sims[name].spearman),
                "ssim": plain(sims[name].ssim),
                "verdict": plain(
                    verdict(sims[name].spearman, "fails target randomization", ctx.threshold)
                ),
            }
        }
        for name in ctx.names
    }
