"""``VisionLanguageModel``: one wrapper around open_clip that every method and callback uses.

Construction has one factory with explicit precedence for ``pretrained``:

1. ``None`` — random initialisation;
2. a name in :data:`LOCAL_SOURCES` (``"shapes"``) — a backbone this project builds itself; it is cached under
   ``checkpoints/backbones/`` and built on first use;
3. a path to an existing file — an open_clip state dict, loaded with ``weights_only=True``;
4. anything else — an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``, ...), downloaded by open_clip.

Architectures are open_clip JSON configs. The project registers its own from ``xvlm/model_configs/``; a config
listed in :data:`CONV_STEMS` gets its ViT patch embedding replaced by a small convolutional stem (hybrid ViT,
Xiao et al. 2021, "Early convolutions help transformers see better") of the same total stride, which is what
lets a four-layer ViT tell shapes apart on 64-px images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

Freeze = Literal["none", "image", "text", "all"]

#: ViT configs whose patch embedding is a convolutional stem: output channels of each stride-2 stage. The
#: number of stages is ``log2(patch_size)``, so the stem yields the config's patch grid.
CONV_STEMS: dict[str, tuple[int, ...]] = {
    "xvlm-tiny": (32, 64, 128),
}


def _shapes_source(model_name: str) -> str:
    from xvlm.shapes_pretraining import shapes_backbone_path

    return str(shapes_backbone_path(model_name))


#: Pretrained sources this project provides itself: name -> function(model_name) returning a local weights file.
LOCAL_SOURCES: dict[str, Callable[[str], str]] = {
    "shapes": _shapes_source,
}


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


def available_models() -> list[str]:
    """Every architecture name ``VisionLanguageModel`` accepts (open_clip's and the project's)."""
    return sorted(open_clip.list_models())


def _check_model_name(model: str) -> None:
    if model.startswith(("hf-hub:", "local-dir:")) or model in open_clip.list_models():
        return
    raise ValueError(
        f"Unknown model '{model}'. Available open_clip architectures: {', '.join(available_models())}. "
        f"Project configs live in {MODEL_CONFIG_DIR}."
    )


def _resolve_pretrained(model: str, pretrained: str | None) -> tuple[str | None, str | None]:
    """Return ``(local_file, open_clip_tag)``; at most one is set. Raises a clear error for unknown values."""
    if pretrained is None:
        return None, None
    if pretrained in LOCAL_SOURCES:
        return LOCAL_SOURCES[pretrained](model), None
    if Path(pretrained).is_file():
        return pretrained, None
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained in tags:
        return None, pretrained
    looks_like_path = any(ch in pretrained for ch in "/\\.")
    what = f"file '{pretrained}' does not exist" if looks_like_path else f"'{pretrained}' is not a known source"
    raise ValueError(
        f"pretrained={pretrained!r} for model '{model}': {what}. Use an existing weights file, one of the "
        f"project's sources {sorted(LOCAL_SOURCES)}, or an open_clip tag for this model: {tags or 'none'}."
    )


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
    """Build the open_clip model ``model`` (with its conv stem, if any) and load ``pretrained`` (module docstring)."""
    _check_model_name(model)
    local_file, tag = _resolve_pretrained(model, pretrained)
    with _silenced_warnings(local_file is not None):  # open_clip warns "initialized randomly" before we load
        clip = open_clip.create_model(model, pretrained=tag, force_image_size=image_size)
    if model in CONV_STEMS:
        visual = clip.visual
        visual.conv1 = conv_stem(visual.conv1.out_channels, visual.patch_size[0], CONV_STEMS[model])
    if local_file is not None:
        open_clip.load_checkpoint(clip, local_file, weights_only=True)
    return clip


@dataclass
class ImageTokens:
    """Intermediate image tokens.

    Attributes:
        patches: one ``[B, N, W]`` tensor per requested layer (``N = h * w`` patch tokens, tower width ``W``).
        cls: one ``[B, W]`` class token per requested layer (``None`` for towers without one).
        grid: ``(h, w)`` of the patch grid.
    """

    patches: list[torch.Tensor]
    cls: list[torch.Tensor] | None
    grid: tuple[int, int]


class VisionLanguageModel(nn.Module):
    """An open_clip model with the encoders every xvlm method needs.

    Args:
        model: open_clip architecture name (``ViT-B-16``, ``RN50``, ``xvlm-tiny``, ...).
        pretrained: weights source, resolved as in the module docstring.
        freeze: which tower stays fixed: ``none``, ``image``, ``text`` or ``all``.
        image_size: input side in pixels; defaults to the architecture's (positional embeddings of loaded
            weights are interpolated by open_clip).
    """

    def __init__(
        self,
        model: str = "xvlm-tiny",
        pretrained: str | None = "shapes",
        freeze: Freeze = "none",
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.model_name = model
        self.clip = create_clip(model, pretrained, image_size)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.text = getattr(self.clip, "text", self.clip)
        if not hasattr(self.text, "token_embedding"):
            raise ValueError(f"model '{model}' has no token-embedding text tower; soft prompts are not supported")
        self.set_freeze(freeze)

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

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
        """Set ``requires_grad`` so that the towers named by ``freeze`` stay fixed (logit scale is frozen by ``all``)."""
        if freeze not in ("none", "image", "text", "all"):
            raise ValueError(f"freeze={freeze!r}: choose one of none, image, text, all")
        self.freeze = freeze
        self.clip.requires_grad_(True)
        if freeze in ("image", "all"):
            self.clip.visual.requires_grad_(False)
        if freeze in ("text", "all"):
            for name, param in self.clip.named_parameters():
                if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias"):
                    param.requires_grad_(False)
        if freeze == "all":
            self.clip.logit_scale.requires_grad_(False)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[T, L]`` (``L`` = the model's context length) on the model's device."""
        return self.tokenizer(list(texts)).to(self.text.token_embedding.weight.device)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, D]`` projected image features (unit norm when ``normalize``)."""
        return self.clip.encode_image(images, normalize=normalize)

    @property
    def pools_causal_eot(self) -> bool:
        """Whether the text tower is causal and pools at the end-of-text token (the largest id), as CLIP's is.

        Then no token after the last end-of-text of a batch can reach a pooled feature, and text encoding drops
        those padding positions (:meth:`encode_prompt_embeddings`).
        """
        pool = getattr(self.text, "text_pool_type", getattr(self.text, "pool_type", None))
        return pool == "argmax" and getattr(self.text, "attn_mask", None) is not None

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``[T, L]`` token ids -> ``[T, D]`` projected text features (unit norm when ``normalize``).

        For a causal tower pooled at the end-of-text token this is
        ``encode_prompt_embeddings(token_embeddings(tokens), argmax(tokens))``, which skips the padding after the
        longest text (CLIP's own ``encode_text`` runs all ``L`` positions; the features agree to rounding).
        """
        if not self.pools_causal_eot:
            return self.clip.encode_text(tokens, normalize=normalize)
        return self.encode_prompt_embeddings(self.token_embeddings(tokens), tokens.argmax(dim=-1), normalize)

    def encode_texts(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Tokenize and encode ``T`` strings: ``[T, D]``."""
        return self.encode_text(self.tokenize(texts), normalize=normalize)

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[T, L]`` ids -> ``[T, L, W]`` input embeddings of the text transformer (for soft prompts)."""
        return self.text.token_embedding(tokens)

    def encode_prompt_embeddings(
        self, embeddings: torch.Tensor, eot_index: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Text features from input embeddings (CoOp-style soft prompts).

        ``f = ln_final(transformer(E + P))[t, eot_t] @ W_proj`` for embeddings ``E [T, L, W]``, positional
        embedding ``P [L, W]`` and the end-of-text position ``eot_index [T]``; returns ``[T, D]``. With a causal
        tower only the first ``max_t eot_t + 1`` positions are run (the later ones cannot reach any ``eot_t``).
        """
        text = self.text
        cast_dtype = text.transformer.get_cast_dtype()
        if self.pools_causal_eot:
            embeddings = embeddings[:, : int(eot_index.max()) + 1]
        length = embeddings.shape[1]
        x = embeddings.to(cast_dtype) + text.positional_embedding[:length].to(cast_dtype)
        attn_mask = text.attn_mask[:length, :length] if text.attn_mask is not None else None
        x = text.transformer(x, attn_mask=attn_mask)
        x = text.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index]
        proj = text.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image_tokens(self, images: torch.Tensor, layers: int | Sequence[int] | None = None) -> ImageTokens:
        """Intermediate patch tokens from ``forward_intermediates``.

        Args:
            images: ``[B, 3, H, W]``.
            layers: last ``n`` blocks if an int, these block indices if a sequence, all blocks if ``None``.

        Returns:
            :class:`ImageTokens` with ``[B, N, W]`` patch tokens (before ``ln_post`` and the projection; see
            :meth:`project_tokens`) and ``[B, W]`` class tokens per layer.
        """
        visual = self.clip.visual
        indices = list(layers) if isinstance(layers, Sequence) else layers
        out = visual.forward_intermediates(
            images, indices=indices, intermediates_only=True, output_fmt="NCHW", output_extra_tokens=True
        )
        maps = out["image_intermediates"]
        grid = (int(maps[0].shape[-2]), int(maps[0].shape[-1]))
        patches = [m.flatten(2).transpose(1, 2) for m in maps]
        prefix = out.get("image_intermediates_prefix")
        cls = [p[:, 0] for p in prefix] if prefix is not None else None
        return ImageTokens(patches=patches, cls=cls, grid=grid)

    def project_tokens(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Map ViT tokens ``[..., W]`` into the joint space: ``ln_post(x) @ proj`` -> ``[..., D]``."""
        visual = self.clip.visual
        if not hasattr(visual, "ln_post"):
            raise ValueError(f"project_tokens needs a ViT image tower; '{self.model_name}' has {type(visual).__name__}")
        x = visual.ln_post(tokens)
        if visual.proj is not None:
            x = x @ visual.proj
        return F.normalize(x, dim=-1) if normalize else x
