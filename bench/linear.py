"""Small-batch linear layers on the CPU: PyTorch's default (MKL) vs oneDNN on packed weights.

A decode step's matmuls have one row per running sequence, so on a CPU they are
small-batch and bound by streaming the weights. This times GPT-2's 48 linear layers
(12 blocks of c_attn, attn c_proj, c_fc, mlp c_proj) and its tied LM head, float32,
for a range of batch rows, three ways: `F.linear` on the plain weight (MKL sgemm), and
`torch.ops.mkldnn._linear_pointwise` on a weight reordered once by oneDNN, with and
without a batch-size hint. All three agree to ~1e-6 (checked here).

    python bench/linear.py --shape gpt2 --json bench/results/linear.json

`--panels`: instead, gptserve's panel kernel (gptserve/model/panel_linear.py) on the same 48
layers and LM head, weights in float32, bfloat16, float16 and int8, against oneDNN on
packed float32, at every row count given; and the read bandwidth that one row reaches.

    python bench/linear.py --panels --rows 1,2,4,8,16,64,256 --json bench/results/linear_panels.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = {"gpt2": (768, 12, 50257), "gpt2-medium": (1024, 24, 50257)}


def timed(fn, min_seconds: float = 0.5) -> float:
    """Best-of mean milliseconds per call, over at least `min_seconds`."""
    fn()
    best, spent = float("inf"), 0.0
    while spent < min_seconds:
        start = time.perf_counter()
        fn()
        dt = time.perf_counter() - start
        best, spent = min(best, dt), spent + dt
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,256,512,2048")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json")
    ap.add_argument("--panels", action="store_true", help="the panel kernel per weight format")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.panels:
        return panels(args)
    torch.manual_seed(0)
    c, n_layer, vocab = SHAPES[args.shape]
    shapes = [(3 * c, c), (c, c), (4 * c, c), (c, 4 * c)] * n_layer  # (out, in)
    weights = [torch.randn(o, i) * 0.02 for o, i in shapes]
    biases = [torch.randn(o) * 0.02 for o, _ in shapes]
    wte = torch.randn(vocab, c) * 0.02
    hinted = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    unhinted = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    head_packed = torch.ops.mkldnn._reorder_linear_weight(wte)

    def layers(x, xh, packed):
        for w, b, (_, i) in zip(packed or weights, biases, shapes):
            inp = x if i == c else xh
            if packed is None:
                F.linear(inp, w, b)
            else:
                torch.ops.mkldnn._linear_pointwise(inp, w, b, "none", [], "")

    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"{args.shape}, float32, {args.threads} threads: milliseconds per pass")
    print(f"{'rows':>5} | {'48 layers: MKL':>15} {'oneDNN':>8} {'hint 1':>8} | {'LM head: MKL':>13} {'oneDNN':>8}")
    for m in rows_list:
        x, xh = torch.randn(m, c), torch.randn(m, 4 * c)
        r = {"rows": m,
             "layers_mkl_ms": timed(lambda: layers(x, xh, None)),
             "layers_onednn_ms": timed(lambda: layers(x, xh, unhinted)),
             "layers_onednn_hint1_ms": timed(lambda: layers(x, xh, hinted)),
             "head_mkl_ms": timed(lambda: x @ wte.t()),
             "head_onednn_ms": timed(lambda: torch.ops.mkldnn._linear_pointwise(x, head_packed, None, "none", [], ""))}
        diff = (F.linear(x, weights[0], biases[0])
                - torch.ops.mkldnn._linear_pointwise(x, unhinted[0], biases[0], "none", [], "")).abs().max()
        r["max_abs_diff"] = float(diff)
        results.append(r)
        print(f"{m:>5} | {r['layers_mkl_ms']:>15.2f} {r['layers_onednn_ms']:>8.2f} {r['layers_onednn_hint1_ms']:>8.2f} | "
              f"{r['head_mkl_ms']:>13.2f} {r['head_onednn_ms']:>8.2f}   (max diff {diff:.1e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "threads": args.threads, "torch": torch.__version__,
                       "results": results}, f, indent=2)


def panels(args: argparse.Namespace) -> None:
    """Every layer and the LM head, one pass, per weight format: milliseconds per pass."""
    from gptserve.model.cpu_kernels import cpu_kernel_variant, panel_kernels
    from gptserve.model.panel_linear import PanelLinear

    if panel_kernels() is None:
        raise SystemExit("the CPU kernels are unavailable (compiler, or GPTSERVE_NO_KERNELS)")
    torch.manual_seed(0)
    c, n_layer, vocab = SHAPES[args.shape]
    shapes = [(3 * c, c), (c, c), (4 * c, c), (c, 4 * c)] * n_layer + [(vocab, c)]
    weights = [torch.randn(o, i) * 0.02 for o, i in shapes]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    formats = ("float32", "bfloat16", "float16", "int8")
    layers = {fmt: [PanelLinear(w, None, fmt) for w in weights] for fmt in formats}
    results = []
    print(f"{args.shape}, {args.threads} threads, {cpu_kernel_variant()} kernels: "
          f"ms per pass over {len(shapes)} layers (LM head included)")
    print(f"{'rows':>5} {'oneDNN f32':>11} " + " ".join(f"{f:>9}" for f in formats) + f" {'f32 vs oneDNN':>14}")
    for m in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(m, i) for _, i in shapes]
        r = {"rows": m, "onednn_float32_ms": timed(lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                                            for x, p in zip(xs, packed)])}
        for fmt, mods in layers.items():
            r[f"panels_{fmt}_ms"] = timed(lambda: [layer(x) for x, layer in zip(xs, mods)])
        results.append(r)
        print(f"{m:>5} {r['onednn_float32_ms']:>11.2f} " + " ".join(f"{r[f'panels_{f}_ms']:>9.2f}" for f in formats)
              + f" {r['onednn_float32_ms'] / r['panels_float32_ms']:>13.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "threads": args.threads, "torch": torch.__version__,
                       "kernels": cpu_kernel_variant(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
