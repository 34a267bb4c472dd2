"""taps-bench: benchmark suite and leaderboard for task-aware speculative decoding."""

__version__ = "0.1.0"
