"""Text classification: SST-2, TREC, AG News, or any file or hub dataset with a text and a label."""

from __future__ import annotations

from datamodules.base import PromptDataModule


class ClassificationDataModule(PromptDataModule):
    """Text classification with a template and a verbalizer.

    Takes every argument of :class:`~datamodules.base.PromptDataModule`; the task's family must be
    ``classification``. Example config::

        data:
          class_path: datamodules.ClassificationDataModule
          init_args: {task: sst2, few_shot_k: 16}
    """

    family = "classification"
