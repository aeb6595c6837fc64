"""Learnable soft prompts (CoOp, Zhou et al. 2022) encoded by a frozen or trainable CLIP text tower.

A prompt of class ``c`` is the token sequence ``[SOS] X₁ … X_n {name_c} . [EOS]``: the ``n`` context vectors
``X [n, W]`` replace the embeddings of ``n`` placeholder words, the class name and the full stop keep their
word embeddings, and the sequence goes through the text transformer, ``ln_final`` and the text projection
(:meth:`~xvlm.backbones.VisionLanguageModel.encode_prompt_embeddings`). The context is shared by all classes,
or one context per class (``class_specific``). Only the token ids of the classes are stored; their word
embeddings are looked up when a prompt is encoded, so memory does not grow with ``C × L × W``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from xvlm.backbones import VisionLanguageModel

PLACEHOLDER = "X"


class SoftPrompts(nn.Module):
    """Context vectors ``X`` and the token ids of every class prompt (see the module docstring).

    Args:
        backbone: the model whose tokenizer, word embeddings and text tower the prompts use (not registered as a
            submodule: the caller owns it).
        class_names: ``C`` class names in label order.
        n_ctx: number of context vectors ``n``.
        class_specific: one context per class (``[C, n, W]``) instead of one shared context (``[n, W]``).
        init_std: the context is initialised ``N(0, init_std²)``.
    """

    def __init__(self, backbone: VisionLanguageModel, class_names: Sequence[str], n_ctx: int = 12,
                 class_specific: bool = False, init_std: float = 0.02) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"n_ctx={n_ctx}: soft prompts need at least one context vector")
        context = " ".join([PLACEHOLDER] * n_ctx)
        tokens = backbone.tokenize([f"{context} {name}." for name in class_names]).cpu()
        eot = tokens.argmax(dim=-1)  # the end-of-text id is the largest in CLIP's vocabulary
        if bool((tokens[:, -1] != 0).any()):  # the tokenizer truncated a prompt
            raise ValueError(f"a prompt with {n_ctx} context words does not fit the text context of "
                             f"{tokens.shape[1]} tokens; shorten n_ctx or the class names")
        self.n_ctx = n_ctx
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("eot_index", eot, persistent=False)
        shape = (len(class_names), n_ctx, backbone.text_width) if class_specific else (n_ctx, backbone.text_width)
        self.context = nn.Parameter(torch.randn(shape) * init_std)

    def embeddings(self, backbone: VisionLanguageModel, classes: torch.Tensor, shift: int = 0) -> torch.Tensor:
        """Input embeddings ``[K, L, W]`` of the prompts of ``classes [K]``, the context rolled by ``shift``.

        The context occupies positions ``1..n``; ``roll(X, shift)`` along the token axis gives the prompt
        variants of LICO.
        """
        words = backbone.token_embeddings(self.tokens[classes])
        context = self.context[classes] if self.context.ndim == 3 else self.context.expand(len(classes), -1, -1)
        context = torch.roll(context, shifts=shift, dims=1).to(words.dtype)
        return torch.cat([words[:, :1], context, words[:, 1 + self.n_ctx:]], dim=1)

    def encode(self, backbone: VisionLanguageModel, classes: torch.Tensor, shift: int = 0,
               normalize: bool = False) -> torch.Tensor:
        """Text features ``[K, D]`` of the prompts of ``classes [K]`` (context rolled by ``shift``)."""
        return backbone.encode_prompt_embeddings(self.embeddings(backbone, classes, shift), self.eot_index[classes],
                                                 normalize=normalize)

    def encode_variants(self, backbone: VisionLanguageModel, classes: torch.Tensor, count: int) -> torch.Tensor:
        """Features ``[K, M, D]`` of ``M = count`` variants per class, variant ``k`` with the context rolled by ``k``.

        All ``K · M`` prompts go through the text tower in one batch.
        """
        embeddings = torch.cat([self.embeddings(backbone, classes, shift) for shift in range(count)])
        eot = self.eot_index[classes].repeat(count)
        feats = backbone.encode_prompt_embeddings(embeddings, eot, normalize=False)
        return feats.view(count, len(classes), -1).transpose(0, 1)
