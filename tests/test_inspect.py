"""The token inspector: decoded tokens and their routes, and the page in a real browser.

A run is built by hand: two trajectories of the bundled tiny model's tokenizer (one with two
fragile tokens, one with none) and their scores at layer 3 with J = 3 alternatives.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from analysis.inspect import (
    BUNDLED_DIR,
    NAME_BYTES,
    decode_name,
    decode_pieces,
    encode_name,
    fill,
    load_tokenizer,
    main,
    script_json,
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
    for name in ("std_argmax", "alt_kl", "alt_argmax_changed", "verified"):
        scores[name] = [None] * len(scores["problem_id"])  # as in files scored before them
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


def test_a_trajectory_generated_but_not_scored_is_told_apart_from_a_missing_one(run, capsys):
    """The demo scores verified samples only: asking for an unverified one names its verdict
    and the samples of that problem that were scored."""
    root, _ = run
    generated = root / "trajectories" / "tiny" / "demo" / "generated"
    extra = pl.read_ipc(generated / "00000.arrow").filter(pl.col("problem_id") == "p-a")
    extra = extra.with_columns(
        sample_idx=pl.lit(1, pl.Int32), verified=pl.lit(False), verify_reason=pl.lit("wrong answer")
    )
    write_arrow(extra.to_arrow().cast(TRAJECTORIES_SCHEMA), generated / "00001.arrow",
                config_hash="t")  # fmt: skip
    argv = [str(root), "--model", "tiny", "--layer", "3", "--problem", "p-a", "--sample", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "p-a/1 was generated (not verified (wrong answer)) but not scored" in err
    assert "scored samples of p-a: 0" in err
    assert main([*argv[:-3], "p-z", "--sample", "0"]) == 2
    assert "p-z/0 is not among the run's generated trajectories" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp_path: Path, *args: str) -> tuple[str, str]:
    """(what headless Chromium printed, e.g. the DOM after the page's scripts ran; the
    console's messages, with any uncaught error and any policy refusal)."""
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
        *args,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    console = [ln for ln in done.stderr.decode(errors="replace").splitlines() if "CONSOLE" in ln]
    return done.stdout.decode("utf-8"), "\n".join(console)


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
    dom, console = _chromium(tmp_path, "--dump-dom", f"{page.as_uri()}#t={position}")
    assert "Uncaught" not in console and "Content Security Policy" not in console
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


# Strings from data sets, models and files: each one is a problem id, an answer, a data set
# name, prompt and completion text (so token text too). Payloads that ran would log "XSS" to
# the console or set the title; the ones with __NAME__ are the page template's own slots.
HOSTILE = [
    "<script>console.log('XSS-1');document.title='XSS'</script>",
    "</script><script>console.log('XSS-2')</script>",
    "<!--<script>",  # switches a script element's parser into its double-escaped state
    "<!--<script>console.log('XSS-3')//",
    "</SCRIPT ><img src=x onerror=\"console.log('XSS-4')\">",
    "\"'><img src=x onerror=console.log('XSS-5')>",
    "'\"--><svg onload=console.log('XSS-6')>",
    "${console.log('XSS-7')}",
    "`;console.log('XSS-8');`",
    "__DATA__",
    "__TITLE__ __SUBTITLE__",
    "__SCRIPT__ __GRADIENT__ __CSP__",
    "javascript:console.log('XSS-9')",
    "a\u2028b\u2029c",
    "../../../../outside/escape",
    "..",
    ".",
    "/etc/passwd",
    "a\\b/../c",
    "\x00\x01\x07\x1b[31m\x7f\t\n",
    "\u202eevil\u200f\u200e\u061c",
    "x" * 5000,
    "<!--<script>" * 300,
    "&lt;script&gt;&amp;&#60;script&#x3e;",
    "]]><![CDATA[<style>*{display:none}</style>",
    "{{title}} %s %(x)s {0} $title $$",
    "\\u003cscript\\u003e\\x3c/script\\x3e",
    "<iframe src=\"javascript:console.log('XSS-10')\"></iframe>",
    "é 中文 😀 \ufeff",
    "",
]
# Directory names: no "/" or NUL, at most 255 bytes; glob characters too.
HOSTILE_RUN = "r-__DATA__-__TITLE__-\"'><img src=x onerror=console.log('XSS-run')><!--<script>"
HOSTILE_MODEL = "m-__SUBTITLE__<svg onload=console.log('XSS-model')>[x]*?${1}"


@pytest.fixture(scope="module")
def hostile_tokenizer(tmp_path_factory):
    """A byte-level BPE trained on the corpus: every byte is a token and some payloads are
    whole tokens (e.g. "<script>"), so token text is hostile too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(HOSTILE * 3, trainers.BpeTrainer(initial_alphabet=alphabet))
    folder = tmp_path_factory.mktemp("hostile-tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    return tok, folder


@pytest.fixture
def hostile_run(tmp_path, hostile_tokenizer):
    """A run whose every name and string is hostile: (run folder, {(id, sample): input_ids},
    {(id, sample): prompt_len})."""
    import yaml

    tok, folder = hostile_tokenizer
    root = tmp_path / "runs" / HOSTILE_RUN
    root.mkdir(parents=True)
    model = {"name": HOSTILE_MODEL, "hf_id": None, "path": str(folder)}
    model |= {"num_layers": 4, "moe_layers": [0, 1, 2, 3]}
    config = {"model": model, "scoring": {"layers": ["early", "final"]}}
    (root / "config.yaml").write_text(yaml.safe_dump(config | {"sweep": {"models": []}}))
    n = len(HOSTILE)
    traj = {name: [] for name in TRAJECTORIES_SCHEMA.names}
    scores = {name: [] for name in SCORES_SCHEMA.names}
    ids_of, prompt_len = {}, {}
    for i, pid in enumerate(HOSTILE):
        sample, dataset = i % 3, HOSTILE[(i + 3) % n]
        prompt = tok.encode("Q " + pid + " ?").ids
        ids = prompt + tok.encode(" A " + HOSTILE[(i + 5) % n]).ids
        ids_of[(pid, sample)], prompt_len[(pid, sample)] = ids, len(prompt)
        for key, value in dict(
            problem_id=pid, sample_idx=sample, input_ids=ids, prompt_len=len(prompt),
            model=HOSTILE_MODEL, dataset=dataset, completion_text=HOSTILE[(i + 5) % n],
            extracted_answer=HOSTILE[(i + 1) % n], gold_answer=HOSTILE[(i + 2) % n],
            verified=i % 2 == 0, verify_reason=HOSTILE[(i + 4) % n], seed=0,
            finish_reason="stop", sample_logprobs=None,
        ).items():  # fmt: skip
            traj[key].append(value)
        for t in range(len(prompt) - 1, len(ids) - 1):
            u = [0.2, 0.3, 0.1, 0.25] if t % 3 == 0 else [0.97, 0.97, 0.99, 0.96]
            if t == len(prompt) and i < 2:  # numbers a broken file may hold: no JSON for them
                u = [math.nan, 0.3, math.inf, 0.25]
            row = dict(
                problem_id=pid, sample_idx=sample, position=t, target_id=ids[t + 1],
                std_route=[1, 2], std_prob=u[0], alt_routes=[[3, 4], [5, 6], [7, 8]],
                alt_probs=u[1:], std_route_logprob=-1.0, alt_route_logprobs=[-2.0, -3.0, -4.0],
                model=HOSTILE_MODEL, layer=3, dataset=dataset,
            )  # fmt: skip
            for key, value in row.items():
                scores[key].append(value)
    write_arrow(
        pa.Table.from_pydict(traj, schema=TRAJECTORIES_SCHEMA),
        root / "trajectories" / HOSTILE_MODEL / "d" / "generated" / "00000.arrow",
        config_hash="t",
    )
    for name in ("std_argmax", "alt_kl", "alt_argmax_changed", "verified"):
        scores[name] = [None] * len(scores["problem_id"])  # as in files scored before them
    write_arrow(
        pa.Table.from_pydict(scores, schema=SCORES_SCHEMA),
        root / "scores" / HOSTILE_MODEL / "layer=3" / "d" / "00000.arrow",
        config_hash="t",
    )
    return root, ids_of, prompt_len


class _PageText(HTMLParser):
    """What a reader sees: <title>, <h1>, and per trajectory section its heading, meta line,
    text and token spans; every element name that occurs."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.stack, self.sections = [], [], []
        self.title = self.h1 = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        cls = dict(attrs).get("class") or ""
        if tag == "section":
            self.sections.append({"h2": "", "meta": "", "text": "", "tokens": 0})
        if tag == "span" and cls.startswith("tok ") and self.sections:
            self.sections[-1]["tokens"] += 1
        if tag not in ("meta", "br", "img", "link", "input"):
            self.stack.append((tag, cls))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        tags = [t for t, _ in self.stack]
        classes = [c for _, c in self.stack]
        if tags and tags[-1] == "title":
            self.title += data
        elif "h1" in tags:
            self.h1 += data
        elif "section" in tags and self.sections:
            part = "text" if "text" in classes else "h2" if "h2" in tags else "meta"
            self.sections[-1][part] += data


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_hostile_strings_render_as_text_and_never_run(
    hostile_run, hostile_tokenizer, tmp_path, capsys
):
    root, ids_of, prompt_len = hostile_run
    tok, _ = hostile_tokenizer
    argv = [str(root), "--model", HOSTILE_MODEL, "--layer", "final", "--top-fragile", "99"]
    assert main(argv) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page.resolve().parent.parent == (root / "inspect").resolve()
    dom, console = _chromium(tmp_path, "--dump-dom", page.as_uri())
    # Nothing from data ran, nor tried to (the page's policy would log a refusal).
    assert "XSS" not in console and "Uncaught" not in console
    assert "Content Security Policy" not in console and "Refused" not in console
    seen = _PageText()
    seen.feed(dom)
    seen.close()
    assert seen.tags.count("script") == 2 and seen.tags.count("style") == 1
    assert not {"img", "svg", "iframe", "link"} & set(seen.tags)
    title = f"{HOSTILE_RUN}: {HOSTILE_MODEL} · final (L3)"
    assert seen.title == title and seen.h1 == title
    # Every trajectory, its name and every token: shown as the very text they are.
    assert len(seen.sections) == len(ids_of)
    shown = {s["h2"]: s for s in seen.sections}
    for (pid, sample), ids in ids_of.items():
        section = shown[f"{pid} / sample {sample}"]
        i, n = HOSTILE.index(pid), len(HOSTILE)
        text = "".join(decode_pieces(tok, ids))
        assert text == f"Q {pid} ? A {HOSTILE[(i + 5) % n]}"
        assert section["text"].replace("\u200b", "") == text
        assert section["tokens"] == len(ids) - prompt_len[(pid, sample)]
        assert section["meta"].startswith(HOSTILE[(i + 3) % n] + " · verified: ")
        answer, gold = (json.dumps(HOSTILE[(i + k) % n], ensure_ascii=False) for k in (1, 2))
        assert f" · answer {answer} (gold {gold}) · " in section["meta"]
    assert sum(s["tokens"] for s in seen.sections) == sum(
        len(ids) - prompt_len[k] for k, ids in ids_of.items()
    )
    assert 'class="tok bin-fragile sel"' in dom  # the detail panel shows the worst token


def test_page_names_stay_in_the_run_and_give_back_the_id(hostile_run, tmp_path, capsys):
    root, ids_of, _ = hostile_run
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    names = set()
    for pid, sample in ids_of:
        argv = [str(root), "--model", HOSTILE_MODEL, "--layer", "3", "--problem", pid]
        assert main([*argv, "--sample", str(sample)]) == 0, pid
        page = Path(capsys.readouterr().out.strip())
        assert page.resolve().parent == (root / "inspect").resolve() / page.parent.name
        assert decode_name(page.parent.name) == HOSTILE_MODEL
        name = page.name
        assert re.fullmatch(r"L3-[A-Za-z0-9_.=%~]*-s\d\.html", name) and len(name) <= 255
        encoded = name[len("L3-") : -len(f"-s{sample}.html")]
        assert "~" in encoded or decode_name(encoded) == pid  # "~": a shortened long id
        names.add(name)
    assert len(names) == len(ids_of)
    new = [p for p in tmp_path.rglob("*") if p.is_file() and p not in before]
    assert len(new) == len(ids_of) and all(p.is_relative_to(root / "inspect") for p in new)
    assert [p for p, t in before.items() if not p.exists() or p.stat().st_mtime_ns != t] == []


def test_page_data_is_inert_json_for_any_string():
    data = {"s": HOSTILE, "n": [math.nan, math.inf, -math.inf, 0.5], "k": {"<a>": "&"}}
    blob = script_json(data)
    assert not set(blob) & set("<>&\u2028\u2029") and blob.isascii()
    assert json.loads(blob) == {"s": HOSTILE, "n": [None, None, None, 0.5], "k": {"<a>": "&"}}
    # The template's slots are filled once: a value naming a slot stays text.
    assert fill("__A__|__B__", {"A": "__B__", "B": "x"}) == "__B__|x"


def test_page_names_are_reversible_and_distinct():
    values = [*HOSTILE, "A", "a", "%41", "a%2Fb", "a/b", ".a", "%2Ea", "a~b", "é", "\udcff"]
    values += ["é" * 300, "x" * 300 + "a", "x" * 300 + "b"]
    encoded = [encode_name(v) for v in values]
    assert len(set(encoded)) == len(values)
    for value, name in zip(values, encoded, strict=True):
        assert re.fullmatch(r"[A-Za-z0-9_.=%~]*", name) and not name.startswith(".")
        assert len(name.encode()) <= NAME_BYTES
        if "~" in name:  # shortened: its start, then a hash of the whole value
            head, digest = name.split("~")
            assert len(value) > 60 and value.startswith(decode_name(head)) and len(digest) == 16
        else:
            assert decode_name(name) == value


def test_a_page_outside_the_run_is_refused(hostile_run, tmp_path, capsys):
    root, ids_of, _ = hostile_run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "inspect").symlink_to(elsewhere)
    argv = [str(root), "--model", HOSTILE_MODEL, "--layer", "3", "--problem", "..", "--sample", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "would leave" in err and err.count("\n") == 1
    assert not any(elsewhere.iterdir())


def test_error_naming_a_hostile_id_is_one_line(hostile_run, capsys):
    root, _, _ = hostile_run
    argv = [str(root), "--model", HOSTILE_MODEL, "--layer", "3", "--problem", "no\nsuch\x1b[2J"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "\x1b" not in err


def test_wandb_tables_keep_hostile_strings_as_text(hostile_run, tmp_path, monkeypatch, caplog):
    from orchestrator.wandb_run import WandbConfig, WandbSession

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    for var in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR"):
        monkeypatch.setenv(f"WANDB_{var}", str(tmp_path / f"wandb-{var.lower()}"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    root, ids_of, _ = hostile_run
    tables = wandb_tables(root, AnalysisConfig(), per_layer=len(ids_of))
    assert list(tables) == [f"{HOSTILE_MODEL}/L3"]
    frame = tables[f"{HOSTILE_MODEL}/L3"]
    assert set(frame["problem_id"]) == set(HOSTILE)
    session = WandbSession(
        WandbConfig(mode="offline", progress_interval_s=3600), run_id="r", run_dir=root, config={}
    )
    assert session.active
    with caplog.at_level(logging.WARNING):
        session.log_tokens(tables)
        session.finish(exit_code=0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    (logged,) = list((root / "wandb").rglob("*.table.json"))
    table = json.loads(logged.read_text())
    assert table["columns"] == frame.columns
    column = table["columns"].index
    assert [r[column("problem_id")] for r in table["data"]] == frame["problem_id"].to_list()
    assert [r[column("token")] for r in table["data"]] == frame["token"].to_list()
    assert [r[column("context")] for r in table["data"]] == frame["context"].to_list()
