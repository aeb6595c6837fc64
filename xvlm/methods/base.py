"""Behaviour every xvlm ``LightningModule`` shares.

- Builds a :class:`~xvlm.backbones.VisionLanguageModel` from flat, CLI-visible arguments; ``init_weights`` starts
  from another run's or open_clip's weights without taking over that run's settings (``ckpt_path`` is for
  resuming the same run only).
- Reads the datamodule's :class:`~datamodules.task.Task` in ``setup``.
- Validation/test: zero-shot logits of every class from its prompt(s), scored with :class:`GZSLMetrics`
  (``val/S``, ``val/U``, ``val/H``, ``val/zsl``, ``val/seen_top1``).
- Checkpoints record the module class (a checkpoint of another class is refused) and the RNG states (resumed
  runs continue the same random stream).
- AdamW (or SGD) without weight decay on gains, biases and embeddings; linear warm-up then cosine decay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F

from datamodules.task import Task
from xvlm.backbones import Freeze, VisionLanguageModel
from xvlm.checkpointing import (
    CLASS_KEY,
    RNG_KEY,
    capture_rng_state,
    check_checkpoint_class,
    class_path,
    load_weights,
    restore_rng_state,
)
from xvlm.metrics import GZSLMetrics

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class XVLMModule(L.LightningModule):
    """Base class of the methods; see the module docstring.

    Args:
        model: open_clip architecture name.
        pretrained: weights source (see :mod:`xvlm.backbones`).
        freeze: tower(s) kept fixed: none, image, text, all.
        input_size: image side the backbone takes (positional embeddings are resized); ``None`` keeps the
            architecture's. Named apart from the datamodule's ``image_size``, whose value Lightning would
            otherwise have to merge with this one in the logged hyper-parameters.
        init_weights: checkpoint or state dict whose matching tensors initialise this module.
        templates: prompt templates for class names; class text features average over them.
        lr: peak learning rate.
        weight_decay: weight decay (matrices only).
        optimizer: ``adamw`` or ``sgd`` (Nesterov-free SGD with ``momentum``, the recipe of CNN classifiers).
        momentum: SGD momentum.
        warmup_steps: linear warm-up steps before cosine decay.
    """

    def __init__(
        self,
        model: str = "xvlm-tiny",
        pretrained: str | None = "shapes",
        freeze: Freeze = "none",
        input_size: int | None = None,
        init_weights: str | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        lr: float = 1e-4,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = VisionLanguageModel(model, pretrained, freeze, input_size)
        if init_weights is not None:
            load_weights(self, init_weights)
        self.templates = tuple(templates)
        self.task: Task | None = None
        self.val_metrics: GZSLMetrics | None = None
        self.test_metrics: GZSLMetrics | None = None
        self._class_text: torch.Tensor | None = None

    @property
    def input_side(self) -> int:
        """Side in pixels of the images the module takes (``input_size``, else the backbone's)."""
        return self.hparams.input_size or self.backbone.image_size

    # ----------------------------------------------------------------- contracts
    def zero_shot_encoder(self) -> VisionLanguageModel:
        """The image and text towers as they are now (contract 3 of DESIGN.md)."""
        return self.backbone

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, C]`` of images ``[B, 3, H, W]`` over the task's classes (what saliency is scored on).

        Here the zero-shot logits ``τ · f(x) g(T)ᵀ`` against every class prompt; a method with its own classifier
        head overrides this. Differentiable, so saliency methods can back-propagate through it.
        """
        return self.backbone.logit_scale.exp() * self.backbone.encode_image(images) @ self._text_for_scoring().T

    def _text_for_scoring(self) -> torch.Tensor:
        """The class text features cached for this evaluation epoch, or freshly encoded outside one ``[C, D]``."""
        return self._class_text if self._class_text is not None else self.class_text_features()

    def explain(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Patch–class similarity map of the predicted class (contract 4).

        ``saliency [B, H, W]`` = cosine between each projected patch token and the predicted class's text
        feature, min–max normalised per image and upsampled bilinearly; ``predicted [B]``; ``logits [B, C]``.
        """
        images = batch["image"]
        text = self._text_for_scoring()
        logits = self.classify(images)
        predicted = logits.argmax(dim=1)
        tokens = self.backbone.encode_image_tokens(images, layers=1)
        patches = self.backbone.project_tokens(tokens.patches[-1])
        sim = torch.einsum("bnd,bd->bn", patches, text[predicted]).view(-1, 1, *tokens.grid)
        low = sim.amin(dim=(2, 3), keepdim=True)
        high = sim.amax(dim=(2, 3), keepdim=True)
        sim = (sim - low) / (high - low).clamp_min(1e-8)
        saliency = F.interpolate(sim, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return {"saliency": saliency, "predicted": predicted, "logits": logits}

    # ----------------------------------------------------------------- task and text
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        task = getattr(datamodule, "task", None)
        if not isinstance(task, Task):
            raise ValueError(f"{type(self).__name__} needs a datamodule that publishes a Task (datamodule.task); "
                             f"got {type(datamodule).__name__}")
        self.attach_task(task)

    def attach_task(self, task: Task) -> None:
        """Take ``task``'s label space: class names for prompts, the GZSL metrics of its seen/unseen split and the
        buffers ``seen_classes [C_seen]`` and ``seen_position [C]`` (a class's index among the seen ones, or −1).

        ``setup`` calls it with the datamodule's task; call it directly to use a module without a ``Trainer``
        (``xvlm explain``). A method that builds task-dependent parts overrides this (calling ``super()``) rather
        than ``setup``, so that they exist before a checkpoint's weights are loaded either way.
        """
        self.task = task
        self.val_metrics = GZSLMetrics(task.num_classes, task.seen, task.unseen)
        self.test_metrics = GZSLMetrics(task.num_classes, task.seen, task.unseen)
        device = self.backbone.logit_scale.device
        seen = torch.as_tensor(task.seen, dtype=torch.long, device=device)
        position = torch.full((task.num_classes,), -1, dtype=torch.long, device=device)
        position[seen] = torch.arange(len(seen), device=device)
        self.register_buffer("seen_classes", seen, persistent=False)
        self.register_buffer("seen_position", position, persistent=False)

    def seen_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Position ``[B]`` of each label among the task's seen classes (the target over seen-class outputs).

        Raises:
            ValueError: a label is an unseen class (the datamodule leaks held-out classes into training).
        """
        target = self.seen_position[labels]
        if bool((target < 0).any()):
            raise ValueError("a training batch holds an unseen class; the datamodule leaks held-out classes")
        return target

    def class_prompts(self, template: str, classes: Sequence[int] | None = None) -> list[str]:
        """``template.format(name)`` for each class (all classes when ``classes`` is None)."""
        names = self.task.class_names
        indices = range(len(names)) if classes is None else classes
        return [template.format(names[i]) for i in indices]

    def class_text_features(self, classes: Sequence[int] | None = None) -> torch.Tensor:
        """Unit-norm class embeddings ``[C, D]``: the mean over templates of the prompt features, renormalised."""
        feats = torch.stack([self.backbone.encode_texts(self.class_prompts(t, classes)) for t in self.templates])
        return F.normalize(feats.mean(dim=0), dim=-1)

    # ----------------------------------------------------------------- evaluation
    def on_train_start(self) -> None:
        self.val_metrics.reset()

    def on_validation_epoch_start(self) -> None:
        with torch.no_grad():
            self._class_text = self.class_text_features()

    on_test_epoch_start = on_validation_epoch_start

    def zero_shot_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` cosine logits against the cached class text features."""
        return self.backbone.encode_image(images) @ self._class_text.T

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val_metrics.update(self.zero_shot_logits(batch["image"]), batch["label"])

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.test_metrics.update(self.zero_shot_logits(batch["image"]), batch["label"])

    def _log_metrics(self, metric: GZSLMetrics, prefix: str) -> None:
        values = {f"{prefix}/{k}": v for k, v in metric.compute().items()}
        self.log_dict(values, prog_bar=True)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        if self._class_text is None:
            self.on_validation_epoch_start()
        logits = self.zero_shot_logits(batch["image"])
        return {"index": batch["index"], "prediction": logits.argmax(dim=1), "logits": logits}

    # ----------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters in two optimiser groups: matrices with weight decay, the rest without."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            is_gain = param.ndim < 2 or "embedding" in name or "logit_scale" in name
            (no_decay if is_gain else decay).append(param)
        return [{"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.parameter_groups()
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total // 2)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CLASS_KEY] = class_path(self)
        checkpoint[RNG_KEY] = capture_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_class(checkpoint, class_path(self))
        if RNG_KEY in checkpoint:
            restore_rng_state(checkpoint[RNG_KEY])
