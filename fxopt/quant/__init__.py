"""Post-training quantization: the algorithms behind the ``quantize``, ``awq``, ``smooth-activations`` and
``shift-activations`` passes.

- :mod:`~fxopt.quant.formats`: number formats (int8, int4, fp8), affine parameters, int4 packing;
- :mod:`~fxopt.quant.ops`: the ``fxopt::`` quantized ops a quantized graph calls (importing this package
  registers them);
- :mod:`~fxopt.quant.observers`: activation ranges from calibration data (min/max, percentile, MSE, entropy);
- :mod:`~fxopt.quant.weights`: group-wise weight quantization, the clipping search and GPTQ;
- :mod:`~fxopt.quant.equivalence`: output-preserving channel scales and shifts (SmoothQuant, OS+, AWQ);
- :mod:`~fxopt.quant.plan` and :mod:`~fxopt.quant.rewrite`: choosing each layer's precision
  (sensitivity, ``scheme=mixed``) and rewriting the graph to quantized ops;
- :mod:`~fxopt.quant.attention`: int8 attention (``attention=int8``): per-head scales, each layer's error, the
  rewrite to ``fxopt::attention_q``.

The passes in :mod:`fxopt.passes` hold the options and call these.
"""

from fxopt.quant import ops  # noqa: F401  (registers the fxopt:: quantized ops)
