"""Training side networks (``lisa train``) and main networks (``lisa pretrain``).

* ``config``: the flags of ``lisa train`` as one dataclass, with parser, checks and fingerprint
* ``build``: everything a ``lisa train`` run trains with, built from the config
* ``loop``: the one training loop both commands run
* ``logs``: loss records, the loss log, the tracker, the progress bar
* ``train``: ``lisa train`` = build + loop + checkpoint and validation callbacks
* ``pretrain``: ``lisa pretrain`` = its network, data, EMA and sample grids + the same loop
* ``checkpoint``: atomic checkpoints; ``compilation``: ``torch.compile`` per block
"""
