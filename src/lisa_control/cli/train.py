"""``lisa train``: train a side network for a frozen main network, with LISA by default."""

from __future__ import annotations


def main(argv=None) -> None:
    from ..training.config import parse_args
    from ..training.train import train

    train(parse_args(argv))
