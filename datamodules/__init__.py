"""The DataModule zoo; every DataModule publishes a :class:`Task`."""

from datamodules.shapes import ShapesDataModule
from datamodules.task import Task

__all__ = ["ShapesDataModule", "Task"]
