"""Plant known, realistic bugs in the kernels, launchers and engines one at a time, and check that the tests
catch each one. A bug no test catches means a test is missing.

    python dev/plant_bugs.py                 # every bug, stopping at each one's first failing test
    python dev/plant_bugs.py --all softplus  # one bug (by name fragment), counting every failing test

Each bug is a one-line source edit, undone afterwards whatever happens (the files are restored from
memory; `git diff` shows nothing once it finishes). The tests run under Triton's interpreter, as in
CI. These are the bugs a review planted that the suite used to let through, plus their neighbours.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = [
    "tests/test_triton_second_order.py",
    "tests/test_second_order.py",
    "tests/test_triton_reverse.py",
    "tests/test_triton_backward.py",
    "tests/test_reverse_mode.py",
    "tests/test_triton_forward.py",
    "tests/test_strided_inputs.py",
    "tests/test_compile.py",
    "tests/test_real_networks.py",
    "tests/test_tf32_emulation.py",
]


@dataclass
class Bug:
    name: str
    path: str
    old: str
    new: str
    what: str


BUGS = [
    Bug(
        "fused-backward-contiguous-x",
        "tritonjac/triton_engine/backward.py",
        "stride_xp=x2d.stride(0),\n        stride_xf=x2d.stride(1),",
        "stride_xp=d_in,\n        stride_xf=1,",
        "the fused backward told that x is contiguous (strides hard-wired)",
    ),
    Bug(
        "forward-mask-off-by-one",
        "kernels/forward.py",
        "    m_p = o_p < num_points\n    o_s = tl.arange(0, SLOTS)\n    o_w = tl.arange(0, WIDTH_PAD)\n",
        "    m_p = o_p <= num_points\n    o_s = tl.arange(0, SLOTS)\n    o_w = tl.arange(0, WIDTH_PAD)\n",
        "the whole-network forward writes one row past the end of y and J",
    ),
    Bug(
        "layer-forward-mask-off-by-one",
        "kernels/forward.py",
        "    m_p = o_p < num_points\n    o_n = i_n * BLOCK_N",
        "    m_p = o_p <= num_points\n    o_n = i_n * BLOCK_N",
        "the per-layer forward writes one row past the end of its outputs",
    ),
    Bug(
        "weight-grad-split-drops-last-point",
        "kernels/backward.py",
        "stop = tl.minimum(start + points_per_split, num_points)",
        "stop = tl.minimum(start + points_per_split, num_points - 1)",
        "the per-layer weight gradient leaves out the last point",
    ),
    Bug(
        "softplus-second-derivative-loses-beta",
        "kernels/activations.py",
        "d2s = tl.where(linear, 0.0, PARAM * q * q_neg)",
        "d2s = tl.where(linear, 0.0, q * q_neg)",
        "softplus's s'' without its factor beta (only a loss on J sees it)",
    ),
    Bug(
        "chunked-backward-wrong-dy-slice",
        "tritonjac/triton_engine/backward.py",
        "G[:, 0] = gy[start : start + chunk]",
        "G[:, 0] = gy[: xc.shape[0]]",
        "every chunk of the per-layer backward reads the first chunk's dLoss/dy",
    ),
    Bug(
        "encoding-cosine-slope-sign",
        "kernels/forward.py",
        "slope = tl.where(is_sin, cos_t, tl.where(is_cos, -sin_t, 1.0))",
        "slope = tl.where(is_sin, cos_t, tl.where(is_cos, sin_t, 1.0))",
        "the encoded cosines' derivative with the wrong sign (J of encoded networks)",
    ),
    Bug(
        "per-layer-backward-skip-gradient-unscaled",
        "tritonjac/triton_engine/backward.py",
        "grad_W[l][:, hidden_cols] += gw[0] if scale == 1.0 else scale * gw[0]",
        "grad_W[l][:, hidden_cols] += gw[0]",
        "the per-layer backward's weight gradient of a scaled skip layer without its scale",
    ),
    Bug(
        "selected-outputs-wrong-rows",
        "tritonjac/triton_engine/forward.py",
        "return [(slice(None), False), (rows, True)]",
        "return [(slice(None), False), (slice(0, rows.stop - rows.start), True)]",
        "the last layer's tangents taken from the first rows of W instead of the selected outputs'",
    ),
    Bug(
        "triton-skip-weights-unscaled",
        "tritonjac/triton_engine/forward.py",
        "        if spec.layer_scale(l) != 1.0:\n            W = W * spec.layer_scale(l)\n",
        "",
        "the Triton launchers multiply a skip layer's weights without its scale",
    ),
    Bug(
        "tf32-operands-truncated",
        "kernels/forward.py",
        "        if ROUND_TF32_OPERANDS:",
        "        if False:",
        "TF32 dots without their operands rounded to nearest (the tensor cores truncate them)",
    ),
    Bug(
        "narrow-layers-in-tf32",
        "tritonjac/precision.py",
        'if precision == "tf32" and min(d_in, d_out) <= NARROW_FEATURES:',
        'if precision == "tf32" and min(d_in, d_out) < 0:',
        "the per-layer kernels compute x's columns and the few outputs in TF32 (the fused ones in fp32)",
    ),
    Bug(
        "reverse-last-curvature",
        "tritonjac/torch_engine/reverse_mode.py",
        "        curvatures[last] = second_last[:, rows].t() * U_last",
        "        curvatures[last] = None",
        "reverse mode's backward forgets the output activation's curvature term",
    ),
    Bug(
        "reverse-last-tangent-weight-grad",
        "tritonjac/torch_engine/reverse_mode.py",
        "                g_hidden[rows] += torch.bmm(w[:, None, :], A[1:]).squeeze(1)",
        "                pass",
        "reverse mode's backward leaves out the last layer's weight gradient through the tangents",
    ),
    Bug(
        "reverse-encoding-second-derivative",
        "tritonjac/torch_engine/reverse_mode.py",
        "        input_map.add_seed_input_grad(g_x, da0, V, d2)",
        "        pass",
        "reverse mode's dLoss/dx forgets that the encoding's derivatives depend on x",
    ),
    Bug(
        "reverse-saved-chunk",
        "tritonjac/torch_engine/reverse_mode.py",
        "lambda start, stop, scratch: store.chunk(start, stop)",
        "lambda start, stop, scratch: store.chunk(0, stop - start)",
        "reverse mode's backward reads the first chunk's saved adjoints for every chunk",
    ),
    Bug(
        "reverse-kernel-first-slope",
        "kernels/reverse.py",
        "        G = G * tl.load(ws + p_ws_tile)[:, None, :]\n",
        "",
        "the whole-network reverse kernel forgets the first layer's slope before J",
    ),
    Bug(
        "reverse-kernel-slope-of-the-wrong-layer",
        "kernels/reverse.py",
        "            ds = tl.load(ws + (l + 1) * BLOCK_M * WIDTH_PAD + p_ws_tile)",
        "            ds = tl.load(ws + l * BLOCK_M * WIDTH_PAD + p_ws_tile)",
        "the whole-network reverse kernel scales the adjoints by the previous layer's slopes",
    ),
    Bug(
        "reverse-kernel-padding-adjoint-written",
        "kernels/reverse.py",
        "        m_j = m_p[:, None] & (o_a[None, :] < ADJOINTS)",
        "        m_j = m_p[:, None]",
        "the whole-network reverse kernel writes its padding adjoint slot into J",
    ),
    Bug(
        "reverse-kernel-persistent-stride",
        "kernels/reverse.py",
        "        first_point += num_programs.to(tl.int64) * BLOCK_M",
        "        first_point += BLOCK_M",
        "the whole-network reverse kernel's programs step to the next block instead of their next one",
    ),
    Bug(
        "adjoint-propagation-with-curvature",
        "kernels/backward.py",
        "            G_Z = _activation_backward(G, Z, 1, ACT, ACT_PARAM, ACT_THRESHOLD)",
        "            G_Z = _activation_backward(G, Z, SLOTS, ACT, ACT_PARAM, ACT_THRESHOLD)",
        "the per-layer adjoint propagation treats adjoint rows as [value; tangents] (curvature terms)",
    ),
    Bug(
        "reverse-layers-all-output-rows",
        "tritonjac/triton_engine/reverse.py",
        "                W_hidden = None if W_hidden is None else W_hidden[rows]",
        "                W_hidden = None if W_hidden is None else W_hidden[: rows.stop - rows.start]",
        "per-layer reverse mode starts the adjoints from the first outputs' rows, not the selected ones'",
    ),
    Bug(
        "reverse-layers-skip-share-dropped",
        "tritonjac/triton_engine/reverse.py",
        "                    g_a0 = share if g_a0 is None else g_a0.add_(share)",
        "                    g_a0 = share",
        "per-layer reverse mode keeps only the first layer's share of a0's adjoints (a skip layer's is lost)",
    ),
    Bug(
        "seeded-backward-one-hot-slot",
        "kernels/backward.py",
        "                g += tl.where(o_s[None, :] == o + 1, 1.0, 0.0)",
        "                g += tl.where(o_s[None, :] == o, 1.0, 0.0)",
        "the seeded backward puts the loss on the wrong tangent slot (the value row for output 0)",
    ),
    Bug(
        "seeded-backward-first-layer-column",
        "kernels/backward.py",
        "                _add_to(gw_first + o_w * IN + j, g_col, m_w)",
        "                _add_to(gw_first + o_w * IN + (SEED_INPUTS - 1 - j), g_col, m_w)",
        "the seeded backward adds the first layer's tangent gradient to the wrong columns of W_1",
    ),
    Bug(
        "seeded-recompute-ignores-input-start",
        "kernels/forward.py",
        "                seed_col = column[None, None, :] - input_start",
        "                seed_col = column[None, None, :]",
        "the per-layer recompute places the seeds at x's first columns, not at the differentiated ones",
    ),
    Bug(
        "seeded-encoding-wrong-coordinate",
        "kernels/forward.py",
        "(o_s[None, :] - 1) * stride_gjo + j * stride_gjk",
        "(o_s[None, :] - 1) * stride_gjo + 0 * stride_gjk",
        "the encoded features' seeded tangents all take the seeds' first coordinate",
    ),
    Bug(
        "seeded-per-layer-first-columns-gradient",
        "tritonjac/triton_engine/backward.py",
        "                            grad_W[l][:, first : first + k] += scale * g_seeded",
        "                            grad_W[l][:, first : first + k] -= scale * g_seeded",
        "the per-layer seeded backward subtracts the first layer's tangent gradient instead of adding it",
    ),
    Bug(
        "seeded-per-layer-encoding-second-derivative",
        "tritonjac/triton_engine/backward.py",
        "                        inputs.map.add_seed_input_grad(g_x, g_T, V, d2)",
        "                        pass",
        "the per-layer seeded backward's dLoss/dx forgets that the encoded seeds' tangents depend on x",
    ),
    Bug(
        "chunk-workers-gradients",
        "tritonjac/torch_engine/common.py",
        "    for worker in sorted(per_worker)[1:]:",
        "    for worker in sorted(per_worker)[1:1]:",
        "the PyTorch engine keeps worker 0's weight gradients and drops the other workers'",
    ),
    Bug(
        "chunk-workers-inference-mode",
        "tritonjac/torch_engine/common.py",
        "    inference = torch.is_inference_mode_enabled()",
        "    inference = False",
        "the PyTorch engine's chunk workers leave inference mode (writes to inference tensors fail)",
    ),
    Bug(
        "chunk-workers-denormals",
        "tritonjac/torch_engine/common.py",
        "torch.no_grad(), denormals_flushed():",
        "torch.no_grad():",
        "the PyTorch engine's chunk workers keep denormals (softplus(100) 9x slower on CPU)",
    ),
    Bug(
        "denormal-mode-not-restored",
        "tritonjac/torch_engine/common.py",
        "        if not was_flushing:\n            torch.set_flush_denormal(False)",
        "        pass",
        "the calling thread is left flushing denormals after a call",
    ),
    Bug(
        "flush-skipped-beside-openmp-threads",
        "tritonjac/torch_engine/common.py",
        'return getattr(_thread_flush, "on", False) and torch.get_num_threads() == 1',
        'return getattr(_thread_flush, "on", False)',
        "softplus's flush passes are skipped on a worker whose ops also run on OpenMP threads without FTZ",
    ),
    Bug(
        "tanh-into-slope",
        "tritonjac/activations.py",
        "    torch.mul(value, value, out=slope).neg_().add_(1.0)",
        "    torch.mul(value, value, out=slope).add_(1.0)",
        "tanh's allocation-free slope is 1 + t^2",
    ),
    Bug(
        "saved-pre-activations-in-scratch",
        "tritonjac/torch_engine/forward_mode.py",
        "z, U = _pre_activation(net, layer, A, a0, D, scratch if saved is None else None)",
        "z, U = _pre_activation(net, layer, A, a0, D, scratch)",
        "forward mode saves z and U for the backward in a buffer the next layer overwrites",
    ),
    Bug(
        "second-order-third-derivative",
        "tritonjac/torch_engine/second_order.py",
        "        curvature.addcmul_(r3, _row_products(GQ, _quadratic(U, order)))",
        "        pass",
        "the second-order backward drops the third-derivative term of dLoss/dz",
    ),
    Bug(
        "second-order-off-diagonal",
        "tritonjac/torch_engine/second_order.py",
        "                gD[b].addcmul_(r2, GQ[r] * U[a])",
        "                pass",
        "the second-order backward takes a Hessian row's quadratic term through U_a only",
    ),
    Bug(
        "second-order-encoding-third",
        "tritonjac/torch_engine/second_order.py",
        "        per_feature += gA0[1 + k, :, :C] * d3",
        "        pass",
        "dLoss/dx forgets that the encoding's Laplacian row depends on x",
    ),
    Bug(
        "second-order-forward-curvature",
        "tritonjac/torch_engine/second_order.py",
        "        out[1 + order.k :].addcmul_(s2, _quadratic(D[: order.k], order))",
        "        pass",
        "the second-order rows miss s''(z) times the tangents' products",
    ),
    Bug(
        "laplacian-kernel-curvature",
        "kernels/forward.py",
        "out + (d2s * squares)[:, None, :], out)",
        "out, out)",
        "the kernels' Laplacian row misses s''(z) times the tangents' squares",
    ),
    Bug(
        "laplacian-kernel-unit-tangent",
        "kernels/forward.py",
        "unit = (column[None, None, :] == input_start + o_s[None, :, None] - 1) & (\n"
        "                    o_s[None, :, None] <= NUM_TANGENTS\n"
        "                )",
        "unit = column[None, None, :] == input_start + o_s[None, :, None] - 1",
        "x's unit tangents reach the Laplacian slot (a latent column becomes part of a0's Laplacian)",
    ),
    Bug(
        "laplacian-kernel-slot-mask",
        "kernels/forward.py",
        "SECOND_ROWS: tl.constexpr = NUM_TANGENTS * (NUM_TANGENTS + 1) // 2 if HESSIAN else LAPLACIAN",
        "SECOND_ROWS: tl.constexpr = NUM_TANGENTS * (NUM_TANGENTS + 1) // 2 if HESSIAN else 0",
        "the per-layer kernel neither reads nor stores the Laplacian slot",
    ),
    Bug(
        "laplacian-kernel-encoding",
        "kernels/forward.py",
        "acc3 += tl.where(o_s[None, :, None] == row, c[:, None, :], 0.0)",
        "acc3 += tl.where(o_s[None, :, None] == row, 0.0 * c[:, None, :], 0.0)",
        "the kernels' encoded input leaves its second derivatives out of the Laplacian row",
    ),
    Bug(
        "laplacian-backward-third",
        "kernels/backward.py",
        "g_z = ds * g_h + d2s * curvature + d3s * g_s * squares",
        "g_z = ds * g_h + d2s * curvature",
        "the kernels' Laplacian backward drops the third-derivative term of dLoss/dz",
    ),
    Bug(
        "laplacian-backward-tangents",
        "kernels/backward.py",
        "G_Z + (2.0 * d2s * g_s)[:, None, :] * Z",
        "G_Z + (d2s * g_s)[:, None, :] * Z",
        "the kernels' Laplacian backward halves the squares' derivative in dLoss/dU",
    ),
    Bug(
        "hessian-kernel-curvature",
        "kernels/forward.py",
        "out = tl.where(o_slot[None, :, None] == slot, out + quadratic[:, None, :], out)",
        "out = out",
        "the kernels' Hessian rows miss s''(z) U_a U_b",
    ),
    Bug(
        "hessian-kernel-encoding-slot",
        "kernels/forward.py",
        "row = hessian_slot(j, j, NUM_TANGENTS) if HESSIAN else 1 + NUM_TANGENTS",
        "row = hessian_slot(0, j, NUM_TANGENTS) if HESSIAN else 1 + NUM_TANGENTS",
        "the encoding's second derivatives land in row (0, j) of the Hessian, not (j, j)",
    ),
    Bug(
        "hessian-backward-one-factor",
        "kernels/backward.py",
        "G_Z = tl.where(o_s[None, :, None] == 1 + b, G_Z + (curved * u_a)[:, None, :], G_Z)",
        "G_Z = G_Z",
        "the kernels' Hessian backward takes a row (a, b) back through U_a only",
    ),
    Bug(
        "laplacian-backward-encoding-weight",
        "tritonjac/triton_engine/backward.py",
        "partial[:, cols] += G[:, row].t() @ d2[:, cols]",
        "pass",
        "the encoded columns' weight gradient misses a0's second-order rows (the features' f'')",
    ),
    Bug(
        "laplacian-backward-encoding-input",
        "tritonjac/triton_engine/backward.py",
        "g_x[:, :k].index_add_(1, inputs.map.coordinate, g_curved * d3)",
        "pass",
        "the kernels' dLoss/dx forgets that the encoding's second-order rows depend on x",
    ),
]


def run_tests(all_failures: bool) -> tuple[bool, str]:
    """Run the kernel tests; (caught, the failing tests and the first failure's message)."""
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", *KERNEL_TESTS]
    if not all_failures:
        args.append("-x")
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    failed = [line for line in lines if re.match(r"(FAILED|ERROR) ", line)]
    message = [line for line in lines if line.startswith("E ")][:6]
    if proc.returncode not in (0, 1) and not failed:  # 2 is -x stopping the workers early
        failed.append(f"pytest exit code {proc.returncode}: {proc.stdout[-500:]}{proc.stderr[-500:]}")
    return proc.returncode != 0, "\n".join(failed + message)


def plant(bug: Bug, all_failures: bool) -> bool:
    path = ROOT / bug.path
    original = path.read_text()
    if original.count(bug.old) != 1:
        raise SystemExit(f"{bug.name}: the text to replace occurs {original.count(bug.old)} times in {bug.path}")
    start = time.time()
    try:
        path.write_text(original.replace(bug.old, bug.new))
        caught, failures = run_tests(all_failures)
    finally:
        path.write_text(original)
    verdict = "caught" if caught else "NOT CAUGHT"
    failed = [line for line in failures.splitlines() if line.startswith(("FAILED", "ERROR"))]
    count = f", {len(failed)} failing tests" if all_failures else ""
    print(f"{bug.name}: {verdict} in {time.time() - start:.0f} s{count} ({bug.what})")
    messages = [line for line in failures.splitlines() if line.startswith("E ")]
    for line in (failed[:6] + messages[:4]) if caught else failures.splitlines()[:6]:
        print(f"    {line[:200]}")
    return caught


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="fragments of bug names to plant (default: all)")
    parser.add_argument("--all", action="store_true", help="run every test instead of stopping at the first failure")
    options = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")
    bugs = [b for b in BUGS if not options.names or any(n in b.name for n in options.names)]
    missed = [b.name for b in bugs if not plant(b, options.all)]
    print(f"{len(bugs) - len(missed)} of {len(bugs)} planted bugs caught" + (f"; missed: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
