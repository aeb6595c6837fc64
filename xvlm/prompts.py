"""Text prompts: learnable soft prompts (CoOp, Zhou et al. 2022), prompts over a learnable vocabulary of primitives
(CSP/Troika, for compositional methods: :class:`PrimitivePrompts`) and descriptor sentences (DCLIP), one builder
each for LaZSL, LICO, MSCI and ECOR.

A soft prompt of class ``c`` is the token sequence ``[SOS] X₁ … X_n {name_c} . [EOS]``: the ``n`` context vectors
``X [n, W]`` replace the embeddings of ``n`` placeholder words, the class name and the full stop keep their word
embeddings, and the sequence goes through the (frozen or trainable) text transformer, ``ln_final`` and the text
projection (:meth:`~xvlm.backbones.VisionLanguageModel.encode_prompt_embeddings`). The context is shared by all
classes, or one context per class (``class_specific``). Only the token ids of the classes are stored; their word
embeddings are looked up when a prompt is encoded, so memory does not grow with ``C × L × W``.

Descriptor sentences (DCLIP, Menon & Vondrick 2023, as LaZSL uses them; spec ``methods/lazsl.md`` §2.1) are the
one prompt builder for class descriptors: :func:`descriptor_sentences` turns ``{class: [descriptor, ...]}`` into
``"{class}, {descriptor_sentence(d)}{suffix}"`` per descriptor, padded to the longest list with a mask, and
:func:`encode_descriptors` encodes them with a text tower. Two deliberate deviations from DCLIP: the sentence rule
tests the first *word* ("a"/"an", "has", ..., "used"), not the first letters, so "antennae" reads "which has
antennae"; a class with an empty descriptor list is its name alone ("donuts"), not "donuts, which has ".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from xvlm.backbones import VisionLanguageModel

__all__ = [
    "ClassPromptTokens",
    "PrimitivePrompts",
    "SoftPrompts",
    "descriptor_sentence",
    "descriptor_sentences",
    "encode_descriptors",
    "primitive_phrase",
    "require_descriptors",
]

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
        self.length = int(eot.max()) + 1
        """Positions a causal text tower runs: up to the latest end-of-text of any class (a static size)."""
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
                                                 normalize=normalize, length=self.length)

    def encode_variants(self, backbone: VisionLanguageModel, classes: torch.Tensor, count: int) -> torch.Tensor:
        """Features ``[K, M, D]`` of ``M = count`` variants per class, variant ``k`` with the context rolled by ``k``.

        All ``K · M`` prompts go through the text tower in one batch.
        """
        embeddings = torch.cat([self.embeddings(backbone, classes, shift) for shift in range(count)])
        eot = self.eot_index[classes].repeat(count)
        feats = backbone.encode_prompt_embeddings(embeddings, eot, normalize=False, length=self.length)
        return feats.view(count, len(classes), -1).transpose(0, 1)


class ClassPromptTokens:
    """Token ids of every template × class prompt, tokenized once per task and kept on the device.

    A training step that draws one template per class then gathers its prompts' ids on the device
    (:meth:`encode`): no tokenizer call and no value read back from the device per step. The ids are cut after
    the latest end-of-text position of all prompts (a causal tower never reads further), ``length``, a size known
    on the host; towers that are not causal keep the full context.

    Args:
        backbone: the model whose tokenizer makes the ids and whose text tower encodes them.
        prompts: ``T`` lists (one per template) of the ``C`` class prompts in label order.

    Attributes:
        tokens: ``[T, C, length]`` token ids, on the device of ``backbone`` (see :meth:`to`).
        length: positions per prompt.
    """

    def __init__(self, backbone: VisionLanguageModel, prompts: Sequence[Sequence[str]]) -> None:
        ids = backbone.tokenize([prompt for row in prompts for prompt in row]).cpu()
        self.length = int(ids.argmax(dim=-1).max()) + 1 if backbone.pools_causal_eot else ids.shape[1]
        self.tokens = ids[:, : self.length].reshape(len(prompts), -1, self.length)
        self.to(backbone.logit_scale.device)

    def to(self, device: torch.device) -> ClassPromptTokens:
        """Move the ids to ``device`` (once; a no-op when they are there)."""
        self.tokens = self.tokens.to(device)
        return self

    def encode(self, backbone: VisionLanguageModel, templates: torch.Tensor, classes: torch.Tensor,
               normalize: bool = True) -> torch.Tensor:
        """Text features ``[K, D]`` of the prompts of template ``templates[k]`` and class ``classes[k]`` (``[K]``
        each, on the device)."""
        return backbone.encode_text(self.tokens[templates, classes], normalize=normalize, length=self.length)


# --------------------------------------------------------------------------------------------- descriptor sentences
_VERBS = frozenset({"has", "often", "typically", "may", "can"})
_IS_WORDS = frozenset({"a", "an", "used"})


def descriptor_sentence(descriptor: str) -> str:
    """DCLIP's relative clause for a descriptor, testing its first word (module docstring).

    "a"/"an"/"used" → "which is {d}"; "has"/"often"/"typically"/"may"/"can" → "which {d}"; else "which has {d}".

    Example:
        >>> [descriptor_sentence(d) for d in ("a long beak", "antennae", "can fly", "five points")]
        ['which is a long beak', 'which has antennae', 'which can fly', 'which has five points']
    """
    words = descriptor.split(maxsplit=1)
    first = words[0].lower() if words else ""
    if first in _IS_WORDS:
        return f"which is {descriptor}"
    if first in _VERBS:
        return f"which {descriptor}"
    return f"which has {descriptor}"


def require_descriptors(table: Mapping[str, list[str]], class_names: Sequence[str], source: str) -> None:
    """Raise a ``ValueError`` naming ``source`` and every one of ``class_names`` that ``table`` lacks."""
    missing = [name for name in class_names if name not in table]
    if missing:
        raise ValueError(f"{source} has no descriptors for {len(missing)} class(es): {', '.join(missing)}")


def descriptor_sentences(
    class_names: Sequence[str], descriptors: Mapping[str, list[str]], suffix: str = ""
) -> tuple[list[list[str]], torch.Tensor]:
    """Sentences ``"{class}, {descriptor_sentence(d)}{suffix}"`` per class, padded to the longest list.

    Underscores in class names become spaces. A class with an empty list gets its name alone (module docstring).

    Args:
        class_names: the ``C`` classes, in score order.
        descriptors: descriptor phrases per class name; must cover every name.
        suffix: appended to every sentence ("." for ImageNet in the LaZSL reference, "" elsewhere).

    Returns:
        ``C`` lists of ``M = max_k M_k`` sentences (padded with ""), and the ``[C, M]`` bool mask of real ones.

    Raises:
        ValueError: if ``descriptors`` lacks some of ``class_names`` (all missing names are listed).
    """
    require_descriptors(descriptors, class_names, "the descriptor table")
    rows = []
    for name in class_names:
        label = name.replace("_", " ")
        sentences = [f"{label}, {descriptor_sentence(d)}{suffix}" for d in descriptors[name]]
        rows.append(sentences or [label + suffix])
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    width = int(lengths.max()) if rows else 0
    mask = torch.arange(width) < lengths[:, None]
    return [row + [""] * (width - len(row)) for row in rows], mask


def encode_descriptors(
    encoder: VisionLanguageModel, sentences: list[list[str]], mask: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Unit-norm text features ``Q [C, M, D]`` of the sentences where ``mask [C, M]`` is set; zeros elsewhere.

    ``sentences`` and ``mask`` as :func:`descriptor_sentences` returns them; at most ``batch_size`` sentences go
    through the text tower at once.
    """
    flat = [s for row, keep in zip(sentences, mask.tolist()) for s, k in zip(row, keep) if k]
    feats = torch.cat([encoder.encode_texts(flat[i : i + batch_size]) for i in range(0, len(flat), batch_size)])
    out = feats.new_zeros(*mask.shape, feats.shape[-1])
    out[mask.to(feats.device)] = feats
    return out


# --------------------------------------------------------------------------------------------- primitive prompts
def primitive_phrase(name: str) -> str:
    """A primitive's name as words: lowercased, "." and "_" as spaces (UT-Zappos ``Faux.Fur`` → ``faux fur``)."""
    return name.replace(".", " ").replace("_", " ").lower().strip()


class PrimitivePrompts(nn.Module):
    """Soft prompts over a vocabulary of primitives (CSP/Troika/MSCI): ``[SOS] p₁ … p_n v₁ … v_k [EOS]``.

    Each branch (``pair``, ``state``, ``object``, ...) has its own prefix ``p [n, W]``, initialised from the word
    embeddings of ``prefix`` ("a photo of": ``n = 3``). Every primitive is one learnable vector ``v [W]`` of a shared
    vocabulary ``V [|A|+|O|, W]`` (states first), initialised as the mean word embedding of its name
    (:func:`primitive_phrase`), so a multi-word primitive takes one position. A prompt's primitives are rows of ``V``
    (a state–object pair: ``v_a, v_o``); ``vocab_dropout`` drops vocabulary entries' elements in training. The
    sequence goes through the text tower like :class:`SoftPrompts`; causal towers run only up to the end-of-text
    position, the "context length 8" of the reference.

    Args:
        backbone: the model whose tokenizer, word embeddings and text tower the prompts use (not registered).
        states / objects: primitive names, in the task's order.
        branches: names of the prefixes.
        prefix: the words that initialise every prefix.
        vocab_dropout: dropout on the vocabulary in training.
    """

    def __init__(self, backbone: VisionLanguageModel, states: Sequence[str], objects: Sequence[str],
                 branches: Sequence[str] = ("pair", "state", "object"), prefix: str = "a photo of",
                 vocab_dropout: float = 0.0) -> None:
        super().__init__()
        names = [primitive_phrase(n) for n in (*states, *objects)]
        with torch.no_grad():
            head = backbone.tokenize([prefix]).cpu()
            self.n_prefix = int(head.argmax(dim=-1)) - 1  # positions between start and end of text
            if self.n_prefix < 1:
                raise ValueError(f"prefix={prefix!r} has no words; give the words that initialise the prompts")
            words = backbone.token_embeddings(head.to(backbone.logit_scale.device))[0].float().cpu()
            tokens = backbone.tokenize(names).cpu()
            embedded = backbone.token_embeddings(tokens.to(backbone.logit_scale.device)).float().cpu()
        inner = (torch.arange(tokens.shape[1]) > 0) & (torch.arange(tokens.shape[1]) < tokens.argmax(dim=-1)[:, None])
        vocab = (embedded * inner[..., None]).sum(dim=1) / inner.sum(dim=1, keepdim=True).clamp_min(1)
        self.num_states = len(states)
        self.vocab = nn.Parameter(vocab)
        self.prefixes = nn.ParameterDict({b: nn.Parameter(words[1 : 1 + self.n_prefix].clone()) for b in branches})
        self.register_buffer("start_end", words[[0, 1 + self.n_prefix]].clone(), persistent=False)
        self.vocab_dropout = vocab_dropout

    def embeddings(self, branch: str, primitives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings ``[K, 2 + n + k, W]`` of prompts over ``primitives [K, k]`` (rows of ``V``; states
        ``0..|A|-1``, objects ``|A| + o``) and their end-of-text positions ``[K]``."""
        vocab = nn.functional.dropout(self.vocab, self.vocab_dropout, self.training)
        count = len(primitives)
        prefix = self.prefixes[branch].expand(count, -1, -1)
        start, end = (row.expand(count, 1, -1) for row in self.start_end.to(vocab.dtype))
        sequence = torch.cat([start, prefix, vocab[primitives], end], dim=1)
        eot = torch.full((count,), sequence.shape[1] - 1, dtype=torch.long, device=sequence.device)
        return sequence, eot

    def encode(self, backbone: VisionLanguageModel, branch: str, primitives: torch.Tensor,
               chunk: int = 4096) -> torch.Tensor:
        """Unit-norm text features ``[K, D]`` of the prompts over ``primitives [K, k]``, at most ``chunk`` prompts
        through the text tower at once."""
        out = []
        for part in primitives.split(chunk):
            sequence, eot = self.embeddings(branch, part)
            out.append(backbone.encode_prompt_embeddings(sequence, eot, normalize=True, length=sequence.shape[1]))
        return torch.cat(out)
