"""The defaults of compression, in one table read by both the API (``rc.compress``,
``rc.plan``) and the command line (``rankcut compress`` / ``sweep``), so the two cannot drift.

``calib`` is the one default that the two apply differently, on purpose: the command line draws
``calib`` examples from the training split with the *evaluation* transform (no augmentation)
for data-aware planning. The API cannot strip the augmentation from ``train_data``, so it plans
on exactly the ``calib_data`` it is given (none by default); ``rankcut.data.calibration(dataset,
n=COMPRESS["calib"])`` makes the same batches the command line uses.
"""

from __future__ import annotations

COMPRESS = {
    "method": "auto",          # choose the factorization per layer
    "schedule": "one_shot",    # plan, apply everything, then fine-tune
    "distill": True,           # fine-tune with the original model as teacher
    "calib": 512,              # calibration examples (command line: drawn from the train split)
    "synthetic_calib": 0,      # command line, without data: inputs synthesised from BatchNorm
    "rounds": 3,               # multistage rounds
    "rank_multiple": 1,        # keep every rank (8 suits many kernels)
    "min_params": 1024,        # layers with fewer parameters stay dense
    "allow_slower": False,     # the latency guard is on
    "speed_slack": 0.1,        # up to 10% more predicted damage may be spent on speed
    "optimizer": "sgd",
    "batch_size": 128,
}
