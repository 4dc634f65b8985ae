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


def completion_tokens(table: pa.Table) -> int:
    """Completion tokens of a trajectory table: the sum of len(input_ids) - prompt_len, from
    the list offsets only (generation records it in each file's sidecar as `tokens`)."""
    import pyarrow.compute as pc

    total = pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0
    return int(total - (pc.sum(table["prompt_len"]).as_py() or 0))


# Only in trajectory files generated with generation.record_routes, appended after
# TRAJECTORIES_SCHEMA's columns: the experts the generator's own router picked for each
# completion token (index i: the forward pass at position prompt_len - 1 + i, whose next token
# is completion token i, i.e. the scorer's position of that target), at each of the model's MoE
# layers (the field's metadata `layers`: their decoder indices, in order), k expert ids each in
# the generator's order. An empty list for a sample without tokens; null where not recorded.
GEN_ROUTES = "gen_routes"


def gen_routes_field(n_experts: int, top_k: int, layers: list[int]) -> pa.Field:
    """The `gen_routes` column of a model: per completion token, per MoE layer, k expert ids
    of expert_id_type (a fixed-size list of fixed-size lists, as the score files keep routes)."""
    route = pa.list_(expert_id_type(n_experts), top_k)
    return pa.field(
        GEN_ROUTES,
        pa.list_(pa.list_(route, len(layers))),
        metadata={"layers": ",".join(str(i) for i in layers)},
    )


def gen_route_layers(field: pa.Field) -> list[int]:
    """The decoder indices of a `gen_routes` field's layers (its metadata)."""
    return [int(i) for i in (field.metadata or {}).get(b"layers", b"").decode().split(",") if i]


# One row per trajectory of a scoring-input shard (trajectories/<model>/<dataset>/shards/<k>.arrow):
# a reference to row `row` (0-based) of the generated file `file` (its path below the cell's
# folder trajectories/<model>/<dataset>/, e.g. "generated/00003.arrow") whose sidecar's sha256
# is `sha256`. The scorer reads the rows themselves (workers.trajectories); shards written
# before hold TRAJECTORIES_SCHEMA rows instead and are read as they are.
SHARD_REFS_SCHEMA = pa.schema(
    [
        ("file", pa.dictionary(pa.int32(), pa.string())),
        ("sha256", pa.dictionary(pa.int32(), pa.string())),
        ("row", pa.int64()),
    ]
)

# One row per scored completion token (docs/method.md): the standard route S and J alternatives at
# one MoE layer, each with u(R) = p(target | prefix, R) and s(R) = sum of router log-softmax.
# The scorer writes `scores_schema(...)`: these columns with the routes compacted; files of this
# exact layout (int32 ids in variable lists, as written before) read the same (`as_list_routes`).
# Then S's argmax next token and, per alternative, KL(p_S || p_R) over the next-token
# distribution and whether R's argmax differs from S's; and the trajectory's `verified` flag
# (null when the trajectories carry none). Files written before these four columns lack them.
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
        ("std_argmax", pa.int32()),
        ("alt_kl", pa.list_(pa.float32())),
        ("alt_argmax_changed", pa.list_(pa.bool_())),
        ("verified", pa.bool_()),
    ]
)
# Only in files scored under a position budget (scoring.positions other than all), appended
# after SCORES_SCHEMA's columns: the trajectory's number of completion tokens, which the
# analysis weights its scored rows by (analysis.metrics). Full runs keep SCORES_SCHEMA as is.
COMPLETION_TOKENS = pa.field("completion_tokens", pa.int32())
# Only in files scored with scoring.moe_geometry, appended last: per alternative R, the cosine
# of its layer-L MoE block output (routed experts plus any shared ones) with S's, and
# ||out(R)|| / ||out(S)|| (both 1 for a draw of S itself; float32 from float32 outputs).
MOE_GEOMETRY = (
    pa.field("alt_moe_cos", pa.list_(pa.float32())),
    pa.field("alt_moe_norm_ratio", pa.list_(pa.float32())),
)


ROUTE_COLUMNS = ("std_route", "alt_routes")


def expert_id_type(n_experts: int) -> pa.DataType:
    """The smallest unsigned integer type that holds expert ids 0 .. n_experts - 1."""
    for kind, bits in ((pa.uint8(), 8), (pa.uint16(), 16), (pa.uint32(), 32)):
        if n_experts <= 1 << bits:
            return kind
    raise ValueError(f"{n_experts} experts do not fit an expert id of 32 bits")


CONSTANT_COLUMNS = ("model", "dataset")  # one value per score file (the job)


def scores_schema(n_experts: int, top_k: int, alternatives: int) -> pa.Schema:
    """SCORES_SCHEMA as a model's scorer writes it: each route a fixed-size list of k expert ids
    of expert_id_type (1 byte each for up to 256 experts, not 4, and no offsets), the J
    alternatives a fixed-size list of them; model and dataset dictionary-encoded (one string
    per file; Polars reads them as Categorical). Every other column keeps its type."""
    ids = expert_id_type(n_experts)
    route = pa.list_(ids, top_k)
    names = pa.dictionary(pa.int32(), pa.string())
    schema = SCORES_SCHEMA
    for name, kind in (
        ("std_route", route),
        ("alt_routes", pa.list_(route, alternatives)),
        *((c, names) for c in CONSTANT_COLUMNS),
    ):
        schema = schema.set(schema.get_field_index(name), pa.field(name, kind))
    return schema


def as_list_routes(table: pa.Table) -> pa.Table:
    """`table` with its route and constant columns in SCORES_SCHEMA's types (int32 variable
    lists, plain strings; a no-op for a table in that layout): score tables of either layout,
    or of models with other expert counts or k, concatenate once they have been through this."""
    for name in (*ROUTE_COLUMNS, *CONSTANT_COLUMNS):
        if name in table.column_names:
            i = table.schema.get_field_index(name)
            table = table.set_column(
                i, SCORES_SCHEMA.field(name), table[name].cast(SCORES_SCHEMA.field(name).type)
            )
    return table


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
