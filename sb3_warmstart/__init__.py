"""Stable-Baselines3 extensions that fix PPO's bad start on LLMCluster-v0: heuristic
demonstrations, recurrent behaviour cloning, KL-regularised (Recurrent)PPO, temperature control,
normaliser stabilisation, full-state checkpoints and chunked training."""
