"""The main job: typed config, stages (warm start, PPO), run folder, logs, progress, report."""
