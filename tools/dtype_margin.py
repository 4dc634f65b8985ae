"""How far bfloat16 scoring moves u(R) from float32, per tiny family: what a bf16 win margin
must exceed (analysis.metrics.WIN_MARGINS).

    python -m tools.dtype_margin                      # six tiny variants, early and final layer
    python -m tools.dtype_margin --trajectories 8 --tokens 64 --layers early,middle,final

Run from the repository root (it builds the tiny models of tests/moe_factories.py).

Contract: for each variant of tests/moe_factories.py (the four families, six models) it scores
the same random trajectories with the fast scorer in bfloat16 (the float32 model cast to bf16,
ScoreConfig(dtype="bfloat16"), J alternatives from a pool of every expert), then computes u of
exactly those (position, route) pairs in float32 by brute force (workers.scoring.brute, the definition
of u; the routes of a bf16 run are its own, so the float32 scorer, which draws from float32
router logits, would not give the same pairs). Per variant and layer it prints the max and the
99.9th percentile of |u_bf16(R) - u_fp32(R)| over every pair (S included), and the max of
|gain_bf16 - gain_fp32| over the tokens, gain = max_j u(R_j) - u(S), the quantity a win compares
with the margin; then the margin the analysis takes for bf16 scores by default. A win decided by
rounding needs the gain's deviation to exceed the margin, so the margin is set above it.
CPU only, a few seconds per variant; nothing is written.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass

import torch

J = 32


@dataclass(frozen=True)
class Deviation:
    """bf16 against float32 on the (t, R) pairs of one model and layer: u per pair, and per
    token the gain max_j u(R_j) - u(S) in both (float64 tensors)."""

    u_bf16: torch.Tensor
    u_fp32: torch.Tensor
    gain_bf16: torch.Tensor
    gain_fp32: torch.Tensor

    @property
    def du(self) -> torch.Tensor:
        return (self.u_bf16 - self.u_fp32).abs()

    @property
    def dgain(self) -> torch.Tensor:
        return (self.gain_bf16 - self.gain_fp32).abs()

    def false_wins(self, margin: float, fp32_margin: float) -> float:
        """Share of tokens that win in bf16 (gain > margin) but not in float32."""
        return ((self.gain_bf16 > margin) & (self.gain_fp32 <= fp32_margin)).double().mean().item()


def measure(model, layer_spec: str, table, alternatives: int = J) -> Deviation:
    """Score `table` (TRAJECTORIES_SCHEMA) at `layer_spec` in bf16 and compare every (t, R)
    pair's u with float32 brute force on `model` (float32, eval mode; left unchanged)."""
    from workers.scoring.brute import brute_logprobs
    from workers.scoring.scorer import ScoreConfig, Scorer

    low = copy.deepcopy(model).to(torch.bfloat16)
    config = ScoreConfig(alternatives=alternatives, dtype="bfloat16")
    scorer = Scorer("tiny", config, model=low)
    layer = scorer.resolve_layer(layer_spec)
    scores = scorer.score_table(table, layer).to_pylist()
    u_low, u_ref = [], []
    for ids, rows in _by_trajectory(table, scores):
        pos = torch.tensor([r["position"] for r in rows for _ in range(1 + len(r["alt_routes"]))])
        rts = torch.tensor([route for r in rows for route in [r["std_route"], *r["alt_routes"]]])
        u_low.append(torch.tensor([p for r in rows for p in [r["std_prob"], *r["alt_probs"]]]))
        u_ref.append(brute_logprobs(model, ids, layer, pos, rts, batch_size=64).exp())
    low_u, ref_u = torch.cat(u_low).double(), torch.cat(u_ref).double()
    a, b = low_u.view(-1, 1 + alternatives), ref_u.view(-1, 1 + alternatives)
    gain = lambda u: u[:, 1:].max(1).values - u[:, 0]  # noqa: E731
    return Deviation(low_u, ref_u, gain(a), gain(b))


def _by_trajectory(table, scores: list[dict]):
    """(input ids, its score rows) per trajectory of `table`."""
    for row in table.to_pylist():
        key = (row["problem_id"], row["sample_idx"])
        yield (
            row["input_ids"],
            [s for s in scores if (s["problem_id"], s["sample_idx"]) == key],
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.dtype_margin", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--trajectories", type=int, default=4, help="random trajectories per variant")
    p.add_argument("--tokens", type=int, default=32, help="scored tokens per trajectory")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--alternatives", type=int, default=J)
    p.add_argument("--layers", default="early,final", help="comma-separated early|middle|final")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.trajectories, args.tokens, args.prompt_tokens, args.alternatives) < 1:
        print(
            "error: --trajectories, --tokens, --prompt-tokens, --alternatives must be >= 1",
            file=sys.stderr,
        )
        return 2
    if args.prompt_tokens + args.tokens > 256:  # the tiny models' max_position_embeddings
        print("error: --prompt-tokens + --tokens must be <= 256", file=sys.stderr)
        return 2
    from analysis.metrics import WIN_MARGINS
    from tests.moe_factories import VARIANTS, make_model, make_trajectories, single_thread

    n = args.trajectories
    length, prompt = (args.prompt_tokens + args.tokens,) * n, (args.prompt_tokens,) * n
    table = make_trajectories(lengths=length, prompt_lens=prompt, seed=args.seed)
    margin, fp32_margin = WIN_MARGINS["bfloat16"], WIN_MARGINS["float32"]
    print(
        f"{n} trajectories x {args.tokens} scored tokens, J={args.alternatives}; bf16 fast scorer"
        f" vs float32 brute force; false wins: gain > {margin:g} in bf16, <= {fp32_margin:g} in float32"
    )
    head = (
        "variant",
        "layer",
        "pairs",
        "max|du|",
        "p99.9|du|",
        "p99|dgain|",
        "max|dgain|",
        "false wins",
    )
    print("{:<20} {:<6} {:>6} {:>9} {:>10} {:>10} {:>10} {:>10}".format(*head))
    found = []
    with single_thread():
        for name in VARIANTS:
            model = make_model(name, seed=args.seed)
            for spec in args.layers.split(","):
                d = measure(model, spec.strip(), table, args.alternatives)
                found.append(d)
                print(
                    f"{name:<20} {spec:<6} {d.du.numel():>6} {d.du.max():>9.1e}"
                    f" {d.du.quantile(0.999):>10.1e} {d.dgain.quantile(0.99):>10.1e}"
                    f" {d.dgain.max():>10.1e} {d.false_wins(margin, fp32_margin):>10.2%}",
                    flush=True,
                )
    dgain = torch.cat([d.dgain for d in found])
    false = sum(d.false_wins(margin, fp32_margin) * d.dgain.numel() for d in found) / dgain.numel()
    p99 = dgain.quantile(0.99).item()
    print(
        f"all: p99 |dgain| {p99:.1e}, max {dgain.max():.1e}; bf16 default win margin {margin:g}"
        f" ({'above' if margin > p99 else 'NOT above'} the p99); false wins {false:.2%} of tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
