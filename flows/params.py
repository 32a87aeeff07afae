"""Typed flow parameters: the Prefect UI draws them as a form, and the server validates them.

The constraints live in these types, so the parameter schema of a deployment
carries them and the server refuses a run with an invalid value before any
work starts, naming the field. The descriptions live in each flow's docstring
(`Args:`), which is where Prefect reads them from.

A parameter left empty (None) keeps the worker's setting: its profile, then its
environment (EMBEDDING_PROVIDER, RAGINGEST_CHUNKER, ...), then the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from config.settings import ChunkerName, IndexStrategy, ProviderName, Settings, load_settings

SourcePath = Annotated[str, Field(min_length=1)]
SourceName = Annotated[str, Field(min_length=1)] | None
Profile = Literal["dev", "prod"] | None
Globs = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None
Chunker = ChunkerName | None
Provider = ProviderName | None
ModelName = Annotated[str, Field(min_length=1)] | None
Dimensions = Annotated[int, Field(ge=1, le=16000)] | None
BatchSize = Annotated[int, Field(ge=1, le=2048)] | None
IndexStrategyChoice = IndexStrategy | None
SettingsOverrides = dict[str, Any] | None

# Flow parameter -> the Settings field it overrides.
SETTING_FOR_PARAMETER: dict[str, str] = {
    "include": "include",
    "exclude": "exclude",
    "chunker": "chunker",
    "provider": "embedding_provider",
    "model": "embedding_model",
    "dimensions": "embedding_dimensions",
    "batch_size": "embed_batch_inputs",
    "index_strategy": "index_strategy",
}

# Prefect stores parameters in plain text and shows them in the UI: secrets come from the
# worker's environment only.
SECRET_SETTINGS = frozenset({"openai_api_key"})


class ParameterError(ValueError):
    """A flow parameter the server could not check (a path, a settings key) is wrong."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"parameter {parameter!r}: {message}")
        self.parameter = parameter


def checked_overrides(settings_overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The free-form overrides, refused when a key is not a setting or holds a secret."""
    overrides = dict(settings_overrides or {})
    for key in overrides:
        if key in SECRET_SETTINGS:
            raise ParameterError(
                "settings_overrides",
                f"{key} is a secret; set it in the worker's environment, never in parameters",
            )
        if key not in Settings.model_fields:
            raise ParameterError("settings_overrides", f"{key!r} is not a setting")
    return overrides


def run_settings(
    profile: str | None, settings_overrides: Mapping[str, Any] | None, **choices: Any
) -> Settings:
    """Settings for one flow run: profile, environment, overrides, then the typed parameters."""
    overrides = checked_overrides(settings_overrides)
    for parameter, value in choices.items():
        if value is not None:
            overrides[SETTING_FOR_PARAMETER[parameter]] = tuple(value) if isinstance(value, list) else value
    return load_settings(profile, **overrides)


def existing_folder(source: str) -> Path:
    """The source folder, checked on the machine that runs the flow before any work starts."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ParameterError("source", f"{source} is not a folder on the machine running this flow")
    return folder
