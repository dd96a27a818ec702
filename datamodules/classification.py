"""Text classification: SST-2, TREC, AG News, or any file or hub dataset with a text and a label."""

from __future__ import annotations

from datamodules.base import PromptDataModule
from datamodules.readers import DataError


class ClassificationDataModule(PromptDataModule):
    """Text classification with a template and a verbalizer.

    Takes every argument of :class:`~datamodules.base.PromptDataModule`; the task's family must be
    ``classification``. Example config::

        data:
          class_path: datamodules.ClassificationDataModule
          init_args: {task: sst2, few_shot_k: 16}
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.spec.family != "classification":
            raise DataError(
                f"data.init_args.task: '{self.spec.name}' is a {self.spec.family} task, not classification"
            )
