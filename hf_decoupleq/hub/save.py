"""Model cards on `save_pretrained` / `push_to_hub` of a decoupleQ model.

transformers writes no model card on `save_pretrained`, and its `push_to_hub` replaces README.md with a generic
card. A quantized checkpoint without its settings and the `import hf_decoupleq` line is a trap for its users
(transformers silently loads random weights without the plugin), so the quantizer attaches, on the model
instance only, a `save_pretrained` that also renders `model_cards/template.md`, and a `push_to_hub` that saves
that folder and uploads it with `huggingface_hub` (one commit). Both are picklable objects holding the model (not
closures), so `copy.deepcopy(model)` and pickling give a copy whose methods save the copy.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)


def _state_bytes(model: nn.Module) -> int:
    # Tied tensors (e.g. embeddings shared with lm_head) are stored once.
    seen = {}
    for t in model.state_dict().values():
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
    return sum(seen.values())


def render_card_for(model: nn.Module, repo_id: str | None = None):
    from .card import render_model_card

    qcfg = model.config.quantization_config
    qdict = qcfg.to_dict() if hasattr(qcfg, "to_dict") else dict(qcfg)
    stats = qdict.get("quantization_stats") or {}
    base = stats.get("base_model") or getattr(model, "name_or_path", None) or None
    return render_model_card(
        qdict,
        base_model=base if base and not os.path.isdir(str(base)) else None,
        quantized_size_bytes=_state_bytes(model),
        original_size_bytes=stats.get("original_size_bytes"),
        eval_results=stats.get("eval"),
        repo_id=repo_id,
    )


class _SaveWithCard:
    """`model.save_pretrained` that also writes the model card (README.md).

    A picklable object holding the model, not a closure over it: `copy.deepcopy(model)` and pickling copy it with
    the model, so the copy's `save_pretrained` saves the copy."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.__doc__ = type(model).save_pretrained.__doc__

    def __call__(self, save_directory, *args, **kwargs):
        model = self.model
        result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
        if getattr(model, "hf_quantizer", None) is not None and getattr(model.config, "quantization_config", None):
            card = render_card_for(model, repo_id=kwargs.get("repo_id"))
            card.save(os.path.join(os.fspath(save_directory), "README.md"))
        return result


class _PushWithCard:
    """`model.push_to_hub` that uploads the folder `model.save_pretrained` writes, model card included, in one
    commit (same design as `_SaveWithCard`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.__doc__ = type(model).push_to_hub.__doc__

    def __call__(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        max_shard_size: str | int = "50GB",
        create_pr: bool = False,
        revision: str | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ):
        from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

        api = HfApi(token=token if isinstance(token, str) else None)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            _SaveWithCard(self.model)(tmp, max_shard_size=max_shard_size, repo_id=repo_id)
            if tags:
                card = ModelCard.load(os.path.join(tmp, "README.md"))
                card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
                card.save(os.path.join(tmp, "README.md"))
            operations = [
                CommitOperationAdd(path_in_repo=os.path.relpath(os.path.join(root, f), tmp).replace(os.sep, "/"),
                                   path_or_fileobj=os.path.join(root, f))
                for root, _, files in sorted(os.walk(tmp))
                for f in sorted(files)
            ]
            return api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=commit_message or "Upload decoupleQ-quantized model",
                create_pr=create_pr,
                revision=revision,
            )


def attach_card_writer(model: nn.Module) -> None:
    """Make `model.save_pretrained` also write README.md and `model.push_to_hub` upload it (idempotent)."""
    current = model.__dict__.get("save_pretrained")
    if isinstance(current, _SaveWithCard) and current.model is model:
        return
    model.save_pretrained = _SaveWithCard(model)
    model.push_to_hub = _PushWithCard(model)
