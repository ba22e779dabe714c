"""RL Zoo with the KL-regularised algorithms: ``klppo`` (:class:`~sb3_warmstart.algorithms.ppo.KLPPO`)
and ``klppo_lstm`` (:class:`~sb3_warmstart.algorithms.ppo.KLRecurrentPPO`).

rl_zoo3 2.9 finds an algorithm by name in its ``ALGOS`` dict (``rl_zoo3.utils.ALGOS``, the one
dict that ``train``, ``enjoy`` and the experiment manager share) and checks ``--algo`` against
its keys when it parses the command line, before ``--gym-packages`` are imported. So a package
cannot add algorithms from the command line alone; this launcher adds ours to that dict, then
runs rl_zoo3's own script with the remaining arguments unchanged::

    python -m sb3_warmstart.algorithms.zoo train --algo klppo --env LLMCluster-v0 \\
        --gym-packages llm_cluster_env --conf-file configs/zoo/klppo.yml -f runs/zoo \\
        --eval-freq -1 --seed 0 --num-threads 1
    python -m sb3_warmstart.algorithms.zoo enjoy --algo klppo --env LLMCluster-v0 \\
        --gym-packages llm_cluster_env -f runs/zoo --exp-id 1 -n 200

The YAML's keys are the algorithms' keyword arguments: SB3's PPO ones plus the KL settings as
flat keywords (``kl_coef``, ``kl_ref_coef_initial``...) and ``init_policy`` (a policy file
written by the behaviour-cloning stage to start from, which also becomes the KL reference).
From Python, :func:`register` does the same for code that calls rl_zoo3 itself.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sb3_warmstart.algorithms.ppo import KLPPO, KLRecurrentPPO

#: Names under which RL Zoo finds our algorithms (``--algo``, the run folder's parent).
ZOO_ALGOS = {"klppo": KLPPO, "klppo_lstm": KLRecurrentPPO}
#: The rl_zoo3 scripts this launcher runs.
SCRIPTS = ("train", "enjoy")


def register() -> None:
    """Add :data:`ZOO_ALGOS` to rl_zoo3's ``ALGOS`` (idempotent)."""
    from rl_zoo3.utils import ALGOS

    ALGOS.update(ZOO_ALGOS)


def main(argv: Sequence[str] | None = None) -> None:
    """``main(["train", *rl_zoo3_train_args])`` or ``main(["enjoy", ...])``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in SCRIPTS:
        raise SystemExit(f"usage: python -m sb3_warmstart.algorithms.zoo {{{','.join(SCRIPTS)}}} "
                         f"[rl_zoo3 arguments]; got {args[0] if args else 'nothing'!r}")
    register()
    if args[0] == "train":
        from rl_zoo3.train import train as script
    else:
        from rl_zoo3.enjoy import enjoy as script
    sys.argv = [f"rl_zoo3.{args[0]}", *args[1:]]
    script()


if __name__ == "__main__":
    main()
