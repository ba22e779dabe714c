"""Named scenarios: YAML files of ``LLMCluster-v0`` keyword arguments shipped with the package.

A scenario file is a mapping of :class:`~llm_cluster_env.config.EnvConfig` fields plus an
optional ``description``. ``gym.make("LLMCluster-v0", scenario=name_or_path, **overrides)``
layers the overrides on top. YAML needs ``pyyaml`` (the ``compare`` or ``train`` extra); the
environment itself does not.

A packaged scenario that replays a trace names it relative to the repository root
(``../shared/data/...``, outside the package: raw data is never shipped); the path is used as
written when it exists from the working directory, and otherwise resolved against the
repository root of this checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from llm_cluster_env.validation import ConfigError


def _yaml():
    try:
        import yaml
    except ImportError:  # pragma: no cover - depends on the install
        raise ImportError(
            "scenario files are YAML: install pyyaml (pip install 'llm-cluster-rl[compare]')"
        ) from None
    return yaml


def available_scenarios() -> list[str]:
    """Names of the packaged scenarios."""
    folder = resources.files(__name__)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read(name_or_path: str) -> tuple[str, dict[str, Any]]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"scenario={name_or_path!r}: no such file")
        text = path.read_text()
    else:
        resource = resources.files(__name__) / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise ConfigError(f"scenario={name_or_path!r}: unknown scenario "
                              f"(known: {', '.join(available_scenarios())}; or a .yaml path)")
        text = resource.read_text()
    data = _yaml().safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"scenario={name_or_path!r}: expected a mapping of settings")
    return path.stem, data


def scenario_description(name_or_path: str) -> str:
    """The scenario's ``description`` field ("" if none)."""
    return str(_read(name_or_path)[1].get("description", ""))


#: The repository root of this checkout (packaged scenarios' trace paths are relative to it).
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def load_scenario_dict(name_or_path: str) -> dict[str, Any]:
    """The scenario's settings (without ``description``), with ``name`` defaulting to the
    scenario's name (and a packaged scenario's relative trace path resolved, see above)."""
    name, data = _read(name_or_path)
    data = {k: v for k, v in data.items() if k != "description"}
    data.setdefault("name", name)
    workload = data.get("workload")
    packaged = Path(name_or_path).suffix not in (".yaml", ".yml")
    if packaged and isinstance(workload, dict) and isinstance(workload.get("trace_path"), str):
        path = Path(workload["trace_path"])
        if not path.is_absolute() and not path.exists():
            data["workload"] = {**workload, "trace_path": str(REPOSITORY_ROOT / path)}
    return data


def scenario_trace_missing(name_or_path: str) -> str | None:
    """The trace file a scenario replays when it is not there (``None`` otherwise)."""
    trace = load_scenario_dict(name_or_path).get("workload", {}).get("trace_path")
    return trace if trace is not None and not Path(trace).is_file() else None
