"""FP8 training kernels (DeepSeek-V3 recipe) on Triton, each with a pure-PyTorch reference of identical numerics.

- ``kernels.reference``: the references (quantization bits, FP32-accumulated GEMMs); pure PyTorch.
- ``kernels.formats``: scale formats per tensor class (fp32 or ue8m0), ``kernels.scale_format``.
- ``kernels.quant``, ``kernels.fp8_gemm``, ``kernels.grouped_gemm``: the Triton kernels and their launchers.
- ``kernels.fp8_linear``: autograd Functions (Fprop/Dgrad/Wgrad in FP8), ``FP8Linear``, ``fp8_grouped_mm``,
  ``convert_to_fp8(model)`` for ``precision=fp8``, ``fp8_stats(model)`` for logging, ``check_fp8_dims(cfg)``.
- ``kernels.caches``: FP8 weights kept per optimizer step, one quantization of an input read by two projections.
- ``kernels.accumulation``: how each machine accumulates (interpreter, Hopper), the tests' tolerances.
- ``kernels.backend``: ``resolve_backend("auto"|"triton"|"torch"|"torchao")``; ``kernels.comparison``: torchao.
- ``kernels.compile_check``: compiles every kernel for sm_90 as it runs, without a GPU
  (``python -m kernels.compile_check``); ``kernels/gpu_check.sh``: the GPU tests and benchmark on a GPU.

Nothing here imports the Triton kernel modules at package import: ``@triton.jit`` decides between GPU and
CPU interpreter when a kernel is defined, so they load only once a backend has been resolved.
"""
