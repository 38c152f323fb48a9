"""Ray Data bulk jobs: entry points for `ray job submit -- python -m pipelines.<name>`."""
