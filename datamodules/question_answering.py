"""Question answering. BoolQ-style yes/no questions read the answer through a verbalizer, like
classification; the answer slot is the template's ``{mask}``."""

from __future__ import annotations

from datamodules.base import PromptDataModule


class QuestionAnsweringDataModule(PromptDataModule):
    """QA tasks (``family: question_answering``) such as BoolQ, or a file in the same shape.

    Takes every argument of :class:`~datamodules.base.PromptDataModule`. Example::

        data:
          class_path: datamodules.QuestionAnsweringDataModule
          init_args: {task: boolq, max_length: 320}
    """

    family = "question_answering"
