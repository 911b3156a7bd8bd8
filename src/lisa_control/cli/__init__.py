"""The ``lisa`` command: one module per sub-command in this folder, each a parser and a call.

Every user error is a :class:`LisaError` and ends as one line on stderr with exit code 2; only
our own bugs show a traceback.
"""

from __future__ import annotations

import importlib
import sys

from ..core.errors import LisaError

# command -> what it does; the command's module in this folder has main(argv).
COMMANDS = {
    "train": "train a side network (ControlNet) with LISA; flags as diffusers' train_controlnet.py",
    "sample": "generate with a trained side network",
    "eval": "sample a test split with a side network (or a run's checkpoints) and score it",
    "edit": "restore or edit images with a pretrained model (CODE, or SDEdit)",
    "pretrain": "train a small main network from scratch on an embedded task or your images",
    "demo": "plain ControlNet vs LISA on the embedded pose task, with a report",
}

USAGE = (
    f"usage: lisa {{{','.join(COMMANDS)}}} [flags]\n\n"
    + "".join(f"  {name:<9} {text}\n" for name, text in COMMANDS.items())
    + "\nRun `lisa COMMAND --help` for a command's flags. `lisa --version` prints the version.\n"
    "Multi-GPU: accelerate launch -m lisa_control train\n"
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V"):
        from .. import __version__

        print(f"lisa-control {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lisa: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        importlib.import_module(f"{__name__}.{command}").main(rest)
    except LisaError as exc:
        print(f"lisa {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lisa {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
