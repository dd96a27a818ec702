"""Task DataModules, one per task family, sharing :class:`PromptDataModule`."""

from datamodules.base import PromptDataModule
from datamodules.classification import ClassificationDataModule
from datamodules.question_answering import QuestionAnsweringDataModule
from datamodules.relation_extraction import RelationExtractionDataModule

#: task family -> DataModule class (a plain lookup for scripts; configs name the class directly)
DATAMODULES = {
    "classification": ClassificationDataModule,
    "relation_extraction": RelationExtractionDataModule,
    "question_answering": QuestionAnsweringDataModule,
}

__all__ = ["PromptDataModule", "ClassificationDataModule", "RelationExtractionDataModule", "QuestionAnsweringDataModule", "DATAMODULES"]
