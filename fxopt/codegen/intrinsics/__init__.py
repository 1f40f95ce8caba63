"""The ISA-specific instructions fxopt's kernels call by name (TVM tensor intrinsics), one module per architecture.

Most of a kernel is the same on every ISA: its loops are vectorized at the :class:`~fxopt.codegen.isa.Isa`'s lanes
and LLVM picks the instructions. What LLVM cannot pick from plain loops (an int16 pair multiply-add, later VNNI's
``vpdpbusd``, AVX-512-BF16's ``vdpbf16ps``, AMX tiles, NEON's ``sdot``) is written here, once, and a kernel family
tensorizes with it (:mod:`fxopt.codegen.kernels`).
"""
