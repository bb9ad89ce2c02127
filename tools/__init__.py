"""Benchmarks, measurements and generators, each run from the repository root as ``python -m tools.NAME``
(see docs/benchmarks.md); tests import the shared pieces (``tools.digits_arch``, ``tools.zoo``)."""
