"""Algorithms: the KL mixin, KLPPO/KLRecurrentPPO, recurrent rollout buffers, schedules and callbacks."""
