"""The grid report: the leaderboard and its XY sheets, the Grid report tab, and the run notes that link to it."""
