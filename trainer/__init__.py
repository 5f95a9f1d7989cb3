"""The Tributary coordinator: config, round loop, merging, replay, evaluation, checkpoints."""
