"""Shared printing for the examples."""

import gradwatch


def show(w: "gradwatch.Watch", err: BaseException | None = None) -> None:
    if err is not None:
        print(f"torch raised {type(err).__name__}: {str(err).splitlines()[0][:120]}")
        for note in getattr(err, "__notes__", []):
            print("  note:", note)
    print(w.report())
