"""The static HTML leaderboard, computed from the results store only."""
