"""Second derivatives in the same forward pass: Hessians and Laplacians of y with respect to the
k differentiated inputs, and their first-order backward (docs/design.md, section 11).

With the values h and the k tangents T (forward mode), each layer also carries q second-order
rows Q, stacked with them: A = [h; T_1..T_k; Q_1..Q_q], shape (1 + k + q, P, d). A layer is one
GEMM over all rows (z = W h + b, U = W T, V = W Q), then per row

    h' = s(z),   T'_j = s'(z) U_j,   Q'_r = s'(z) V_r + s''(z) quad_r(U),

where a Hessian row r = (a, b), a <= b, has quad_r = U_a U_b (k (k + 1) / 2 rows), and the single
Laplacian row, asked for without the Hessian, has quad = sum_j U_j^2 (the "forward Laplacian").
With the Hessian the Laplacian is the sum of its diagonal rows.

The input a0 enters with its own rows (x: the unit vectors as tangents and no curvature; an
encoding: its analytic first and second derivatives per feature), built per chunk.

Backward, for adjoints (h', T', Q') of a layer's output rows:

    V_r-bar = s' Q'_r-bar
    U_j-bar = s' T'_j-bar + s'' sum_r Q'_r-bar d quad_r / d U_j
    z-bar   = s' h'-bar + s'' (sum_j T'_j-bar U_j + sum_r Q'_r-bar V_r) + s''' sum_r Q'_r-bar quad_r

then one weight-gradient GEMM and one propagation GEMM over the stacked adjoints. The encoding's
rows depend on x through its derivatives up to the third.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grad_mode import records_autograd, refuse_double_backward
from ..network import NetworkSpec
from .common import (
    CHUNK_BYTES,
    GPU_CHUNK_BYTES,
    Network,
    Scratch,
    chunked_gradients,
    evaluate_activation,
    flush_softplus,
    run_chunks,
)

__all__ = [
    "SecondOrder",
    "second_order_jacobian",
    "assemble",
    "forward_points",
    "backward_by_recompute",
    "activation_derivatives",
    "through_activation",
]


@dataclass(frozen=True)
class SecondOrder:
    """Which second-order rows a call carries: the Hessian's upper triangle (a <= b) over the k
    differentiated inputs, or, for the Laplacian alone, one row of sum_j d2/dx_j^2."""

    k: int
    hessian: bool
    laplacian: bool

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(a, b) of each Hessian row (empty for the Laplacian row alone)."""
        return [(a, b) for a in range(self.k) for b in range(a, self.k)] if self.hessian else []

    @property
    def num_rows(self) -> int:
        """q, the second-order rows per point and layer."""
        return len(self.pairs) if self.hessian else 1

    def diagonal_rows(self) -> list[int]:
        """The rows holding d2/dx_a^2, a = 0..k-1 (the Laplacian's terms), in a's order."""
        if not self.hessian:
            raise ValueError("the Laplacian row alone has no diagonal rows")
        pairs = self.pairs
        return [pairs.index((a, a)) for a in range(self.k)]

    def hessian_index(self) -> list[list[int]]:
        """index[a][b]: the row of d2/dx_a dx_b (symmetric)."""
        pairs = self.pairs
        return [[pairs.index((min(a, b), max(a, b))) for b in range(self.k)] for a in range(self.k)]


# ---- the input rows --------------------------------------------------------------------------------
def _input_rows(net: Network, x: torch.Tensor, order: SecondOrder, scratch: Scratch):
    """a0's stacked rows (1 + k + q, P, len(a0)): its values, its tangents along the k inputs and
    its second derivatives, for one chunk x (P, d_in)."""
    input_map, k = net.input_map, order.k
    a0, _, d1, d2 = input_map.evaluate(x, second=True)
    P, d0 = a0.shape
    A0 = scratch.get("A0", 1 + k + order.num_rows, P, d0)
    A0.zero_()
    A0[0] = a0
    if input_map.encoding is None:  # a0 is x: unit tangents, no curvature
        for j in range(k):
            A0[1 + j, :, input_map.start + j] = 1.0
        return A0
    C = input_map.width
    on_coordinate = input_map.coordinate.unsqueeze(0) == torch.arange(k, device=x.device).unsqueeze(1)  # (k, C)
    A0[1 : 1 + k, :, :C] = torch.where(on_coordinate.unsqueeze(1), d1, 0.0)
    if order.hessian:
        for j, r in enumerate(order.diagonal_rows()):
            A0[1 + k + r, :, :C] = torch.where(on_coordinate[j], d2, 0.0)
    else:  # the Laplacian row: every encoded feature's coordinate is differentiated
        A0[1 + k, :, :C] = d2
    return A0


def _input_grad(net: Network, x, gA0, order: SecondOrder):
    """dLoss/dx (P, d_in) from the adjoints gA0 (1 + k + q, P, len(a0)) of a0's rows."""
    input_map, k = net.input_map, order.k
    if input_map.encoding is None:
        return gA0[0].clone()  # the tangent and curvature rows do not depend on x
    _, _, d1, d2 = input_map.evaluate(x, second=True)
    d3 = input_map.third_derivative(x)
    C, coordinate = input_map.width, input_map.coordinate
    columns = torch.arange(C, device=x.device)
    g_x = torch.zeros_like(x)
    g_x[:, k:] = gA0[0, :, C:]
    # each feature's value row, its own coordinate's tangent row and its curvature row
    per_feature = gA0[0, :, :C] * d1 + gA0[1 + coordinate, :, columns].t() * d2
    if order.hessian:
        diagonal = torch.tensor(order.diagonal_rows(), device=x.device)
        per_feature += gA0[1 + k + diagonal[coordinate], :, columns].t() * d3
    else:
        per_feature += gA0[1 + k, :, :C] * d3
    g_x[:, :k].index_add_(1, coordinate, per_feature)
    return g_x


# ---- one layer -------------------------------------------------------------------------------------
def _pre_activation(layer, A, A0):
    """z (P, d) and the derivative rows D = [U; V] (k + q, P, d_rows) of one layer."""
    if layer.rows is None:  # every row through the same weights: one GEMM per input
        Z = None
        for rows_in, W in ((A, layer.hidden), (A0, layer.inputs)):
            if W is not None:
                part = torch.mm(rows_in.flatten(0, 1), W.t()).view(rows_in.shape[0], rows_in.shape[1], -1)
                Z = part if Z is None else Z.add_(part)
        z, D = Z[0], Z[1:]
        if layer.bias is not None:
            z += layer.bias
        return z, D
    z, D = None, None  # the last layer with selected outputs: values for all, derivatives for those
    for rows_in, W in ((A, layer.hidden), (A0, layer.inputs)):
        if W is not None:
            zp = torch.nn.functional.linear(rows_in[0], W)
            Dp = torch.matmul(rows_in[1:], W[layer.rows].t())
            z, D = (zp, Dp) if z is None else (z.add_(zp), D.add_(Dp))
    if layer.bias is not None:
        z += layer.bias
    return z, D


def _row_products(A, B):
    """sum over rows of A * B, (n, P, d) x (n, P, d) -> (P, d), accumulated row by row (on CPU
    3x faster than (A * B).sum(0), whose reduction over the outer dimension is slow)."""
    total = A[0] * B[0]
    for j in range(1, A.shape[0]):
        total.addcmul_(A[j], B[j])
    return total


def _quadratic(U, order: SecondOrder):
    """quad_r(U) for every second-order row, (q, P, d)."""
    if order.hessian:
        return torch.stack([U[a] * U[b] for a, b in order.pairs])
    return _row_products(U, U).unsqueeze(0)


def _stack_rows(h, s1, s2, D, order: SecondOrder):
    """[h; s1 U; s1 V + s2 quad(U)], (1 + k + q, P, d): a layer's output rows from its activation's
    value and derivatives at z (s2 None: piecewise linear; s1 None too: the identity)."""
    if s1 is None:
        return torch.cat([h.unsqueeze(0), D])
    out = h.new_empty(1 + D.shape[0], *h.shape)
    out[0] = h
    torch.mul(s1, D, out=out[1:])
    if s2 is not None:
        out[1 + order.k :].addcmul_(s2, _quadratic(D[: order.k], order))
    return out


def _activate(act, z, D, order: SecondOrder):
    """The next layer's input rows [s(z); s'(z) U; s'(z) V + s''(z) quad(U)], (1 + k + q, P, d)."""
    return _stack_rows(*evaluate_activation(act, z, curvature=True), D, order)


# ---- forward ---------------------------------------------------------------------------------------
def _forward_chunk(x, net: Network, order: SecondOrder, saved: list | None, scratch: Scratch):
    """y (P, d_L) and the output's derivative rows (k + q, P, m) for one chunk; with `saved`,
    appends each layer's (z, D) for the backward."""
    A0 = _input_rows(net, x, order, scratch)
    A = None
    last = len(net.layers) - 1
    for l, layer in enumerate(net.layers):
        z, D = _pre_activation(layer, A, A0)
        if saved is not None:
            saved.append((z, D))
        if l < last:
            A = _activate(layer.act, z, D, order)
    if layer.act.is_identity:
        return z, D
    rows = layer.rows if layer.rows is not None else slice(None)
    out = _activate(layer.act, z[:, rows], D, order)
    return layer.act.value(z), out[1:]


# Forward mode's chunks on CPU: with 5 or more stacked rows the per-op overhead of small chunks
# outweighed the cache (SIREN's Laplacian step on a 2-core VM: 3 MB chunks 5-10% faster than 1.5 MB).
SECOND_ORDER_CHUNK_BYTES = CHUNK_BYTES


def chunk_points(num_points: int, weights, order: SecondOrder, x: torch.Tensor) -> int:
    """Points per chunk: (1 + k + q) stacked rows of the widest layer, SECOND_ORDER_CHUNK_BYTES in all."""
    per_point = (1 + order.k + order.num_rows) * max(w.shape[0] for w in weights) * x.element_size()
    chunk_bytes = SECOND_ORDER_CHUNK_BYTES if x.device.type == "cpu" else GPU_CHUNK_BYTES
    return max(1, min(num_points, chunk_bytes // per_point))


def forward_points(x2d, weights, biases, spec: NetworkSpec, order: SecondOrder, saved: list | None, band_weights=None):
    """Chunked forward -> y (P, d_L), J (P, m, k), S (P, m, q): S holds the second-order rows."""
    P = x2d.shape[0]
    net = Network(x2d, weights, biases, spec, band_weights)
    d_out, k = weights[-1].shape[0], order.k
    m = spec.jacobian_outputs(d_out)
    y = x2d.new_empty(P, d_out)
    J = x2d.new_empty(P, m, k)
    S = x2d.new_empty(P, m, order.num_rows)
    step = chunk_points(P, weights, order, x2d)
    if saved is not None:
        saved.extend([None] * -(-P // step))

    def work(start, stop, worker, scratch):
        chunk_saved = [] if saved is not None else None
        y[start:stop], D = _forward_chunk(x2d[start:stop], net, order, chunk_saved, scratch)
        J[start:stop] = D[:k].permute(1, 2, 0)
        S[start:stop] = D[k:].permute(1, 2, 0)
        if saved is not None:
            saved[start // step] = chunk_saved

    if P:
        run_chunks(P, step, x2d, work)
    return y, J, S


# ---- backward --------------------------------------------------------------------------------------
def activation_derivatives(act, z):
    """(s, s', s'', s''') at z; (z, None, None, None) for the identity. Softplus's are flushed on CPU
    like the forward's (`evaluate_activation`)."""
    if act.is_identity:
        return z, None, None, None
    h, s1, s2, s3 = act.evaluate_third(z)
    flush_softplus(act, z, h, s1, s2)
    return h, s1, s2, s3


def through_activation(derivatives, D, g0, GD, rows, order: SecondOrder):
    """dLoss/d[z; U; V] as one stacked (1 + k + q, P, d) tensor G, or (gz, gD) apart when the last
    layer's derivative rows hold fewer outputs than its values (then G is None), from
    dLoss/d[h'; T'; Q'] (g0 (P, d), GD (k + q, P, d_rows)) and the activation's `_derivatives`."""
    _, s1, s2, s3 = derivatives
    stacked = rows == slice(None)
    if s1 is None:  # the identity
        G = torch.cat([g0.unsqueeze(0), GD]) if stacked else None
        return (G, G[0], G[1:]) if stacked else (None, g0, GD)
    k = order.k
    G = g0.new_empty(1 + GD.shape[0], *g0.shape) if stacked else None
    gz = torch.mul(g0, s1, out=G[0]) if stacked else g0 * s1
    r1 = s1[:, rows]
    gD = torch.mul(GD, r1, out=G[1:]) if stacked else GD * r1
    if s2 is not None:
        r2, r3 = s2[:, rows], s3[:, rows]
        U, GQ = D[:k], GD[k:]
        curvature = _row_products(GD, D).mul_(r2)  # s'' (sum_j T'_j-bar U_j + sum_r Q'_r-bar V_r)
        curvature.addcmul_(r3, _row_products(GQ, _quadratic(U, order)))
        gz[:, rows] += curvature
        # s'' sum_r Q'_r-bar d quad_r / d U_j
        if order.hessian:
            for r, (a, b) in enumerate(order.pairs):
                gD[a].addcmul_(r2, GQ[r] * U[b])
                gD[b].addcmul_(r2, GQ[r] * U[a])
        else:
            gD[:k].addcmul_(GQ[0] * r2, U, value=2.0)
    return G, gz, gD


def _backward_chunk(x, layer_saved, net: Network, order: SecondOrder, g0, GD, grad_W, grad_b, need_x, scratch):
    """Add one chunk's weight and bias gradients to grad_W / grad_b; return its dLoss/dx.

    Each layer's activation is evaluated once, (s, s', s'', s''') together: s, s', s'' rebuild its
    output rows, the next layer's input, and s', s'', s''' take the adjoints through it."""
    layers = net.layers
    A0 = _input_rows(net, x, order, scratch)
    gA0 = None
    last = len(layers) - 1
    derivatives = activation_derivatives(layers[last].act, layer_saved[last][0])
    for l in range(last, -1, -1):
        layer = layers[l]
        rows = layer.rows if layer.rows is not None else slice(None)
        G, gz, gD = through_activation(derivatives, layer_saved[l][1], g0, GD, rows, order)
        A = None
        if layer.hidden is not None:  # this layer's input: the previous layer's output rows
            z_prev, D_prev = layer_saved[l - 1]
            derivatives = activation_derivatives(layers[l - 1].act, z_prev)
            A = _stack_rows(*derivatives[:3], D_prev, order)
        for rows_in, W, cols in ((A, layer.hidden, layer.hidden_cols), (A0, layer.inputs, layer.input_cols)):
            if W is None or grad_W[l] is None:
                continue
            g_W = grad_W[l][:, cols]
            if G is not None:
                g_W.addmm_(G.flatten(0, 1).t(), rows_in.flatten(0, 1))
            else:
                g_W.addmm_(gz.t(), rows_in[0])
                g_W[rows].addmm_(gD.flatten(0, 1).t(), rows_in[1:].flatten(0, 1))
        if grad_b[l] is not None:
            grad_b[l] += gz.sum(0)
        for W, into_a0 in ((layer.inputs, True), (layer.hidden, False)):
            if W is None or (into_a0 and not need_x):
                continue
            if G is not None:
                g = torch.mm(G.flatten(0, 1), W).view(G.shape[0], G.shape[1], W.shape[1])
            else:
                g = torch.cat([(gz @ W).unsqueeze(0), gD @ W[rows]])
            if into_a0:
                gA0 = g if gA0 is None else gA0.add_(g)
            else:
                g0, GD = g[0], g[1:]
    return _input_grad(net, x, gA0, order) if need_x else None


def _backward(x2d, weights, net: Network, order: SecondOrder, gy, gJ, gS, need_x, need_W, need_b, layer_saved):
    d_out, k = weights[-1].shape[0], order.k
    m = net.spec.jacobian_outputs(d_out)

    def chunk_backward(c, start, stop, grad_W, grad_b, scratch):
        P = stop - start
        g0 = gy[start:stop] if gy is not None else x2d.new_zeros(P, d_out)
        GD = x2d.new_zeros(k + order.num_rows, P, m)
        if gJ is not None:
            GD[:k] = gJ[start:stop].permute(2, 0, 1)
        if gS is not None:
            GD[k:] = gS[start:stop].permute(2, 0, 1)
        return _backward_chunk(
            x2d[start:stop], layer_saved(c, start, stop, scratch), net, order, g0, GD, grad_W, grad_b, need_x, scratch
        )

    step = chunk_step(x2d, weights, order)
    return chunked_gradients(x2d, weights, net.spec, need_x, need_W, need_b, chunk_backward, step)


def chunk_step(x2d, weights, order: SecondOrder) -> int:
    return chunk_points(x2d.shape[0], weights, order, x2d) if x2d.shape[0] else 1


def backward_by_recompute(
    x2d, weights, biases, spec: NetworkSpec, order: SecondOrder, gy, gJ, gS, need_x, need_W, need_b, band_weights=None
):
    """The analytic backward for a forward that kept nothing but its inputs (the torch.compile op):
    each chunk's forward is recomputed before its backward."""
    net = Network(x2d, weights, biases, spec, band_weights)

    def recompute(c, start, stop, scratch):
        saved = []
        _forward_chunk(x2d[start:stop], net, order, saved, scratch)
        return saved

    with torch.no_grad():
        return _backward(x2d, weights, net, order, gy, gJ, gS, need_x, need_W, need_b, recompute)


class _SecondOrderJacobian(torch.autograd.Function):
    """(y, J, S) with an analytic first-order backward that saves x and, per layer, z_l and D_l."""

    @staticmethod
    def forward(ctx, request, band_weights, x2d, *params):
        spec, order = request
        L = len(spec.activations)
        weights, biases = list(params[:L]), list(params[L:])
        saved = []
        y, J, S = forward_points(x2d, weights, biases, spec, order, saved, band_weights)
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.order, ctx.band_weights = spec, order, band_weights
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x2d, *weights, *(t for chunk in saved for zD in chunk for t in zD))
        return y, J, S

    @staticmethod
    def backward(ctx, gy, gJ, gS):
        refuse_double_backward()
        from .common import saved_call

        x2d, weights, flat, net, need_x, need_W, need_b = saved_call(ctx)
        L = len(weights)

        def layer_saved(c, start, stop, scratch):
            chunk = flat[2 * L * c : 2 * L * (c + 1)]
            return list(zip(chunk[0::2], chunk[1::2]))

        gx, grad_W, grad_b = _backward(x2d, weights, net, ctx.order, gy, gJ, gS, need_x, need_W, need_b, layer_saved)
        return (None, None, gx, *grad_W, *grad_b)


def second_order_jacobian(x2d, weights, biases, spec: NetworkSpec, hessian: bool, laplacian: bool, band_weights=None):
    """y (P, d_L), J (P, m, k), then H (P, m, k, k) if `hessian`, then the Laplacian (P, m) if
    `laplacian` (the trace of H), at the points x2d (P, d_0); differentiable to first order."""
    order = SecondOrder(spec.jacobian_inputs, hessian, laplacian)
    params = [*weights, *biases]
    if records_autograd(x2d, *params):
        y, J, S = _SecondOrderJacobian.apply((spec, order), band_weights, x2d, *params)
    else:
        with torch.no_grad():
            y, J, S = forward_points(x2d, weights, biases, spec, order, None, band_weights)
    return (y, J, *assemble(order, S))


def assemble(order: SecondOrder, S):
    """[H (P, m, k, k)] and/or [the Laplacian (P, m)] from the second-order rows S (P, m, q)."""
    out = []
    if order.hessian:
        out.append(S[:, :, torch.tensor(order.hessian_index(), device=S.device)])
    if order.laplacian:
        out.append(S[:, :, order.diagonal_rows()].sum(-1) if order.hessian else S[:, :, 0])
    return out
