"""The released mega1.3B preset (SPEC §6) with the release's optimiser settings."""

from configs.released import released_config


def get_config(arg: str | None = None):
  return released_config("mega1.3B")
