"""benchmarks/ppo_credit.py: each variant is the default config with exactly its overrides, and
a variant name that does not exist is refused before anything trains."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from benchmarks import ppo_credit as pc  # noqa: E402
from sb3_warmstart.pipeline.config import TrainingConfig  # noqa: E402

pytestmark = pytest.mark.train


def test_variants_set_their_overrides_and_the_shared_budget():
    base = TrainingConfig()
    args = pc.Args(steps=4096, warmup_steps=1536, baseline="lor", seed=3)
    paired = pc.variant_config(base, "paired_warmup", args)
    assert paired.ppo.paired_baseline == "lor"
    assert paired.stabilization.critic_warmup_steps == 1536
    assert (paired.total_requests, paired.seed) == (4096, 3)
    raw = pc.variant_config(base, "warmup", args)
    assert raw.ppo.paired_baseline is None and raw.stabilization.critic_warmup_steps == 1536
    default = pc.variant_config(base, "default", args)
    assert default.stabilization == base.stabilization and default.ppo == base.ppo
    assert set(pc.DEFAULT_VARIANTS) < set(pc.VARIANTS)


def test_an_unknown_variant_is_refused_before_anything_runs(tmp_path):
    args = pc.Args(run=str(tmp_path / "missing_run"), out=str(tmp_path / "out"),
                   variants="paired,paired_warmpu")
    with pytest.raises(ValueError, match="paired_warmpu"):
        pc.main(args)
    assert not (tmp_path / "out").exists()
