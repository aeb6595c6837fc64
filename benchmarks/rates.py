"""Device and pipeline rates: achieved FLOP/s of the image tower against the device's matmul rate, data loading
against the training step, and peak memory per method.

- **FLOP/s**: the image tower's forward and backward pass on one batch (``encode_image(x).sum().backward()``),
  counted with ``torch.utils.flop_counter.FlopCounterMode`` and timed (median of repeats after a warm-up), as a
  fraction of a large ``torch.mm`` in the same process (float32 ``2048²`` on a CPU, bfloat16 ``8192²`` on a GPU).
- **Data**: images per second a datamodule's training loader delivers with its configured workers (decode,
  augmentation, collation; the first batch, which starts the workers, is not counted): the Shapes world and an
  image folder of JPEG photos of odd, non-square sizes written for the benchmark.
- **Memory**: the peak during two training steps of the hand-written loop, each method in a fresh process (a
  process reuses the memory its allocator kept from earlier work): resident memory on a CPU (Linux's ``VmHWM``,
  reset before the steps), ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.steps import Setting, batches_of, hand_written_loop, method_and_data
from datamodules import ImageFolderDataModule, ShapesDataModule


def median_seconds(fn: Callable[[], object], setting: Setting, repeats: int = 5) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        setting.synchronize()
        start = time.perf_counter()
        fn()
        setting.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(setting: Setting) -> float:
    """FLOP/s of one large dense ``torch.mm`` on the device (module docstring)."""
    n, dtype = (8192, torch.bfloat16) if setting.device == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=setting.device, dtype=dtype)
    b = torch.randn(n, n, device=setting.device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, setting)


def image_tower_rate(setting: Setting, batch: int = 64) -> tuple[float, float]:
    """``(FLOP per step, FLOP/s)`` of the image tower's forward and backward pass on ``batch`` random images."""
    module, _ = method_and_data("clip", setting)
    backbone = module.backbone.to(setting.device).train()
    images = torch.randn(batch, 3, module.input_side, module.input_side, device=setting.device)

    def step() -> None:
        with setting.autocast():
            loss = backbone.encode_image(images).float().sum()
        loss.backward()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    return flops, flops / median_seconds(step, setting)


def loader_rate(loader: torch.utils.data.DataLoader, batches: int) -> float:
    """Images per second of ``batches`` batches of ``loader`` after its first (which starts the workers)."""
    iterator = iter(loader)
    next(iterator)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(iterator)["label"])
    return images / (time.perf_counter() - start)


def write_photo_folder(root: Path, classes: int = 8, per_class: int = 64, seed: int = 0) -> Path:
    """``root/{train,val}/<class>/<i>.jpg`` (``per_class`` training images, 2 for validation): smooth random-colour
    JPEGs of odd, non-square sizes (240–480 × 180–400)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                height, width = int(rng.integers(180, 401)) | 1, int(rng.integers(240, 481)) | 1
                coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
                Image.fromarray(coarse).resize((width, height), Image.BILINEAR).save(folder / f"{i}.jpg", quality=90)
    return root


def data_rates(setting: Setting, batches: int = 6) -> dict[str, float]:
    """Images per second of the Shapes ``attributes`` loader (its configured workers) and of an image folder of
    photos (``ImageFolderDataModule``'s default workers), at the model's input size."""
    _, configured = method_and_data("clip", setting)
    shapes = ShapesDataModule(**{**configured.hparams, "train_size": 64 * (batches + 1)})
    shapes.setup("fit")
    side = shapes.hparams.image_size
    with tempfile.TemporaryDirectory(prefix="xvlm-bench-photos-") as folder:
        photos = ImageFolderDataModule(root=str(write_photo_folder(Path(folder))), image_size=side, batch_size=64)
        photos.setup("fit")
        return {f"Shapes (num_workers={shapes.hparams.num_workers})": loader_rate(shapes.train_dataloader(), batches),
                f"image folder, JPEG photos (num_workers={photos.hparams.num_workers})":
                    loader_rate(photos.train_dataloader(), batches)}


def resident_bytes(field: str = "VmRSS") -> int:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak(setting: Setting) -> int:
    """Reset the peak-memory mark of the device; return the memory in use now (bytes)."""
    if setting.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark back to the current resident size
    return resident_bytes()


def peak(setting: Setting) -> int:
    """The peak memory (bytes) since :func:`reset_peak`."""
    return torch.cuda.max_memory_allocated() if setting.device == "cuda" else resident_bytes("VmHWM")


def _step_memory(method: str, setting: Setting) -> tuple[int, int]:
    module, data = method_and_data(method, setting)
    run = hand_written_loop(module.to(setting.device).train(), batches_of(data), setting)
    before = reset_peak(setting)
    run(1)
    return before, peak(setting)


def peak_step_memory(method: str, setting: Setting) -> tuple[int, int]:
    """``(before, peak)`` bytes around two training steps of ``method`` at its config's batch, in a fresh process
    (module docstring)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_step_memory, method, setting).result()
