"""Reverse mode: J's m rows by a reverse sweep after the values, for fewer outputs than inputs, and
the first-order backward of that computation (docs/design.md, section 9).

An SDF's gradient (m = 1 of k = 3) costs 1 + 1 rows per layer this way against forward mode's
1 + 3. Per chunk of points, the forward computes z_l and h_l = s(z_l) up the layers, then the
adjoints of the m selected outputs, dh_l[r] = d y_(o+r) / d h_l, down them:

    dz_l = s'(z_l) * dh_l          dh_(l-1) = dz_l W_l (its hidden columns)
    da0 += dz_l W_l (its a0 columns, on the first layer and the skips)

and J's row r is da0[r] on x's differentiated columns (through the encoding's derivatives).

The backward of a loss with adjoints gy and Jbar uses sum(Jbar * J) = sum_r (the derivative of
y_(o+r) along the direction Jbar[r] in x): its gradient is that of m forward tangents seeded with
Jbar's rows, and the adjoints of those tangents are the dh_l the forward saved. So the backward
runs the m tangents up (U_l = W_l T_(l-1), T_l = s'(z_l) U_l: one GEMM row each per layer) and
one value adjoint down, with each weight gradient one GEMM over the 1 + m stacked rows:

    g_z  = s'(z) * g_h + s''(z) * sum_r dh[r] * U[r]
    dW  += [g_z; dz]^T [h_prev; T_prev]         g_(h_prev) = g_z W

min(m, k) rows for a loss on J, where forward mode's backward carries k.
"""

from __future__ import annotations

import torch

from ..grad_mode import records_autograd, refuse_double_backward
from ..network import NetworkSpec
from .common import (
    Layer,
    Network,
    Scratch,
    activation_into,
    activation_value,
    chunk_points,
    chunked_gradients,
    evaluate_activation,
    run_chunks,
    saved_call,
)

__all__ = ["mlp_jacobian", "forward_points", "backward_by_recompute"]


def _value_pre_activation(layer: Layer, h, a0, out=None):
    """z (P, d) of one layer from the previous layer's output h and a0 (values only), into `out`
    when given."""
    inputs, W = (a0, layer.inputs) if layer.hidden is None else (h, layer.hidden)
    if layer.bias is not None:
        z = torch.addmm(layer.bias, inputs, W.t(), out=out)
    else:
        z = torch.mm(inputs, W.t(), out=out)
    if layer.hidden is not None and layer.inputs is not None:  # a skip: a0's term
        z.addmm_(a0, layer.inputs.t())
    return z


def _selected_slopes(net: Network, slope_last, P: int, like):
    """s_L'(z_L) of the selected outputs, (m, P): the last layer's adjoints dz_L[r] (one non-zero each)."""
    rows = net.rows
    if slope_last is None:
        return like.new_ones(rows.stop - rows.start, P)
    return slope_last[:, rows].t()


class _Store:
    """What the backward reads, for every point, in tensors allocated once and written chunk by
    chunk: z_l of every layer (None for an identity last layer), the adjoints dh_l (m, P, d_l) of
    every layer but the last, and a0's adjoints (m, P, len(a0's differentiated columns)) with an
    encoding (else None). Saving each chunk's own tensors instead interleaved them with the
    chunks' temporaries on the heap: the forward's peak memory was 1.8x what it saved."""

    def __init__(self, tensors: list):
        self.tensors = tensors

    @classmethod
    def allocate(cls, num_points: int, net: Network, empty):
        """A store for num_points points, its tensors from empty(role, *shape): `Scratch.get` (one
        chunk's, reused), or a factory of fresh tensors (what autograd keeps)."""
        layers, rows = net.layers, net.rows
        m, last = rows.stop - rows.start, len(layers) - 1
        z = [empty(f"store z{l}", num_points, layer.width) for l, layer in enumerate(layers)]
        if layers[last].act.is_identity:
            z[last] = None  # y itself
        dh = [empty(f"store dh{l}", m, num_points, layers[l].width) for l in range(last)]
        input_map = net.input_map
        da0 = empty("store da0", m, num_points, input_map.width) if input_map.encoding is not None else None
        return cls([*z, *dh, da0])

    def chunk(self, start: int, stop: int) -> list:
        """The views of points start:stop, in the same order."""
        L = (len(self.tensors) + 1) // 2
        return [
            None if t is None else (t[start:stop] if i < L else t[:, start:stop]) for i, t in enumerate(self.tensors)
        ]


# ---- forward ---------------------------------------------------------------------------------------
def _forward_chunk(x, net: Network, scratch: Scratch, saved: list | None = None):
    """y (P, d_L) and J (P, m, k) for one chunk of points x (P, d_0); with `saved` (a `_Store`'s
    views of these points), writes what the backward needs there."""
    input_map, layers = net.input_map, net.layers
    L = len(layers)
    last = L - 1
    a0, _, d1, _ = input_map.evaluate(x)
    zs, slopes, h = [], [], None
    P = x.shape[0]
    for l, layer in enumerate(layers):
        out = saved[l] if saved is not None and saved[l] is not None else scratch.get(f"z{l}", P, layer.width)
        z = _value_pre_activation(layer, h, a0, out)
        h, slope = _activate(layer.act, z, scratch, l, slope=not (layer.act.name == "softplus" and l < last))
        zs.append(z)
        slopes.append(slope)
    y = h

    # the adjoints of the selected outputs, from the last layer down
    columns = input_map.differentiated_columns
    w = _selected_slopes(net, slopes[last], x.shape[0], x)[:, :, None]  # (m, P, 1)
    layer = layers[last]
    dh = w * layer.hidden[net.rows][:, None, :] if layer.hidden is not None else None
    da0 = w * layer.inputs[net.rows, columns][:, None, :] if layer.inputs is not None else None
    for l in range(last - 1, -1, -1):
        layer = layers[l]
        if saved is not None:
            saved[L + l].copy_(dh)
        dz = _adjoint(layer.act, dh, zs[l], slopes[l], scratch.get("dz", *dh.shape))
        m, P, d = dz.shape
        if layer.hidden is not None:  # two buffers in turn: dz is dh itself after an identity
            out = scratch.get("dh" if l % 2 else "dh'", m * P, layer.hidden.shape[1])
            dh = torch.mm(dz.reshape(m * P, d), layer.hidden, out=out).view(m, P, -1)
        if layer.inputs is not None:
            g = torch.mm(dz.reshape(m * P, d), layer.inputs[:, columns]).view(m, P, -1)
            da0 = g if da0 is None else da0.add_(g)
    if saved is not None and saved[-1] is not None:
        saved[-1].copy_(da0)
    return y, input_map.jacobian(da0, d1)


def _activate(act, z, scratch: Scratch, l: int, slope: bool = True):
    """h_l = s(z_l) and s'(z_l) (None when not asked for, or for the identity) of one layer, in
    scratch (one buffer per layer: the adjoints read them all) where the activation can write into
    buffers."""
    if act.is_identity:
        return z, None
    h = scratch.get("h" if l % 2 else "h'", *z.shape)  # the next layer reads h while writing its own
    s1 = scratch.get(f"slope{l}", *z.shape) if slope else None
    if activation_into(act, z, h, s1):
        return h, s1
    if not slope:
        return activation_value(act, z), None
    h, s1, _ = evaluate_activation(act, z)
    return h, s1


def _adjoint(act, dh, z, slope, out):
    """dz = s'(z) * dh, into `out`: from the slope, or without one (softplus) by torch's fused
    kernel, which computes the slope and the product in one pass, as autograd does."""
    if act.is_identity:
        return dh
    if slope is not None:
        return torch.mul(dh, slope, out=out)
    return torch.ops.aten.softplus_backward.grad_input(dh, z, act.param, act.threshold, grad_input=out)


def forward_points(x2d, weights, biases, spec: NetworkSpec, store: _Store | None, band_weights=None):
    """Chunked forward over (P, d_0) points -> y (P, d_L), J (P, m, k); with `store` (allocated
    for these points), writes what the backward needs there."""
    P = x2d.shape[0]
    net = Network(x2d, weights, biases, spec, band_weights)
    d_out = weights[-1].shape[0]
    y = x2d.new_empty(P, d_out)
    J = x2d.new_empty(P, spec.jacobian_outputs(d_out), spec.jacobian_inputs)

    def work(start, stop, worker, scratch):
        saved = store.chunk(start, stop) if store is not None else None
        y[start:stop], J[start:stop] = _forward_chunk(x2d[start:stop], net, scratch, saved)

    run_chunks(P, chunk_points(P, weights, spec, x2d), x2d, work)
    return y, J


# ---- backward --------------------------------------------------------------------------------------
def _backward_chunk(x, saved, net: Network, gy, V, grad_W, grad_b, need_x: bool, scratch: Scratch):
    """Accumulate one chunk's weight and bias gradients into grad_W / grad_b; return the grad of x.

    gy (P, d_L) is dLoss/dy (a buffer this function may overwrite), V (m, P, k) the rows of
    dLoss/dJ (None: no loss on J); `saved` is what `_forward_chunk` saved for these points.
    """
    input_map, layers = net.input_map, net.layers
    L = len(layers)
    last, rows, tangents = L - 1, net.rows, V is not None
    zs, dhs, da0 = saved[:L], saved[L : 2 * L - 1], saved[2 * L - 1]
    a0, _, d1, d2 = input_map.evaluate(x, second=need_x and tangents)
    columns = input_map.differentiated_columns
    seed = input_map.seed_tangent(V, d1) if tangents else None  # a0's tangent (m, P, len(columns))

    # up: the inputs [h_l; T_l] of every layer after the first, s'(z_l), and the curvature terms
    # s''(z_l) * sum_r dh_l[r] * U_l[r] of the value adjoints
    stacked, slopes, curvatures = [None] * L, [None] * L, [None] * L
    T = None
    for l in range(last):
        layer = layers[l]
        h, slope, second = evaluate_activation(layer.act, zs[l], curvature=tangents)
        slopes[l] = slope
        if not tangents:
            stacked[l] = h[None]
            continue
        U = _tangent_pre_activation(layer, T, seed, columns)
        if second is not None:
            curvatures[l] = second * (dhs[l] * U).sum(0)
        A = scratch.get(f"A{l}", 1 + U.shape[0], *h.shape)
        A[0] = h
        if slope is None:
            A[1:] = U
        else:
            torch.mul(slope, U, out=A[1:])
        stacked[l], T = A, A[1:]
    layer = layers[last]
    _, slope_last, second_last = evaluate_activation(layer.act, zs[last], value=False, curvature=tangents)
    w = _selected_slopes(net, slope_last, x.shape[0], x)  # (m, P): the last layer's tangent adjoints
    if second_last is not None:  # only the selected outputs' tangents: U_L[r] at output o + r
        U_last = _tangent_pre_activation(layer, T, seed, columns, net.rows)
        curvatures[last] = second_last[:, rows].t() * U_last

    # down: the value adjoint g, the weight gradients
    g, g_a0 = gy, None
    for l in range(last, -1, -1):
        layer = layers[l]
        if l == last:
            gz = g if slope_last is None else g.mul_(slope_last)
            if curvatures[l] is not None:
                gz[:, rows] += curvatures[l].t()
        else:
            gz = g if slopes[l] is None else g.mul_(slopes[l])
            if curvatures[l] is not None:
                gz += curvatures[l]
        if grad_W[l] is not None:
            _add_weight_grad(grad_W[l], layer, l == last, gz, w, dhs, slopes, l, stacked, a0, seed, columns, rows)
        if grad_b[l] is not None:
            grad_b[l] += gz.sum(0)
        if layer.inputs is not None and need_x:  # a0's share: from the first layer and the skips
            g_next = gz @ layer.inputs
            g_a0 = g_next if g_a0 is None else g_a0.add_(g_next)
        if layer.hidden is not None:
            g = gz @ layer.hidden
    if not need_x:
        return None
    g_x = input_map.input_grad(x, g_a0, None, d1, None)
    if tangents:
        input_map.add_seed_input_grad(g_x, da0, V, d2)
    return g_x


def _tangent_pre_activation(layer: Layer, T, seed, columns: slice, rows: slice | None = None):
    """U (m, P, d) = W [T; seed] of the tangents along the directions; with `rows` (the last
    layer), only U[r] at output rows.start + r, as (m, P)."""
    if rows is None:
        U = torch.matmul(T, layer.hidden.t()) if layer.hidden is not None else None
        if layer.inputs is not None:
            term = torch.matmul(seed, layer.inputs[:, columns].t())
            U = term if U is None else U.add_(term)
        return U
    U = (T * layer.hidden[rows][:, None, :]).sum(-1) if layer.hidden is not None else None
    if layer.inputs is not None:
        term = (seed * layer.inputs[rows, columns][:, None, :]).sum(-1)
        U = term if U is None else U.add_(term)
    return U


def _add_weight_grad(grad_W, layer: Layer, is_last, gz, w, dhs, slopes, l, stacked, a0, seed, columns, rows):
    """One layer's weight gradient: [g_z; dz]^T [h_prev; T_prev] over its hidden columns, and the
    same with [a0; seed] over its a0 columns. The last layer's tangent adjoints dz[r] are w[r] at
    output o + r alone, so they touch those rows of W only."""
    tangents = seed is not None
    if is_last:
        if layer.hidden is not None:
            A = stacked[l - 1]
            g_hidden = grad_W[:, layer.hidden_cols]
            g_hidden.addmm_(gz.t(), A[0])
            if tangents:
                g_hidden[rows] += torch.bmm(w[:, None, :], A[1:]).squeeze(1)
        if layer.inputs is not None:
            g_inputs = grad_W[:, layer.input_cols]
            g_inputs.addmm_(gz.t(), a0)
            if tangents:
                g_inputs[rows, columns] += torch.bmm(w[:, None, :], seed).squeeze(1)
        return
    dz = None
    if tangents:
        dz = dhs[l] if slopes[l] is None else dhs[l] * slopes[l]
    if layer.hidden is not None:
        A = stacked[l - 1]
        G = gz[None] if dz is None else torch.cat([gz[None], dz])
        grad_W[:, layer.hidden_cols].addmm_(G.flatten(0, 1).t(), A[: G.shape[0]].flatten(0, 1))
    if layer.inputs is not None:
        g_inputs = grad_W[:, layer.input_cols]
        g_inputs.addmm_(gz.t(), a0)
        if dz is not None:
            g_inputs[:, columns].addmm_(dz.flatten(0, 1).t(), seed.flatten(0, 1))


def _backward(x2d, weights, net: Network, gy, gJ, need_x, need_W, need_b, chunk_saved):
    """Chunked backward: gradients of x, the weights and the biases (None where not needed).
    `chunk_saved(start, stop, scratch)` gives what `_forward_chunk` saved for points start:stop."""
    d_out = weights[-1].shape[0]

    def chunk_backward(c, start, stop, grad_W, grad_b, scratch):
        g_values = scratch.get("gy", stop - start, d_out)
        if gy is None:
            g_values.zero_()
        else:
            g_values.copy_(gy[start:stop])
        V = gJ[start:stop].transpose(0, 1) if gJ is not None else None
        saved = chunk_saved(start, stop, scratch)
        return _backward_chunk(x2d[start:stop], saved, net, g_values, V, grad_W, grad_b, need_x, scratch)

    return chunked_gradients(x2d, weights, net.spec, need_x, need_W, need_b, chunk_backward)


class _ReverseJacobian(torch.autograd.Function):
    """(y, J) by reverse sweeps, with an analytic first-order backward; saves x and, per layer,
    z_l and the adjoints dh_l."""

    @staticmethod
    def forward(ctx, spec: NetworkSpec, band_weights, x2d, *params):
        L = spec.num_layers
        weights, biases = list(params[:L]), list(params[L:])
        net = Network(x2d, weights, biases, spec, band_weights)
        store = _Store.allocate(x2d.shape[0], net, lambda role, *shape: x2d.new_empty(shape))
        y, J = forward_points(x2d, weights, biases, spec, store, band_weights)
        ctx.set_materialize_grads(False)  # a loss on y alone or J alone gives None for the other
        ctx.spec, ctx.band_weights = spec, band_weights
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x2d, *weights, *store.tensors)
        return y, J

    @staticmethod
    def backward(ctx, gy, gJ):
        refuse_double_backward()
        x2d, weights, own, net, need_x, need_W, need_b = saved_call(ctx)
        store = _Store(list(own))
        gx, grad_W, grad_b = _backward(
            x2d, weights, net, gy, gJ, need_x, need_W, need_b, lambda start, stop, scratch: store.chunk(start, stop)
        )
        return (None, None, gx, *grad_W, *grad_b)


def backward_by_recompute(x2d, weights, biases, spec: NetworkSpec, gy, gJ, need_x, need_W, need_b, band_weights=None):
    """The analytic backward for a forward that kept nothing but its inputs (the torch.compile op):
    each chunk's forward is recomputed before its backward."""
    net = Network(x2d, weights, biases, spec, band_weights)
    step = chunk_points(x2d.shape[0], weights, spec, x2d)

    def recompute(start, stop, scratch):
        saved = _Store.allocate(step, net, scratch.get).chunk(0, stop - start)  # one per worker, in its scratch
        _forward_chunk(x2d[start:stop], net, scratch, saved)
        return saved

    with torch.no_grad():
        return _backward(x2d, weights, net, gy, gJ, need_x, need_W, need_b, recompute)


def mlp_jacobian(x2d, weights, biases, spec: NetworkSpec, band_weights=None):
    """y (P, d_L) and J (P, m, k) at the points x2d (P, d_0) by reverse sweeps, differentiable."""
    params = [*weights, *biases]
    if not records_autograd(x2d, *params):
        with torch.no_grad():
            return forward_points(x2d, weights, biases, spec, None, band_weights)
    return _ReverseJacobian.apply(spec, band_weights, x2d, *params)
