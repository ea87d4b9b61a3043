"""gradwatch's benchmarks, run as modules from the repository root: ``python -m benchmarks.overhead``,
``python -m benchmarks.structure``, ``python -m benchmarks.floor``,
``python -m benchmarks.profile_gradwatch``, ``python -m benchmarks.calls``. See README.md."""
