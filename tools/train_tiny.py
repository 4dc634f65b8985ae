"""Train the bundled tiny Qwen3-MoE on the demo task (workers/generation/demo_task.py) from scratch, on CPU.

    python -m tools.train_tiny --out workers/assets/tiny-moe --seed 0 --steps 475 --threads 1

Writes a standard Hugging Face model directory (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json) that
`AutoModelForCausalLM.from_pretrained(dir, use_safetensors=True)` and
`AutoTokenizer.from_pretrained(dir)` load offline, and vLLM can serve, plus a README.md with
the training facts and the accuracy and fragile share measured by tools.demo_eval.

The architecture is the real transformers Qwen3-MoE (16 experts, top-4, norm_topk_prob=True),
only small: 4 decoder layers so that the early, middle and final layers are distinct.

Threads: the result is deterministic for a given (seed, steps, threads) on one machine, and
the thread count changes the floating-point reduction order, hence the weights. The bundled
model was trained with one thread: ~1.1 s per step, ~9 minutes for 475 steps, and a single
thread keeps that pace on a CPU shared with other work (two threads, each waiting on the
other, were up to ~5x slower per step there). On an idle 2-core machine `--threads 2` runs
~0.8 s per step (~6.5 minutes) and trains an equally good model, but not bit-identical weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from workers.atomic import atomic_write
from workers.generation import demo_task

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos, unk
WORDS = ["solve", "for", "in", "..", "x", "*", "+", "-", "=", ";", "try", ":", "answer"]


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny model. ~1.9M parameters, ~7 MB of float32 safetensors."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, as in Qwen3-30B-A3B
    head_dim: int = 32
    num_experts: int = 16
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 64
    max_position_embeddings: int = 256
    router_aux_loss_coef: float = 0.01  # higher than Qwen's 0.001: few steps to spread the load


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults reproduce the bundled model."""

    out: str = "workers/assets/tiny-moe"
    seed: int = 0
    steps: int = 475
    rows: int = 8  # packed rows per step ...
    width: int = 512  # ... of this many tokens: ~3,800 real tokens, ~60 examples per step
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    difficulty: int = 1
    threads: int = 1  # see the note on threads in the module docstring
    eval_every: int = 0  # > 0: also measure on a few eval problems every this many steps
    eval_problems: int = 1000  # measured after training (and 100), written into README.md
    eval_seed: int = 1234


def build_tokenizer():
    """A word-level tokenizer: every space-separated word or number of the task is one token.

    No BOS is added (as with Qwen3), so `tokenizer(text)` and the ids a server sends agree.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    numbers = [str(i) for i in range(-demo_task.MAX_NUMBER, demo_task.MAX_NUMBER + 1)]
    words = SPECIAL_TOKENS + WORDS + numbers
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",  # decoder-only: batched generation pads on the left
        model_max_length=TinyModelConfig.max_position_embeddings,
    )


def build_model_config(tokenizer, shape: TinyModelConfig):
    from transformers import Qwen3MoeConfig

    vocab_size = 64 * math.ceil(len(tokenizer) / 64)  # round up, as real checkpoints do
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        intermediate_size=4 * shape.hidden_size,  # dense MLP size; unused, every layer is MoE
        norm_topk_prob=True,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["Qwen3MoeForCausalLM"],
        **asdict(shape),
    )


def encode_example(tokenizer, problem: demo_task.DemoProblem, rng: random.Random):
    """(ids, labels): prompt + solution + EOS; labels are -100 on the prompt.

    Loss on completion tokens only: prompts are uniformly random equations, so predicting
    them teaches nothing the model is ever asked to do and only adds gradient noise.
    """
    prompt = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
    solution = tokenizer(demo_task.render_solution(problem, rng), add_special_tokens=False)
    completion = solution["input_ids"] + [tokenizer.eos_token_id]
    return prompt + completion, [-100] * len(prompt) + completion


class PackedBatches:
    """Endless batches of fresh examples packed into rows of `width` tokens.

    Packing wastes little compute on padding (examples at difficulty 1 run from 27 to 91 tokens). Each
    example restarts its position ids at 0, which transformers turns into a block-diagonal
    causal mask, so no example attends to another: training sees exactly what inference sees.
    An example that does not fit a row's remaining room opens the next row. The tail of a row
    is padding, given positions of its own and no loss.
    """

    def __init__(self, tokenizer, pool, rng: random.Random, rows: int, width: int):
        self.tokenizer, self.pool, self.rng = tokenizer, pool, rng
        self.rows, self.width = rows, width
        self.pending = None

    def next_example(self):
        example, self.pending = self.pending, None
        return example or encode_example(self.tokenizer, self.rng.choice(self.pool), self.rng)

    def __next__(self):
        pad = self.tokenizer.pad_token_id
        ids, labels, positions = [], [], []
        for _ in range(self.rows):
            row_ids, row_labels, row_pos = [], [], []
            while True:
                ex_ids, ex_labels = self.next_example()
                if len(ex_ids) > self.width:
                    raise ValueError(
                        f"an example of {len(ex_ids)} tokens exceeds width {self.width}"
                    )
                if len(row_ids) + len(ex_ids) > self.width:
                    self.pending = (ex_ids, ex_labels)
                    break
                row_ids += ex_ids
                row_labels += ex_labels
                row_pos += range(len(ex_ids))
            room = self.width - len(row_ids)
            ids.append(row_ids + [pad] * room)
            labels.append(row_labels + [-100] * room)
            positions.append(row_pos + list(range(room)))
        return torch.tensor(ids), torch.tensor(labels), torch.tensor(positions)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig, shape: TinyModelConfig = TinyModelConfig()) -> dict:
    """Train from scratch and save the model directory; returns the training facts."""
    from transformers import Qwen3MoeForCausalLM

    # 1. Seed everything and fix the thread count (results depend on both).
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"demo-train:{cfg.seed}")
    # 2. Tokenizer, model, optimizer.
    tokenizer = build_tokenizer()
    model = Qwen3MoeForCausalLM(build_model_config(tokenizer, shape))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms: no weight decay
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    pool = demo_task.problem_pool(cfg.difficulty, "train")
    print(f"params {n_params:,}; train problems {len(pool)}; steps {cfg.steps}", flush=True)
    # 3. Train: fresh random examples every step, router load-balancing loss included.
    batches = PackedBatches(tokenizer, pool, rng, cfg.rows, cfg.width)
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(cfg.steps):
        model.train()
        input_ids, labels, positions = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        # attention_mask=None + restarting position ids = packed (block-diagonal) attention;
        # transformers only applies it without a KV cache, hence use_cache=False (with a cache
        # the examples of a row would silently attend to each other).
        out = model(
            input_ids=input_ids,
            position_ids=positions,
            labels=labels,
            use_cache=False,
            output_router_logits=True,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            elapsed = time.perf_counter() - started
            print(
                f"step {step:5d} loss {out.loss.item():.4f} aux {out.aux_loss.item():.3f} "
                f"lr {lr_at(step, cfg):.2e} {elapsed:.0f}s",
                flush=True,
            )
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            print(f"eval at step {step + 1}: {quick_eval(model, tokenizer, cfg)}", flush=True)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    # 4. Save a standard model directory.
    facts = {
        "params": n_params,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "rows": cfg.rows,
        "width": cfg.width,
        "threads": cfg.threads,
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "steps_per_second": round(cfg.steps / seconds, 3),
        "final_loss": round(out.loss.item(), 4),
    }
    save_model_dir(Path(cfg.out), model, tokenizer)
    return facts


def quick_eval(model, tokenizer, cfg: TrainConfig) -> str:
    """Accuracy and fragile share on 100 eval problems (a seed apart from the final one's)."""
    from tools.demo_eval import evaluate_model

    model.eval()
    state = torch.get_rng_state()  # sampling must not shift the training stream
    r = evaluate_model(model, tokenizer, 100, cfg.eval_seed + 1, difficulty=cfg.difficulty)
    torch.set_rng_state(state)
    return f"accuracy {r['accuracy']:.2f} fragile share {r['fragile_share']:.3f}"


def save_model_dir(out: Path, model, tokenizer) -> None:
    """config.json, model.safetensors, generation_config.json and the tokenizer files."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,  # 0 = no top-k cut: sample from the model's full distribution
        max_new_tokens=demo_task.max_completion_tokens(1) + 9,
    )
    model.save_pretrained(out, safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)  # saved via a private temp file
    # transformers 5 writes the expert count as `num_local_experts` only; transformers 4 and
    # the vLLM builds on it read `num_experts` (and would silently default to 128). Write both.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["num_experts"] = config["num_local_experts"]
    atomic_write(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)
    # Name the class every transformers version knows (v5 writes its new backend's name), and
    # write the special tokens map that older loaders (and vLLM's) read.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["add_bos_token"] = False
    atomic_write(tok_cfg_path, json.dumps(tok_cfg, indent=2) + "\n")
    specials = {
        k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    atomic_write(out / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")


def write_model_card(out: Path, cfg: TrainConfig, facts: dict, measured: list[dict]) -> None:
    """README.md of the model directory: task, architecture, training and measured numbers."""
    config = json.loads((out / "config.json").read_text())
    expert_params = 3 * config["hidden_size"] * config["moe_intermediate_size"]
    idle = config["num_experts"] - config["num_experts_per_tok"]
    active = facts["params"] - config["num_hidden_layers"] * idle * expert_params
    rng = random.Random(0)
    problem = rng.choice(demo_task.problem_pool(cfg.difficulty, "eval"))
    minutes = facts["train_seconds"] / 60
    rows = "\n".join(
        f"| {r['problems']} | {r['seed']} | {r['accuracy']:.3f} ({r['verified']}/{r['samples']})"
        f" | {r['fragile_share']:.3f} ({r['fragile_tokens']}/{r['verified_tokens']}) |"
        for r in measured
    )
    shape = {k: config[k] for k in asdict(TinyModelConfig())}
    atomic_write(
        out / "README.md",
        f"""# tiny-moe: a tiny Qwen3-MoE for the demo task

Bundled so that the whole pipeline runs offline on a laptop. It is the real transformers
Qwen3-MoE architecture (`Qwen3MoeForCausalLM`, `model_type: qwen3_moe`), only small, trained
from scratch by `tools/train_tiny.py` on the task of `workers/generation/demo_task.py`. Prompt template:
`{{prompt}}` (no chat template).

## Task

Solve `a * x + b = c` for a whole number x in 1..9 by guess-and-check: isolate `a * x`, then
try candidates in a random order until the check is 0. The order of the guesses is a free
choice, so every guess is a real fork (probability about 1/untried), which is what gives
verified trajectories their fragile tokens; the final answer is checked by exact match
(`workers.generation.demo_task.extract_answer`). Training and evaluation problems are disjoint splits of
all (a, b, x) triples. Example (one token per space-separated word or number):

    prompt:     {problem.prompt}
    completion: {demo_task.render_solution(problem, rng)}

## Architecture

| | |
|---|---|
| decoder layers | {config["num_hidden_layers"]}, every one a sparse MoE block |
| hidden size | {config["hidden_size"]} |
| attention | {config["num_attention_heads"]} heads, {config["num_key_value_heads"]} KV heads, head dim {config["head_dim"]} |
| experts | {config["num_experts"]} routed, top-{config["num_experts_per_tok"]}, `norm_topk_prob: true`, expert intermediate size {config["moe_intermediate_size"]} |
| vocabulary | {config["vocab_size"]} (word-level: words, numbers -{demo_task.MAX_NUMBER}..{demo_task.MAX_NUMBER}, `<pad>` `<s>` `</s>` `<unk>`; no BOS is added) |
| parameters | {facts["params"]:,} total, {active:,} active per token |
| dtype | float32 (`model.safetensors`) |

Full shape: `{json.dumps(shape)}`.

## Training

    python -m tools.train_tiny --out workers/assets/tiny-moe --seed {cfg.seed} --steps {cfg.steps} --threads {cfg.threads}

Seed {cfg.seed}, {cfg.steps} steps of AdamW (peak lr {cfg.lr}, {cfg.warmup_steps} warmup steps, cosine decay
to 10%). Each step is {cfg.rows} packed rows of {cfg.width} tokens, ~60 fresh examples: a random problem
of the train split with a fresh random guess order. Loss: cross-entropy on completion tokens
plus the router load-balancing loss (coefficient {config["router_aux_loss_coef"]}). Torch threads: {cfg.threads}.
Training took {facts["train_seconds"]:.0f} s wall ({minutes:.1f} min) and {facts["train_cpu_seconds"]:.0f} s of CPU;
final loss {facts["final_loss"]} (the floor set by the random guess order is ~0.18 nats per
completion token).

## Measured

Sampled at temperature 1.0, top_p 1.0, no top-k, on fresh eval-split problems; fragile share =
share of the completion tokens (EOS included) of verified trajectories whose probability under
the model is below 0.5:

    python -m tools.demo_eval --model workers/assets/tiny-moe --problems 100 --seed {cfg.eval_seed}
    python -m tools.demo_eval --model workers/assets/tiny-moe --problems {cfg.eval_problems} --seed {cfg.eval_seed}

| problems | seed | accuracy | fragile share |
|---|---|---|---|
{rows}

`tests/test_tiny_model.py` requires accuracy in [0.5, 0.9] and fragile share >= 0.05 on the
100-problem measurement.

## Loading

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("workers/assets/tiny-moe")
model = AutoModelForCausalLM.from_pretrained("workers/assets/tiny-moe", use_safetensors=True)
```
""",
    )


def parse_args(argv=None) -> TrainConfig:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> None:
    # 1. Train and save.
    cfg = parse_args(argv)
    facts = train(cfg)
    print(json.dumps(facts), flush=True)
    # 2. Measure the saved directory exactly as users will (tools.demo_eval), both on the
    #    test's 100 problems and on a larger sample, and write the model card.
    from tools.demo_eval import evaluate

    measured = [evaluate(cfg.out, n, cfg.eval_seed) for n in sorted({100, cfg.eval_problems})]
    for result in measured:
        print(json.dumps(result), flush=True)
    write_model_card(Path(cfg.out), cfg, facts, measured)


if __name__ == "__main__":
    main()
