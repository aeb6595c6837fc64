"""``PredictionWriter``: what ``xvlm predict`` writes — one row per image to a CSV or JSONL file and, with
``explain``, the explanation PNGs beside it.

A row holds, in this order (CSV columns, JSON keys):

- ``index``: the sample's position in the predicted split's dataset; ``path``: its file, when the batch names
  files (the ``predict_dir`` folder of :class:`datamodules.ImageFolderDataModule`); ``label``: the true class, when
  the batch has labels;
- ``class_1``, ``prob_1``, ..., ``class_k``, ``prob_k``: the ``top_k`` classes of ``softmax(classify(x))`` over the
  task's classes with their probabilities (so they sum to at most 1);
- ``seen``: whether ``class_1`` is a seen class of the task (one the module was trained on);
- ``top_<group>``, ``top_<group>_score``: the method's explanation summary, the best entry of every ranking its
  ``explain`` returns (:func:`xvlm.explain.render.top_ranked`: ECOR's rationales and pairs, SVIP's attributes,
  MSCI's pairs, states and objects). Whether the method has rankings is read from the explanation of the first
  image; a method without any (CLIP fine-tuning, LICO: a saliency map only) is not explained further unless PNGs
  are asked for. ``summary: false`` skips even that (an explanation runs the method's explainer, integrated
  gradients by default).

Unreadable images follow the datamodule's ``on_bad_image``: ``error`` stops prediction with an error naming the
file, ``skip`` leaves them out (no row; the dataset warns, naming the file).

Several processes (DDP): every rank keeps the rows of its own share; at the end of the epoch each rank writes them
to ``<file>.rank<r>.jsonl``, all ranks wait, and rank 0 merges the parts into the file (by ``index``, one row per
index: a sample the loader served twice is written once) and deletes them, so no two ranks write the same file.
Each PNG is written to a temporary file and renamed into place (a sample two ranks saw still leaves one whole file).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from matplotlib.figure import Figure

from datamodules.task import Task
from xvlm.checkpointing import _umask
from xvlm.contracts import ExplainableModule
from xvlm.explain.gallery import explain_batch, render_explained
from xvlm.explain.render import per_sample_entries, sample_explanation, save_figure, top_ranked

FORMATS = (".csv", ".jsonl")
"""File suffixes the writer knows: CSV with a header row, or one JSON object per line."""


def prediction_rows(logits: torch.Tensor, batch: dict[str, Any], task: Task, top_k: int) -> list[dict[str, Any]]:
    """The rows of one batch (module docstring) without the explanation summary.

    Args:
        logits: ``[B, C]`` class scores (``classify``), any real values (``-inf`` for classes a head never scores).
        batch: with ``index [B]``, and ``path`` (``B`` file names) and ``label [B]`` when known.
        task: the label space (class names, seen classes).
        top_k: classes per row (at most ``C``).
    """
    probabilities = logits.detach().float().softmax(dim=1).cpu()
    top = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
    names, seen = task.class_names, set(task.seen)
    rows = []
    for b, (values, classes) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
        row: dict[str, Any] = {"index": int(batch["index"][b])}
        if "path" in batch:
            row["path"] = str(batch["path"][b])
        if "label" in batch:
            row["label"] = names[int(batch["label"][b])]
        for rank, (value, c) in enumerate(zip(values, classes), start=1):
            row[f"class_{rank}"], row[f"prob_{rank}"] = names[c], value
        row["seen"] = classes[0] in seen
        rows.append(row)
    return rows


def summary_columns(explanation: dict[str, Any]) -> dict[str, Any]:
    """``top_<group>`` and ``top_<group>_score`` of one sample's explanation
    (:func:`~xvlm.explain.render.top_ranked`)."""
    columns: dict[str, Any] = {}
    for group, (name, score) in top_ranked(explanation).items():
        columns[f"top_{group}"], columns[f"top_{group}_score"] = name, score
    return columns


def unique_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` in ``index`` order, the first row of each index only."""
    first: dict[int, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(int(row["index"]), row)
    return [first[index] for index in sorted(first)]


def _replace_atomically(path: Path, write: Any) -> None:
    """``write(temporary_path)`` in ``path``'s folder, then rename it to ``path`` (with the permissions of any new
    file: ``mkstemp`` makes it private)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` to ``path`` (replaced atomically): CSV (columns in first-seen order) or JSONL, by suffix."""
    path = Path(path)

    def write(target: Path) -> None:
        with target.open("w", newline="", encoding="utf-8") as file:
            if path.suffix == ".jsonl":
                file.writelines(json.dumps(row) + "\n" for row in rows)
                return
            columns = list(dict.fromkeys(key for row in rows for key in row))
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    _replace_atomically(path, write)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def _explain(module: ExplainableModule, batch: dict[str, Any]) -> dict[str, Any]:
    """The module's explanation of ``batch`` (:func:`~xvlm.explain.gallery.explain_batch`) from copies of its tensors:
    the prediction loop makes inference tensors, which explainers cannot differentiate through."""
    with torch.inference_mode(False):
        batch = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    return explain_batch(module, batch)


class PredictionWriter(BasePredictionWriter):
    """Writes ``xvlm predict``'s rows and explanation PNGs (module docstring).

    Args:
        path: the ``.csv`` or ``.jsonl`` file; None writes ``predictions.csv`` into the trainer's log folder
            (``<log_dir>/<run>/csv/version_N/`` under the ``xvlm`` CLI).
        top_k: classes per row.
        explain: also render every image's explanation (the module's ``explain``, as ``xvlm explain`` draws it)
            into ``<file stem>_explanations/`` beside the file, one PNG per image named by its index (and file).
        summary: add the explanation summary columns (module docstring).
    """

    def __init__(self, path: str | None = None, top_k: int = 5, explain: bool = False, summary: bool = True) -> None:
        super().__init__(write_interval="batch")
        if path is not None and Path(path).suffix not in FORMATS:
            raise ValueError(f"PredictionWriter(path={path!r}): write a {' or a '.join(FORMATS)} file")
        if top_k < 1:
            raise ValueError(f"PredictionWriter(top_k={top_k}): give at least 1")
        self.path, self.top_k, self.explain, self.summary = path, top_k, explain, summary
        self._rows: list[dict[str, Any]] = []
        self._ranked: bool | None = None

    @property
    def explanation_dir(self) -> Path:
        """Where the PNGs go: ``<file stem>_explanations/`` beside the file."""
        path = Path(self.path)
        return path.with_name(f"{path.stem}_explanations")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "predict" and self.path is None:
            self.path = str(Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv")

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: ExplainableModule, prediction: dict[str, Any],
                           batch_indices: Sequence[int] | None, batch: dict[str, Any], batch_idx: int,
                           dataloader_idx: int) -> None:
        rows = prediction_rows(prediction["logits"], batch, pl_module.task, self.top_k)
        if self.summary and self._ranked is None:  # does the method rank anything? Ask about one image
            first = {key: value[:1] for key, value in per_sample_entries(batch).items()}
            self._ranked = bool(summary_columns(sample_explanation(_explain(pl_module, first), 0)))
        if self.explain or (self.summary and self._ranked):
            explanation = _explain(pl_module, batch)
            if self.summary and self._ranked:
                rows = [row | summary_columns(sample_explanation(explanation, i)) for i, row in enumerate(rows)]
            if self.explain:
                names = [f"{row['index']:05d}_{Path(row['path']).stem if 'path' in row else 'predict'}" for row in rows]
                for name, figure in zip(names, render_explained(batch, explanation, names,
                                                                pl_module.task.class_names)):
                    self._save(figure, self.explanation_dir / f"{name}.png")
        self._rows += rows

    @staticmethod
    def _save(figure: Figure, path: Path) -> None:
        _replace_atomically(path, lambda target: save_figure(figure, target))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.path)
        rows = self._rows
        if trainer.world_size > 1:
            parts = [path.with_name(f"{path.name}.rank{rank}.jsonl") for rank in range(trainer.world_size)]
            write_rows(parts[trainer.global_rank], rows)
            trainer.strategy.barrier("PredictionWriter")
            if not trainer.is_global_zero:
                return
            rows = [row for part in parts for row in read_jsonl(part)]
            for part in parts:
                part.unlink()
        rows = unique_rows(rows)
        write_rows(path, rows)
        print(f"Predictions: {path} ({len(rows)} images)" + (f"; explanations: {self.explanation_dir}/"
                                                              if self.explain else ""))
