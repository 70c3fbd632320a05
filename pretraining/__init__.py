"""Pre-training tasks: stage 2 (VTM + MLM + PLM through the bridge fusion) and its held-out evaluation.

A task wraps a model and its losses for the shared engine (``engine/trainer.py``); see
:mod:`pretraining.fusion_task`.
"""
