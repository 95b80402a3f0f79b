"""magpie-synth: Magpie-style alignment data synthesis from aligned chat models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("magpie-synth")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+src"
