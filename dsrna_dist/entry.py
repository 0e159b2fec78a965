"""Light stage entry points: ``--help`` without torch, and one ``main(argv)``/``cli()`` pair.

Why a module of its own: a stage module imports torch, Accelerate and the model code at the
top (2-10 s). Each stage module calls :func:`help_before_imports` *before* those imports, so
``python -m dsrna_dist.<stage> --help`` and the ``dsrna-<stage> --help`` console scripts answer
from the config dataclasses alone (this module and ``config.py`` import only yaml). Every stage
then exposes the same pair: ``main(argv=None)`` (programmatic, parses ``argv``) and ``cli()``
(the console script: parses ``sys.argv``).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional, Sequence

# stage -> its config class in dsrna_dist.config
STAGE_CONFIGS = {"search": "SearchConfig", "train": "TrainConfig", "evaluate": "EvalConfig",
                 "report": "ReportConfig"}


def prog(stage: str) -> str:
    return f"python -m dsrna_dist.{stage}"


def summary(doc: Optional[str]) -> str:
    """First paragraph of a module docstring: the one-line description under ``usage:``."""
    return (doc or "").strip().split("\n\n")[0].strip()


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("--help", "-h") for a in argv)


def help_text(stage: str, doc: Optional[str]) -> str:
    from . import config

    return config.format_help(getattr(config, STAGE_CONFIGS[stage]), prog(stage), summary(doc))


def help_before_imports(module_name: str, stage: str, doc: Optional[str]) -> None:
    """At the top of a stage module: answer ``--help`` and exit 0 before the heavy imports.

    Acts only when this process runs the stage as a program (``python -m`` makes the module
    ``__main__``; the console script is ``dsrna-<stage>``), never when a library imports it.
    """
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    if (module_name == "__main__" or argv0 == f"dsrna-{stage}") and wants_help(sys.argv[1:]):
        if os.environ.get("RANK", "0") in ("", "0"):  # under a launcher: printed once, by rank 0
            print(help_text(stage, doc))
            sys.stdout.flush()
        raise SystemExit(0)


def run_main(stage: str, doc: Optional[str], target: Callable[..., Any],
             argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``): real ``--help``, else fire calls ``target``
    with ``config=`` and the dotted ``--section.key=value`` overrides."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if wants_help(argv):
        print(help_text(stage, doc))
        raise SystemExit(0)
    import fire

    fire.Fire(target, command=argv, name=prog(stage))
