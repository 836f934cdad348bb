"""The released mega7.3B preset (SPEC §6) with the release's optimiser settings."""

from configs.released import released_config


def get_config(arg: str | None = None):
  return released_config("mega7.3B", paper_7b=True)
