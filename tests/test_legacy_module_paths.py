"""Files saved before the 2026-12-04 package layout name classes by their old module paths;
they must still resolve (pickle looks a class up by module path and name)."""

import pickle

import pytest

pytest.importorskip("torch")

import sb3_warmstart  # noqa: E402,F401  (installs the finder)


def _pickle_naming(module: str, name: str) -> bytes:
    # protocol-2 GLOBAL opcode: what cloudpickle/pickle write for a class pickled by reference
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nq\x00."


@pytest.mark.parametrize("module,name,new_module", [
    ("sb3_warmstart.set_policy", "ReplicaSetPolicy", "sb3_warmstart.policies.replica_set"),
    ("sb3_warmstart.policies", "TemperatureMlpLstmPolicy", "sb3_warmstart.policies.recurrent"),
    ("sb3_warmstart.ppo", "KLPPO", "sb3_warmstart.algorithms.ppo"),
    ("sb3_warmstart.normalize", "ObsNormalizer", "sb3_warmstart.common.normalize"),
    ("llm_cluster_env.env", "LLMClusterEnv", "llm_cluster_env.env.cluster_env"),
    ("llm_cluster_env.observation", "ObservationBuilder", "llm_cluster_env.env.observation"),
])
def test_old_module_paths_resolve_to_the_moved_classes(module, name, new_module):
    import importlib

    cls = pickle.loads(_pickle_naming(module, name))
    assert cls is getattr(importlib.import_module(new_module), name)


def test_unknown_names_still_fail():
    with pytest.raises(AttributeError, match="Nope"):
        pickle.loads(_pickle_naming("sb3_warmstart.policies", "Nope"))
