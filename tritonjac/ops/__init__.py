"""The `torch.library` operators: how `torch.compile(fullgraph=True)` sees a JacobianMLP.

    tritonjac::mlp_jacobian                  (x, weights, biases, activations..., jacobian, backend) -> (y, J)
    tritonjac::mlp_jacobian_backward         (x, weights, biases, dy, dJ, ..., backend) -> (dx, dweights, dbiases)
    tritonjac::triton_mlp_jacobian           (x, weights, biases, activations..., jacobian) -> (y, J)
    tritonjac::triton_mlp_jacobian_backward
    tritonjac::mlp_second_order              (x, weights, biases, ..., hessian, laplacian) -> (y, J, S)
    tritonjac::mlp_second_order_backward     (..., dy, dJ, dS, ...) -> (dx, dweights, dbiases)

`opaque.py` defines the first pair (`custom_op`s, opaque to the compiler) on import: the PyTorch
engine, and the Triton kernels where the compiler cannot trace them (under the interpreter, or by
choice with TRITONJAC_OPAQUE_COMPILE=1). `traced.py` defines the `triton_` pair (`triton_op`s, for
CUDA tensors: the compiler traces into them and sees each kernel launch, so inductor schedules the
kernels in its own graph; inductor lowers Triton kernels for GPUs only, hence two families). Its
import costs about a second (triton and inductor), so `tritonjac.functional` imports it only when
the Triton kernels are compiled. `second_order.py` defines the last pair (`custom_op`s on the
PyTorch engine, for calls with Hessians or Laplacians), imported on first use. These modules are
the package's only import-time side effects.

Each forward's autograd formula calls its backward op, which recomputes the forward (nothing but
the inputs is saved). Eager calls do not go through these ops: each engine has its own
`autograd.Function`, which keeps what is faster (saved state on CPU; no tangents in the backward
without a loss on J).
"""
