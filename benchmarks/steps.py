"""Training steps of every method: inside Lightning's ``Trainer`` against a hand-written loop on the same model,
data and optimiser, and CLIPFineTune against a plain open_clip loop.

- **Hand-written loop** (per method): move the batch to the device, the method's own loss (``losses(batch)["loss"]``,
  ``loss(batch)`` for CLIPFineTune), ``backward``, optimiser step, ``zero_grad``: what a user would write around
  the same model without a framework. The batch's targets are prepared on the host first, as the Trainer does.
- **Trainer**: ``Trainer.fit`` of the same module on the same batches (a CSV logger, ``log_every_n_steps=10``, no
  progress bar or checkpoints), timed from the start of the first timed batch to the end of the last, so the
  framework's loop, hooks, logging and learning-rate schedule are all inside.
- **Plain open_clip loop**: the same open_clip model trained with CLIP's loss against one prompt per seen class,
  tokenized once, ``model.encode_image`` / ``model.encode_text`` (normalised), cross-entropy: CLIPFineTune with
  ``symmetric=False`` computes the same loss.

Candidates run in alternating rounds (each round: every candidate for ``steps`` timed steps after one warm-up step);
a figure is the median over rounds of the mean step time. On a GPU every timed span starts and ends with
``torch.cuda.synchronize``.
"""

from __future__ import annotations

import importlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import open_clip
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from datamodules import ShapesDataModule
from datamodules.task import Task
from xvlm.methods import XVLMModule

CONFIGS = Path(__file__).parents[1] / "configs"
METHODS = ("clip", "lico", "svip", "msci", "ecor")


@dataclass
class Setting:
    """Where and how the benchmark runs: device, open_clip model name, Lightning precision, batches per round."""

    device: str
    model: str
    precision: str
    steps: int
    rounds: int

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def autocast(self) -> Any:
        """The autocast region of ``precision`` for the hand-written loops (none for ``32-true``)."""
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.precision)
        return torch.autocast(self.device, dtype=dtype, enabled=dtype is not None)


def method_and_data(method: str, setting: Setting, **overrides: Any) -> tuple[XVLMModule, ShapesDataModule]:
    """The module of ``configs/<method>/shapes.yaml`` on ``setting.model`` with random weights and its Shapes
    datamodule at the model's input size (the config's batch size)."""
    spec = yaml.safe_load((CONFIGS / method / "shapes.yaml").read_text())
    module_path, name = spec["model"]["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_path), name)
    module = cls(**{**spec["model"]["init_args"], "model": setting.model, "pretrained": None, **overrides})
    data_args = spec["data"]["init_args"]
    data = ShapesDataModule(**{**data_args, "image_size": module.input_side,
                               "train_size": 4 * data_args.get("batch_size", 64)})
    data.setup("fit")
    module.attach_task(data.task)
    return module, data


class FixedBatches(L.LightningDataModule):
    """A datamodule serving the same collated batches every epoch (the benchmark's data for the Trainer)."""

    def __init__(self, task: Task, batches: list[dict[str, Any]]) -> None:
        super().__init__()
        self.task, self.batches = task, batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, shuffle=False)


def batches_of(data: ShapesDataModule) -> list[dict[str, Any]]:
    """Every training batch of ``data`` (collated, on the host)."""
    return list(data.train_dataloader())


def cycle(batches: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    while True:
        yield from batches


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def loss_function(module: XVLMModule) -> Callable[[dict[str, Any]], torch.Tensor]:
    """The method's training loss of a batch: ``loss(batch)`` (CLIPFineTune) or ``losses(batch)["loss"]``."""
    return module.loss if hasattr(module, "loss") else (lambda batch: module.losses(batch)["loss"])


def hand_written_loop(module: XVLMModule, batches: list[dict[str, Any]], setting: Setting) -> Callable[[int], float]:
    """``run(steps) -> seconds``: one warm-up step, then ``steps`` timed steps of the hand-written loop."""
    optimizer = module.build_optimizer()
    loss_of = loss_function(module)
    prepared = [module.prepare_training_batch(batch) for batch in batches]
    stream = cycle(prepared)

    def step() -> None:
        batch = to_device(next(stream), setting.device)
        with setting.autocast():
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, setting)


def open_clip_loop(module: XVLMModule, batches: list[dict[str, Any]], setting: Setting) -> Callable[[int], float]:
    """The plain open_clip loop on ``module``'s CLIP model (module docstring)."""
    model = module.backbone.clip
    task = module.task
    tokenizer = open_clip.get_tokenizer(setting.model)
    tokens = tokenizer([module.templates[0].format(task.class_names[c]) for c in task.seen]).to(setting.device)
    position = {c: i for i, c in enumerate(task.seen)}
    data = [(b["image"], torch.tensor([position[int(c)] for c in b["label"]])) for b in batches]
    optimizer = module.build_optimizer()
    stream = cycle(data)

    def step() -> None:
        images, target = next(stream)
        images, target = images.to(setting.device, non_blocking=True), target.to(setting.device, non_blocking=True)
        with setting.autocast():
            image = model.encode_image(images, normalize=True)
            text = model.encode_text(tokens, normalize=True)
            loss = F.cross_entropy(model.logit_scale.exp() * image @ text.T, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, setting)


def timed_steps(step: Callable[[], None], setting: Setting) -> Callable[[int], float]:
    def run(steps: int) -> float:
        step()
        setting.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        setting.synchronize()
        return (time.perf_counter() - start) / steps

    return run


class _StepTimer(L.Callback):
    """Seconds per step from the start of the second step to the end of the last (the first warms up), across
    epoch ends."""

    def __init__(self, setting: Setting) -> None:
        self.setting, self.start, self.seconds = setting, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == 1 and not self.start:
            self.setting.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == trainer.max_steps:
            self.setting.synchronize()
            self.seconds = (time.perf_counter() - self.start) / (trainer.max_steps - 1)


def trainer_loop(module: XVLMModule, batches: list[dict[str, Any]], setting: Setting) -> Callable[[int], float]:
    """``run(steps) -> seconds``: ``Trainer.fit`` of ``module`` for one warm-up and ``steps`` timed steps."""
    data = FixedBatches(module.task, batches)
    logs = tempfile.mkdtemp(prefix="xvlm-bench-")

    def run(steps: int) -> float:
        timer = _StepTimer(setting)
        trainer = L.Trainer(accelerator=setting.device, devices=1, precision=setting.precision, max_steps=steps + 1,
                            logger=CSVLogger(logs), log_every_n_steps=10, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=[timer])
        trainer.fit(module, data)
        return timer.seconds

    return run


def alternating_medians(candidates: dict[str, Callable[[int], float]], setting: Setting) -> dict[str, float]:
    """Median over ``setting.rounds`` rounds of each candidate's seconds per step, the candidates in turn."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(setting.rounds):
        for name, run in candidates.items():
            times[name].append(run(setting.steps))
    return {name: statistics.median(values) for name, values in times.items()}


@dataclass
class StepRow:
    """One method's step times: the hand-written loop, the Trainer, and their ratio (plain / Trainer)."""

    method: str
    batch: int
    plain: float
    trainer: float

    @property
    def ratio(self) -> float:
        return self.plain / self.trainer


def method_steps(setting: Setting, methods: tuple[str, ...] = METHODS) -> list[StepRow]:
    """Every method's hand-written and Trainer step times (module docstring)."""
    rows = []
    for method in methods:
        module, data = method_and_data(method, setting)
        batches = batches_of(data)
        module.to(setting.device).train()
        medians = alternating_medians({"plain": hand_written_loop(module, batches, setting),
                                       "trainer": trainer_loop(module, batches, setting)}, setting)
        rows.append(StepRow(method, len(batches[0]["label"]), medians["plain"], medians["trainer"]))
        del module
    return rows


def clip_against_open_clip(setting: Setting) -> dict[str, float]:
    """Seconds per step of the plain open_clip loop, of CLIPFineTune's loss in the hand-written loop and of
    CLIPFineTune in the Trainer, all with ``symmetric=False`` and one template."""
    module, data = method_and_data("clip", setting, symmetric=False)
    batches = batches_of(data)
    module.to(setting.device).train()
    return alternating_medians({"open_clip loop": open_clip_loop(module, batches, setting),
                                "CLIPFineTune.loss loop": hand_written_loop(module, batches, setting),
                                "CLIPFineTune in the Trainer": trainer_loop(module, batches, setting)}, setting)


def step_profile(method: str, setting: Setting, rows: int = 12) -> str:
    """``torch.profiler`` table (top ``rows`` operators by self time) of three hand-written steps of ``method``."""
    module, data = method_and_data(method, setting)
    run = hand_written_loop(module.to(setting.device).train(), batches_of(data), setting)
    run(1)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if setting.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        run(3)
    key = "self_device_time_total" if setting.device == "cuda" else "self_cpu_time_total"
    return profile.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48)


def gpu_busy_share(method: str, setting: Setting, compiled: bool = True) -> float:
    """Kernel time over wall time of five hand-written steps of ``method`` (its towers compiled when ``compiled``);
    GPU only."""
    module, data = method_and_data(method, setting, compile=compiled)
    run = hand_written_loop(module.to(setting.device).train(), batches_of(data), setting)
    run(3)  # compiles
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        start = time.perf_counter()
        run(5)
        wall = time.perf_counter() - start
    kernels = [event for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    return sum(event.time_range.elapsed_us() for event in kernels) / 1e6 / wall
