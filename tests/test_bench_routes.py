"""The aggregation bench's synthetic routes (analysis.bench.make_routes) have the structure of
the scorer's draws: alternatives overlap S, and a draw of S is marked as one."""

import numpy as np

from analysis.bench import make_scores


def test_synthetic_alternatives_overlap_s_as_the_scorers_draws_do():
    t = make_scores(2_000, alternatives=32, top_k=8, experts=128, seed=5)
    std = np.array(t["std_route"].to_pylist())
    alt = np.array(t["alt_routes"].to_pylist())
    assert all(len(set(r)) == 8 for r in std) and all(len(set(r)) == 8 for r in alt.reshape(-1, 8))
    overlap = (alt[:, :, :, None] == std[:, None, None, :]).any(3).sum(2)
    # uniform draws of 8 of 128 would share 0.5 experts with S on average
    assert 2.5 < overlap.mean() < 6
    # a draw whose set is S's carries S's u and s exactly (a tie), and only such a draw
    u_s, s_s = t["std_prob"].to_numpy(), t["std_route_logprob"].to_numpy()
    u = np.array(t["alt_probs"].to_pylist())
    s = np.array(t["alt_route_logprobs"].to_pylist())
    same = overlap == 8
    assert (u[same] == np.broadcast_to(u_s[:, None], u.shape)[same]).all()
    assert (s[same] == np.broadcast_to(s_s[:, None], s.shape)[same]).all()
    assert not (s[~same] == np.broadcast_to(s_s[:, None], s.shape)[~same]).any()
