"""fxopt: a compiler-style graph optimizer for PyTorch models."""
