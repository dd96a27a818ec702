"""Hard prompts: a template and a verbalizer, no new parameters.

"Exploiting Cloze Questions for Few Shot Text Classification and Natural Language Inference"
(Schick & Schütze, arXiv:2001.07676); "Making Pre-trained Language Models Better Few-shot
Learners" (Gao et al., arXiv:2012.15723).

With a frozen backbone it is zero-shot (``validate``/``test`` need no ``fit``); with
``tune_backbone: true`` it is prompt-based fine-tuning in the PET / LM-BFF style.
"""

from __future__ import annotations

from prompt_methods.base import PromptModule


class HardPrompt(PromptModule):
    """Template + verbalizer. Takes every argument of :class:`PromptModule`.

    Example::

        model:
          class_path: prompt_methods.HardPrompt
          init_args: {tune_backbone: true, lr: 1.0e-5}
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
