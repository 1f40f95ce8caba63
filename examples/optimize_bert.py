"""Optimize a BERT encoder with the default pipeline and print what each pass did.

Run: python examples/optimize_bert.py [--full]   (--full: BERT-base at sequence 128)
"""

import sys

import torch

import fxopt
from fxopt.zoo import load_zoo_model

name = "bert" if "--full" in sys.argv else "bert-tiny"
model, inputs = load_zoo_model(name)
optimized = fxopt.optimize(model, inputs, target="cpu", pipeline="default", verify="end")

print(optimized.report())
with torch.no_grad():
    reference = model(*inputs).last_hidden_state
print("max abs difference:", (optimized(*inputs).last_hidden_state - reference).abs().max().item())
