"""``sb3/`` of an export: the recipe for loading the run's models with stock Stable-Baselines3
and the observation statistics the policy acts with, as JSON.

Nothing is generated or copied: the policy classes a saved model refers to live in
:mod:`sb3_warmstart.policies.replica_set` and :mod:`sb3_warmstart.policies.recurrent`, which
import only torch, Stable-Baselines3, sb3-contrib, gymnasium and numpy. So installing this
project without extras (``pip install llm-cluster-rl``) beside torch, ``stable-baselines3`` and
``sb3-contrib`` is enough for stock ``PPO.load``/``RecurrentPPO.load`` of a run's
``final_model.zip`` and checkpoints, with no ``custom_objects``: the training settings saved
with the model (KL and optimisation configs) unpickle from modules that need no extra either
(``tests/test_export.py`` loads the models in a process where the ``train`` and ``deploy``
extras cannot be imported).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_cluster_env.atomic import atomic_write_json, atomic_write_text

SB3_FOLDER = "sb3"
NORMALIZER_FILE = "vecnormalize.json"

_README = """# Loading the trained model with stock Stable-Baselines3

Needs this project without extras (`pip install llm-cluster-rl`: it holds the policy classes,
`sb3_warmstart.policies.replica_set` and `sb3_warmstart.policies.recurrent`), `torch`,
`stable-baselines3` and, for a recurrent model, `sb3-contrib`. Not needed: the `train` extra
(imitation, PyYAML, TensorBoard) and the `deploy` extra (ONNX). The models of the run:

{models}

```python
from stable_baselines3 import PPO           # a recurrent run: from sb3_contrib import RecurrentPPO

model = PPO.load("final_model.zip", device="cpu")   # or checkpoints/step_<n>/model.zip
action, _ = model.predict(obs, deterministic=True)
```

`{normalizer}` holds the observation statistics the policy acts with (`obs_rms.mean`,
`obs_rms.var`, `clip_obs`, `epsilon`; `norm_obs: false` for the replica-set policies, which
scale their inputs inside the network); the run folder's `final_vecnormalize.json` and each
checkpoint's `vecnormalize.json` hold the whole `VecNormalize` (reward statistics too). An MLP
policy acts on `clip((obs - mean) / sqrt(var + epsilon), -clip_obs, clip_obs)`, as
`VecNormalize` computes.
"""


def write_sb3_artefacts(out: Path, *, obs_normalizer_json: dict[str, Any] | None,
                        model_files: Sequence[Path]) -> Path:
    """Write ``out/sb3/``: ``vecnormalize.json`` (when given) and a ``README.md`` with the
    loading recipe for ``model_files``; returns the folder."""
    folder = Path(out) / SB3_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    if obs_normalizer_json is not None:
        atomic_write_json(folder / NORMALIZER_FILE, obs_normalizer_json)
    listed = "\n".join(f"- `{p}`" for p in model_files) or "- (none listed)"
    atomic_write_text(folder / "README.md",
                      _README.format(models=listed, normalizer=NORMALIZER_FILE))
    return folder


__all__ = ["NORMALIZER_FILE", "SB3_FOLDER", "write_sb3_artefacts"]
