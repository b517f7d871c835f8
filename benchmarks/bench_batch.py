"""Batch mode: images/s of `cnnscan.batch.runner` vs a naive loop, thread-pool vs DataLoader
reading, Ray (2 actors) vs in-process, and peak memory over few vs many images.

    python benchmarks/bench_batch.py speed --images 64        # engine vs explain() per image
    python benchmarks/bench_batch.py loaders --images 64      # thread pool vs DataLoader
    python benchmarks/bench_batch.py ray --images 1000        # Ray local, 2 workers
    python benchmarks/bench_batch.py memory --sizes 200,2000  # peak RSS, each in a subprocess

Grad-CAM for the top-1 class on the default model (EfficientNet-Lite0). The images are
generated photos (random crops, flips and brightness of scikit-image's samples, about
640×480 JPEG) written to a temporary folder (or --dir, reused if it holds enough). Ratios
are measured in one run, alternating ours and the reference; on a shared, loaded machine
the absolute numbers are noisy.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import cnnscan
import cnnscan.batch
from cnnscan.batch import compute


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEG photos of about 640×480 made from scikit-image's samples."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("img-*.jpg"))
    if len(existing) >= count:
        return existing[:count]
    sources = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket(), data.horse()]
    sources = [np.stack([s] * 3, -1) if s.ndim == 2 else s[..., :3] for s in sources]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img-{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        source = sources[i % len(sources)]
        h, w = source.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = source[y : y + ch, x : x + cw].astype(np.float32) * rng.uniform(0.7, 1.2)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        picture = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8))
        picture.resize((640, 480), Image.Resampling.BILINEAR).save(path, quality=90)
    return paths


def naive(model, paths) -> float:
    """Seconds for explain() per image, as a user would write the loop."""
    began = time.perf_counter()
    for path in paths:
        cnnscan.explain(model, path, "gradcam", targets="top1")
    return time.perf_counter() - began


def engine(model, paths, out: Path, **options) -> float:
    shutil.rmtree(out, ignore_errors=True)
    began = time.perf_counter()
    cnnscan.batch.run(paths, ["gradcam"], out, model=model, progress=False, **options)
    return time.perf_counter() - began


def dataloader_prefetch(items, load, workers, ahead):
    """The same contract as `compute.prefetch`, with torch's DataLoader worker processes."""
    import torch

    items = list(items)

    class Reads(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return i, compute._attempt(load, items[i])

    loader = torch.utils.data.DataLoader(
        Reads(),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=max(2, ahead // max(1, workers)),
        persistent_workers=False,
    )
    for i, result in loader:
        yield items[i], result


def cmd_speed(args, model, paths, work: Path) -> None:
    few = paths[: args.naive_images]
    print(f"{len(few)} images for the naive loop, {len(paths)} for the engine")
    engine(model, paths[:8], work / "warm")  # model copy, layer, measured sizes
    naive(model, paths[:2])
    for rep in range(args.repeat):
        t_naive = naive(model, few) / len(few)
        t_engine = engine(model, paths, work / "engine", batch_size=args.batch_size) / len(paths)
        print(
            f"  round {rep + 1}: naive {1 / t_naive:6.2f} img/s, engine {1 / t_engine:6.2f} "
            f"img/s -> {t_naive / t_engine:.2f}x"
        )


def inline_reads(items, load, workers, ahead):
    """No reading ahead: each image is read when the compute asks for it."""
    for item in items:
        yield item, compute._attempt(load, item)


def cmd_loaders(args, model, paths, work: Path) -> None:
    engine(model, paths[:8], work / "warm")
    original = compute.prefetch
    readers = {
        "a reading thread per worker": original,
        "a DataLoader process per worker": dataloader_prefetch,
        "inline": inline_reads,
    }
    for rep in range(args.repeat):
        rates = {}
        for name, reader in readers.items():
            compute.prefetch = reader
            try:
                seconds = engine(model, paths, work / "loader")
            finally:
                compute.prefetch = original
            rates[name] = len(paths) / seconds
        listing = ", ".join(f"{name} {rate:.2f} img/s" for name, rate in rates.items())
        print(f"  round {rep + 1}: {listing}")


def cmd_ray(args, model, paths, work: Path) -> None:
    engine(model, paths[:8], work / "warm")
    for rep in range(args.repeat):
        t_local = engine(model, paths, work / "local", workers=2, batch_size=args.batch_size)
        t_ray = engine(
            model, paths, work / "ray", engine="ray", workers=2, batch_size=args.batch_size
        )
        n = len(paths)
        print(
            f"  round {rep + 1}: in-process {n / t_local:6.2f} img/s, Ray 2 workers "
            f"{n / t_ray:6.2f} img/s (incl. start-up) -> Ray takes {t_ray / t_local:.2f}x"
        )


def cmd_memory(args, model, paths, work: Path) -> None:
    for size in (int(s) for s in args.sizes.split(",")):
        out = work / f"memory-{size}"
        shutil.rmtree(out, ignore_errors=True)
        began = time.perf_counter()
        child = subprocess.run(
            [sys.executable, __file__, "_child", str(paths[0].parent), str(size), str(out)],
            check=True,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - began
        peak = int(child.stdout.strip().splitlines()[-1])
        print(f"  {size:5d} images: peak RSS {peak / 2**20:7.1f} MiB ({seconds:.0f} s)")


def child(folder: str, size: int, out: str) -> None:
    """Run the engine over the first `size` images; print the peak RSS in bytes."""
    paths = sorted(Path(folder).glob("img-*.jpg"))[:size]
    cnnscan.batch.run(paths, ["gradcam"], out, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("speed", "loaders", "ray", "memory"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--naive-images", type=int, default=32)
    parser.add_argument("--sizes", default="200,2000")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=None, help="folder for the generated images (kept)")
    args = parser.parse_args()
    count = max(args.images, *(int(s) for s in args.sizes.split(",")))
    count = count if args.what == "memory" else args.images
    keep = args.dir is not None
    folder = Path(args.dir) if keep else Path(tempfile.mkdtemp(prefix="cnnscan-bench-"))
    work = Path(tempfile.mkdtemp(prefix="cnnscan-bench-out-"))
    try:
        paths = make_images(folder, count)
        print(
            f"{args.what}: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
            f"torch threads {__import__('torch').get_num_threads()}"
        )
        model = cnnscan.load_model()
        commands = {
            "speed": cmd_speed,
            "loaders": cmd_loaders,
            "ray": cmd_ray,
            "memory": cmd_memory,
        }
        commands[args.what](args, model, paths, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
