"""Prompts, the HF generation backend and generate_trajectories on a tiny random Qwen3-MoE."""

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

from workers.generation import (
    Completion,
    SamplingParams,
    encode_prompt,
    make_backend,
    sample_seed,
)
from workers.generation.generate import generate_trajectories
from workers.generation.hf import _RowSampler
from workers.generation.prompts import MATH_INSTRUCTION, render_prompt
from workers.schemas import PROBLEMS_SCHEMA, TRAJECTORIES_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["<pad>", "</s>", "<unk>", "<s>", "<|user|>", "<|assistant|>"]
WORDS += [str(i) for i in range(30)] + "solve x + * = for in .. try : no yes ; answer".split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the demo task's words, built offline."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core box: one thread is ~10x faster than two fighting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-qwen3-moe")
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        bos_token_id=3,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    Qwen3MoeForCausalLM(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def backend(tiny_model):
    return make_backend("hf", str(tiny_model), batch_size=8)


PROMPTS = [(f"p{i}", f"solve {i + 2} * x + {i} = {3 * i + 1}") for i in range(4)]


# --- prompts -----------------------------------------------------------------------------------


def test_render_prompt_with_and_without_chat_template():
    chat = build_tokenizer(CHAT_TEMPLATE)
    text = render_prompt(chat, "solve 2 * x", instruction=" answer")
    assert text == "<s><|user|> solve 2 * x answer <|assistant|>"
    plain = build_tokenizer()
    assert render_prompt(plain, "solve 2 * x") == "solve 2 * x"
    assert render_prompt(plain, "Q", instruction="math") == "Q" + MATH_INSTRUCTION
    assert (
        render_prompt(chat, "Q", template="Q: {prompt}{instruction}", use_chat_template=False)
        == "Q: Q"
    )
    assert (
        render_prompt(plain, "Q", instruction="!", template="<{prompt}|{instruction}>") == "<Q|!>"
    )


def test_encode_prompt_adds_bos_once():
    tok = build_tokenizer(CHAT_TEMPLATE)
    bos = tok.bos_token_id
    rendered = render_prompt(tok, "solve 2")
    ids = encode_prompt(tok, rendered)
    assert ids.count(bos) == 1 and ids[0] == bos
    assert encode_prompt(tok, "solve 2") == tok("solve 2")["input_ids"]


# --- sampling ----------------------------------------------------------------------------------


def test_sampling_params_validate():
    assert SamplingParams() == SamplingParams(
        n=1, temperature=1.0, top_p=1.0, max_tokens=256, seed=0
    )
    for bad in ({"n": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, "p1", 0) == sample_seed(0, "p1", 0)
    seeds = {sample_seed(s, p, k) for s in (0, 1) for p in ("p1", "p2") for k in (0, 1)}
    assert len(seeds) == 8
    assert sample_seed(0, "p1", 0) == 6891319883334482134  # sha256: same on every run/machine


def test_row_sampler_follows_the_distribution_and_top_p():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 1e-9]]))
    draws = []
    sampler = _RowSampler([123], temperature=1.0, top_p=1.0)
    for _ in range(3000):
        out = sampler(None, logits.clone())
        assert torch.isinf(out).sum() == 3
        draws.append(int(out.argmax()))
    freq = [draws.count(i) / len(draws) for i in range(4)]
    assert abs(freq[0] - 0.6) < 0.04 and abs(freq[1] - 0.3) < 0.04 and abs(freq[2] - 0.1) < 0.03
    nucleus = _RowSampler([123], temperature=1.0, top_p=0.8)
    assert {int(nucleus(None, logits.clone()).argmax()) for _ in range(300)} == {0, 1}
    greedy = _RowSampler([123], temperature=0.0, top_p=1.0)
    assert int(greedy(None, logits.clone()).argmax()) == 0


def test_row_sampler_top_k_and_min_p_drop_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top2 = _RowSampler([7], temperature=1.0, top_p=1.0, top_k=2)
    draws = [int(top2(None, logits.clone()).argmax()) for _ in range(2000)]
    assert set(draws) == {0, 1}
    assert abs(draws.count(0) / len(draws) - 0.5 / 0.8) < 0.04  # renormalised over the top 2
    # min_p=0.25: tokens below 0.25 x 0.5 = 0.125 go (only the last one here).
    minp = _RowSampler([7], temperature=1.0, top_p=1.0, min_p=0.25)
    assert {int(minp(None, logits.clone()).argmax()) for _ in range(1000)} == {0, 1, 2}
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)


# --- the HF backend ----------------------------------------------------------------------------


def test_generate_shape_order_and_finish_reasons(backend):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=1)
    completions = backend.generate(PROMPTS, params)
    assert [(c.problem_id, c.sample_idx) for c in completions] == [
        (pid, k) for pid, _ in PROMPTS for k in range(3)
    ]
    eos = backend.tokenizer.eos_token_id
    reasons = set()
    for c in completions:
        assert c.prompt_ids == encode_prompt(backend.tokenizer, dict(PROMPTS)[c.problem_id])
        if c.finish_reason == "stop":
            assert c.completion_ids[-1] == eos and eos not in c.completion_ids[:-1]
        else:
            assert c.finish_reason == "length"
            assert len(c.completion_ids) == 12 and eos not in c.completion_ids
        assert c.text == backend.tokenizer.decode(c.completion_ids, skip_special_tokens=True)
        reasons.add(c.finish_reason)
    assert reasons == {"stop", "length"}  # 12 samples over a 46-word vocabulary: both happen


def test_generate_is_deterministic_and_independent_of_batching(backend):
    params = SamplingParams(n=2, temperature=1.0, max_tokens=10, seed=5)
    first = backend.generate(PROMPTS, params)
    assert backend.generate(PROMPTS, params) == first
    backend.batch_size = 1
    try:
        assert backend.generate(PROMPTS, params) == first
        # A sample does not depend on the other prompts in the call either.
        alone = backend.generate([PROMPTS[2]], params)
    finally:
        backend.batch_size = 8
    assert alone == [c for c in first if c.problem_id == PROMPTS[2][0]]
    other_seed = backend.generate(PROMPTS, SamplingParams(n=2, max_tokens=10, seed=6))
    assert [c.completion_ids for c in other_seed] != [c.completion_ids for c in first]


def test_greedy_and_tiny_top_p_agree(backend):
    greedy = backend.generate(PROMPTS[:2], SamplingParams(n=2, temperature=0.0, max_tokens=8))
    assert greedy[0].completion_ids == greedy[1].completion_ids  # samples of greedy are equal
    nucleus = backend.generate(PROMPTS[:2], SamplingParams(n=2, top_p=1e-6, max_tokens=8, seed=9))
    assert [c.completion_ids for c in nucleus] == [c.completion_ids for c in greedy]


def test_make_backend_errors():
    with pytest.raises(ValueError, match="valid backends: hf, vllm"):
        make_backend("tgi", "x")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install \.\[vllm\]"):
            make_backend("vllm", "x")


def test_worker_modules_do_not_import_vllm_or_optional_libraries():
    code = (
        "import sys\n"
        "import workers.generation, workers.generation.generate, workers.generation.datasets, workers.generation.verify, workers.generation.prompts\n"
        "print(sorted(m for m in ('vllm', 'datasets', 'math_verify', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- generate_trajectories ---------------------------------------------------------------------


def _problems(rows: list[tuple[str, str, str]], dataset: str = "demo") -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"problem_id": p, "dataset": dataset, "prompt": q, "gold_answer": g, "metadata": "{}"}
            for p, q, g in rows
        ],
        schema=PROBLEMS_SCHEMA,
    )


def test_generate_trajectories_on_the_tiny_model(backend):
    problems = _problems([(pid, text, "3") for pid, text in PROMPTS[:3]])
    params = SamplingParams(n=2, max_tokens=8, seed=4)
    table = generate_trajectories(
        backend, problems, params, model_name="tiny", verifier="exact", tokenizer=backend.tokenizer
    )
    assert table.schema == TRAJECTORIES_SCHEMA
    assert table.num_rows == 6
    completions = backend.generate(PROMPTS[:3], params)  # the same samples: deterministic
    for row, c in zip(table.to_pylist(), completions, strict=True):
        assert row["input_ids"] == c.prompt_ids + c.completion_ids
        assert row["prompt_len"] == len(c.prompt_ids)
        assert (row["problem_id"], row["sample_idx"]) == (c.problem_id, c.sample_idx)
        assert row["completion_text"] == c.text and row["finish_reason"] == c.finish_reason
        assert row["model"] == "tiny" and row["dataset"] == "demo" and row["seed"] == 4
        assert row["gold_answer"] == "3"
        assert row["verify_reason"] in {"match", "mismatch", "no_answer"}


class CannedBackend:
    """A GenerationBackend with fixed completions: checks the verification plumbing only."""

    tokenizer = None

    def __init__(self, texts: dict[str, list[str]]):
        self.texts = texts

    def generate(self, prompts, params):
        return [
            Completion(pid, k, [1, 2], [3, 4, 5], self.texts[pid][k], "stop")
            for pid, _ in prompts
            for k in range(params.n)
        ]


def test_generate_trajectories_keeps_all_samples_with_verdicts():
    problems = _problems([("q1", "What is 1/2?", "0.5"), ("q2", "What is 2+2?", "4")], "math500")
    backend = CannedBackend(
        {"q1": ["\\boxed{\\frac{1}{2}}", "\\boxed{1/3}"], "q2": ["4", "\\boxed{4}"]}
    )
    table = generate_trajectories(
        backend,
        problems,
        SamplingParams(n=2, seed=11),
        model_name="m",
        verifier="math",
        tokenizer=build_tokenizer(),
        instruction="math",
    )
    rows = table.to_pylist()
    assert [r["verified"] for r in rows] == [True, False, False, True]
    assert [r["verify_reason"] for r in rows] == ["match", "mismatch", "no_answer", "match"]
    assert [r["extracted_answer"] for r in rows] == ["\\frac{1}{2}", "1/3", None, "4"]
    assert rows[0]["input_ids"] == [1, 2, 3, 4, 5] and rows[0]["prompt_len"] == 2
    assert {r["dataset"] for r in rows} == {"math500"} and {r["seed"] for r in rows} == {11}


# --- rows that cannot be prompted, completions that cannot be verified quickly ---------------


NEAR_FULL = " ".join(["1"] * 250)  # 250 of the tiny model's 256 positions: 6 tokens of room
UNPROMPTABLE = {
    "empty": ("", "empty_prompt"),
    "blank": (" \n\t", "empty_prompt"),
    "huge": ("1 " * 500_000, "prompt_too_long"),  # 1 MB: 500k tokens
    "just over": (" ".join(["1"] * 256), "prompt_too_long"),  # no room for one token
}


def test_rows_that_cannot_be_prompted_are_unverified_samples_and_the_rest_generate(backend):
    rows = [
        ("p0", PROMPTS[0][1], "3"),
        *((pid, text, "3") for pid, (text, _) in UNPROMPTABLE.items()),
        ("near", NEAR_FULL, "3"),
    ]
    params = SamplingParams(n=2, max_tokens=12, seed=3)
    table = generate_trajectories(
        backend,
        _problems(rows),
        params,
        model_name="tiny",
        verifier="exact",
        tokenizer=backend.tokenizer,
        template="{prompt}{instruction}",
        use_chat_template=False,
        instruction="",
    )
    out = table.to_pylist()
    assert [(r["problem_id"], r["sample_idx"]) for r in out] == [
        (pid, k) for pid, _, _ in rows for k in range(2)
    ]
    by_id = {pid: [r for r in out if r["problem_id"] == pid] for pid, _, _ in rows}
    for pid, (_, reason) in UNPROMPTABLE.items():
        for r in by_id[pid]:
            assert not r["verified"] and r["verify_reason"] == r["finish_reason"] == reason
            assert r["input_ids"] == [] and r["prompt_len"] == 0 and r["completion_text"] == ""
    # The good rows are what they would be alone; the near-full one is clipped to its room.
    alone = backend.generate([PROMPTS[0]], params)
    assert [r["input_ids"] for r in by_id["p0"]] == [c.prompt_ids + c.completion_ids for c in alone]
    clipped = backend.generate([("near", NEAR_FULL)], replace(params, max_tokens=6))
    assert [r["input_ids"] for r in by_id["near"]] == [
        c.prompt_ids + c.completion_ids for c in clipped
    ]
    assert all(len(r["input_ids"]) <= 256 and r["prompt_len"] == 250 for r in by_id["near"])


def test_a_backend_refuses_a_prompt_that_leaves_no_room(backend):
    with pytest.raises(ValueError, match="no room to generate within the model's 256"):
        backend.generate([("x", UNPROMPTABLE["just over"][0])], SamplingParams(max_tokens=4))


def test_verification_in_the_generator_keeps_its_deadline_on_looping_completions():
    looping = "\\boxed{" * 30_000 + "\\boxed{" + "{" * 50_000 + "x" * 50_000  # ~360k chars
    solved = "\\fbox{" * 28_000 + "\\boxed{4}"
    problems = _problems([("q1", "What is 2+2?", "4")], "math500")
    backend = CannedBackend({"q1": [looping, solved, looping]})
    start = time.monotonic()
    table = generate_trajectories(
        backend,
        problems,
        SamplingParams(n=3, seed=1),
        model_name="m",
        verifier="math",
        tokenizer=build_tokenizer(),
        verify_timeout_s=1.0,
    )
    assert time.monotonic() - start < 3 * 1.0 + 15  # three deadlines, the checker's start
    reasons = table.column("verify_reason").to_pylist()
    assert reasons[0] in ("timeout", "no_answer") and reasons[2] in ("timeout", "no_answer")
    assert reasons[1] in ("timeout", "match")
    assert table.column("verified").to_pylist()[1] == (reasons[1] == "match")


def test_bundled_tiny_model_solves_demo_problems():
    from workers.generation import demo_task

    path = demo_task.bundled_model_path()
    assert (path / "model.safetensors").is_file()  # shipped in the package, never skipped
    backend = make_backend("hf", str(path), batch_size=16)
    problems = demo_task.make_problems(4, 0)
    table = generate_trajectories(
        backend,
        problems,
        SamplingParams(n=2, max_tokens=demo_task.max_completion_tokens(), seed=0),
        model_name="tiny-moe",
        verifier="exact",
        tokenizer=backend.tokenizer,
        template="{prompt}",
        use_chat_template=False,
    )
    assert table.num_rows == 8
    assert sum(table.column("verified").to_pylist()) >= 4  # a trained model mostly solves it


def test_hf_backend_records_the_route_the_model_takes_at_each_completion_token(tiny_model):
    """With route_layers, each completion token i carries, per layer, the experts the router
    picked in the forward pass at position prompt_len - 1 + i, whatever the batch and its left
    padding: the same sets as one unbatched forward pass over the finished sequence gives."""
    from workers.adapters import adapter_for

    recorder = make_backend("hf", str(tiny_model), batch_size=3, route_layers=[0, 1])
    assert recorder.routes_field.type.value_type.list_size == 2  # layers
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=5)
    completions = recorder.generate(PROMPTS, params)
    model, adapter = recorder.model, adapter_for(recorder.model)
    chosen = {}
    hooks = [
        adapter.router(layer).register_forward_hook(
            lambda m, a, out, layer=layer: chosen.__setitem__(
                layer, adapter.parse_router_output(out)[1]
            )
        )
        for layer in (0, 1)
    ]
    try:
        for c in completions:
            routes = c.routes
            assert routes.shape == (len(c.completion_ids), 2, 2) and routes.dtype == "uint8"
            assert routes.max() < 8
            ids = c.prompt_ids + c.completion_ids
            with torch.inference_mode():
                model(torch.tensor([ids[:-1]]))
            p = len(c.prompt_ids)
            for slot, layer in enumerate((0, 1)):
                full = chosen[layer].reshape(len(ids) - 1, 2)[p - 1 :].tolist()
                recorded = routes[:, slot].tolist()
                assert [set(r) for r in full] == [set(r) for r in recorded]
    finally:
        for hook in hooks:
            hook.remove()
    # recording changes nothing that is sampled
    plain = make_backend("hf", str(tiny_model), batch_size=3).generate(PROMPTS, params)
    assert [c.completion_ids for c in plain] == [c.completion_ids for c in completions]
    assert all(c.routes is None for c in plain)
