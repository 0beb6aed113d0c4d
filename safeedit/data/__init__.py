"""Embedded data sets and loaders for data given by spec (see `sources`)."""

from safeedit.data.loaders import make_loader
from safeedit.data.sources import EMBEDDED, DataSpec, load_data

__all__ = ["EMBEDDED", "DataSpec", "load_data", "make_loader"]
