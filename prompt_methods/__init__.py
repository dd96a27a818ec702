"""Prompt methods: one LightningModule each, interchangeable on any task DataModule."""

from prompt_methods.base import PromptModule
from prompt_methods.fine_tuning import FineTuning
from prompt_methods.hard_prompt import HardPrompt
from prompt_methods.p_tuning import PTuning
from prompt_methods.peft_peer import PeftPeer
from prompt_methods.prefix_tuning import PrefixTuning
from prompt_methods.soft_prompt import SoftPrompt

__all__ = ["PromptModule", "HardPrompt", "SoftPrompt", "PrefixTuning", "PTuning", "FineTuning", "PeftPeer"]
