"""The template every xvlm method fills in: the parts a method shares live here once.

- **Backbone**: builds a :class:`~xvlm.backbones.VisionLanguageModel` from flat, CLI-visible arguments (open_clip
  architecture and weights, or a timm image tower with ``image_encoder='timm:<name>'``). Methods never
  re-declare these arguments (except to give one another default); they take their own and pass ``**kwargs`` on.
- **Task**: ``setup`` reads the datamodule's :class:`~datamodules.task.Task` and calls :meth:`XVLMModule.attach_task`,
  which builds the metrics, then the method's task-dependent parts (:meth:`XVLMModule.build_task_parts`, the hook a
  method overrides), then loads ``init_weights`` once, so the weights land in parts that exist.
- **One evaluation path**: validation, test, predict and saliency all score :meth:`XVLMModule.classify`
  (``[B, C]`` logits over the task's classes). The default is the zero-shot head ``τ · f(x) g(T)ᵀ`` against the
  class prompts; a method with its own classifier overrides ``classify``. :class:`~xvlm.metrics.GZSLMetrics`
  gives ``val/S``, ``val/U``, ``val/H``, ``val/zsl``, ``val/seen_top1``. A closed-set classifier
  (``classifies_unseen = False``) is scored on images of seen classes only and also logs ``val/acc``.
- **Calibrated stacking** (a task with seen and unseen classes): after each validation epoch the calibration ``γ``
  with the highest H on the validation split is chosen (:func:`xvlm.metrics.choose_calibration`, over every
  process's samples) and logged with the calibrated ``val/S_cal``, ``val/U_cal``, ``val/H_cal`` as
  ``val/calibration``; it is stored in checkpoints and applied to the test split (``test/S_cal``, ...), which never
  chooses anything. ``calibration: <float>`` fixes it instead (the value a validation-protocol run chose, for a
  final run whose validation data are the test data: such a task says so, and then a chosen calibration is refused).
- **Explanation**: :meth:`XVLMModule.explain` is the registry explainer named by ``explainer`` (default: the
  method's class attribute ``default_explainer``) on :meth:`XVLMModule.classify` (:mod:`xvlm.explain.explainers`).
- **Optimisation**: AdamW (or Adam or SGD) without weight decay on gains, biases and embeddings; the parts a method adds
  (heads, prompts, adapters) may get their own learning rate ``head_lr``; linear warm-up then cosine decay.
- **Checkpoints** record the module class (a checkpoint of another class is refused) and the RNG states (resumed
  runs continue the same random stream). ``init_weights`` starts from another run's or open_clip's weights without
  taking over that run's settings (``ckpt_path`` is for resuming the same run only).
"""

from __future__ import annotations

import math
import warnings
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
from xvlm.explain.explainers import check_explainer, explain_with, get_explainer
from xvlm.metrics import GZSLMetrics
from xvlm.prompts import ClassPromptTokens

# XVLMModule prepares training batches on the host (on_before_batch_transfer); Lightning warns about every module
# that does so with a datamodule, although it then calls the module's hook as intended.
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule`")

DEFAULT_TEMPLATES = ("a photo of a {}.",)
CALIBRATION_KEY = "xvlm_gzsl_calibration"
"""Checkpoint entry of the calibrated-stacking ``γ`` chosen on validation (None before any validation epoch)."""


class XVLMModule(L.LightningModule):
    """Base class of the methods; see the module docstring.

    Args:
        model: open_clip architecture name (its text tower always; its image tower with ``image_encoder='clip'``), or
            ``hf-hub:<org>/<repo>`` / ``local-dir:<folder>``, which bring their own weights.
        pretrained: weights source of ``model`` (see :mod:`xvlm.backbones`); ``auto``: ``shapes`` for the project's
            architectures, none for ``hf-hub:``/``local-dir:`` names (setting it with those is an error).
        freeze: tower(s) kept fixed: none, image, text, all.
        input_size: image side the backbone takes (positional embeddings are resized); ``None`` keeps the
            architecture's. Named apart from the datamodule's ``image_size``, whose value Lightning would
            otherwise have to merge with this one in the logged hyper-parameters.
        image_encoder: ``clip`` (the image tower of ``model``) or ``timm:<name>`` (a timm model's feature maps;
            not text-aligned, so no zero-shot scoring).
        encoder_weights: weights of a timm image encoder: ``None``, ``hub`` or a local file.
        encoder_kwargs: extra ``timm.create_model`` arguments.
        init_weights: checkpoint or state dict whose matching tensors initialise this module (loaded once the
            method's task-dependent parts exist).
        templates: prompt templates for class names; class text features average over them.
        lr: peak learning rate of the backbone's own weights.
        head_lr: peak learning rate of the parts the method adds (heads, prompts, adapters, temperatures);
            ``None`` uses ``lr``.
        weight_decay: weight decay (matrices only).
        warmup_steps: linear warm-up steps before cosine decay.
        optimizer: ``adamw``, ``adam`` (L2 weight decay) or ``sgd`` (Nesterov-free SGD with ``momentum``, the recipe
            of CNN classifiers).
        momentum: SGD momentum.
        explainer: the explainer of :meth:`explain` (a name of :data:`xvlm.explain.explainers.EXPLAINERS`);
            ``None`` uses the method's :attr:`default_explainer`.
        calibration: ``validation`` (choose the calibrated-stacking ``γ`` on the validation split after every
            validation epoch) or a fixed ``γ`` (module docstring).
        compile: ``torch.compile`` the towers' blocks (:meth:`~xvlm.backbones.VisionLanguageModel.compile_blocks`)
            once the task's parts exist: ``true`` with torch's defaults, or the options of ``torch.compile``
            (``{mode: max-autotune}``, ``{backend: eager}``, ...). Checkpoints are unchanged.
        fused_optimizer: the optimiser's fused kernels (one launch for all parameters); ``None``: on when the
            parameters are on a GPU.
    """

    #: Whether :meth:`classify` scores unseen classes (zero-shot heads do; a classifier over seen classes does not,
    #: and is then evaluated on images of seen classes only).
    classifies_unseen: bool = True
    #: The explainer of :meth:`explain` when ``explainer`` is not given (a registry name). Integrated gradients of
    #: the module's own decision: on the Shapes explanation benchmark (``docs/explanations.md``) it puts its peak
    #: on the object for every image and the most mass inside it, with the lowest deletion AUC, for CLIPFineTune and
    #: LICO alike, where the former defaults (patch–prompt, Grad-CAM) point at the background; it needs only
    #: gradients, so it serves every tower. ``input_x_gradient`` is 5-10x cheaper and nearly as well placed.
    default_explainer: str = "integrated_gradients"
    #: Whether checkpoints hold the frozen backbone's parameters. A method on a frozen tower sets it False: with
    #: ``pretrained`` weights its checkpoints then hold the trainable parameters and the buffers only, and the frozen
    #: ones are rebuilt from ``model`` and ``pretrained`` when a checkpoint is loaded (:meth:`full_state_dict`).
    stores_frozen_weights: bool = True

    def __init__(
        self,
        model: str = "xvlm-tiny",
        pretrained: str | None = "auto",
        freeze: Freeze = "none",
        input_size: int | None = None,
        image_encoder: str = "clip",
        encoder_weights: str | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        init_weights: str | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        lr: float = 1e-4,
        head_lr: float | None = None,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        momentum: float = 0.9,
        explainer: str | None = None,
        calibration: float | Literal["validation"] = "validation",
        compile: bool | dict[str, Any] = False,
        fused_optimizer: bool | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer={optimizer!r}: choose 'adamw', 'adam' or 'sgd'")
        if isinstance(calibration, str) and calibration != "validation":
            raise ValueError(f"calibration={calibration!r}: choose 'validation' (chosen on the validation split) "
                             f"or a number (a fixed calibration)")
        self.gzsl_calibration: float | None = None if calibration == "validation" else float(calibration)
        """The calibrated-stacking ``γ`` applied to test: chosen on the last validation epoch, or fixed."""
        self.explainer_name = explainer or self.default_explainer
        get_explainer(self.explainer_name)  # an unknown name fails here, listing the choices
        self.save_hyperparameters()
        self.backbone = VisionLanguageModel(model, pretrained, freeze, input_size, image_encoder=image_encoder,
                                            encoder_weights=encoder_weights, encoder_kwargs=encoder_kwargs)
        self.templates = tuple(templates)
        self.task: Task | None = None
        self.val_metrics: GZSLMetrics | None = None
        self.test_metrics: GZSLMetrics | None = None
        self._class_text: torch.Tensor | None = None
        self._prompt_tokens: ClassPromptTokens | None = None
        self._host_seen_position: torch.Tensor | None = None
        self._init_weights_loaded = False
        self._towers_compiled = False
        self._frozen_clip: VisionLanguageModel | None = None
        check_explainer(self.explainer_name, self)  # ... and one the image tower cannot serve

    @property
    def input_side(self) -> int:
        """Side in pixels of the images the module takes (``input_size``, else the backbone's)."""
        return self.hparams.input_size or self.backbone.image_size

    # ----------------------------------------------------------------- contracts (xvlm.contracts.ExplainableModule)
    def zero_shot_encoder(self) -> VisionLanguageModel:
        """The towers LaZSL scores with (contract 3 of DESIGN.md): the current CLIP towers, or with a timm image
        encoder the frozen CLIP of ``model`` and ``pretrained``.

        A timm encoder has no text-aligned image embedding, so LaZSL runs on the frozen CLIP (both towers,
        ``requires_grad=False``), whose numbers then stay constant across epochs. It is built on first use and held
        outside the module tree (``model`` and ``pretrained`` define it, so it is neither trained nor checkpointed),
        and moved to the device and dtype of the module's own towers on every call.
        """
        if self.backbone.text_aligned_images:
            return self.backbone
        with torch.inference_mode(False):  # first use may come inside a validation loop
            if self._frozen_clip is None:
                clip = VisionLanguageModel(self.hparams.model, self.hparams.pretrained, freeze="all").eval()
                self.__dict__["_frozen_clip"] = clip  # a plain attribute: not a submodule
            own = self.backbone.logit_scale
            return self._frozen_clip.to(device=own.device, dtype=own.dtype)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, C]`` of images ``[B, 3, H, W]`` over the task's classes: the one evaluation path
        (validation, test, predict, saliency metrics).

        Here the zero-shot logits ``τ · f(x) g(T)ᵀ`` against every class prompt; a method with its own classifier
        head overrides this. Differentiable in the images, so saliency methods can back-propagate through it.
        """
        return self.backbone.logit_scale.exp() * self.backbone.encode_image(images) @ self._text_for_scoring().T

    def _text_for_scoring(self) -> torch.Tensor:
        """Class text features ``[C, D]``, encoded once per evaluation epoch without gradients.

        They are made outside inference mode, so that saliency methods may back-propagate through
        :meth:`classify` to the images after validation. The cache is dropped when an epoch starts.
        """
        if self._class_text is None:
            with torch.inference_mode(False), torch.no_grad():
                self._class_text = self.class_text_features()
        return self._class_text

    def _drop_class_text(self) -> None:
        self._class_text = None

    on_train_epoch_start = on_validation_epoch_start = on_test_epoch_start = on_predict_epoch_start = _drop_class_text

    def explain(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Saliency of the predicted class by the module's explainer (contract 4): ``saliency [B, H, W]``,
        ``predicted [B]``, ``logits [B, C]`` (:func:`xvlm.explain.explainers.explain_with` with
        :attr:`explainer_name`)."""
        return explain_with(self, batch, self.explainer_name)

    # ----------------------------------------------------------------- task and text
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        task = getattr(datamodule, "task", None)
        if not isinstance(task, Task):
            raise ValueError(f"{type(self).__name__} needs a datamodule that publishes a Task (datamodule.task); "
                             f"got {type(datamodule).__name__}")
        self.attach_task(task)

    def attach_task(self, task: Task) -> None:
        """Take ``task``'s label space, then build the method's parts for it and load ``init_weights`` (once).

        Sets the GZSL metrics of the task's seen/unseen split (unseen classes only when :attr:`classifies_unseen`)
        and the buffers ``seen_classes [C_seen]`` and ``seen_position [C]`` (a class's index among the seen ones,
        or −1), calls :meth:`build_task_parts` (its random initialisation seeded by ``torch.initial_seed()``, the
        run's seed, whatever drew from the generator before), and loads ``init_weights`` the first time. ``setup`` calls it with
        the datamodule's task; call it directly to use a module without a ``Trainer`` (``xvlm explain``), so that
        the task-dependent parts exist before a checkpoint's weights are loaded either way.
        """
        self.task = task
        self._prompt_tokens = None
        unseen = task.unseen if self.classifies_unseen else ()
        calibrating = bool(task.seen) and bool(unseen)
        if calibrating and self.hparams.calibration == "validation" and task.extras.get("validates_on_test"):
            raise ValueError(f"{task.source} validates on its test images, so calibration='validation' would choose "
                             f"the calibration on test data: pass the val/calibration of a run on the validation "
                             f"protocol as calibration: <value>")
        self.val_metrics = GZSLMetrics(task.num_classes, task.seen, unseen, keep_scores=calibrating)
        self.test_metrics = GZSLMetrics(task.num_classes, task.seen, unseen, keep_scores=calibrating)
        device = self.backbone.logit_scale.device
        seen = torch.as_tensor(task.seen, dtype=torch.long)
        position = torch.full((task.num_classes,), -1, dtype=torch.long)
        position[seen] = torch.arange(len(seen))
        self._host_seen_position = position  # for labels still on the host: prepare_training_batch copies nothing
        self.register_buffer("seen_classes", seen.to(device), persistent=False)
        self.register_buffer("seen_position", position.to(device), persistent=False)
        # seeded by the run's seed alone: Lightning's set-up (DDP's process group, the sampler) draws from torch's
        # generator before this point, so a head built from its current state would differ with the process count
        with torch.random.fork_rng(devices=[]):  # the CPU generator (parameters are built on the CPU), restored after
            torch.default_generator.manual_seed(torch.initial_seed())
            self.build_task_parts(task)
        if self.hparams.init_weights is not None and not self._init_weights_loaded:
            load_weights(self, self.hparams.init_weights)
            self._init_weights_loaded = True
        if self.hparams.compile and not self._towers_compiled:
            options = self.hparams.compile if isinstance(self.hparams.compile, dict) else {}
            self.backbone.compile_blocks(**options)
            self._towers_compiled = True

    def build_task_parts(self, task: Task) -> None:
        """Hook: build the parts whose shape depends on the task (heads over its classes, prompts of its names).

        Called by :meth:`attach_task` every time a task is attached; build once and check that a later task fits.
        Parts built here are on the backbone's device and get ``head_lr``. The base has none.
        """

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """In training, add the batch's targets and classes (:meth:`prepare_training_batch`) while its labels are
        still on the host, so that the step on the device reads nothing back."""
        if self._trainer is not None and self.trainer.training and isinstance(batch, dict) and "label" in batch:
            return self.prepare_training_batch(batch)
        return batch

    def prepare_training_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with ``seen_target [B]`` (each label's position among the seen classes), ``seen_present [K]``
        (the sorted positions present) and ``seen_present_index [B]`` (each sample's row of ``seen_present``),
        computed from the labels where they are (on the host, before the batch goes to the device).

        Raises:
            ValueError: a label is an unseen class (the datamodule leaks held-out classes into training).
        """
        labels = batch["label"]
        target = (self._host_seen_position if labels.device.type == "cpu" else self.seen_position)[labels]
        if bool((target < 0).any()):
            raise ValueError("a training batch holds an unseen class; the datamodule leaks held-out classes")
        present, index = target.unique(return_inverse=True)
        return {**batch, "seen_target": target, "seen_present": present, "seen_present_index": index}

    def seen_targets(self, batch: dict[str, Any]) -> torch.Tensor:
        """Position ``[B]`` of each label among the task's seen classes (the target over seen-class outputs):
        ``batch["seen_target"]`` (:meth:`prepare_training_batch`), made here from the labels when the batch did not
        come through a Trainer (which reads a flag back from the device).

        Raises:
            ValueError: a label is an unseen class (the datamodule leaks held-out classes into training).
        """
        if "seen_target" not in batch:
            batch = self.prepare_training_batch(batch)
        return batch["seen_target"]

    def seen_classes_present(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(present [K], index [B])``: the sorted seen-class positions in the batch and each sample's row of
        them (:meth:`prepare_training_batch`; made here when the batch did not come through a Trainer)."""
        if "seen_present" not in batch:
            batch = self.prepare_training_batch(batch)
        return batch["seen_present"], batch["seen_present_index"]

    def prompt_tokens(self) -> ClassPromptTokens:
        """Token ids of every template × class prompt of the task (:class:`~xvlm.prompts.ClassPromptTokens`),
        made on first use after the task is attached and kept on the module's device."""
        if self._prompt_tokens is None:
            self._prompt_tokens = ClassPromptTokens(self.backbone, [self.class_prompts(t) for t in self.templates])
        return self._prompt_tokens.to(self.backbone.logit_scale.device)

    def class_prompts(self, template: str, classes: Sequence[int] | None = None) -> list[str]:
        """``template.format(name)`` for each class (all classes when ``classes`` is None)."""
        names = self.task.class_names
        indices = range(len(names)) if classes is None else classes
        return [template.format(names[i]) for i in indices]

    def class_text_features(self, classes: Sequence[int] | None = None) -> torch.Tensor:
        """Unit-norm class embeddings ``[C, D]``: the mean over templates of the prompt features, renormalised."""
        tokens, device = self.prompt_tokens(), self.backbone.logit_scale.device
        chosen = torch.arange(self.task.num_classes) if classes is None else torch.as_tensor(classes)
        chosen = chosen.to(device=device, dtype=torch.long)
        feats = torch.stack([tokens.encode(self.backbone, torch.full_like(chosen, t), chosen)
                             for t in range(len(self.templates))])
        return F.normalize(feats.mean(dim=0), dim=-1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Log every term of the method's :meth:`losses` under ``train/`` and return its ``loss`` (a method with a
        single loss overrides this)."""
        out = self.losses(batch)
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True)
        return out["loss"]

    # ----------------------------------------------------------------- evaluation
    def on_train_start(self) -> None:
        self.val_metrics.reset()

    def _evaluate(self, batch: dict[str, Any], metric: GZSLMetrics, prefix: str) -> None:
        """Score ``classify`` on the batch into ``metric``; a closed-set classifier drops unseen-class images and
        logs ``<prefix>/acc``, the top-1 over the seen-class images of the epoch."""
        images, labels = batch["image"], batch["label"]
        if not self.classifies_unseen:
            keep = torch.isin(labels, self.seen_classes)
            images, labels = images[keep], labels[keep]
            if len(labels) == 0:
                return
        logits = self.classify(images)
        metric.update(logits, labels)
        if not self.classifies_unseen:
            self.log(f"{prefix}/acc", (logits.argmax(dim=1) == labels).float().mean(), batch_size=len(labels),
                     prog_bar=True, sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def _log_metrics(self, metric: GZSLMetrics, prefix: str) -> None:
        """Log ``metric`` under ``prefix``; with calibrated stacking also ``<prefix>/calibration`` and the
        ``<prefix>/S_cal``, ``U_cal``, ``H_cal`` at :attr:`gzsl_calibration` (chosen first on validation)."""
        values = {f"{prefix}/{k}": v for k, v in metric.compute().items()}
        if metric.keep_scores and metric.update_count:
            choose = prefix == "val" and self.hparams.calibration == "validation" and not self.trainer.sanity_checking
            if choose:
                self.gzsl_calibration = metric.choose_calibration()
            if self.gzsl_calibration is not None:
                calibrated = metric.report_at(self.gzsl_calibration)
                values |= {f"{prefix}/{k}_cal": v for k, v in calibrated.items()}
                values[f"{prefix}/calibration"] = torch.tensor(self.gzsl_calibration)
        self.log_dict(values, prog_bar=True)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self.classify(batch["image"])
        return {"index": batch["index"], "prediction": logits.argmax(dim=1), "logits": logits}

    # ----------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters in optimiser groups: matrices with weight decay, the rest (gains, biases,
        embeddings, temperatures) without; with ``head_lr`` set, each split again into the backbone's own weights
        (``lr``) and the parts the method added (``head_lr``: heads, prompts, adapters)."""
        head_lr = self.hparams.head_lr
        adapters = {id(p) for p in self.backbone.adapter_parameters()}
        own = {id(p) for p in self.backbone.parameters()} - adapters
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            is_gain = param.ndim < 2 or any(key in name for key in ("embedding", "logit_scale", "register_tokens"))
            is_added = head_lr is not None and id(param) not in own
            groups.setdefault((is_gain, is_added), []).append(param)
        return [{"params": params, "weight_decay": 0.0 if is_gain else self.hparams.weight_decay,
                 **({"lr": head_lr} if is_added else {})}
                for (is_gain, is_added), params in sorted(groups.items())]

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The ``optimizer`` over :meth:`parameter_groups`: AdamW, Adam (weight decay as an L2 term of the
        gradient) or SGD with ``momentum``; fused kernels by ``fused_optimizer``."""
        groups, hp = self.parameter_groups(), self.hparams
        fused = self.fused_kernels(groups)
        if hp.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, fused=fused)
        return (torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW)(groups, lr=hp.lr, fused=fused)

    def fused_kernels(self, groups: list[dict[str, Any]]) -> bool:
        """Whether the optimiser of ``groups`` runs fused: ``fused_optimizer``, or when it is None whether every
        parameter is on a GPU."""
        if self.hparams.fused_optimizer is not None:
            return self.hparams.fused_optimizer
        return all(p.is_cuda for group in groups for p in group["params"])

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer()
        total = max(1, int(self.trainer.estimated_stepping_batches))
        # Lightning 2.6 builds and starts iterating the train loader for this estimate, before a checkpoint's loop
        # state is restored, and then never loads the loader's saved position: drop that loader so the fit loop
        # builds it again after the restore (mid-epoch resume, datamodules.sampling).
        self.trainer.fit_loop._combined_loader = None
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
        checkpoint[CALIBRATION_KEY] = self.gzsl_calibration
        for key in self.reproducible_keys():
            checkpoint["state_dict"].pop(key, None)

    def reproducible_keys(self) -> set[str]:
        """State-dict names a checkpoint leaves out (:attr:`stores_frozen_weights`): the frozen backbone parameters
        when ``pretrained`` rebuilds them, else none. Buffers stay (a frozen conv stem's BatchNorm statistics)."""
        if self.stores_frozen_weights or self.hparams.pretrained is None:
            return set()
        return {name for name, p in self.backbone.named_parameters(prefix="backbone") if not p.requires_grad}

    def full_state_dict(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint's ``state_dict`` completed with the frozen tensors it left out (:meth:`reproducible_keys`),
        taken from this module, which rebuilt them from ``model`` and ``pretrained``."""
        own = self.state_dict()
        return {**{k: own[k] for k in self.reproducible_keys() - stored.keys()}, **stored}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_class(checkpoint, class_path(self))
        if RNG_KEY in checkpoint:
            restore_rng_state(checkpoint[RNG_KEY])
        checkpoint["state_dict"] = self.full_state_dict(checkpoint["state_dict"])
        if self.hparams.calibration == "validation" and checkpoint.get(CALIBRATION_KEY) is not None:
            self.gzsl_calibration = float(checkpoint[CALIBRATION_KEY])
