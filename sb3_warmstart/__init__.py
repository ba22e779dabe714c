"""Stable-Baselines3 extensions that fix PPO's bad start on LLMCluster-v0: heuristic
demonstrations, recurrent behaviour cloning, KL-regularised (Recurrent)PPO, temperature control,
normaliser stabilisation, full-state checkpoints and chunked training.

Subpackages: ``algorithms`` (KL mixin, KLPPO/KLRecurrentPPO, recurrent buffers, schedules,
callbacks), ``policies`` (replica-set and recurrent policies, policy files, the policy router),
``common`` (normalisers, checkpoints), ``warmstart`` (demonstrations, behaviour cloning),
``pipeline`` (the main job: config, stages, run folder, logs, report) and ``export`` (ONNX).
"""

from sb3_warmstart.legacy_module_paths import install as _install_legacy_module_paths

_install_legacy_module_paths()  # files saved before the 2026-12-04 layout still load
