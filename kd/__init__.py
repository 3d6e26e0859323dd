"""kd: offline knowledge distillation of a student language model from a logitcache.

Submodules import torch and transformers on first use; importing `kd` itself stays light.
"""
