"""Channel and kernel pruning: coupled channel groups, random_coarse, de_channel, their cost model and
latency table, and the framework-free speedup."""
