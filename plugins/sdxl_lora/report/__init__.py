"""The grid report: the leaderboard and its XY sheets, the report page, the link to it and the run notes."""
