"""The main job: heuristic demos -> behaviour cloning -> KL-regularised PPO -> report.

With no arguments it runs the default configuration (the dataclass defaults of
``sb3_warmstart/pipeline/config.py``; ``--print-config`` shows them) in ``runs/default``: one router for
any cluster, trained across the ``generalist`` scenario family (a new cluster of 2-16 replicas,
GPU mix, length distribution, arrival process and load every episode), then printed against
every heuristic on held-out scenarios of the family. ``--scenario`` (or ``--replicas``,
``--qps``, ``--family none``) trains on one scenario instead. Running the same command
again resumes from the latest checkpoint (``--resume warmstart`` retrains from scratch), or,
when the run has finished, only evaluates it again (its report is rewritten, nothing else); with
``--chunk-mode`` it continues with the next chunk. A run with other settings (seed,
hyperparameters, environment, budget) never resumes a different run: it goes to a new folder
(``runs/default-2``...), or with ``--output-dir``/``--strict-resume`` it is refused.

Examples::

    python train/warmstart.py                                  # the generalist
    python train/warmstart.py --family my_family.yaml          # another scenario family
    python train/warmstart.py --scenario heterogeneous         # one scenario
    python train/warmstart.py --profile heterogeneous          # from configs/warmstart.yaml
    python train/warmstart.py --replicas 8 --qps 30 --ppo-requests 50000
    python train/warmstart.py --chunk-mode --chunk-size 8192 --total-requests 32768
    python train/warmstart.py --external-pretrain runs/bc.zip --skip-bc-training
    python train/warmstart.py --set kl.kl_ref_coef_initial=0.8 --set ppo.n_epochs=6

Every value is checked before any work starts; a bad one exits with status 2 and a message
naming the flag or key and the value. Ctrl-C during PPO saves a checkpoint and exits with
status 130.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO_ROOT))
#: The profiles file of the checkout (``--config`` when not given).
DEFAULT_CONFIG = REPO_ROOT / "configs" / "warmstart.yaml"

from llm_cluster_env.validation import ConfigError, deep_merge  # noqa: E402


def build_parser(defaults: Any = None, source: str = "") -> argparse.ArgumentParser:
    """The command line. The help of every flag that sets a config key is that key's
    documentation and its value in ``defaults`` (a ``TrainingConfig``: the profile the command
    would run; the embedded defaults when ``None``), so ``--help`` never states a default the
    config does not have.

    :param source: where ``defaults`` come from (shown in the help).
    """
    from sb3_warmstart.pipeline.config import (
        TrainingConfig,
        describe_key,
        key_choices,
        key_value,
    )

    config = defaults if defaults is not None else TrainingConfig()

    def shown(value: Any) -> str:
        return "none" if value is None else str(value)

    def about(key: str, text: str | None = None) -> str:
        """Help of a flag setting ``key``: its documentation and the profile's value."""
        text = (text if text is not None else describe_key(key)).rstrip(".")
        return f"{text} (default: {shown(key_value(config, key))})".replace("%", "%%")

    env = config.env
    p = argparse.ArgumentParser(
        prog="train/warmstart.py", description=__doc__.split("\n\n")[0],
        epilog=f"Defaults shown: {source or 'the embedded defaults'} (--profile P --help "
               "shows profile P's).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file keyed by env id (default: configs/warmstart.yaml "
                   "of this checkout, whose 'default' profile is the embedded defaults)")
    p.add_argument("--profile", default="default",
                   help="profile under LLMCluster-v0 in --config, merged over 'default'")
    p.add_argument("--output-dir", help="run folder (default: runs/<profile>, or runs/<profile>-N "
                   "when that folder holds a run with other settings)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as YAML and exit")
    g = p.add_argument_group("environment")
    g.add_argument("--family", help=about("family", describe_key("family").rstrip(".")
                                          + "; 'none' on the command line"))
    g.add_argument("--scenario", help=(
        "train on this one scenario (packaged name or YAML path; sets family to none) "
        f"(default: {shown(config.env_kwargs.get('scenario'))}, "
        f"{'used' if config.family is None else 'used only with family none'})"))
    g.add_argument("--replicas", type=int, help=f"number of replicas of the one scenario "
                   f"(default: {env.num_replicas})")
    g.add_argument("--qps", type=float, help="arrival rate of the one scenario, requests/s "
                   f"(default: {env.workload.qps})")
    g.add_argument("--seed", type=int, help=about("seed"))
    g = p.add_argument_group("budgets")
    g.add_argument("--ppo-requests", type=int, help=about("total_requests"))
    g.add_argument("--total-requests", type=int, help=about(
        "total_requests", "same as --ppo-requests (chunk mode)"))
    g.add_argument("--demo-steps", type=int, help=about("warm_start.demo_steps"))
    g.add_argument("--bc-epochs", type=int, help=about("bc.epochs"))
    g.add_argument("--algorithm", choices=key_choices("ppo.algorithm"),
                   help=about("ppo.algorithm"))
    g = p.add_argument_group("warm start")
    g.add_argument("--no-warmstart", action="store_true", help=about(
        "warm_start.enabled", "cold-start PPO (no demos/BC/KL); the profile's warm_start.enabled"))
    g.add_argument("--external-pretrain", metavar="PATH",
                   help="pretrained checkpoint (policy_io zip) to start from; validated first")
    g.add_argument("--skip-bc-training", action="store_true",
                   help="use --external-pretrain as is (else BC fine-tunes it on fresh demos)")
    g.add_argument("--force-warmstart", action="store_true",
                   help="collect demos and clone again even if the run folder has them")
    g = p.add_argument_group("resume and chunks")
    g.add_argument("--resume", choices=["ask", "checkpoint", "warmstart", "external"],
                   default="ask", help="when a checkpoint exists: resume it (ask: also asks if "
                   "an external model exists; needs a terminal), or retrain from scratch "
                   "(warmstart: demos + BC + PPO again; the earlier outputs are moved to "
                   "previous-<time>/), or start from the external model")
    g.add_argument("--strict-resume", action="store_true",
                   help="refuse, rather than use a new folder or start fresh, when the folder "
                   "or its checkpoint holds a run with other settings")
    g.add_argument("--chunk-mode", action="store_true",
                   help="train in chunks, checkpointing after each; rerun to continue")
    g.add_argument("--chunk-size", type=int, help="env steps per chunk (with --chunk-mode)")
    g.add_argument("--max-chunks", type=int,
                   help="stop after this many chunks; rerun the same command to continue")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted (value parsed as YAML)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _config_path(given: str | None) -> str | Path | None:
    """``--config``, or the checkout's profiles file when not given."""
    if given is None and DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    return given


def profile_defaults(argv: list[str] | None) -> tuple[Any, str]:
    """The config the command's ``--config``/``--profile`` resolve to (without other flags),
    and a description of it: the defaults ``--help`` shows. The embedded defaults when they
    do not resolve (the run itself then reports why)."""
    from sb3_warmstart.pipeline.config import TrainingConfig, load_config

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--profile", default="default")
    known, _ = pre.parse_known_args(argv)
    path = _config_path(known.config)
    try:
        return (load_config(path, known.profile),
                f"profile {known.profile!r}" + (f" of {path}" if path is not None else ""))
    except ConfigError:
        return TrainingConfig(), "the embedded defaults"


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    target[parts[-1]] = value


def overrides_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser
                        ) -> dict[str, Any]:
    """The config overrides the flags ask for. Values are validated once, by the config
    (errors name the key); only how-to-run flags are checked here (status 2)."""
    import yaml

    out: dict[str, Any] = {}
    for flag, value in (("--chunk-size", args.chunk_size), ("--max-chunks", args.max_chunks)):
        if value is not None and value < 1:
            parser.error(f"{flag}={value}: must be >= 1")
    if (args.ppo_requests and args.total_requests and args.ppo_requests != args.total_requests):
        parser.error(f"--ppo-requests={args.ppo_requests} and --total-requests="
                     f"{args.total_requests} disagree (they are the same budget)")
    for flag, value in (("--chunk-size", args.chunk_size), ("--max-chunks", args.max_chunks)):
        if value is not None and not args.chunk_mode:
            parser.error(f"{flag}={value}: needs --chunk-mode")
    if args.skip_bc_training and not args.external_pretrain:
        parser.error("--skip-bc-training: needs --external-pretrain PATH")
    if args.external_pretrain and not Path(args.external_pretrain).is_file():
        parser.error(f"--external-pretrain={args.external_pretrain!r}: no such file")
    if args.no_warmstart and (args.external_pretrain or args.force_warmstart):
        parser.error("--no-warmstart: conflicts with --external-pretrain/--force-warmstart")
    env: dict[str, Any] = {}
    if args.scenario:
        env["scenario"] = args.scenario
    if args.replicas is not None:
        env["num_replicas"] = args.replicas
    if args.qps is not None:
        env["workload"] = {"qps": args.qps}
    if env:
        out["env_kwargs"] = env
        if args.family not in (None, "none"):
            parser.error(f"--family={args.family!r}: conflicts with --scenario/--replicas/--qps "
                         "(they describe one scenario)")
        out["family"] = None
    if args.family is not None:
        out["family"] = None if args.family == "none" else args.family
    if args.seed is not None:
        out["seed"] = args.seed
    budget = args.ppo_requests if args.ppo_requests is not None else args.total_requests
    if budget is not None:
        out["total_requests"] = budget
    if args.algorithm:
        out.setdefault("ppo", {})["algorithm"] = args.algorithm
    ws: dict[str, Any] = {}
    if args.demo_steps is not None:
        ws["demo_steps"] = args.demo_steps
    if args.bc_epochs is not None:
        out["bc"] = {"epochs": args.bc_epochs}
    if args.external_pretrain:
        ws["external_pretrain"] = args.external_pretrain
    if args.skip_bc_training:
        ws["skip_bc_training"] = True
    if args.no_warmstart:
        ws["enabled"] = False
    if ws:
        out["warm_start"] = ws
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep or not key:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            parser.error(f"--set {item!r}: value is not valid YAML: {err}")
        patch: dict[str, Any] = {}
        _set_dotted(patch, key, value)
        out = deep_merge(out, patch)
    return out


def main(argv: list[str] | None = None, **pipeline_hooks: Any) -> dict[str, Any]:
    """Run the job; returns the report summary. ``pipeline_hooks`` (``prompt``,
    ``interactive``) let tests answer the resume question."""
    parser = build_parser(*profile_defaults(argv))
    args = parser.parse_args(argv)
    print("[warmstart] checking the configuration", flush=True)
    from sb3_warmstart.pipeline.config import dump_config_text, load_config

    config_path = _config_path(args.config)
    try:
        overrides = overrides_from_args(args, parser)
        config = load_config(config_path, args.profile, overrides)
    except ConfigError as err:
        parser.error(str(err))
    if args.print_config:
        print(dump_config_text(config, args.profile), end="")
        return {"config": config.to_dict()}
    print("[warmstart] loading the training stack (torch, Stable-Baselines3)", flush=True)
    from sb3_warmstart.pipeline.runner import (
        PipelineError,
        RunOptions,
        TrainingInterrupted,
        WarmStartPipeline,
    )

    command = [Path(sys.argv[0]).name if argv is None else "train/warmstart.py",
               *(sys.argv[1:] if argv is None else argv)]
    options = RunOptions(
        output_dir=Path(args.output_dir or f"runs/{args.profile}"),
        output_dir_given=args.output_dir is not None, resume=args.resume,
        strict_resume=args.strict_resume, force_warmstart=args.force_warmstart,
        chunk_mode=args.chunk_mode, chunk_size=args.chunk_size, max_chunks=args.max_chunks,
        progress=not args.no_progress,
        command=command, **pipeline_hooks)
    pipeline = WarmStartPipeline(config, options)
    try:
        return pipeline.run()
    except PipelineError as err:
        print(f"warmstart.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingInterrupted as stop:
        print(f"warmstart.py: {stop}", file=sys.stderr)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        detail = ("no new checkpoint; the same command continues from the latest one"
                  if pipeline.stage == "PPO" else "the same command redoes this stage and "
                  "reuses the finished ones")
        print(f"warmstart.py: interrupted during {pipeline.stage}: {detail}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
