"""Task DataModules, one per task family, sharing :class:`PromptDataModule`."""

from datamodules.base import PromptDataModule
from datamodules.classification import ClassificationDataModule

__all__ = ["PromptDataModule", "ClassificationDataModule"]
