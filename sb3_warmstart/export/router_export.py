"""Export a trained router into one folder: :func:`export_router` (from a run folder, a
checkpoint or a policy zip) and :func:`export_policy` (from a policy object).

The folder (see ``docs/export.md``)::

    policy.onnx            the greedy actor, input scaling inside (sb3_warmstart.export.graph)
    schema.json            features, tensors, reference hardware, check, provenance (.schema)
    router_runtime.py      copies of llm_cluster_env.deploy.router_runtime (numpy +
    vllm_router_adapter.py onnxruntime) and .vllm_router_adapter: all a deployment needs
    sb3/                   loading recipe for stock SB3 and vecnormalize.json (.sb3_bundle)

Files are written into a temporary sibling folder moved into place at the end, so a failed
export leaves an earlier one untouched.
"""

from __future__ import annotations

import importlib
import shutil
import time
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy

from llm_cluster_env.atomic import atomic_write_json
from sb3_warmstart.common.normalize import ObsNormalizer
from sb3_warmstart.export.errors import ExportError
from sb3_warmstart.export.graph import compare_with_onnx, policy_graph, write_onnx
from sb3_warmstart.export.samples import graph_inputs, sample_observations
from sb3_warmstart.export.sb3_bundle import write_sb3_artefacts
from sb3_warmstart.export.schema import build_schema, reference_hardware
from sb3_warmstart.policies.replica_set import SET_POLICIES

ONNX_FILE = "policy.onnx"
SCHEMA_FILE = "schema.json"
RUN_MODEL = "final_model.zip"
#: Modules of the ``deploy`` extra the export needs: torch's ONNX exporter (onnx,
#: onnxscript) and the ONNX-vs-torch check (onnxruntime).
DEPLOY_MODULES = ("onnx", "onnxscript", "onnxruntime")
DEPLOY_INSTALL = "pip install -e '.[deploy]'"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_router` wrote and checked: the folder and its ``schema.json``."""

    out: Path
    schema: dict[str, Any]


def require_deploy_extra() -> None:
    """Raise :class:`ExportError` naming the ``deploy`` extra and its install command when one
    of :data:`DEPLOY_MODULES` cannot be imported."""
    missing = []
    for name in DEPLOY_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"the ONNX export needs the deploy extra ({', '.join(missing)} not "
                          f"installed): {DEPLOY_INSTALL}")


@dataclass(frozen=True)
class ExportSource:
    """What :func:`resolve_source` found: the path :func:`load_policy` reads (a run folder, a
    checkpoint directory or a policy zip) and the SB3 model files it stands for."""

    path: Path
    kind: str  # "run", "checkpoint" or "policy_zip"
    model_files: tuple[Path, ...]


def resolve_source(source: str | Path) -> ExportSource:
    """The run folder, checkpoint directory or policy zip ``source`` names. A run's own
    ``final_model.zip`` stands for its run folder, a checkpoint's ``model.zip`` for its
    checkpoint directory. :class:`ExportError` names the path and what is wrong."""
    from sb3_warmstart.common.checkpoint import MODEL_FILE, STATE_FILE

    source = Path(source)
    if not source.exists():
        raise ExportError(f"{source}: no such run folder, checkpoint or policy file")
    if source.is_file():
        if source.suffix != ".zip":
            raise ExportError(f"{source}: not a run folder, checkpoint directory or policy zip")
        if source.name == RUN_MODEL and (source.parent / "config.yaml").is_file():
            source = source.parent
        elif source.name == MODEL_FILE and (source.parent / STATE_FILE).is_file():
            source = source.parent
        else:
            return ExportSource(source, "policy_zip", (source,))
    if (source / RUN_MODEL).is_file():
        models = [source / RUN_MODEL, *sorted((source / "checkpoints").glob("step_*/model.zip"))]
        return ExportSource(source, "run", tuple(models))
    if (source / STATE_FILE).is_file():
        return ExportSource(source, "checkpoint", (source / MODEL_FILE,))
    found = sorted(p.name for p in source.iterdir())[:12]
    raise ExportError(f"{source}: no {RUN_MODEL} (the run has not finished: export one of its "
                      f"checkpoints, {source}/checkpoints/step_<n>) and no {STATE_FILE} (not a "
                      f"checkpoint either); it holds {found}")


def _one_line(err: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def check_zip(path: Path) -> None:
    """Raise :class:`ExportError` naming ``path`` when it is not a complete SB3 model zip:
    unreadable, a member failing its CRC, or no ``data`` member (a truncated SB3 zip can still
    open as the torch archive stored inside it, whose members are not SB3's)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = archive.namelist()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise ExportError(f"{path}: not a readable zip archive (truncated or corrupt): "
                          f"{_one_line(err)}") from None
    if bad is not None:
        raise ExportError(f"{path}: member {bad!r} fails its CRC check (truncated or corrupt)")
    if "data" not in names:
        raise ExportError(f"{path}: not a Stable-Baselines3 model zip (truncated, or another "
                          f"kind of zip): no 'data' member among {names[:6]}")


def load_source(source: ExportSource) -> tuple[Any, Any, dict[str, Any], str]:
    """``(model, obs_rms, env_kwargs, label)`` of ``source``. Any failure to read it (a
    truncated or corrupt file, a zip that is no policy, a checkpoint that fails its checksums)
    is an :class:`ExportError` of one line naming the path."""
    from sb3_warmstart.policies.run_loading import load_policy

    what = {"run": "run folder", "checkpoint": "checkpoint",
            "policy_zip": "policy zip"}[source.kind]
    if source.kind != "checkpoint":  # a checkpoint's manifest checksums cover its model.zip
        check_zip(source.model_files[0])
    try:
        model, obs_rms, env_kwargs, _, label = load_policy(source.path)
    except Exception as err:  # SB3, torch, zipfile and pickle raise many types
        hint = (" (expected a policy zip of train/pretrain.py, a run's final_model.zip or a "
                "checkpoint's model.zip)" if source.kind == "policy_zip" else "")
        raise ExportError(f"{source.path}: cannot load this {what}{hint}: "
                          f"{_one_line(err)}") from err
    if not env_kwargs:
        raise ExportError(f"{source.path}: the {what} does not record its training "
                          "environment (env_kwargs), which the export check runs on")
    return model, obs_rms, env_kwargs, label


def export_router(source: str | Path, out: str | Path, *, sample_requests: int = 256,
                  seed: int = 10_000, tolerance: float = 1e-4) -> ExportResult:
    """Export the policy of ``source`` (a run folder or its ``final_model.zip``, a checkpoint
    directory or its ``model.zip``, or a policy zip of ``train/pretrain.py``) into ``out``
    (see :func:`export_policy`)."""
    require_deploy_extra()
    check_out_replaceable(Path(out))  # before the source is loaded
    resolved = resolve_source(source)
    model, obs_rms, env_kwargs, label = load_source(resolved)
    return export_policy(model.policy, obs_rms, env_kwargs, out, label=label,
                         source=str(resolved.path.resolve()),
                         model_files=resolved.model_files, sample_requests=sample_requests,
                         seed=seed, tolerance=tolerance)


def _runtime_sources() -> list[Path]:
    import llm_cluster_env

    root = Path(llm_cluster_env.__file__).resolve().parent
    return [root / "deploy" / "router_runtime.py", root / "deploy" / "vllm_router_adapter.py"]


def _normalizer_json(normalizer: ObsNormalizer | None) -> dict[str, Any]:
    out: dict[str, Any] = {"format": "vecnormalize/json", "format_version": 1,
                           "norm_obs": normalizer is not None}
    if normalizer is not None:
        stats = normalizer.to_dict()
        out.update(clip_obs=stats["clip_obs"], epsilon=stats["epsilon"],
                   obs_rms={k: stats[k] for k in ("mean", "var", "count")})
    return out


def check_out_replaceable(out: Path) -> None:
    """Raise :class:`ExportError` when ``out`` exists and is neither an empty folder nor an
    earlier export (a folder with :data:`SCHEMA_FILE`): the export replaces nothing else."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ExportError(f"{out}: exists and is not an export folder; refusing to replace it")
    if any(out.iterdir()) and not (out / SCHEMA_FILE).is_file():
        raise ExportError(f"{out}: an existing folder without {SCHEMA_FILE} (not an earlier "
                          "export); refusing to replace it")


def export_policy(policy: ActorCriticPolicy, obs_rms: Any, env_kwargs: dict[str, Any],
                  out: str | Path, *, label: str, source: str,
                  model_files: Sequence[Path] = (), sample_requests: int = 256,
                  seed: int = 10_000, tolerance: float = 1e-4) -> ExportResult:
    """Export ``policy`` (trained on the environment ``env_kwargs``, with the observation
    statistics ``obs_rms`` for an MLP policy) into ``out``.

    :param label: the policy's name in the schema's provenance.
    :param source: where the policy came from (provenance).
    :param model_files: the SB3 model zips the ``sb3/README.md`` lists.
    :param sample_requests: decisions of the training environment (routed by ``lor``) the
        ONNX graph is checked on.
    :param seed: seed of that check episode.
    :param tolerance: largest allowed |probability difference| between ONNX and torch; above
        it, or on any greedy disagreement, the export fails.
    """
    require_deploy_extra()
    out = Path(out)
    check_out_replaceable(out)
    th.set_num_threads(1)
    set_policy = isinstance(policy, SET_POLICIES)
    normalizer = None
    if not set_policy and obs_rms is not None:
        normalizer = obs_rms if isinstance(obs_rms, ObsNormalizer) else ObsNormalizer(obs_rms)
    spec = policy_graph(policy, normalizer)
    observations, layout = sample_observations(env_kwargs, requests=sample_requests, seed=seed)
    if set_policy:
        policy.check_schema(layout.replica_features,
                            layout.names[layout.replica_block:layout.history_offset])
    elif observations.shape[1:] != tuple(policy.observation_space.shape):
        raise ExportError(f"{source}: the policy expects observations of shape "
                          f"{tuple(policy.observation_space.shape)}, its training environment "
                          f"{env_kwargs} gives {observations.shape[1:]}")
    sample = graph_inputs(spec, observations, layout)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{time.monotonic_ns()}")
    tmp.mkdir()
    try:
        onnx_path = tmp / ONNX_FILE
        write_onnx(spec, {k: v[:2] for k, v in sample.items()}, onnx_path)
        check = compare_with_onnx(spec, onnx_path, sample)
        check["sample"] = (f"{sample_requests} consecutive decisions of the training "
                           f"environment under lor, seed {seed}")
        if check["max_abs_probability_diff"] > tolerance or check["greedy_agreement"] < 1.0:
            raise ExportError(f"the ONNX graph does not reproduce the policy: {check}")
        schema = build_schema(
            spec, layout, source=source, hardware=reference_hardware(env_kwargs), check=check,
            onnx_path=onnx_path, temperature=float(getattr(policy, "temperature", 1.0)),
            fixed_replicas=None if set_policy else int(policy.action_space.n))
        schema["provenance"]["label"] = label
        schema["provenance"]["env_kwargs"] = env_kwargs
        atomic_write_json(tmp / SCHEMA_FILE, schema)
        for file in _runtime_sources():
            shutil.copy2(file, tmp / file.name)
        write_sb3_artefacts(tmp, obs_normalizer_json=_normalizer_json(normalizer),
                            model_files=model_files)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{time.monotonic_ns()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, schema)


__all__ = ["DEPLOY_INSTALL", "DEPLOY_MODULES", "ONNX_FILE", "SCHEMA_FILE", "ExportResult",
           "ExportSource", "check_out_replaceable", "check_zip", "export_policy",
           "export_router", "load_source", "require_deploy_extra", "resolve_source"]
