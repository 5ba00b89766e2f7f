"""Triton kernels of tritonjac, installed as `tritonjac.kernels`: only `@triton.jit` code lives here.

    activations.py   s, s', s'' (and s''') of every activation, selected by the registry's constexpr
                     id, and sin_cos (no libdevice slow path)
    forward.py       mlp_forward_kernel (whole network), layer_forward_kernel (one layer), and the
                     input helpers: encoded_input (an encoding's features and tangents from x),
                     network_input
    backward.py      mlp_backward_kernel (fused, whole network), layer_backward_kernel and
                     layer_weight_grad_kernel (the per-layer plan)
    reverse.py       mlp_reverse_kernel: y and J in reverse mode for the whole network (values up,
                     the adjoints of J's m rows down)

Launching them (shapes, strides, grids, configurations) is `tritonjac.triton_engine`'s job; its
kernel registry lists every kernel here with its pointer arguments and autotune key.

The contract every kernel follows
---------------------------------
The stacked tile. A block of BLOCK_M points is held as one tile of shape (BLOCK_M, SLOTS, width):
slot 0 the values h (or pre-activations z), slots 1..NUM_TANGENTS the tangents T (or U), and the
padding slots up to SLOTS = next_power_of_2(1 + NUM_TANGENTS) zeros. Reshaped to
(BLOCK_M * SLOTS, width) it is one `tl.dot` operand, so the values and all tangents go through a
layer's matmul together. Without tangents (JACOBIAN=False, or no loss on J in a backward) SLOTS = 1.
With LAPLACIAN (the per-layer kernels, forward and backward) slot 1 + NUM_TANGENTS carries the
Laplacian row; with HESSIAN slots 1 + NUM_TANGENTS.. carry the Hessian's upper triangle, row (a, b)
in `forward.hessian_slot(a, b)` (second order).
In reverse mode (kernels/reverse.py, and layer_backward_kernel with ADJOINTS) the stacked rows of a
point are instead the adjoints of J's m rows, ADJOINTS = m of them padded to ADJ_SLOTS.

Axes and their names.
- points: `num_points`, tiled by BLOCK_M (BLOCK_P in the weight gradient, which reduces over them);
  offsets `o_p`, the point stride `stride_*p`.
- slots: the stacked rows of one point; `o_s`, the slot stride `stride_*s`. LIVE_SLOTS (per-layer
  backward) is how many slots carry data (1 + NUM_TANGENTS, or 1).
- tangents: NUM_TANGENTS = k, the differentiated inputs (J has shape (points, out, k)).
- features: a layer's output features are N (`d_out`, tiled by BLOCK_N, offsets `o_n`), its input
  features are the reduction axis K of the matmul (`d_in`, tiled by BLOCK_K, offsets `o_k`); the
  whole-network kernels keep the full (padded) width WIDTH_PAD in one tile, offsets `o_w`.
  The weight is (d_out, d_in) as in nn.Linear: strides `stride_wn`, `stride_wk`.
- TILE_ROWS (fused backward) = BLOCK_M * SLOTS, the rows of the stacked operand.

Prefixes. `o_` offsets (an arange along one axis), `m_` masks (which offsets are in bounds), `p_`
pointers (base + offsets * strides), `b_` a block loaded from global memory (`bias_row` is a
loaded bias), `i_` program ids, `g_`/`G` gradients (G_Z = dLoss/d[z; U]).

Arguments, in this order: pointers (`*_ptr`), sizes (`num_points`, `d_in`, `d_out`, ...), strides
(`stride_<tensor><axis>`), then constexprs: shapes (IN, NUM_TANGENTS, WIDTH, OUT, SLOTS, ...),
the activation (ACT, ACT_PARAM, ACT_THRESHOLD; LAST_ACT, LAST_PARAM, LAST_THRESHOLD for the
last layer), switches (HAS_BIAS, JACOBIAN, HAS_GY, HAS_GJ, NEED_X, LAST_STEP, STORE_Z, ADJOINTS;
a layer's input parts HAS_HIDDEN, HAS_INPUT, ENCODED and the whole network's PLAIN_INPUT, HAS_SKIP, with
OUT_START/OUT_STOP for the outputs J holds: docs/design.md section 8),
PRECISION (the `tl.dot` input precision: "ieee", "tf32" or "tf32x3"), block sizes (BLOCK_*), and
INTERPRET_BF16 last (the interpreter's bf16 workaround, see forward.py). Sizes that vary with the
call (`num_points`, ...) are not specialised (`do_not_specialize`), so a new N never recompiles.

Precision. Operands are in the data dtype (fp32, bf16 or fp16); every accumulation, activation
and tangent scaling is fp32. Program ids are widened to int64 before they multiply a stride.
Masks guard every load and store: a kernel never touches memory outside its tensors.
"""
