"""Task DataModules, one per task family, sharing :class:`PromptDataModule`."""

from datamodules.base import PromptDataModule
from datamodules.classification import ClassificationDataModule
from datamodules.question_answering import QuestionAnsweringDataModule
from datamodules.relation_extraction import RelationExtractionDataModule

__all__ = ["PromptDataModule", "ClassificationDataModule", "RelationExtractionDataModule", "QuestionAnsweringDataModule"]
