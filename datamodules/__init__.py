"""The DataModule zoo; every DataModule publishes a :class:`Task`."""

from datamodules.cifar import CIFARDataModule
from datamodules.czsl import CZSLDataModule
from datamodules.folder import ImageFolderDataModule
from datamodules.rationales import DRORDataModule, RationaleFolderDataModule, normalise_rationale
from datamodules.shapes import ShapesDataModule
from datamodules.task import Task
from datamodules.xlsa import XianDataModule

__all__ = ["CIFARDataModule", "CZSLDataModule", "DRORDataModule", "ImageFolderDataModule", "RationaleFolderDataModule",
           "ShapesDataModule", "Task", "XianDataModule", "normalise_rationale"]
