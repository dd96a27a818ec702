"""Export prompts on the packaged SmolLM2 to PEFT adapter folders and compare logits with PEFT.

    python benchmarks/peft_roundtrip.py --out benchmarks/results/peft_roundtrip.json

Each method's parameters are moved off their init (as training would), exported with
``export_adapter``, loaded with ``peft.PeftModel.from_pretrained`` on a fresh copy of the backbone
(fp32, eager attention) and run on the same sentence; the JSON holds the max absolute logit
difference over every position of the sentence.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from prompt_methods import PrefixTuning, PTuning, SoftPrompt  # noqa: E402
from prompt_methods.backbone import resolve  # noqa: E402
from prompt_methods.peft_format import export_adapter  # noqa: E402
from test_peft_format import our_logits, peft_logits, trained  # noqa: E402


def main() -> None:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/peft_roundtrip.json")
    args = parser.parse_args()
    path = resolve("smollm2-135m")
    ids = torch.tensor([AutoTokenizer.from_pretrained(path)("Review: a gripping, funny film. Sentiment:")["input_ids"]])
    rows, folder = [], Path(tempfile.mkdtemp())
    for cls, kwargs in ((SoftPrompt, {"num_virtual_tokens": 20}), (PrefixTuning, {"num_virtual_tokens": 10}),
                        (PTuning, {"num_virtual_tokens": 6})):
        ours = trained(cls(backbone="smollm2-135m", verbalizer=[[[5]], [[7]]], **kwargs), seed=3)
        ours.backbone.set_attn_implementation("eager")
        out = export_adapter(ours, folder / cls.__name__)
        base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
        theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
        a, b = our_logits(ours, ids), peft_logits(theirs, ids)
        row = {"method": cls.__name__, "peft_type": json.loads((out / "adapter_config.json").read_text())["peft_type"],
               "max_abs_logit_diff": (a - b).abs().max().item(), "max_abs_logit": a.abs().max().item(),
               "peft": peft.__version__}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
