"""Structured pruning: the algorithms behind the ``prune-channels`` pass, split the way Torch-Pruning separates
dependency analysis from pruners.

- :mod:`~fxopt.prune.groups`, :mod:`~fxopt.prune.dependency`, :mod:`~fxopt.prune.rules`: which dimensions of which
  tensors shrink together (DepGraph-style groups), with one rule per op;
- :mod:`~fxopt.prune.importance`: how much each channel matters (and, for Fisher, in which order to remove them);
- :mod:`~fxopt.prune.plan`: how many channels each group keeps to meet the target;
- :mod:`~fxopt.prune.latency`: widths snapped to what measures fastest;
- :mod:`~fxopt.prune.compensation`: removed channels rebuilt in the next layers (data-free);
- :mod:`~fxopt.prune.reconstruction`: the layers reading pruned channels re-fitted on calibration data;
- :mod:`~fxopt.prune.shrink`: the rewrite that removes them;
- :mod:`~fxopt.prune.explain`: ``fxopt prune --explain``.

The pass in :mod:`fxopt.passes.prune_channels` holds the options and calls these.
"""
