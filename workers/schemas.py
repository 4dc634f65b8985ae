"""Arrow schemas of the files that stages exchange (docs/design.md, "Data contracts").

Every stage writes exactly these columns, in this order; readers may rely on them.
"""

import pyarrow as pa

# One row per problem. `metadata` is a JSON object (source ids, options, difficulty, ...).
PROBLEMS_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("dataset", pa.string()),
        ("prompt", pa.string()),
        ("gold_answer", pa.string()),
        ("metadata", pa.string()),
    ]
)

# One row per sampled completion. `input_ids` is prompt + completion; the completion starts at
# `prompt_len`. `extracted_answer` is null when nothing could be extracted. `sample_logprobs`
# holds log p(token | prefix) of each completion token as the generator computed it (vLLM),
# null where the backend does not report it (HF).
TRAJECTORIES_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("prompt_len", pa.int32()),
        ("model", pa.string()),
        ("dataset", pa.string()),
        ("completion_text", pa.string()),
        ("extracted_answer", pa.string()),
        ("gold_answer", pa.string()),
        ("verified", pa.bool_()),
        ("verify_reason", pa.string()),
        ("finish_reason", pa.string()),
        ("seed", pa.int64()),
        ("sample_logprobs", pa.list_(pa.float32())),
    ]
)

# One row per scored completion token (docs/method.md): the standard route S and J alternatives at
# one MoE layer, each with u(R) = p(target | prefix, R) and s(R) = sum of router log-softmax.
SCORES_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("position", pa.int32()),
        ("target_id", pa.int32()),
        ("std_route", pa.list_(pa.int32())),
        ("std_prob", pa.float32()),
        ("alt_routes", pa.list_(pa.list_(pa.int32()))),
        ("alt_probs", pa.list_(pa.float32())),
        ("std_route_logprob", pa.float32()),
        ("alt_route_logprobs", pa.list_(pa.float32())),
        ("model", pa.string()),
        ("layer", pa.int32()),
        ("dataset", pa.string()),
    ]
)
# Only in files scored under a position budget (scoring.positions other than all), appended
# after SCORES_SCHEMA's columns: the trajectory's number of completion tokens, which the
# analysis weights its scored rows by (analysis.metrics). Full runs keep SCORES_SCHEMA as is.
COMPLETION_TOKENS = pa.field("completion_tokens", pa.int32())

# One row per completion token at one MoE layer (docs/method.md, "Counterfactual Expert
# Impact"): the standard route S, u(S), the entropy (nats) of the standard next-token
# distribution; cei_out[i] = log u(S) - log u(S without std_route[i]); cei_in[j] =
# log u(S with its weakest expert replaced by in_experts[j]) - log u(S), for the pool's
# experts not in S (descending router logit).
CEI_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("position", pa.int32()),
        ("target_id", pa.int32()),
        ("std_route", pa.list_(pa.int32())),
        ("std_prob", pa.float32()),
        ("std_entropy", pa.float32()),
        ("cei_out", pa.list_(pa.float32())),
        ("in_experts", pa.list_(pa.int32())),
        ("cei_in", pa.list_(pa.float32())),
        ("model", pa.string()),
        ("layer", pa.int32()),
        ("dataset", pa.string()),
    ]
)
