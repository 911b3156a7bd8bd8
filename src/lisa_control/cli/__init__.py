"""``lisa train | sample | pretrain | demo``.

Every user error is a :class:`LisaError` and ends as one line on stderr with exit code 2; only
our own bugs show a traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..core.errors import LisaError

USAGE = """usage: lisa {train,sample,edit,pretrain,demo} [flags]

  train     train a side network (ControlNet) with LISA; flags as diffusers' train_controlnet.py
  sample    generate with a trained side network
  edit      restore or edit images with a pretrained model (CODE, or SDEdit)
  pretrain  train a small main network from scratch on an embedded task
  demo      plain ControlNet vs LISA on the embedded pose task, with a report

Run `lisa COMMAND --help` for a command's flags. Multi-GPU: accelerate launch -m lisa_control train
"""


def _train(argv):
    from ..training.config import parse_args
    from ..training.loop import train

    train(parse_args(argv))


def _sample(argv):
    from .sample import main

    main(argv)


def _edit(argv):
    from .edit import main

    main(argv)


def _pretrain(argv):
    from .pretrain import main

    main(argv)


def _demo(argv):
    from .demo import main

    main(argv)


COMMANDS = {"train": _train, "sample": _sample, "edit": _edit, "pretrain": _pretrain, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lisa: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        COMMANDS[command](rest)
    except LisaError as exc:
        print(f"lisa {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lisa {command}: interrupted", file=sys.stderr)
        return 130
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
