"""Upload a saved decoupleQ checkpoint to the Hugging Face Hub, with its model card and tokenizer.

    hf auth login   # or set HF_TOKEN
    python examples/push_to_hub.py --model smollm2-w2g64 --repo your-name/SmolLM2-135M-decoupleQ-w2g64

`push_to_hub` of a decoupleQ model uploads the packed safetensors, config.json and a README.md model card (settings,
sizes, and the `import hf_decoupleq` line its users need) in one commit.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from huggingface_hub import CommitOperationAdd, HfApi
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_decoupleq  # noqa: F401  (registers quant_method "decoupleq" with transformers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder of a saved decoupleQ-quantized model")
    p.add_argument("--repo", required=True, help="Hub repo id to create or update, e.g. your-name/model-w2g64")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    args = p.parse_args(argv)

    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # The token comes from the environment (HF_TOKEN) or `hf auth login`; never put it in a script.
    commit = model.push_to_hub(args.repo, private=args.private or None)
    # Not `tokenizer.push_to_hub`: transformers' version uploads a generic README.md over the model card.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = [CommitOperationAdd(name, os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))]
        HfApi().create_commit(repo_id=args.repo, operations=files, commit_message="Upload tokenizer")
    print(f"uploaded {args.model} to {args.repo}: {getattr(commit, 'commit_url', commit)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
