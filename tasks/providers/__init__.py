"""The embedding providers: one registry, the one place a provider's name is spelled.

`ProviderName` feeds the settings, the CLI choices and the flow forms. Each
provider lives in its own module, imported only when a provider of its kind is
built, so choosing `hash` never imports openai, and nothing here imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from config.settings import Settings
    from tasks.providers.base import Embedder

ProviderName = Literal["openai", "sentence-transformers", "hash"]
PROVIDER_NAMES: tuple[ProviderName, ...] = get_args(ProviderName)

PROVIDER_MODULES: dict[ProviderName, str] = {
    "openai": "tasks.providers.openai",
    "sentence-transformers": "tasks.providers.local",
    "hash": "tasks.providers.hash",
}
"""Provider name -> the module whose `create(model, dimensions, settings)` builds it."""

if set(PROVIDER_MODULES) != set(PROVIDER_NAMES):  # pragma: no cover - a registry edit left half done
    raise ImportError("tasks.providers: PROVIDER_MODULES and ProviderName name different providers")


def make_embedder(provider: str, model: str, dimensions: int, settings: Settings) -> Embedder:
    """Build the named provider's embedder; an unknown name fails with the names there are."""
    from config.settings import model_key
    from tasks.providers.base import TerminalEmbeddingError

    module = PROVIDER_MODULES.get(provider)  # type: ignore[call-overload]
    if module is None:
        raise TerminalEmbeddingError(
            f"unknown provider {provider!r}; choose one of {', '.join(PROVIDER_NAMES)}",
            model_key=model_key(provider, model, dimensions),
        )
    embedder: Embedder = importlib.import_module(module).create(model, dimensions, settings)
    return embedder
