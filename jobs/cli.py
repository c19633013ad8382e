"""The ``tans`` command (``python -m jobs.cli``): a thin dispatcher to the job modules in ``jobs/``.

Each ``tans X`` runs ``python -m jobs.<module>`` in-process, so the same thing can be handed to
``ray job submit``. Job modules are imported only when their command runs, which keeps
``tans --help`` fast and free of Ray and torch. It lives here, not in the library, because it
runs the jobs: ``tans/`` never imports ``jobs/``.
"""

from __future__ import annotations

import importlib
import sys

# command -> (job module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("jobs.data", "list the built-in corpus; ingest an ImageFolder or builtin:<source> as tasks"),
    "build-zoo": ("jobs.build_zoo", "pretrain the base supernet, fine-tune per task, measure subnets -> zoo"),
    "zoo": ("jobs.zoo", "inspect a built zoo: `tans zoo stats [--json]`"),
    "train-space": ("jobs.train_space", "query features (Ray Data) + the cross-modal space (Ray Train) -> index"),
    "search": ("jobs.search", "retrieve under constraints, fine-tune the best few (Ray Tune), baselines, report"),
    "evaluate": ("jobs.evaluate", "the model-selection benchmark: ground-truth fine-tunes of a pool, every selector, "
                 "weighted tau and regret over seeds"),
    "predict": ("jobs.predict", "label a dataset with an exported model (Ray Data actor pool) -> Parquet"),
    "export": ("jobs.export", "convert an exported model: `tans export --model URI --onnx [--out PATH]` -> ONNX"),
    "serve": ("jobs.serve", "the online retriever over HTTP (Ray Serve) on 127.0.0.1: `tans serve [--space URI]`"),
    "demo": ("jobs.demo", "the whole pipeline end to end on the built-in corpus, on a local Ray"),
}


def usage() -> str:
    lines = ["usage: tans <command> [args...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`tans <command> --help` describes a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from tans import __version__

        print(f"tans {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    from jobs._common import run_main  # here, not at the top: `tans --help` stays light

    return run_main(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
