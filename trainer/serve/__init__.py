"""`tributary serve`: the run's newest accepted version behind an OpenAI-compatible API on Ray
Serve, swapped to each new version without a failed request."""
