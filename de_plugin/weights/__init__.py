"""Weight pruning: keep-count rounds (the runner of de_layerwise and the baselines), de_layerwise,
seed allocations, recovery, magnitude scoring, INC-style patterns."""
