"""``MixtureLM``: a causal LM built from a ``transformers`` config, from scratch, for Composer.

Why not Composer's ``HuggingFaceModel``: it expects a tokenizer and hub-style batches with
labels; our batches are packed ``input_ids`` (uint16 on the wire) plus the ``group`` of each
sample. What the mixing algorithms need from a model is the loss of every token
(:meth:`MixtureLM.per_token_loss`) so that per-group losses come from the training forward
pass itself; :meth:`MixtureLM.loss` keeps the last one as ``token_losses``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torchmetrics import Metric

__all__ = ["FAMILIES", "MixtureLM", "build_config"]

FAMILIES = ("gpt2", "llama")


def _config_class(family: str) -> type:
    if family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig
    raise ValueError(f"model.family must be one of {', '.join(FAMILIES)}, got {family!r}")


def build_config(family: str, vocab_size: int, seq_len: int, **options: Any) -> Any:
    """A ``transformers`` config; unknown options are an error (transformers would keep them)."""
    cls = _config_class(family)
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"unknown model option(s) {', '.join(unknown)} for family {family!r}; "
            f"known: {', '.join(sorted(known))}"
        )
    length_key = "n_positions" if family == "gpt2" else "max_position_embeddings"
    options.setdefault(length_key, seq_len)
    if options[length_key] < seq_len:
        raise ValueError(f"model.{length_key}={options[length_key]} < sequence length {seq_len}")
    return cls(vocab_size=vocab_size, **options)


class MixtureLM(ComposerModel):
    """Next-token prediction over packed sequences: predict ``input_ids[:, 1:]`` from the rest."""

    def __init__(self, family: str, vocab_size: int, seq_len: int, **options: Any) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.family = family
        self.config = build_config(family, vocab_size, seq_len, **options)
        self.config._attn_implementation = "sdpa"
        self.model = AutoModelForCausalLM.from_config(self.config)
        self.token_losses: torch.Tensor | None = None
        self.train_metrics = self._metrics()
        self.val_metrics = self._metrics()

    @staticmethod
    def _metrics() -> dict[str, Metric]:
        return {
            "LanguageCrossEntropy": LanguageCrossEntropy(),
            "LanguagePerplexity": LanguagePerplexity(),
        }

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        ids = batch["input_ids"][:, :-1].long()
        return self.model(input_ids=ids, use_cache=False).logits

    def per_token_loss(self, outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Cross-entropy of every predicted token, ``(batch, seq_len - 1)``, in float32."""
        targets = batch["input_ids"][:, 1:].long()
        flat = F.cross_entropy(
            outputs.float().reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction="none"
        )
        return flat.view(targets.shape)

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        self.token_losses = self.per_token_loss(outputs, batch)
        return self.token_losses.mean()

    def eval_forward(self, batch: dict[str, Any], outputs: Any | None = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.val_metrics

    def update_metric(self, batch: Any, outputs: torch.Tensor, metric: Metric) -> None:
        metric.update(outputs, batch["input_ids"][:, 1:].long())
