"""Runs corpus cases under ``gradwatch run`` (the CLI), one process per case.

Usage: ``python _cli_driver.py OUT_DIR CASE.py...``. For each case: ``OUT_DIR/<id>/`` (the
``--log-dir``, holding ``gradwatch.jsonl``), ``OUT_DIR/<id>.out``, ``.err`` and ``.status``.

Starting a fresh interpreter and importing torch costs ~2-4 s per case on the 2-core CI
machine, so by default this driver imports ``gradwatch.cli`` (and torch) once and forks one
child per case, each calling ``gradwatch.cli.main(["run", "--log-dir", DIR, CASE])`` -- exactly
what the ``gradwatch`` console script and ``python -m gradwatch`` call -- in a process of its own.
With ``GRADWATCH_CORPUS_CLI=subprocess`` each case runs as ``python -m gradwatch run`` instead.
"""

from __future__ import annotations

import os
import subprocess
import sys


def _paths(out: str, case: str) -> tuple[str, str, str, str]:
    cid = os.path.splitext(os.path.basename(case))[0]
    base = os.path.join(out, cid)
    return base, base + ".out", base + ".err", base + ".status"


def run_forked(out: str, cases: list[str]) -> None:
    import torch  # noqa: F401  (imported once, shared by every child)

    from gradwatch import cli

    for case in cases:
        log_dir, out_path, err_path, status_path = _paths(out, case)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child
            code = 70
            try:
                fd_out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                fd_err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd_out, 1)
                os.dup2(fd_err, 2)
                code = cli.main(["run", "--log-dir", log_dir, case])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 71
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        _, status = os.waitpid(pid, 0)
        with open(status_path, "w") as f:
            f.write(str(os.waitstatus_to_exitcode(status)))


def run_subprocess(out: str, cases: list[str]) -> None:
    for case in cases:
        log_dir, out_path, err_path, status_path = _paths(out, case)
        with open(out_path, "w") as fo, open(err_path, "w") as fe:
            proc = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--log-dir", log_dir,
                                   case], stdout=fo, stderr=fe, check=False)
        with open(status_path, "w") as f:
            f.write(str(proc.returncode))


if __name__ == "__main__":
    out_dir, *case_paths = sys.argv[1:]
    if os.environ.get("GRADWATCH_CORPUS_CLI") == "subprocess" or not hasattr(os, "fork"):
        run_subprocess(out_dir, case_paths)
    else:
        run_forked(out_dir, case_paths)
