"""The ``Task`` contract: what a DataModule tells every method and callback about its label space.

Every DataModule in the zoo publishes ``self.task`` (a frozen :class:`Task`) before ``setup`` returns.
Methods read only the fields they need and call :meth:`Task.require` so that a missing field fails with a
message naming the method, the field and the datamodule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Task:
    """Label space and side information of a dataset.

    Attributes:
        source: who published the task, e.g. ``"ShapesDataModule(task='attributes')"`` (used in error messages).
        class_names: name of every class, in label order (``C`` classes).
        seen: indices of classes that training batches may contain.
        unseen: indices of classes held out from training (zero-shot classes).
        descriptors: per class name, DCLIP-style descriptor phrases ("which is red").
        attributes: ``[C, A]`` class-attribute matrix.
        attribute_names: ``A`` names, one per attribute column.
        states / objects: primitive vocabularies of a compositional task.
        pairs: every ``(state, object)`` composition, indexed like ``class_names``.
        train_pairs / val_pairs / test_pairs: indices into ``pairs`` of the compositions each split contains.
        rationales: per class name, the visual facts that justify it.
        rationale_vocab: names of the ``R`` rationales: the columns of the per-sample ``rationales`` batch field and
            the values of its ``rationale`` index.
    """

    source: str
    class_names: tuple[str, ...]
    seen: tuple[int, ...]
    unseen: tuple[int, ...] = ()
    descriptors: dict[str, list[str]] | None = None
    attributes: torch.Tensor | None = None
    attribute_names: tuple[str, ...] | None = None
    states: tuple[str, ...] | None = None
    objects: tuple[str, ...] | None = None
    pairs: tuple[tuple[str, str], ...] | None = None
    train_pairs: tuple[int, ...] | None = None
    val_pairs: tuple[int, ...] | None = None
    test_pairs: tuple[int, ...] | None = None
    rationales: dict[str, list[str]] | None = None
    rationale_vocab: tuple[str, ...] | None = None
    extras: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def require(self, name: str, user: str) -> object:
        """Return field ``name`` or raise a ``ValueError`` saying that ``user`` needs it and ``source`` lacks it."""
        value = getattr(self, name, None)
        if value is None or (hasattr(value, "__len__") and len(value) == 0):
            raise ValueError(
                f"{user} needs {name}; {self.source} has none. "
                f"Choose a datamodule/task that provides '{name}' (see docs for which tasks carry it)."
            )
        return value
