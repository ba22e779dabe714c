"""Export a trained router for deployment outside the simulator.

``RUN_DIR`` is a run folder of ``train/warmstart.py`` (or its ``final_model.zip``), a
checkpoint directory (``RUN/checkpoints/step_<n>``, or its ``model.zip``) or a policy zip of
``train/pretrain.py``. ``--out`` receives:

* ``policy.onnx``: the greedy actor with its input scaling inside the graph (replica-set
  policies: ``replicas[batch, N, F]`` + ``request[batch, T]``, any N; MLP policies: the flat
  observation with VecNormalize folded in; recurrent ones: LSTM state in and out);
* ``schema.json``: the features in order with units, meaning, source (engine metric and its
  vLLM name, or computed by the router), tensor names and shapes, the export check, provenance;
* ``router_runtime.py`` (numpy + onnxruntime) and ``vllm_router_adapter.py``;
* ``sb3/``: the recipe for reading the run's models with stock ``PPO.load``/``RecurrentPPO.load``
  (this project without extras, torch, SB3, sb3-contrib) and the normaliser statistics as JSON.

The ONNX graph is checked against the torch policy before anything is moved into ``--out``; an
existing ``--out`` is replaced only when the new export is complete. Needs the ``deploy`` extra
(``pip install -e '.[deploy]'``). A source that cannot be read (truncated, corrupt, not a
policy) or a missing extra ends in one line naming it, exit status 2. Example::

    python train/export.py runs/default --out exports/default
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train/export.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="run folder, checkpoint directory or policy zip")
    p.add_argument("--out", required=True, help="export folder (replaced when complete)")
    p.add_argument("--sample-requests", type=int, default=256,
                   help="decisions of the training environment the ONNX graph is checked on "
                        "(default %(default)s)")
    p.add_argument("--seed", type=int, default=10_000,
                   help="seed of that check episode (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sample_requests < 2:
        parser.error(f"--sample-requests={args.sample_requests}: must be >= 2")
    source = Path(args.run_dir)
    if not source.exists():
        parser.error(f"RUN_DIR={args.run_dir!r}: no such run folder, checkpoint or file")
    from sb3_warmstart.export import ExportError, export_router

    try:
        result = export_router(source, args.out, sample_requests=args.sample_requests,
                               seed=args.seed)
    except ExportError as err:
        print(f"train/export.py: error: {err}", file=sys.stderr)
        return 2
    schema = result.schema
    check = schema["export_check"]
    count = schema["replica_count"]
    print(f"exported {schema['provenance']['label']} ({schema['policy']['kind']}"
          f"{', recurrent' if schema['policy']['recurrent'] else ''}) to {result.out}")
    print(f"  replicas: {'any number' if count['mode'] == 'dynamic' else count['replicas']}; "
          f"per-replica features: "
          f"{', '.join(f['name'] for f in schema['replica_features'])}")
    print(f"  ONNX vs torch on {check['rows']} decisions: greedy agreement "
          f"{check['greedy_agreement']:.0%}, max |probability diff| "
          f"{check['max_abs_probability_diff']:.1e}")
    print(f"  inputs: {json.dumps({k: v['shape'] for k, v in schema['inputs'].items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
