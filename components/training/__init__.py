"""Training stages: GPT pretraining, retro-fit / GPT-fit continued pretraining, instruction tuning.

The loop (`loop.py`) runs the same way in-process and inside Ray Train workers (`launcher.py`);
stages (`stages.py`) turn artifacts into a `TrainJob` and a loadable model directory.
"""
