"""The deployments of `deployments/prefect.yaml`, built for `prefect.serve`.

The YAML file is the one description of the deployments: `prefect deploy --all`
reads it for a work pool, and `ragingest serve` reads it here, so the names,
schedules, default parameters and concurrency limits are the same both ways.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule

log = logging.getLogger(__name__)

CHECKOUT = Path(__file__).resolve().parents[1]
PREFECT_YAML = CHECKOUT / "deployments" / "prefect.yaml"


class DeploymentConfigError(ValueError):
    """`prefect.yaml` describes a deployment this module cannot build."""


@dataclass(frozen=True, slots=True)
class CronSpec:
    cron: str
    timezone: str | None = None
    active: bool = True

    def __post_init__(self) -> None:
        """Refuse a bad cron expression or timezone here, with one readable line."""
        import pydantic
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=self.cron, timezone=self.timezone)
        except pydantic.ValidationError as exc:
            problems = "; ".join(str(error["msg"]).removeprefix("Value error, ") for error in exc.errors())
            raise DeploymentConfigError(f"schedule {self.cron!r} ({self.timezone}): {problems}") from None


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    name: str
    entrypoint: str
    """`path/to/file.py:flow_function`, relative to the checkout."""
    description: str | None = None
    tags: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[CronSpec, ...] = ()
    concurrency_limit: int | None = None

    @property
    def entrypoint_file(self) -> Path:
        return CHECKOUT / self.entrypoint.rsplit(":", 1)[0]

    @property
    def module_and_function(self) -> tuple[str, str]:
        path, function = self.entrypoint.rsplit(":", 1)
        return path.removesuffix(".py").replace("/", "."), function


def read_deployment_specs(path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    """Every deployment in `prefect.yaml`, in file order."""
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return [_spec(entry, path) for entry in document.get("deployments") or []]


def _spec(entry: dict[str, Any], path: Path) -> DeploymentSpec:
    name = entry.get("name")
    entrypoint = entry.get("entrypoint")
    if not name or not entrypoint or ":" not in entrypoint:
        raise DeploymentConfigError(f"{path}: every deployment needs a name and a file.py:flow entrypoint")
    limit = entry.get("concurrency_limit")
    if isinstance(limit, dict):
        limit = limit.get("limit")
    return DeploymentSpec(
        name=name,
        entrypoint=entrypoint,
        description=entry.get("description"),
        tags=tuple(entry.get("tags") or ()),
        parameters=dict(entry.get("parameters") or {}),
        schedules=tuple(_cron(name, schedule) for schedule in entry.get("schedules") or ()),
        concurrency_limit=limit,
    )


def _cron(deployment: str, schedule: dict[str, Any]) -> CronSpec:
    if "cron" not in schedule:
        raise DeploymentConfigError(f"deployment {deployment}: only cron schedules are served")
    return CronSpec(schedule["cron"], schedule.get("timezone"), bool(schedule.get("active", True)))


def with_schedule(
    specs: Sequence[DeploymentSpec], *, cron: str | None, timezone: str | None
) -> list[DeploymentSpec]:
    """Override the cron expression and/or timezone of every scheduled deployment."""
    changed: list[DeploymentSpec] = []
    for spec in specs:
        schedules = tuple(
            replace(s, cron=cron or s.cron, timezone=timezone or s.timezone) for s in spec.schedules
        )
        changed.append(replace(spec, schedules=schedules))
    return changed


def served_deployments(specs: Sequence[DeploymentSpec]) -> list[RunnerDeployment]:
    """Runner deployments for `prefect.serve`; a deployment whose flow file is absent is skipped."""
    deployments = []
    for spec in specs:
        if not spec.entrypoint_file.is_file():
            log.warning("not serving %s: %s does not exist", spec.name, spec.entrypoint_file)
            continue
        deployments.append(served_deployment(spec))
    return deployments


def served_deployment(spec: DeploymentSpec) -> RunnerDeployment:
    """The flow imported as a module, so runs find it from any working directory."""
    from prefect.types.entrypoint import EntrypointType

    module, function = spec.module_and_function
    flow = getattr(importlib.import_module(module), function)
    return flow.to_deployment(  # type: ignore[no-any-return]
        name=spec.name,
        description=spec.description,
        tags=list(spec.tags),
        parameters=spec.parameters,
        schedules=[_schedule(s) for s in spec.schedules],
        concurrency_limit=spec.concurrency_limit,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def _schedule(spec: CronSpec) -> Schedule:
    from prefect.schedules import Cron

    return Cron(spec.cron, timezone=spec.timezone, active=spec.active)
