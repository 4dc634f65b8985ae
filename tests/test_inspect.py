"""The token inspector: decoded tokens and their routes, and the page in a real browser.

A run is built by hand: two trajectories of the bundled tiny model's tokenizer (one with two
fragile tokens, one with none) and their scores at layer 3 with J = 3 alternatives.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from analysis.inspect import (
    BUNDLED_DIR,
    decode_pieces,
    load_tokenizer,
    main,
    token_table,
    wandb_tables,
)
from analysis.metrics import AnalysisConfig
from analysis.runinfo import generation_summary
from workers.io import write_arrow
from workers.schemas import SCORES_SCHEMA, TRAJECTORIES_SCHEMA

CONFIG = """\
model: {name: tiny, hf_id: bundled, path: null, num_layers: 4, moe_layers: [0, 1, 2, 3]}
scoring: {layers: [early, final]}
sweep: {models: [], layers: []}
"""
PROMPT = "solve 3 * x = 12 for x in 1 .. 9"
COMPLETIONS = {("p-a", 0): " try 2 : 6 ; try 4 : 12 ; answer 4", ("p-b", 1): " answer 4"}
FRAGILE = {("p-a", 0): {3, 7}, ("p-b", 1): set()}  # positions (from prompt_len - 1) scored fragile


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(
        "tiny", {"model": {"name": "tiny", "hf_id": "bundled", "moe_layers": [0]}}
    )


@pytest.fixture
def run(tmp_path, tokenizer):
    root = tmp_path / "runs" / "inspect-1"
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(CONFIG)
    prompt_ids = tokenizer.encode(PROMPT).ids
    traj = {name: [] for name in TRAJECTORIES_SCHEMA.names}
    scores = {name: [] for name in SCORES_SCHEMA.names}
    for (pid, sample), text in COMPLETIONS.items():
        ids = prompt_ids + tokenizer.encode(text).ids
        for key, value in dict(
            problem_id=pid, sample_idx=sample, input_ids=ids, prompt_len=len(prompt_ids),
            model="tiny", dataset="demo", completion_text=text, extracted_answer="4",
            gold_answer="4", verified=pid == "p-a", verify_reason="", seed=0,
            finish_reason="stop" if pid == "p-a" else "length", sample_logprobs=None,
        ).items():  # fmt: skip
            traj[key].append(value)
        for k, t in enumerate(range(len(prompt_ids) - 1, len(ids) - 1)):
            fragile = k in FRAGILE[(pid, sample)]
            u = [0.2, 0.3, 0.1, 0.25] if fragile else [0.97, 0.97, 0.99, 0.96]
            row = dict(
                problem_id=pid, sample_idx=sample, position=t, target_id=ids[t + 1],
                std_route=[1, 2], std_prob=u[0], alt_routes=[[3, 4], [5, 6], [7, 8]],
                alt_probs=u[1:], std_route_logprob=-1.0, alt_route_logprobs=[-2.0, -3.0, -4.0],
                model="tiny", layer=3, dataset="demo",
            )  # fmt: skip
            for key, value in row.items():
                scores[key].append(value)
    write_arrow(
        pa.Table.from_pydict(traj, schema=TRAJECTORIES_SCHEMA),
        root / "trajectories" / "tiny" / "demo" / "generated" / "00000.arrow",
        config_hash="t",
    )
    write_arrow(
        pa.Table.from_pydict(scores, schema=SCORES_SCHEMA),
        root / "scores" / "tiny" / "layer=3" / "demo" / "00000.arrow",
        config_hash="t",
    )
    return root, prompt_ids


def test_pieces_rebuild_the_decoded_text(tokenizer):
    ids = tokenizer.encode("try 7 : 28 - 16 = 12 ; answer é ü 4").ids
    assert "".join(decode_pieces(tokenizer, ids)) == tokenizer.decode(
        ids, skip_special_tokens=False
    )
    assert BUNDLED_DIR.joinpath("tokenizer.json").is_file()


def test_pieces_of_characters_split_across_byte_level_tokens():
    # A byte-level BPE trained on ASCII only: every non-ASCII character spans 2-3 tokens, each
    # of which alone decodes to a replacement character.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(["x = 12 ; try 3"] * 5, trainers.BpeTrainer(initial_alphabet=alphabet))
    text = "x = 12 ; é 中文 ok"
    ids = tok.encode(text).ids
    pieces = decode_pieces(tok, ids)
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert len(ids) > len(text.split()) and "" in pieces  # a character's first bytes: no text


def test_token_table_shows_the_predicted_token_and_its_best_routes(run, tokenizer):
    root, prompt_ids = run
    tokens, runs = token_table(root, "tiny", 3, [("p-a", 0)], alternatives=2)
    ids = prompt_ids + tokenizer.encode(COMPLETIONS[("p-a", 0)]).ids
    assert tokens.height == len(ids) - len(prompt_ids)
    first = tokens.row(0, named=True)
    # Row position t scores ids[t + 1]: the first completion token.
    assert first["position"] == len(prompt_ids) - 1
    assert first["token"] == decode_pieces(tokenizer, ids)[len(prompt_ids)]
    fragile = tokens.filter(tokens["bin"] == "fragile")
    assert fragile["position"].to_list() == [len(prompt_ids) - 1 + k for k in (3, 7)]
    row = fragile.row(0, named=True)
    # Best first: u 0.3 (route 3 4), then 0.25 (7 8); both beat u(S) = 0.2.
    assert row["best_routes"] == ["3 4", "7 8"] and row["best_u"] == pytest.approx([0.3, 0.25])
    assert row["better_routes"] == 2 and row["rank_std"] == 3.0 and row["std_route"] == "1 2"
    assert runs["pieces"].to_list()[0] == decode_pieces(tokenizer, ids)


def test_wandb_tables_hold_the_most_fragile_trajectory_per_layer_as_plain_columns(run):
    root, _ = run
    tables = wandb_tables(root, AnalysisConfig(), per_layer=1)
    assert list(tables) == ["tiny/L3"]
    frame = tables["tiny/L3"]
    assert set(frame["problem_id"]) == {"p-a"} and frame["bin"].to_list().count("fragile") == 2
    assert all(dtype != pl.List for dtype in frame.dtypes)
    row = frame.filter(pl.col("bin") == "fragile").row(0, named=True)
    assert row["best_alternatives"].startswith("3 4: 0.3000 (s -2.00); 7 8: 0.2500 (s -4.00)")


def test_generation_summary_per_model_and_dataset(run, tokenizer):
    root, _ = run
    lengths = [len(tokenizer.encode(text).ids) for text in COMPLETIONS.values()]
    row = generation_summary(root).row(0, named=True)
    assert (row["model"], row["dataset"], row["samples"], row["verified"]) == ("tiny", "demo", 2, 1)
    assert row["finish_reasons"] == "length: 1, stop: 1"  # most frequent first, then by name
    assert row["backend"] == "unrecorded"  # written here without the actors' sidecar field
    assert row["max_tokens"] == max(lengths) and row["mean_tokens"] == sum(lengths) / 2


def test_cli_bad_input_is_one_line_and_exit_2(run, capsys):
    root, _ = run
    for argv, message in (
        ([str(root), "--model", "tiny", "--layer", "3", "--problem", "nope"], "no scored tokens"),
        ([str(root), "--model", "tiny", "--layer", "middle", "--top-fragile", "1"], "not an index"),
        ([str(root), "--model", "tiny", "--layer", "1", "--top-fragile", "1"], "layer=1"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (root / "inspect").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp_path: Path, *args: str) -> str:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_renders_in_headless_chromium(run, tokenizer, tmp_path, capsys):
    root, prompt_ids = run
    scored = len(tokenizer.encode(COMPLETIONS[("p-a", 0)]).ids)
    # --layer final resolves through the run's config; the top fragile trajectory is p-a.
    assert main([str(root), "--model", "tiny", "--layer", "final", "--top-fragile", "1"]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page == root / "inspect" / "tiny" / "L3-top1-fragile.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text
    position = len(prompt_ids) - 1 + 7  # the second fragile token, named in the URL
    dom = _chromium(tmp_path, "--dump-dom", f"{page.as_uri()}#t={position}")
    # The spans are made by the page's script: their presence proves it ran.
    spans = re.findall(r'<span class="tok bin-(\w+)( sel)?"[^>]*data-position="(\d+)"', dom)
    assert len(spans) == scored
    assert sorted(int(p) for b, _, p in spans if b == "fragile") == [position - 4, position]
    assert [int(p) for _, sel, p in spans if sel] == [position]  # the URL's token is selected
    detail = dom[dom.index('id="detail"') :]
    assert "S (standard)" in detail and "best 3" in detail and "0.2000" in detail
    shot = tmp_path / "page.png"
    _chromium(tmp_path, "--window-size=1200,700", f"--screenshot={shot}", page.as_uri())
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (700, 1200)
    # The fragile tokens' shading (red, pbar ~0.2) is on screen, not only in the DOM.
    red = (pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.6) & (pixels[..., 2] < 0.5)
    assert red.sum() > 50
