"""``VisionLanguageModel``: one wrapper around open_clip that every method and callback uses.

Construction has one factory with explicit precedence for ``pretrained``:

0. a model name with a source, ``hf-hub:<org>/<repo>`` or ``local-dir:<folder>`` (open_clip's hub layout, what
   ``xvlm export`` writes, :mod:`xvlm.hub_folder`), takes its config and weights from that source: ``pretrained``
   must then be unset (``None``, or the default ``auto``), and any other value is an error naming both. open_clip
   downloads hub files into the Hugging Face cache (``HF_HOME``) on first use; with ``HF_HUB_OFFLINE=1`` it reads
   that cache only and fails, naming the file, when it is not there;
1. ``auto`` (the default) — ``shapes`` for the project's own architectures (``xvlm/model_configs/``), nothing for
   a model name with a source; any other architecture has no default weights (an error asks for ``pretrained``);
2. ``None`` — random initialisation;
3. a name in :data:`LOCAL_SOURCES` — a backbone this project provides itself; a module registers a resolver
   ``model_name -> weights file`` with :func:`register_source` (``xvlm.shapes_pretraining`` registers
   ``"shapes"``, which builds and caches its backbones under ``checkpoints/backbones/``);
4. a path to an existing file — an open_clip state dict, loaded with ``weights_only=True``;
5. anything else — an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``, ...), downloaded by open_clip.

Architectures are open_clip JSON configs. The project registers its own from ``xvlm/model_configs/``; a config
listed in :data:`CONV_STEMS` gets its ViT patch embedding replaced by a small convolutional stem (hybrid ViT,
Xiao et al. 2021, "Early convolutions help transformers see better") of the same total stride, which is what
lets a four-layer ViT tell shapes apart on 64-px images. A ``local-dir:`` folder written by ``xvlm export`` for
such towers names its stem, register tokens and block adapters in its config (:func:`tower_changes`,
:mod:`xvlm.hub_folder`).

**Register tokens.** A config listed in :data:`REGISTER_TOKENS` gets ``R`` learned tokens (Darcet et al. 2024,
"Vision Transformers Need Registers"): its image tower becomes a :class:`RegisterVisionTransformer` (the
instance's class is swapped in :func:`create_clip`, as adapters swap the block class; no other model changes)
with the parameter ``visual.register_tokens [R, W]`` in the state dict. The registers are inserted right after
the class token, after the position embeddings and patch dropout (they have no position and are never dropped)
and before ``ln_pre``, so every block attends over ``[c; r_1..r_R; t_1..t_N]``; they are dropped before pooling,
so ``encode_image``, ``output_tokens`` and the pooled feature read only the class and patch tokens. open_clip's
``forward_intermediates`` splits off ``1 + R`` prefix tokens (``image_intermediates_prefix`` is
``[B, 1+R, W]``: class token, then registers). A tower without registers has ``R = 0`` everywhere below.

The image tower is open_clip's (``image_encoder='clip'``) or a timm model (``image_encoder='timm:<name>'``,
:class:`TimmFeatures`); with a timm tower the CLIP image tower is dropped, the text tower stays, and the image
features are not aligned with text (:attr:`VisionLanguageModel.text_aligned_images`).

**ViT stepper.** Methods get inside a ViT image tower (open_clip's, or timm's ``VisionTransformer``: below)
through two calls, for any depth and width:

- :meth:`~VisionLanguageModel.embed_patches`: ``[B, 3, H, W] -> [B, N, W]`` patch embeddings (the ``conv1``
  output, ``N = h·w``), before the class token and the position embeddings;
- :meth:`~VisionLanguageModel.run_blocks`: ``x_0 = ln_pre(dropout_p([c; t] + P))`` with the class token ``c``,
  the patch tokens ``t`` and the position embeddings ``P`` (resized bicubically to the token grid as open_clip's
  ``resize_pos_embed`` does at load time, class position untouched), then ``x_l = block_l(x_{l-1})``. It returns
  the requested blocks' outputs ``[B, 1+N, W]``, optionally their head-averaged attention taken from the same
  pass, and the pooled, projected feature that ``encode_image`` computes. With ``R`` register tokens (inserted
  after ``dropout_p``, before ``ln_pre``) the blocks run on ``[B, 1+R+N, W]``, but the outputs keep the class and
  patch tokens ``[B, 1+N, W]`` and return the registers apart (``[B, R, W]``); the attention is
  ``[B, 1+N+R, 1+N+R]`` in the order *class, patches, registers* (rows and columns ``0..N`` index ``tokens``,
  the last ``R`` the registers), so every row still sums to 1 and the class token's attention to the patches is
  ``attention[:, 0, 1:1+N]`` for every tower (``attention[:, 0, 1:]`` also holds the register columns when
  ``R > 0``; patch-level explainers that roll attention out use the whole square matrix and then read these
  indices).

:meth:`~VisionLanguageModel.norm_tokens` is the LayerNorm after the last block (``ln_post``), and
:attr:`~VisionLanguageModel.vit_width` is ``W``.

**The stepper on a timm ViT** (``image_encoder='timm:vit_base_patch16_224'``, ``deit_base_patch16_224``,
``vit_small_patch14_reg4_dinov2``, ...: any ``timm.models.vision_transformer.VisionTransformer`` whose blocks are
timm's ``Block`` with its ``Attention``) keeps the contract above with timm's own modules, so that
``run_blocks(embed_patches(x))`` computes timm's ``forward_features(x)``:

- ``embed_patches``: ``t = patch_embed(x)`` (flattened ``[B, N, W]``; the ``[B, h, w, W]`` of a model built with
  ``dynamic_img_size`` is flattened row-major), ``grid`` = the patch grid of that input;
- ``run_blocks``: ``x_0 = norm_pre(patch_drop(_pos_embed(t)))``: ``_pos_embed`` prepends the class token and the
  ``R = num_reg_tokens`` registers (``[c; r; t]``, as open_clip's register tower) and adds the position
  embeddings (over class and registers too, or only over the patches with ``no_embed_class``; resampled to the
  grid by timm with ``dynamic_img_size``), then ``pos_drop``; ``pooled = forward_head(norm(x_L), pre_logits=True)``,
  the pre-logits feature ``[B, W]`` (not in the text's joint space). :class:`TimmFeatures` builds its model
  with ``global_pool=''``, whose head returns the whole sequence; ``pooled`` is then its class token (timm's
  ``'token'`` pooling, the ViT default);
- ``norm_tokens`` is timm's ``norm``; ``project_tokens`` (and every other open_clip-only call:
  ``encode_image``, ``add_block_adapters``) keeps needing the CLIP tower;
- :attr:`~VisionLanguageModel.num_registers` is the model's ``num_reg_tokens``.

Not supported (a ValueError naming the model says why): timm ViTs without a class token (``class_token=False``),
prefix tokens other than the class token and registers (DeiT's distillation token), blocks other than ``Block``
with ``Attention`` (``ResPostBlock``, the parallel blocks, ``attn_layer='diff'``) and the other timm ViT
families (``Eva``, relative-position ViTs, ...), which are other classes; a ``patch_embed`` that returns ``NCHW``
or ``NCL`` tokens (which timm's ``VisionTransformer`` cannot run either); and, without ``dynamic_img_size``,
a grid other than the model's (its positions are not resized, as timm's own forward refuses other sizes).

**Block adapters.** :meth:`~VisionLanguageModel.add_block_adapters` turns every visual block into an
:class:`AdaptedResidualAttentionBlock` (the instance's class is swapped; its parameters and their state-dict keys
stay as they are) that adds parallel modules to the two residual branches::

    x <- x + ls_1(MHSA(ln_1(x))) + A_att(x)
    x <- x + ls_2(MLP(ln_2(x)))  + A_mlp(x)

so they act in open_clip's own forward (``encode_image``, ``forward_intermediates``) and in the stepper alike.
Their parameters live at ``clip.visual.transformer.resblocks.{i}.adapter_attn`` / ``adapter_mlp`` and stay
trainable under every ``freeze`` setting. Deliberate choices, which differ from some published adapters:
an adapter reads the branch input ``x`` before the LayerNorm, carries its own scale (there is no separate scaling
factor), and is initialised by its factory (zero-initialised output layers leave the tower's function unchanged).
:class:`BottleneckAdapter` is the adapter a config can name: a ``local-dir:`` folder that ``xvlm export`` wrote for
an adapted tower records each branch's spec in its ``xvlm`` entry, and :func:`create_clip` adds those adapters
before it loads the folder's weights.

Deviations of the stepper from open_clip's and timm's forward: a block whose attention is requested runs its
attention unfused (``softmax(QKᵀ/√d)`` in float32, then ``V`` and ``out_proj``; timm: ``softmax(q kᵀ · scale)``
after ``q_norm``/``k_norm``, then ``attn_drop``, ``V``, ``norm``, the gate if any, ``proj`` and ``proj_drop``),
which differs from the fused kernel by rounding only (timm's unfused path scales ``q`` before the product); the
returned map is taken before attention dropout; with patch dropout active (training), ``N`` is the number of kept
tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from xvlm.hub_folder import folder_weights, xvlm_entry

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

Freeze = Literal["none", "image", "text", "all"]

AUTO = "auto"
"""Default ``pretrained``: ``shapes`` for the project's architectures, nothing for a model name with a source."""
SOURCE_PREFIXES = ("hf-hub:", "local-dir:")
"""Model names that bring their own config and weights (open_clip's schemas)."""

#: Per-channel mean and standard deviation of the pixels CLIP towers were trained on (open_clip's constants).
CLIP_MEAN: tuple[float, float, float] = open_clip.OPENAI_DATASET_MEAN
CLIP_STD: tuple[float, float, float] = open_clip.OPENAI_DATASET_STD

#: ViT configs whose patch embedding is a convolutional stem: output channels of each stride-2 stage. The
#: number of stages is ``log2(patch_size)``, so the stem yields the config's patch grid.
CONV_STEMS: dict[str, tuple[int, ...]] = {
    "xvlm-tiny": (32, 64, 128),
    "xvlm-tiny-reg": (32, 64, 128),
}

#: ViT configs with register tokens (module docstring): number ``R`` of learned tokens next to the class token.
REGISTER_TOKENS: dict[str, int] = {
    "xvlm-tiny-reg": 4,
}



@dataclass(frozen=True)
class TowerChanges:
    """What :func:`create_clip` changes in the model open_clip builds from an architecture's config.

    Attributes:
        conv_stem: channels of the convolutional stem that replaces the ViT's patch embedding (:func:`conv_stem`),
            or None.
        registers: ``R`` register (or prompt) tokens of the image tower (:class:`RegisterVisionTransformer`).
        adapter_attn: the spec of the :class:`BottleneckAdapter` on every block's attention branch (module
            docstring, block adapters), or None.
        adapter_mlp: the same for the MLP branch.
    """

    conv_stem: tuple[int, ...] | None = None
    registers: int = 0
    adapter_attn: BottleneckSpec | None = None
    adapter_mlp: BottleneckSpec | None = None

    @property
    def has_adapters(self) -> bool:
        """Whether the blocks have adapters on either branch."""
        return self.adapter_attn is not None or self.adapter_mlp is not None

    def entry(self) -> dict[str, Any]:
        """The ``xvlm`` config entry of a folder with these changes (:mod:`xvlm.hub_folder`; :func:`tower_changes`
        reads it back)."""
        adapters = None
        if self.has_adapters:
            adapters = {branch: None if spec is None else asdict(spec)
                        for branch, spec in (("attn", self.adapter_attn), ("mlp", self.adapter_mlp))}
        return {"conv_stem": None if self.conv_stem is None else list(self.conv_stem),
                "register_tokens": self.registers, "block_adapters": adapters}


def tower_changes(model: str) -> TowerChanges:
    """The changes of ``model``: the ``xvlm`` entry of a ``local-dir:`` folder's config (:mod:`xvlm.hub_folder`),
    else :data:`CONV_STEMS` and :data:`REGISTER_TOKENS` by name.

    Raises:
        ValueError: the entry's ``block_adapters`` is not ``{"attn": spec | null, "mlp": spec | null}`` with
            ``spec = {"dim", "scale", "dropout"}`` (the error names the model).
    """
    entry = xvlm_entry(model)
    if entry is None:
        return TowerChanges(CONV_STEMS.get(model), REGISTER_TOKENS.get(model, 0))
    stem = entry.get("conv_stem")
    adapters = entry.get("block_adapters") or {}
    try:
        specs = [None if adapters.get(branch) is None else BottleneckSpec(**adapters[branch])
                 for branch in ("attn", "mlp")]
    except (AttributeError, TypeError) as error:
        raise ValueError(f"model={model!r}: the config's block_adapters {adapters!r} is not {{'attn': spec | null, "
                         f"'mlp': spec | null}} with spec = {{'dim', 'scale', 'dropout'}} ({error})") from None
    return TowerChanges(tuple(int(c) for c in stem) if stem else None, int(entry.get("register_tokens", 0)), *specs)


#: Pretrained sources this project provides itself: name -> resolver(model_name) returning a local weights file.
#: Filled by :func:`register_source`.
LOCAL_SOURCES: dict[str, Callable[[str], str | Path]] = {}


def register_source(name: str, resolver: Callable[[str], str | Path]) -> None:
    """Make ``pretrained=name`` resolve to ``resolver(model_name)``, a local open_clip weights file.

    A later registration of the same name replaces the earlier resolver. Sources take precedence over files and
    open_clip tags (module docstring).
    """
    LOCAL_SOURCES[name] = resolver


def _conv_bn_gelu(in_ch: int, out_ch: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.GELU()]


class ConvStem(nn.Sequential):
    """A convolutional patch embedding that runs in channels-last memory format.

    Channels-last convolutions are 1.2-1.3x as fast on CPUs (oneDNN; measured in ``benchmarks/bench_build.py``)
    and are the layout GPU convolution kernels prefer under mixed precision. The output ``[B, W, h, w]`` stays
    channels-last, which open_clip's ``reshape(B, W, h * w)`` reads without a copy.
    Parameter names are those of a plain ``nn.Sequential``.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images.contiguous(memory_format=torch.channels_last))


def conv_stem(width: int, patch_size: int, channels: Sequence[int]) -> ConvStem:
    """Stages of a stride-2 and a stride-1 3x3 convolution (BatchNorm, GELU), then a 1x1 projection to ``width``.

    ``[B, 3, H, W] -> [B, width, H / patch_size, W / patch_size]``; needs ``patch_size == 2 ** len(channels)``.
    The stride-1 convolutions widen each token's receptive field (about 35 px for three stages), which is what
    lets tokens carry corners and curvature instead of flat colour.
    """
    if 2 ** len(channels) != patch_size:
        raise ValueError(f"a conv stem of {len(channels)} stride-2 stages has stride {2 ** len(channels)}, "
                         f"not patch_size={patch_size}")
    layers: list[nn.Module] = []
    in_ch = 3
    for out_ch in channels:
        layers += _conv_bn_gelu(in_ch, out_ch, 2) + _conv_bn_gelu(out_ch, out_ch, 1)
        in_ch = out_ch
    layers.append(nn.Conv2d(in_ch, width, 1))
    return ConvStem(*layers).to(memory_format=torch.channels_last)


class RegisterVisionTransformer(VisionTransformer):
    """open_clip's ViT with ``R`` register tokens ``register_tokens [R, W]`` (module docstring).

    Not constructed directly: :meth:`add_registers` swaps the class of an existing tower and registers the
    parameter, so every other parameter keeps its name. ``_embeds`` inserts the registers after the class token,
    ``_pool`` drops them, and ``forward_intermediates`` treats them as prefix tokens; ``forward`` (hence
    ``encode_image``) is open_clip's.
    """

    register_tokens: nn.Parameter

    @classmethod
    def add_registers(cls, visual: VisionTransformer, count: int) -> None:
        """Turn ``visual`` into a tower with ``count`` registers, initialised like open_clip's class token
        (``W^-1/2 · N(0, 1)``: distinct tokens, so they do not stay interchangeable)."""
        if count < 1:
            raise ValueError(f"a tower with registers needs at least one, not {count}")
        visual.__class__ = cls
        reference = visual.class_embedding
        width = reference.shape[-1]
        tokens = width ** -0.5 * torch.randn(count, width)
        visual.register_parameter("register_tokens", nn.Parameter(tokens.to(reference.device, reference.dtype)))

    @property
    def num_registers(self) -> int:
        return int(self.register_tokens.shape[0])

    def insert_registers(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1+N, W] -> [B, 1+R+N, W]``: the registers right after the class token."""
        registers = self.register_tokens.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)

    def drop_registers(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1+R+N, W] -> [B, 1+N, W]``."""
        return _split_registers(x, self.num_registers)[0]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"register_tokens"}

    def _embeds(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = self.patch_dropout(x + self.positional_embedding.to(x.dtype))
        return self.ln_pre(self.insert_registers(x))

    def _pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super()._pool(self.drop_registers(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        stop_early: bool = False,
        normalize_intermediates: bool = False,
        intermediates_only: bool = False,
        output_fmt: str = "NCHW",
        output_extra_tokens: bool = False,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """open_clip's ``forward_intermediates`` with ``1 + R`` prefix tokens (class token, then registers)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError("Output format must be one of NCHW or NLC.")
        batch, _, height, width = x.shape
        x = self._embeds(x)
        x, intermediates = self.transformer.forward_intermediates(x, indices=indices, stop_early=stop_early)
        if normalize_intermediates:
            intermediates = [self.ln_post(y) for y in intermediates]
        prefix = 1 + self.num_registers
        prefix_tokens = [y[:, :prefix] for y in intermediates]
        intermediates = [y[:, prefix:] for y in intermediates]
        if output_fmt == "NCHW":
            h, w = height // self.patch_size[0], width // self.patch_size[1]
            intermediates = [y.reshape(batch, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        output: dict[str, Any] = {"image_intermediates": intermediates}
        if output_extra_tokens:
            output["image_intermediates_prefix"] = prefix_tokens
        if intermediates_only:
            return output
        pooled, _ = self._pool(x)
        if self.proj is not None:
            pooled = pooled @ self.proj
        output["image_features"] = pooled
        return output


def _num_registers(visual: nn.Module) -> int:
    """``R`` of a tower with register tokens, else 0."""
    return visual.num_registers if isinstance(visual, RegisterVisionTransformer) else 0


def available_models() -> list[str]:
    """Every architecture name ``VisionLanguageModel`` accepts (open_clip's and the project's)."""
    return sorted(open_clip.list_models())


def _check_model_name(model: str) -> None:
    if model.startswith(SOURCE_PREFIXES) or model in open_clip.list_models():
        return
    raise ValueError(
        f"Unknown model '{model}'. Available open_clip architectures: {', '.join(available_models())}. "
        f"Project configs live in {MODEL_CONFIG_DIR}."
    )


def _resolve_pretrained(model: str, pretrained: str | None) -> tuple[str | None, str | None]:
    """Return ``(local_file, open_clip_tag)``; at most one is set. Raises a clear error for unknown values and for
    ``pretrained`` given with a model name that has its own source (module docstring)."""
    if model.startswith(SOURCE_PREFIXES):
        if pretrained not in (None, AUTO):
            raise ValueError(f"model={model!r} takes its weights from that source, so pretrained must be unset, but "
                             f"pretrained={pretrained!r} is set as well. Drop pretrained (or set it to null) to use "
                             f"the weights of {model!r}, or name an open_clip architecture as model to load "
                             f"pretrained={pretrained!r} into it.")
        return None, None
    if pretrained == AUTO:
        pretrained = _default_pretrained(model)
    if pretrained is None:
        return None, None
    if pretrained in LOCAL_SOURCES:
        return str(LOCAL_SOURCES[pretrained](model)), None
    if Path(pretrained).is_file():
        return pretrained, None
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained in tags:
        return None, pretrained
    looks_like_path = any(ch in pretrained for ch in "/\\.")
    what = f"file '{pretrained}' does not exist" if looks_like_path else f"'{pretrained}' is not a known source"
    raise ValueError(
        f"pretrained={pretrained!r} for model '{model}': {what}. Use an existing weights file, one of the "
        f"registered sources {sorted(LOCAL_SOURCES)} (see register_source; the module that registers a source "
        f"must be imported first), or an open_clip tag for this model: {tags or 'none'}."
    )


def _default_pretrained(model: str) -> str:
    """What ``pretrained='auto'`` means for an architecture without a source: ``shapes`` for the project's own."""
    if (MODEL_CONFIG_DIR / f"{model}.json").is_file():
        return "shapes"
    tags = open_clip.list_pretrained_tags_by_model(model)
    raise ValueError(f"model '{model}' has no default weights (pretrained='auto' builds the Shapes backbone of the "
                     f"project's own architectures only): set pretrained to an open_clip tag of this model "
                     f"({tags or 'none'}), a weights file, or null for random initialisation.")


@contextmanager
def _silenced_warnings(active: bool) -> Iterator[None]:
    """Disable logging warnings inside the block when ``active``."""
    if not active:
        yield
        return
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def create_clip(model: str, pretrained: str | None = None, image_size: int | None = None) -> nn.Module:
    """Build the open_clip model ``model`` with its :func:`tower_changes` (conv stem, register tokens, block
    adapters) and load ``pretrained`` (module docstring).

    A ``local-dir:`` folder whose config has an ``xvlm`` entry (towers open_clip cannot build alone,
    :mod:`xvlm.hub_folder`) is built by open_clip from its ``model_cfg`` without weights, changed as the entry says,
    then loaded from the folder's weights file.
    """
    _check_model_name(model)
    local_file, tag = _resolve_pretrained(model, pretrained)
    changes = tower_changes(model)
    exported_by_xvlm = xvlm_entry(model) is not None
    if exported_by_xvlm:
        local_file = str(folder_weights(model))
    with _silenced_warnings(local_file is not None):  # open_clip warns "initialized randomly" before we load
        clip = open_clip.create_model(model, pretrained=tag, force_image_size=image_size,
                                      load_weights=not exported_by_xvlm)
    if changes.conv_stem is not None:
        visual = clip.visual
        visual.conv1 = conv_stem(visual.conv1.out_channels, visual.patch_size[0], changes.conv_stem)
    if (changes.registers or changes.has_adapters) and not isinstance(clip.visual, VisionTransformer):
        asked = f"{changes.registers} register tokens" if changes.registers else "block adapters"
        raise ValueError(f"model '{model}' asks for {asked}, but its image tower is a {type(clip.visual).__name__}, "
                         f"not an open_clip ViT")
    if changes.registers:
        RegisterVisionTransformer.add_registers(clip.visual, changes.registers)
    if changes.has_adapters:
        _add_adapters(clip.visual, model, *(None if spec is None else spec.build
                                            for spec in (changes.adapter_attn, changes.adapter_mlp)))
    if local_file is not None:
        open_clip.load_checkpoint(clip, local_file, weights_only=True)
    return clip


@dataclass
class ImageTokens:
    """Intermediate image tokens.

    Attributes:
        patches: one ``[B, N, W]`` tensor per requested layer (``N = h * w`` patch tokens, tower width ``W``).
        cls: one ``[B, W]`` class token per requested layer.
        grid: ``(h, w)`` of the patch grid.
        registers: one ``[B, R, W]`` tensor of register tokens per requested layer (``R = 0`` without registers).
    """

    patches: list[torch.Tensor]
    cls: list[torch.Tensor]
    grid: tuple[int, int]
    registers: list[torch.Tensor] = field(default_factory=list)


@dataclass
class PatchTokens:
    """Patch embeddings of a ViT before the class token and the position embeddings.

    Attributes:
        tokens: ``[B, N, W]`` with ``N = h * w`` in row-major grid order.
        grid: ``(h, w)`` of the patch grid.
    """

    tokens: torch.Tensor
    grid: tuple[int, int]


@dataclass
class BlockOutputs:
    """What :meth:`VisionLanguageModel.run_blocks` returns.

    With ``R`` register tokens the blocks run on ``[class; registers; patches]``; here the registers are set
    apart, so ``tokens`` keeps its meaning for every tower and ``R = 0`` is the tower without registers.

    Attributes:
        tokens: one ``[B, 1+N, W]`` block output per requested block (class token first, then the patches;
            registers excluded).
        attention: one ``[B, 1+N+R, 1+N+R]`` head-averaged post-softmax attention (float32, rows sum to 1 over
            all ``1+N+R`` keys) per requested block, or ``None`` when not asked for. Rows and columns are ordered
            class token, patches (``1..N``, as in ``tokens``), registers (the last ``R``); ``[..., :1+N, :1+N]``
            is the part among class and patch tokens.
        pooled: ``[B, D]`` projected image feature, as ``encode_image`` computes it (a timm ViT: the pre-logits
            feature ``[B, W]``, module docstring).
        layers: the requested block indices (non-negative, ascending), matching ``tokens`` and ``attention``.
        grid: ``(h, w)`` of the patch grid.
        registers: one ``[B, R, W]`` block output of the register tokens per requested block (``R = 0``: empty).
        num_registers: ``R``.
    """

    tokens: list[torch.Tensor]
    attention: list[torch.Tensor] | None
    pooled: torch.Tensor
    layers: tuple[int, ...]
    grid: tuple[int, int]
    registers: list[torch.Tensor] = field(default_factory=list)
    num_registers: int = 0


class TimmFeatures(nn.Module):
    """A timm model's last feature map, ``[B, 3, H, W] -> [B, N, h, w]`` (``forward_features``).

    Args:
        name: timm model name (``resnet18``, ``wide_resnet50_2``, ... or the CIFAR ``wrn28_2``/``wrn28_8`` of
            :mod:`xvlm.wide_resnet`).
        weights: ``None`` (random), ``"hub"`` (timm's pretrained weights, downloaded) or a local checkpoint file.
        kwargs: extra ``timm.create_model`` arguments (e.g. ``output_stride: 8`` for larger maps on small images).
    """

    def __init__(self, name: str, weights: str | None = None, kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        import timm

        import xvlm.wide_resnet  # noqa: F401  (registers the CIFAR wide ResNets with timm)

        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:20]
            raise ValueError(f"image_encoder='timm:{name}': timm has no model '{name}'. Similar names: {close}")
        options = dict(kwargs or {})
        if weights == "hub":
            options["pretrained"] = True
        elif weights is not None:
            options["checkpoint_path"] = weights
        self.name = name
        self.model = timm.create_model(name, num_classes=0, global_pool="", **options)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


def _residual_branches(block: ResidualAttentionBlock, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """Finish a block from its input ``x`` and ``attended = MHSA(ln_1(x))``, adding the adapters if it has them.

    ``y = x + ls_1(attended) + A_att(x)``, then ``y + ls_2(MLP(ln_2(y))) + A_mlp(y)``; all ``[B, L, W]``.
    """
    adapter_attn, adapter_mlp = getattr(block, "adapter_attn", None), getattr(block, "adapter_mlp", None)
    y = x + block.ls_1(attended)
    if adapter_attn is not None:
        y = y + adapter_attn(x)
    out = y + block.ls_2(block.mlp(block.ln_2(y)))
    if adapter_mlp is not None:
        out = out + adapter_mlp(y)
    return out


class AdaptedResidualAttentionBlock(ResidualAttentionBlock):
    """open_clip's self-attention block with parallel adapters on its residual branches (module docstring).

    Not constructed directly: :meth:`adapt` swaps the class of an existing block and registers the adapters
    ``adapter_attn`` and ``adapter_mlp`` (either may be ``None``), so the block's own parameters keep their
    names. The forward keeps open_clip's fused attention; ``k_x`` and ``v_x`` are ignored, as open_clip's block
    ignores them without cross-attention.
    """

    adapter_attn: nn.Module | None
    adapter_mlp: nn.Module | None

    @classmethod
    def adapt(cls, block: ResidualAttentionBlock, attn: nn.Module | None, mlp: nn.Module | None) -> None:
        """Turn ``block`` into an adapted block in place, with adapters ``[B, L, W] -> [B, L, W]``."""
        block.__class__ = cls
        block.register_module("adapter_attn", attn)
        block.register_module("adapter_mlp", mlp)

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _residual_branches(self, q_x, self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))


def _add_adapters(
    visual: VisionTransformer,
    model: str,
    attn: Callable[[int], nn.Module] | None,
    mlp: Callable[[int], nn.Module] | None,
) -> None:
    """Make every block of ``visual`` an :class:`AdaptedResidualAttentionBlock` with adapters from the factories
    ``width -> module`` (one call per block), on the tower's device and dtype; a ValueError naming ``model`` when
    both factories are None or the blocks already have adapters."""
    if attn is None and mlp is None:
        raise ValueError("add_block_adapters needs an attn or an mlp factory")
    if any(isinstance(block, AdaptedResidualAttentionBlock) for block in visual.transformer.resblocks):
        raise ValueError(f"model '{model}' already has block adapters; add them once")
    width = visual.transformer.width
    reference = visual.class_embedding
    for block in visual.transformer.resblocks:
        made = [None if factory is None else factory(width).to(device=reference.device, dtype=reference.dtype)
                for factory in (attn, mlp)]
        AdaptedResidualAttentionBlock.adapt(block, *made)


@dataclass(frozen=True)
class BottleneckSpec:
    """The arguments of a :class:`BottleneckAdapter` besides its width: what a folder's config records of it."""

    dim: int
    scale: float
    dropout: float

    def build(self, width: int) -> BottleneckAdapter:
        """A new adapter of this spec for tokens of width ``width`` (``W_up = 0``)."""
        return BottleneckAdapter(width, self.dim, self.scale, self.dropout)


class BottleneckAdapter(nn.Module):
    """``A(x) = s · W_up Drop(ReLU(W_down x))``, ``[..., W] -> [..., W]`` with a bottleneck of ``dim`` channels and
    the scale ``s``; ``W_up`` starts at zero, so a new adapter leaves its block unchanged (MSCI's block adapters)."""

    def __init__(self, width: int, dim: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(width, dim), nn.Linear(dim, width)
        self.dropout, self.scale = nn.Dropout(dropout), scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def spec(self) -> BottleneckSpec:
        """What re-creates this adapter (its weights aside) for its width."""
        return BottleneckSpec(self.down.out_features, self.scale, self.dropout.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(F.relu(self.down(x))))


def _multi_head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused attention of ``q, k, v [B, heads, L, d]``; return ``(heads' outputs [B, L, heads·d], A [B, L, L])``.

    ``A_h = softmax(q_h k_hᵀ · scale)`` in float32, the output is ``dropout(A_h) v_h`` with the heads concatenated,
    and ``A = mean_h A_h`` (before dropout), so every row of ``A`` sums to 1.
    """
    batch, heads, length, dim = v.shape
    weights = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1, dtype=torch.float32)
    attended = dropout(weights.to(v.dtype)) @ v
    return attended.transpose(1, 2).reshape(batch, length, heads * dim), weights.mean(dim=1)


def _attend_with_weights(block: ResidualAttentionBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``block`` on ``x [B, L, W]`` with explicit attention; return ``(output [B, L, W], A [B, L, L])``.

    ``A = mean_heads softmax(Q Kᵀ / √d_head)`` (float32) with ``[Q, K, V] = ln_1(x) W_inᵀ + b_in``; the block's
    attention branch is ``out_proj(A_h V)`` with the per-head maps ``A_h``, i.e. what the fused path computes.
    """
    attn = block.attn
    batch, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    attended, weights = _multi_head_attention(q, k, v, (width // heads) ** -0.5, nn.Identity())
    return _residual_branches(block, x, attn.out_proj(attended)), weights


def _timm_attend_with_weights(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a timm ``Block`` on ``x [B, L, W]`` with explicit attention; return ``(output [B, L, W], A [B, L, L])``.

    From the block's own weights, as timm's ``Block`` and ``Attention`` compute them::

        [q, k, v] = qkv(norm1(x)),  q <- q_norm(q),  k <- k_norm(k)
        A_h = softmax(q_h k_hᵀ · scale)                    (float32; A = mean_h A_h, before attn_drop)
        a = proj_drop(proj(g ⊙ norm([attn_drop(A_h) v_h]_h)))  with the gate g = σ(gate(norm1 x)) if any, else 1
        y = x + drop_path1(ls1(a)),  output = y + drop_path2(ls2(mlp(norm2(y))))
    """
    attn = block.attn
    batch, length, _ = x.shape
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attended, weights = _multi_head_attention(attn.q_norm(q), attn.k_norm(k), v, attn.scale, attn.attn_drop)
    attended = getattr(attn, "norm", nn.Identity())(attended)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        attended = attended * gate(h).sigmoid()
    y = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(attended))))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y)))), weights


def _split_registers(x: torch.Tensor, registers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, 1+R+N, W]`` (class, registers, patches) -> ``([B, 1+N, W]`` class and patches, ``[B, R, W])``."""
    if not registers:
        return x, x[:, 1:1]
    return torch.cat([x[:, :1], x[:, 1 + registers:]], dim=1), x[:, 1:1 + registers]


def _class_patches_registers(length: int, registers: int, device: torch.device) -> torch.Tensor:
    """Index that reorders a sequence ``[class; R registers; patches]`` of ``length`` to ``[class; patches;
    registers]`` (the order of :class:`BlockOutputs` attention)."""
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1 + registers, length),
                      torch.arange(1, 1 + registers)]).to(device)


def _resized_positions(visual: VisionTransformer, grid: tuple[int, int]) -> torch.Tensor:
    """Position embeddings ``[1 + h·w, W]`` for a ``grid = (h, w)`` token grid.

    The patch positions are resized from the tower's grid with antialiased bicubic interpolation in float32,
    as open_clip's ``resize_pos_embed`` does when it loads a checkpoint at another size; the class position is
    kept.
    """
    positions = visual.positional_embedding
    old = tuple(visual.grid_size)
    if tuple(grid) == old:
        return positions
    with torch.autocast(positions.device.type, enabled=False):
        patch = positions[1:].reshape(1, *old, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=grid, mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([positions[:1], patch.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


@dataclass(frozen=True)
class _ViTSteps:
    """The tower-specific steps of the ViT stepper (module docstring); the stepper's methods are one code path over
    them, for open_clip's ViT (:func:`_open_clip_steps`) and timm's (:func:`_timm_steps`).

    Attributes:
        width: token width ``W``.
        blocks: the transformer blocks, in order.
        num_registers: ``R``.
        embed: images ``[B, 3, H, W]`` -> :class:`PatchTokens`.
        start: ``(t [B, N, W], grid)`` -> ``x_0 [B, 1+R+N, W]`` (class token, registers, patches; positions added).
        attend: ``(block, x [B, L, W])`` -> ``(block output [B, L, W], head-averaged attention [B, L, L])``.
        pool: last block output ``[B, 1+R+N, W]`` -> pooled feature ``[B, D]`` (not normalised).
        norm: the LayerNorm after the last block, ``[..., W] -> [..., W]``.
    """

    width: int
    blocks: Sequence[nn.Module]
    num_registers: int
    embed: Callable[[torch.Tensor], PatchTokens]
    start: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]
    attend: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    pool: Callable[[torch.Tensor], torch.Tensor]
    norm: Callable[[torch.Tensor], torch.Tensor]


def _open_clip_steps(visual: VisionTransformer) -> _ViTSteps:
    """The stepper's steps on an open_clip ViT: ``conv1``; ``ln_pre(patch_dropout([c; t] + P))`` (registers inserted
    after the class token before ``ln_pre``); ``_pool`` and ``proj`` as in ``encode_image``; ``ln_post``."""

    def embed(images: torch.Tensor) -> PatchTokens:
        maps = visual.conv1(images)
        return PatchTokens(tokens=maps.flatten(2).transpose(1, 2), grid=(int(maps.shape[-2]), int(maps.shape[-1])))

    def start(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = torch.cat([visual.class_embedding.to(tokens.dtype).expand(len(tokens), 1, -1), tokens], dim=1)
        x = visual.patch_dropout(x + _resized_positions(visual, grid).to(x.dtype))
        if _num_registers(visual):
            x = visual.insert_registers(x)  # [B, 1+R+N, W]: the registers have no position and are never dropped
        return visual.ln_pre(x)

    def pool(x: torch.Tensor) -> torch.Tensor:
        pooled, _ = visual._pool(x)  # ln_post, global or attentional pooling: encode_image's own code
        return pooled @ visual.proj if visual.proj is not None else pooled

    return _ViTSteps(width=int(visual.transformer.width), blocks=visual.transformer.resblocks,
                     num_registers=_num_registers(visual), embed=embed, start=start, attend=_attend_with_weights,
                     pool=pool, norm=visual.ln_post)


def _timm_steps(model: TimmVisionTransformer, name: str) -> _ViTSteps:
    """The stepper's steps on a timm ViT (module docstring), ``name`` being how errors call the model:
    ``patch_embed``; ``norm_pre(patch_drop(_pos_embed(t)))``; ``forward_head(norm(x), pre_logits=True)``
    (its class token when the head does not pool); ``norm``."""
    patch_embed = model.patch_embed

    def embed(images: torch.Tensor) -> PatchTokens:
        tokens = patch_embed(images)
        layout = str(getattr(getattr(patch_embed, "output_fmt", None), "value", "NLC"))
        if tokens.dim() == 4 and layout == "NHWC":  # dynamic_img_size: [B, h, w, W]
            return PatchTokens(tokens=tokens.flatten(1, 2), grid=(int(tokens.shape[1]), int(tokens.shape[2])))
        if tokens.dim() != 3 or not (getattr(patch_embed, "flatten", False) or layout == "NLC"):
            raise ValueError(f"embed_patches: the patch embedding of {name} returns {layout} tokens "
                             f"{tuple(tokens.shape)}; the stepper reads flattened [B, N, W] or NHWC [B, h, w, W]")
        if hasattr(patch_embed, "dynamic_feat_size"):
            grid = tuple(int(n) for n in patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))
        else:
            grid = tuple(int(n) for n in patch_embed.grid_size)
        if grid[0] * grid[1] != tokens.shape[1]:
            raise ValueError(f"embed_patches: {name} gave {tokens.shape[1]} patch tokens, not the {grid[0]}x{grid[1]} "
                             f"grid of a {tuple(images.shape[-2:])} input")
        return PatchTokens(tokens=tokens, grid=grid)

    def start(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if model.dynamic_img_size:
            tokens = tokens.unflatten(1, grid)  # NHWC, as patch_embed gives it: _pos_embed resamples the positions
        elif model.pos_embed is not None and tuple(grid) != tuple(patch_embed.grid_size):
            raise ValueError(f"run_blocks: {name} has position embeddings for a {tuple(patch_embed.grid_size)} grid, "
                             f"not {tuple(grid)}; build it with encoder_kwargs dynamic_img_size=True (or img_size) "
                             f"for other input sizes")
        return model.norm_pre(model.patch_drop(model._pos_embed(tokens)))

    def pool(x: torch.Tensor) -> torch.Tensor:
        pooled = model.forward_head(model.norm(x), pre_logits=True)
        return pooled[:, 0] if pooled.dim() == 3 else pooled  # global_pool='': the class token

    return _ViTSteps(width=int(model.embed_dim), blocks=model.blocks, num_registers=int(model.num_reg_tokens),
                     embed=embed, start=start, attend=_timm_attend_with_weights, pool=pool, norm=model.norm)


def _drop_text_alias_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-time hook: drop the ``text.*`` copies of ``clip.*`` weights that state dicts written before the text tower
    became a property hold, so those checkpoints still load strictly."""
    for key in [k for k in state_dict if k.startswith(prefix + "text.")]:
        del state_dict[key]


class VisionLanguageModel(nn.Module):
    """An open_clip model (or an open_clip text tower with a timm image tower) with the encoders xvlm methods need.

    Args:
        model: open_clip architecture name (``ViT-B-16``, ``RN50``, ``xvlm-tiny``, ...), or a model with its own
            config and weights: ``hf-hub:<org>/<repo>``, ``local-dir:<folder>`` (e.g. what ``xvlm export`` wrote).
        pretrained: weights source of ``model``, resolved as in the module docstring (``auto``: ``shapes`` for the
            project's architectures, unset for ``hf-hub:``/``local-dir:`` names, which take no other value).
        freeze: which tower stays fixed: ``none``, ``image`` (the image tower in use), ``text`` or ``all`` (both
            and the logit scale). Block adapters always train.
        image_size: input side in pixels; defaults to the architecture's (positional embeddings of loaded
            weights are interpolated by open_clip). With a timm tower, the side it is used at (default: the
            size in timm's pretrained config).
        image_encoder: ``clip`` (the image tower of ``model``) or ``timm:<name>`` (:class:`TimmFeatures`; the
            CLIP image tower is then dropped).
        encoder_weights: weights of a timm tower: ``None``, ``hub`` or a local file.
        encoder_kwargs: extra ``timm.create_model`` arguments of a timm tower.
    """

    def __init__(
        self,
        model: str = "xvlm-tiny",
        pretrained: str | None = AUTO,
        freeze: Freeze = "none",
        image_size: int | None = None,
        image_encoder: str = "clip",
        encoder_weights: str | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        uses_clip_tower = image_encoder == "clip"
        if not uses_clip_tower and not image_encoder.startswith("timm:"):
            raise ValueError(f"image_encoder={image_encoder!r}: use 'clip' or 'timm:<model name>'")
        if uses_clip_tower and (encoder_weights is not None or encoder_kwargs):
            raise ValueError("encoder_weights and encoder_kwargs configure a timm image encoder; "
                             "image_encoder='clip' takes its weights from pretrained")
        self.model_name = model
        self.image_encoder = image_encoder
        self.clip = create_clip(model, pretrained, image_size if uses_clip_tower else None)
        self.timm_encoder: TimmFeatures | None = None
        if not uses_clip_tower:
            self.clip.visual = None  # the text tower stays; the CLIP image tower is not used
            self.timm_encoder = TimmFeatures(image_encoder.removeprefix("timm:"), encoder_weights, encoder_kwargs)
            self._timm_image_size = image_size
        self.tokenizer = open_clip.get_tokenizer(model)
        if not hasattr(self.text, "token_embedding"):
            raise ValueError(f"model '{model}' has no token-embedding text tower; soft prompts are not supported")
        self.register_load_state_dict_pre_hook(_drop_text_alias_keys)
        self.set_freeze(freeze)

    @property
    def text(self) -> nn.Module:
        """The text tower: ``clip.text`` (open_clip's custom-text models) or the CLIP model itself, whose text parts
        are top-level attributes. A property, not a submodule, so every weight has one name in the state dict."""
        return getattr(self.clip, "text", self.clip)

    @property
    def image_tower(self) -> nn.Module:
        """The image tower in use: open_clip's ``clip.visual`` or the :class:`TimmFeatures`."""
        return self.clip.visual if self.timm_encoder is None else self.timm_encoder

    @property
    def text_aligned_images(self) -> bool:
        """Whether image features live in the text's joint space (the CLIP tower) or not (a timm tower)."""
        return self.timm_encoder is None

    @property
    def image_size(self) -> int:
        """Input side in pixels (a timm tower without ``image_size``: its pretrained config's, else a ValueError)."""
        if self.timm_encoder is not None:
            return self._timm_image_size or _timm_input_side(self.timm_encoder)
        size = self.clip.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def num_registers(self) -> int:
        """``R``, the register tokens of the CLIP image tower (:data:`REGISTER_TOKENS`) or of a timm ViT
        (``num_reg_tokens``); 0 for every other tower."""
        if self.timm_encoder is None:
            return _num_registers(self.clip.visual)
        return int(getattr(self.timm_encoder.model, "num_reg_tokens", 0) or 0)

    @property
    def vit_width(self) -> int:
        """``W``, the token width of the ViT image tower (open_clip's or timm's); a ValueError for other towers."""
        return self._vit_steps("vit_width").width

    @property
    def embed_dim(self) -> int:
        return int(self.text.text_projection.shape[1])

    @property
    def text_width(self) -> int:
        return int(self.text.token_embedding.embedding_dim)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def set_freeze(self, freeze: Freeze) -> None:
        """Set ``requires_grad`` so that the towers named by ``freeze`` stay fixed (logit scale is frozen by ``all``).

        Block adapters (:meth:`add_block_adapters`) stay trainable whatever ``freeze`` is.
        """
        if freeze not in ("none", "image", "text", "all"):
            raise ValueError(f"freeze={freeze!r}: choose one of none, image, text, all")
        self.freeze = freeze
        self.requires_grad_(True)
        if freeze in ("image", "all"):
            self.image_tower.requires_grad_(False)
        if freeze in ("text", "all"):
            for name, param in self.clip.named_parameters():
                if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias"):
                    param.requires_grad_(False)
        if freeze == "all":
            self.clip.logit_scale.requires_grad_(False)
        for param in self.adapter_parameters():
            param.requires_grad_(True)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[T, L]`` (``L`` = the model's context length) on the model's device."""
        return self.tokenizer(list(texts)).to(self.text.token_embedding.weight.device)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, D]`` projected image features (unit norm when ``normalize``); CLIP tower only."""
        if self.timm_encoder is not None:
            raise ValueError(f"encode_image needs the CLIP image tower; this model uses image_encoder="
                             f"{self.image_encoder!r}, whose features are not aligned with text (use feature_maps)")
        return self.clip.encode_image(images, normalize=normalize)

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Image feature maps ``[B, 3, H, W] -> [B, C, h, w]``.

        timm tower: ``forward_features``. CLIP ViT: the last block's patch tokens in the joint space,
        ``ln_post(x) @ proj`` (not normalised), laid out as ``[B, D, h, w]``.
        """
        if self.timm_encoder is not None:
            return self.timm_encoder(images)
        self._vit("feature_maps")
        out = self.run_blocks(self.embed_patches(images), layers=1)
        projected = self.project_tokens(out.tokens[-1][:, 1:], normalize=False)
        return projected.transpose(1, 2).unflatten(2, out.grid)

    @property
    def pools_causal_eot(self) -> bool:
        """Whether the text tower is causal and pools at the end-of-text token (the largest id), as CLIP's is.

        Then no token after the last end-of-text of a batch can reach a pooled feature, and text encoding drops
        those padding positions (:meth:`encode_prompt_embeddings`).
        """
        pool = getattr(self.text, "text_pool_type", getattr(self.text, "pool_type", None))
        return pool == "argmax" and getattr(self.text, "attn_mask", None) is not None

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True, length: int | None = None) -> torch.Tensor:
        """``[T, L]`` token ids -> ``[T, D]`` projected text features (unit norm when ``normalize``).

        For a causal tower pooled at the end-of-text token this is
        ``encode_prompt_embeddings(token_embeddings(tokens), argmax(tokens), length=length)``, which skips the
        padding after the longest text (CLIP's own ``encode_text`` runs all ``L`` positions; the features agree to
        rounding). ``length`` (at least the longest text's end-of-text position + 1) saves reading that position
        back from the device.
        """
        if not self.pools_causal_eot:
            return self.clip.encode_text(tokens, normalize=normalize)
        return self.encode_prompt_embeddings(self.token_embeddings(tokens), tokens.argmax(dim=-1), normalize, length)

    def encode_texts(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Tokenize and encode ``T`` strings: ``[T, D]``."""
        return self.encode_text(self.tokenize(texts), normalize=normalize)

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[T, L]`` ids -> ``[T, L, W]`` input embeddings of the text transformer (for soft prompts)."""
        return self.text.token_embedding(tokens)

    def encode_prompt_embeddings(
        self, embeddings: torch.Tensor, eot_index: torch.Tensor, normalize: bool = True, length: int | None = None
    ) -> torch.Tensor:
        """Text features from input embeddings (CoOp-style soft prompts).

        ``f = ln_final(transformer(E + P))[t, eot_t] @ W_proj`` for embeddings ``E [T, L, W]``, positional
        embedding ``P [L, W]`` and the end-of-text position ``eot_index [T]``; returns ``[T, D]``. With a causal
        tower only the first ``length`` positions are run (the later ones cannot reach any ``eot_t``); ``length``
        must exceed every ``eot_t``. Prompt builders that know it pass it; ``None`` reads ``max_t eot_t + 1``
        back from the device, which makes the host wait for the device.
        """
        text = self.text
        cast_dtype = text.transformer.get_cast_dtype()
        if self.pools_causal_eot:
            embeddings = embeddings[:, : int(eot_index.max()) + 1 if length is None else length]
        length = embeddings.shape[1]
        x = embeddings.to(cast_dtype) + text.positional_embedding[:length].to(cast_dtype)
        attn_mask = text.attn_mask[:length, :length] if text.attn_mask is not None else None
        x = text.transformer(x, attn_mask=attn_mask)
        x = text.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index]
        proj = text.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1) if normalize else x

    def compile_blocks(self, **options: Any) -> int:
        """Compile the towers in place with ``torch.compile(**options)``: every block of the text transformer and of
        a ViT image tower (open_clip's ``resblocks``, timm's ``blocks``), other image towers whole.

        Blocks rather than whole towers, so that every path through them (``encode_image``, :meth:`run_blocks`,
        soft prompts through :meth:`encode_prompt_embeddings`) runs compiled; ``nn.Module.compile`` keeps every
        parameter's name, so state dicts and checkpoints are those of the plain model. Returns the number of
        modules compiled.
        """
        tower = self.image_tower
        if self.timm_encoder is not None:
            image_blocks = list(getattr(tower.model, "blocks", [])) or [tower]
        else:
            image_blocks = list(tower.transformer.resblocks) if isinstance(tower, VisionTransformer) else [tower]
        modules = [*self.text.transformer.resblocks, *image_blocks]
        for module in modules:
            module.compile(**options)
        return len(modules)

    # ----------------------------------------------------------------- ViT stepper
    def _vit(self, what: str) -> VisionTransformer:
        """The open_clip ViT image tower, or a ValueError naming what ``what`` needs and what the model has."""
        if self.timm_encoder is not None:
            raise ValueError(f"{what} needs an open_clip ViT image tower; model '{self.model_name}' uses the timm "
                             f"encoder image_encoder={self.image_encoder!r}")
        visual = self.clip.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"{what} needs an open_clip ViT image tower; model '{self.model_name}' has a "
                             f"{type(visual).__name__}")
        blocks = visual.transformer.resblocks
        if not all(isinstance(block, ResidualAttentionBlock) for block in blocks):
            raise ValueError(f"{what} needs open_clip's default ResidualAttentionBlock; model '{self.model_name}' "
                             f"has {type(blocks[0]).__name__} blocks")
        return visual

    def _timm_vit(self, what: str) -> TimmVisionTransformer:
        """The timm ViT image tower the stepper supports (module docstring), or a ValueError naming what ``what``
        needs and what the model has."""
        from timm.models.vision_transformer import Attention, Block
        from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

        if self.timm_encoder is None:
            raise ValueError(f"{what} needs a timm ViT image tower; model '{self.model_name}' uses the CLIP tower")
        model = self.timm_encoder.model
        where = f"image_encoder={self.image_encoder!r}"
        if not isinstance(model, TimmVisionTransformer):
            raise ValueError(f"{what} needs an open_clip ViT or a timm VisionTransformer image tower; {where} is "
                             f"a {type(model).__name__}")
        if not model.has_class_token:
            raise ValueError(f"{what} needs a ViT with a class token; {where} was built without one "
                             f"(class_token=False)")
        if model.num_prefix_tokens != 1 + model.num_reg_tokens:
            raise ValueError(f"{what} needs a timm ViT whose prefix tokens are the class token and registers; {where} "
                             f"({type(model).__name__}) has {model.num_prefix_tokens} prefix tokens and "
                             f"{model.num_reg_tokens} registers")
        unsupported = sorted({f"{type(b).__name__}/{type(getattr(b, 'attn', None)).__name__}" for b in model.blocks
                              if type(b) is not Block or type(b.attn) is not Attention})
        if unsupported:
            raise ValueError(f"{what} needs timm's Block with its Attention in every block; {where} has "
                             f"{', '.join(unsupported)} (block/attention)")
        return model

    def _vit_steps(self, what: str) -> _ViTSteps:
        """The stepper's steps on the image tower (open_clip's or timm's ViT), or a ValueError naming ``what``."""
        if self.timm_encoder is None:
            return _open_clip_steps(self._vit(what))
        return _timm_steps(self._timm_vit(what), f"image_encoder={self.image_encoder!r}")

    def embed_patches(self, images: torch.Tensor) -> PatchTokens:
        """Patch embeddings ``[B, 3, H, W] -> [B, N, W]`` (``N = h·w`` row-major) and the grid ``(h, w)``.

        open_clip: ``conv1``; timm: ``patch_embed`` (module docstring). Nothing else is added yet:
        :meth:`run_blocks` prepends the class token (and registers) and adds the positions.
        """
        return self._vit_steps("embed_patches").embed(images)

    def run_blocks(
        self,
        patches: PatchTokens,
        *,
        attention: bool = False,
        layers: int | Sequence[int] | None = None,
        normalize: bool = True,
    ) -> BlockOutputs:
        """Run the visual transformer on patch embeddings, keeping the requested blocks' tokens (and attention).

        ``x_0 = ln_pre(patch_dropout([c; t] + P))`` with ``t = patches.tokens [B, N, W]``, the class token ``c`` and
        the position embeddings ``P`` resized to ``patches.grid`` if it differs from the tower's (with register
        tokens ``r``: ``ln_pre([c; r; t'])`` where ``[c; t'] = patch_dropout([c; t] + P)``); a timm ViT:
        ``x_0 = norm_pre(patch_drop(_pos_embed(t)))`` (module docstring). Then every block runs (all of them, for
        ``pooled``). A block whose attention is requested runs unfused and returns
        ``mean_heads softmax(Q Kᵀ / √d_head)`` from the same pass; the others run their own forward.

        Args:
            patches: output of :meth:`embed_patches` (its tokens may be edited, the grid must hold ``N`` tokens).
            attention: also return the requested blocks' head-averaged attention ``[B, 1+N+R, 1+N+R]``
                (class, patches, then the ``R`` registers; :class:`BlockOutputs`).
            layers: last ``n`` blocks if an int, these block indices (negative count from the end) if a sequence,
                all blocks if ``None``.
            normalize: unit-normalise ``pooled``, as ``encode_image(images, normalize=True)`` does.

        Returns:
            :class:`BlockOutputs`; ``pooled [B, D]`` equals ``encode_image`` of the images ``patches`` came from
            (timm: the pre-logits feature ``[B, W]``, ``forward_head(norm(x_L), pre_logits=True)``).
        """
        steps = self._vit_steps("run_blocks")
        wanted = _block_indices(layers, len(steps.blocks))
        tokens, grid = patches.tokens, tuple(patches.grid)
        if tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"run_blocks got {tokens.shape[1]} patch tokens for a {grid[0]}x{grid[1]} grid")
        x = steps.start(tokens, grid)  # [B, 1+R+N, W]: class token, registers, patches
        outputs, maps = [], []
        for index, block in enumerate(steps.blocks):
            if attention and index in wanted:
                x, weights = steps.attend(block, x)
                maps.append(weights)
            else:
                x = block(x)
            if index in wanted:
                outputs.append(x)
        pooled = steps.pool(x)
        registers = steps.num_registers
        split = [_split_registers(y, registers) for y in outputs]
        outputs, register_outputs = [y for y, _ in split], [r for _, r in split]
        if registers:
            order = _class_patches_registers(x.shape[1], registers, x.device)
            maps = [m[:, order][:, :, order] for m in maps]
        return BlockOutputs(tokens=outputs, attention=maps if attention else None,
                            pooled=F.normalize(pooled, dim=-1) if normalize else pooled, layers=wanted, grid=grid,
                            registers=register_outputs, num_registers=registers)

    def encode_image_tokens(self, images: torch.Tensor, layers: int | Sequence[int] | None = None) -> ImageTokens:
        """Intermediate patch and class tokens of a ViT tower (:meth:`run_blocks`).

        Args:
            images: ``[B, 3, H, W]``.
            layers: last ``n`` blocks if an int, these block indices if a sequence, all blocks if ``None``.

        Returns:
            :class:`ImageTokens` with ``[B, N, W]`` patch tokens (before ``ln_post`` and the projection; see
            :meth:`project_tokens`), ``[B, W]`` class tokens and ``[B, R, W]`` register tokens per layer, in
            block order.
        """
        out = self.run_blocks(self.embed_patches(images), layers=layers)
        return ImageTokens(patches=[t[:, 1:] for t in out.tokens], cls=[t[:, 0] for t in out.tokens], grid=out.grid,
                           registers=out.registers)

    def norm_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tower's last LayerNorm on ViT tokens, before the projection: ``ln_post(x)`` (timm: ``norm(x)``),
        ``[..., W] -> [..., W]``."""
        return self._vit_steps("norm_tokens").norm(tokens)

    def project_tokens(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Map ViT tokens ``[..., W]`` into the joint space: ``ln_post(x) @ proj`` -> ``[..., D]``."""
        visual = self._vit("project_tokens")
        x = self.norm_tokens(tokens)
        if visual.proj is not None:
            x = x @ visual.proj
        return F.normalize(x, dim=-1) if normalize else x

    # ----------------------------------------------------------------- block adapters
    def add_block_adapters(
        self,
        attn: Callable[[int], nn.Module] | None = None,
        mlp: Callable[[int], nn.Module] | None = None,
    ) -> None:
        """Add parallel adapters to the residual branches of every visual block (module docstring).

        ``x <- x + ls_1(MHSA(ln_1 x)) + A_att(x)``, then ``x <- x + ls_2(MLP(ln_2 x)) + A_mlp(x)``.

        Args:
            attn: factory ``width -> module [B, L, W] -> [B, L, W]`` of ``A_att`` (one call per block), or ``None``.
            mlp: the same for ``A_mlp``.

        The adapters are placed on the tower's device and dtype and stay trainable under every ``freeze``; their
        parameters are :meth:`adapter_parameters`. A tower takes adapters once. A ``local-dir:`` folder whose
        config records :class:`BottleneckAdapter` adapters (:meth:`changes`) gets them when it is built, before its
        weights are loaded.
        """
        _add_adapters(self._vit("add_block_adapters"), self.model_name, attn, mlp)
        self.set_freeze(self.freeze)

    def add_prompt_tokens(self, count: int, std: float = 0.02) -> nn.Parameter:
        """Append ``count`` learnable tokens ``[count, W] ~ N(0, std²)`` to the image token sequence (visual prompt
        tuning, DROR's "why" prompt): the register-token mechanism of the module docstring, so every block attends
        over ``[c; p_1..p_count; t]`` and pooling reads only the class and patch tokens.

        The tokens stay trainable whatever ``freeze`` was set before; a later :meth:`set_freeze` of the image tower
        freezes them with it. A tower that already has register tokens takes no prompts (its registers are its own).
        """
        visual = self._vit("add_prompt_tokens")
        if self.num_registers:
            raise ValueError(f"model '{self.model_name}' already has {self.num_registers} register tokens; prompt "
                             f"tokens need a tower without registers")
        RegisterVisionTransformer.add_registers(visual, count)
        with torch.no_grad():
            visual.register_tokens.normal_(0.0, std)
        return visual.register_tokens.requires_grad_(True)

    def adapter_modules(self) -> Iterator[nn.Module]:
        """The block adapters of the image tower, block by block (attention branch first)."""
        visual = self.clip.visual
        if not isinstance(visual, VisionTransformer):
            return
        for block in visual.transformer.resblocks:
            if isinstance(block, AdaptedResidualAttentionBlock):
                yield from (m for m in (block.adapter_attn, block.adapter_mlp) if m is not None)

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the block adapters (e.g. for their own learning rate); none before adapters are added."""
        for module in self.adapter_modules():
            yield from module.parameters()

    def changes(self) -> TowerChanges:
        """What the CLIP image tower has beyond open_clip's model of its config, as a folder's ``xvlm`` entry records
        it (:func:`tower_changes`): the architecture's conv stem, the register or prompt tokens
        (:attr:`num_registers`) and the block adapters of each branch.

        Raises:
            ValueError: a branch's adapters are not :class:`BottleneckAdapter` or differ between blocks (no config
                entry re-creates them).
        """
        visual = self.clip.visual
        blocks = list(visual.transformer.resblocks) if isinstance(visual, VisionTransformer) else []
        specs = []
        for branch in ("attn", "mlp"):
            adapters = [getattr(block, f"adapter_{branch}", None) for block in blocks]
            if all(adapter is None for adapter in adapters):
                specs.append(None)
                continue
            other = next((a for a in adapters if not isinstance(a, BottleneckAdapter)), None)
            if other is not None:
                raise ValueError(f"model '{self.model_name}' has {type(other).__name__} block adapters on the "
                                 f"{branch} branch; only BottleneckAdapter adapters can be re-created from a config")
            kinds = {adapter.spec for adapter in adapters}
            if len(kinds) > 1:
                raise ValueError(f"model '{self.model_name}' has {branch} block adapters of {len(kinds)} specs "
                                 f"({sorted(kinds, key=repr)}); a config records one per branch")
            specs.append(kinds.pop())
        return TowerChanges(tower_changes(self.model_name).conv_stem, self.num_registers, *specs)


def _block_indices(layers: int | Sequence[int] | None, depth: int) -> tuple[int, ...]:
    """Non-negative ascending block indices of ``layers`` (see :meth:`VisionLanguageModel.run_blocks`)."""
    if layers is None:
        return tuple(range(depth))
    if isinstance(layers, int):
        if not 1 <= layers <= depth:
            raise ValueError(f"layers={layers}: the image tower has depth {depth}; ask for the last 1..{depth} blocks")
        return tuple(range(depth - layers, depth))
    outside = [index for index in layers if not -depth <= index < depth]
    if outside:
        raise ValueError(f"layers={list(layers)}: blocks {outside} are outside the image tower's depth {depth} "
                         f"(indices -{depth}..{depth - 1})")
    return tuple(sorted({index % depth for index in layers}))


def _timm_input_side(encoder: TimmFeatures) -> int:
    """The input side in timm's pretrained config of ``encoder``; a ValueError if it names none."""
    config = getattr(encoder.model, "pretrained_cfg", None) or {}
    if "input_size" not in config:
        raise ValueError(f"image_encoder='timm:{encoder.name}' names no input size; pass image_size")
    return int(config["input_size"][-1])
