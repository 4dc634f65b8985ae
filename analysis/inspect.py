"""A token inspector: one trajectory's text with every scored token's routes, as one HTML page.

    python -m analysis.inspect runs/<id> --model M --layer L [--problem P [--sample S] |
        --top-fragile N] [--out PATH] [--alternatives 5]

Contract: `token_table(run_dir, model, layer, trajectories)` -> one row per scored token of
the given (problem_id, sample_idx) trajectories, with the token's text decoded by the model's
own tokenizer, pbar and its bin, u(S), the standard route and its router score s(S), rank of
S, Spearman rho, the best alternatives (route, u, s; best first) and the win flags;
`write_page(...)` turns it into one self-contained HTML file (inline CSS, JS and data: no
server, no network) that shows each trajectory's decoded text with every completion token
shaded by pbar, and on hover or click that token's details. Every string from the run's files
(ids, answers, names, token text) is shown as text and never runs (see PAGE); the default
page is `<run>/inspect/<model>/L<layer>-<problem>-s<sample>.html` (or
`L<layer>-top<N>-fragile.html`), the model and problem id percent-encoded (`encode_name`).
`--layer` takes an index or a layer name of the run (early/middle/final). `--top-fragile N` picks the N trajectories with
the most fragile tokens at that layer (ties: more tokens, then problem id). Bad input: one
`error:` line on stderr, exit 2, no page written.

Row position t scores the prediction of token ids[t + 1] from the prefix ids[:t + 1]: the page
shades that predicted token. The tokenizer is the run's model's (config.yaml: model.path, the
bundled tiny model, or the hub id through `tokenizers`' own download/cache), loaded from its
tokenizer.json alone: no model weights, no transformers.
"""

from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import html
import json
import math
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import polars as pl

from analysis.inputs import select_generated_files, select_score_files
from analysis.kernel import KERNEL_FIELDS, route_metrics
from analysis.metrics import AnalysisConfig, find_shards, resolve_margin, scan_scores
from analysis.report import load_run_config
from analysis.runinfo import layer_labels
from workers.atomic import atomic_write
from workers.runfiles import run_models

TRAJECTORIES_GLOB = "trajectories/{model}/*/generated/*.arrow"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "workers" / "assets" / "tiny-moe"


def resolve_layer_arg(spec: str, model: str, run_config: dict | None) -> int:
    """An index, or a layer name as the run's config resolves it for this model."""
    if spec.strip().lstrip("-").isdigit():
        return int(spec)
    for (m, index), label in layer_labels(run_config).items():
        if m == model and label.split(" ")[0] == spec:
            return index
    raise ValueError(f"layer {spec!r} is not an index or a layer name of model {model} in this run")


def load_tokenizer(model: str, run_config: dict | None):
    """The model's tokenizer (tokenizers.Tokenizer) from tokenizer.json: a local path, the
    bundled tiny model, or the hub id (downloaded or cached by tokenizers itself)."""
    from tokenizers import Tokenizer

    entry = run_models(run_config or {}).get(model, {})
    local = entry.get("path") or (BUNDLED_DIR if entry.get("hf_id") == "bundled" else None)
    if local is not None:
        path = Path(local) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {local} (model {model})")
        return Tokenizer.from_file(str(path))
    hub_id = entry.get("hf_id")
    if not hub_id:
        raise FileNotFoundError(f"model {model} is not described in the run's config.yaml")
    return Tokenizer.from_pretrained(hub_id, revision=entry.get("revision") or "main")


def decode_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, so that "".join(pieces) is the decoded sequence.

    Byte-level tokenizers split characters across tokens, so a token alone may decode to a
    replacement character, and some decoders change a token's text by its neighbours. Each
    piece is the growth of the decoding of a short window (the previous piece's tokens and
    this one); a token that ends inside a character yields "" and the one that completes it
    carries the whole character (the incremental decoding of text-generation servers).
    """
    pieces, prefix, read = [], 0, 0
    for i in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=False)
        after = tokenizer.decode(ids[prefix : i + 1], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            pieces.append(after[len(before) :])
            prefix, read = read, i + 1  # the window: the last complete piece's tokens
        else:
            pieces.append("")
    return pieces


def _warn(lines: list[str]) -> None:
    """Files left out because they do not verify, one line each (the report names them too)."""
    for line in lines:
        print(f"warning: left out, not as its sidecar says: {line}", file=sys.stderr)


def _score_paths(run_dir: Path, model: str, layer: int) -> list[Path]:
    """The run's current score files of (model, layer) that verify (analysis.inputs)."""
    inputs = select_score_files(run_dir, under=f"scores/{model}/layer={layer}/")
    _warn(inputs.corrupt)
    return inputs.files


def top_fragile(paths: list[Path], cfg: AnalysisConfig, n: int) -> list[tuple[str, int]]:
    """The n trajectories with the most fragile tokens (pbar < cfg.fragile)."""
    u_sum = pl.col("std_prob").cast(pl.Float64) + pl.col("alt_probs").list.sum()
    pbar = (u_sum / (pl.col("alt_probs").list.len() + 1)).cast(pl.Float32)
    counts = (
        scan_scores(paths)
        .group_by("problem_id", "sample_idx")
        .agg((pbar < pl.lit(cfg.fragile, dtype=pl.Float32)).sum().alias("fragile"), pl.len())
        .sort(["fragile", "len", "problem_id", "sample_idx"], descending=[True, True, False, False])
        .head(n)
        .collect()
    )
    return [(p, int(s)) for p, s in counts.select("problem_id", "sample_idx").rows()]


def _why_unscored(
    run_dir: Path, model: str, wanted: list[tuple[str, int]], score_paths: list[Path]
) -> str:
    """Why the wanted trajectories have no scored tokens: not generated, or generated and not
    scored (with its verification result), and which samples of their problems were scored."""
    runs = _trajectories(run_dir, model, wanted)
    found = {(r["problem_id"], r["sample_idx"]): r for r in runs.iter_rows(named=True)}
    parts = []
    for problem, sample in wanted:
        row = found.get((problem, sample))
        if row is None:
            parts.append(f"{problem}/{sample} is not among the run's generated trajectories")
            continue
        verdict = "verified" if row.get("verified") else f"not verified ({row.get('verify_reason')})"
        parts.append(f"{problem}/{sample} was generated ({verdict}) but not scored")
        scored = (
            scan_scores(score_paths)
            .filter(pl.col("problem_id") == problem)
            .select(pl.col("sample_idx").unique().sort())
            .collect()["sample_idx"]
            .to_list()
        )
        parts.append(
            f"scored samples of {problem}: {', '.join(map(str, scored))}"
            if scored
            else f"no sample of {problem} was scored"
        )
    return ": " + "; ".join(parts) if parts else ""


def _trajectories(run_dir: Path, model: str, wanted: list[tuple[str, int]]) -> pl.DataFrame:
    paths, corrupt = select_generated_files(
        run_dir, TRAJECTORIES_GLOB.format(model=glob.escape(model))
    )
    _warn(corrupt)
    if not paths:
        return pl.DataFrame()
    keys = pl.DataFrame(
        wanted, schema={"problem_id": pl.String, "sample_idx": pl.Int32}, orient="row"
    )
    return (
        pl.scan_ipc([str(p) for p in paths], glob=False)
        .join(keys.lazy(), on=["problem_id", "sample_idx"])
        .unique(["problem_id", "sample_idx"], keep="first", maintain_order=True)
        .collect()
    )


def token_table(
    run_dir: str | Path,
    model: str,
    layer: int,
    trajectories: list[tuple[str, int]],
    *,
    cfg: AnalysisConfig | None = None,
    alternatives: int = 5,
    tokenizer: Any = None,
    paths: list[Path] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(tokens, trajectories): one row per scored token of `trajectories` at (model, layer),
    and one row per trajectory with its decoded pieces. `paths`: the (model, layer) score
    files, when the caller has verified them already. Raises FileNotFoundError when the run
    has no such scores or trajectories."""
    cfg = cfg or AnalysisConfig()
    run_dir = Path(run_dir)
    paths = _score_paths(run_dir, model, layer) if paths is None else paths
    if not paths:
        raise FileNotFoundError(
            f"no complete score shards under {run_dir}/scores/{model}/layer={layer}"
        )
    cfg = resolve_margin(cfg, paths)  # the margin of the scores' dtype, unless set
    keys = pl.DataFrame(
        trajectories, schema={"problem_id": pl.String, "sample_idx": pl.Int32}, orient="row"
    )
    scores = (
        scan_scores(paths)
        .join(keys.lazy(), on=["problem_id", "sample_idx"])
        .sort("problem_id", "sample_idx", "position")
        .collect()
    )
    if scores.is_empty():
        raise FileNotFoundError(
            f"no scored tokens of {', '.join(f'{p}/{s}' for p, s in trajectories)} at {model}"
            f" layer {layer}{_why_unscored(run_dir, model, trajectories, paths)}"
        )
    runs = _trajectories(run_dir, model, trajectories)
    if runs.is_empty():
        raise FileNotFoundError(f"no complete generated trajectories of model {model} in {run_dir}")
    tokenizer = tokenizer or load_tokenizer(model, load_run_config(run_dir))
    texts = {}
    for row in runs.iter_rows(named=True):
        texts[(row["problem_id"], row["sample_idx"])] = decode_pieces(tokenizer, row["input_ids"])
    runs = runs.with_columns(
        pl.Series("pieces", [texts[k] for k in runs.select("problem_id", "sample_idx").rows()])
    )
    metrics = scores.select(
        pl.struct("std_prob", "alt_probs", "std_route_logprob", "alt_route_logprobs")
        .map_batches(route_metrics, return_dtype=pl.Struct(KERNEL_FIELDS))
        .alias("_k")
    ).unnest("_k")
    tokens = pl.concat([scores, metrics], how="horizontal")
    confident = pl.lit(cfg.confident, dtype=pl.Float32)
    fragile = pl.lit(cfg.fragile, dtype=pl.Float32)
    tokens = tokens.with_columns(
        pl.when(pl.col("pbar") >= confident)
        .then(pl.lit("confident"))
        .when(pl.col("pbar") < fragile)
        .then(pl.lit("fragile"))
        .otherwise(pl.lit("ambiguous"))
        .alias("bin"),
        (pl.col("max_alt") > pl.col("std_prob") + cfg.margin).alias("win"),
    )
    rows = []
    for r in tokens.iter_rows(named=True):
        pieces = texts.get((r["problem_id"], r["sample_idx"]), [])
        t = r["position"]
        order = sorted(range(len(r["alt_probs"])), key=lambda j: (-r["alt_probs"][j], j))
        best = order[:alternatives]
        rows.append(
            {
                "problem_id": r["problem_id"],
                "sample_idx": r["sample_idx"],
                "position": t,
                "token": pieces[t + 1] if t + 1 < len(pieces) else "",
                "context": "".join(pieces[max(0, t - 7) : t + 1]),
                "target_id": r["target_id"],
                "pbar": r["pbar"],
                "bin": r["bin"],
                "u_std": r["std_prob"],
                "max_alt": r["max_alt"],
                "gain_pp": None if r["max_alt"] is None else 100 * (r["max_alt"] - r["std_prob"]),
                "win": r["win"],
                "better_routes": sum(u > r["std_prob"] + cfg.margin for u in r["alt_probs"]),
                "rank_std": r["rank_std"],
                "rho": r["rho"],
                "std_route": " ".join(map(str, r["std_route"])),
                "s_std": r["std_route_logprob"],
                "best_routes": [" ".join(map(str, r["alt_routes"][j])) for j in best],
                "best_u": [r["alt_probs"][j] for j in best],
                "best_s": [r["alt_route_logprobs"][j] for j in best],
                "alternatives": len(r["alt_probs"]),
            }
        )
    return pl.DataFrame(rows), runs


def flat_tokens(tokens: pl.DataFrame) -> pl.DataFrame:
    """`token_table`'s rows with plain columns only (for W&B tables and CSV): the best
    alternatives become one text column "3 4: 0.300 (s -2.00); 7 8: 0.250 (s -4.00)"."""
    best = [
        "; ".join(f"{r}: {u:.4f} (s {s:.2f})" for r, u, s in zip(rs, us, ss, strict=True))
        for rs, us, ss in zip(
            tokens["best_routes"], tokens["best_u"], tokens["best_s"], strict=True
        )
    ]
    return tokens.drop("best_routes", "best_u", "best_s").with_columns(
        pl.Series("best_alternatives", best, dtype=pl.String)
    )


def wandb_tables(
    run_dir: str | Path, cfg: AnalysisConfig | None = None, *, per_layer: int = 1
) -> dict[str, pl.DataFrame]:
    """{"<model>/L<layer>": flat token rows of its `per_layer` most fragile trajectories} for
    every (model, layer) with complete scores."""
    cfg = cfg or AnalysisConfig()
    run_dir = Path(run_dir)
    run_config = load_run_config(run_dir)
    jobs: dict[tuple[str, int], list[Path]] = {}
    for p in find_shards(run_dir):  # verified once here, then passed on
        jobs.setdefault((p.parts[-4], int(p.parts[-3].split("=")[1])), []).append(p)
    tokenizers: dict[str, Any] = {}
    out = {}
    for (model, layer), paths in sorted(jobs.items()):
        if model not in tokenizers:
            tokenizers[model] = load_tokenizer(model, run_config)
        wanted = top_fragile(paths, cfg, per_layer)
        tokens, _ = token_table(
            run_dir, model, layer, wanted, cfg=cfg, tokenizer=tokenizers[model], paths=paths
        )
        out[f"{model}/L{layer}"] = flat_tokens(tokens)
    return out


# The page is three constant parts (STYLE, SCRIPT, PAGE) and three values filled in one pass
# (`fill`): a value is never scanned again, so one that holds "__DATA__" stays text. Data
# reaches the page only as the JSON of a non-executed <script type="application/json">
# element (`script_json`: no "<", ">", "&" or non-ASCII character in it, so no string can
# end the element or switch the HTML parser's script states, and U+2028/U+2029 are escaped),
# which the script reads with JSON.parse and shows with textContent only. Titles are
# html.escape'd text. The Content-Security-Policy allows only this script and style (by
# hash), so markup that did slip into the page could neither run nor load anything.
_GRADIENT = ", ".join(f"hsl({10 + 40 * t},90%,{min(62 + 38 * t * t, 100)}%)" for t in (0, 0.5, 1))
STYLE = (
    """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;display:flex;height:100vh}
#main{flex:1;overflow:auto;padding:16px 24px}
#side{width:380px;border-left:1px solid #ccc;padding:16px;overflow:auto;background:#fafafa}
h1{font-size:18px;margin:0 0 4px} h2{font-size:15px;margin:18px 0 4px}
.meta{color:#666;font-size:12px;margin-bottom:6px}
.text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px;
  border:1px solid #ddd;padding:10px;background:#fff}
.prompt{color:#999}
.tok{cursor:pointer;border-radius:2px}
.tok:hover{outline:1px solid #333}
.tok.sel{outline:2px solid #1d4ed8}
.legend{display:flex;align-items:center;gap:6px;font-size:12px;color:#555;margin:6px 0}
.bar{width:160px;height:10px;background:linear-gradient(90deg,"""
    + _GRADIENT
    + """)}
table{border-collapse:collapse;font-size:12px;width:100%} td,th{padding:2px 4px;text-align:left}
th{color:#555;font-weight:600} tr.std{background:#e8eefc}
.num{text-align:right;font-variant-numeric:tabular-nums}
.tok.bin-fragile{font-weight:700}
code{background:#eee;padding:0 3px}
"""
)
SCRIPT = """
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const fmt = (x, d) => (x === null || x === undefined) ? "–" : Number(x).toFixed(d);
function shade(p) {  // pbar 1 -> white, 0.5 -> amber, 0 -> red; none (not finite) -> grey
  if (p === null) return "#ccc";
  const t = Math.max(0, Math.min(1, p));
  const h = 10 + 40 * t, l = 62 + 38 * t * t;
  return "hsl(" + h + ",90%," + Math.min(l, 100) + "%)";
}
function el(tag, cls, text) {  // data goes into textContent only, never into markup
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
let selected = null;
function show(tok, span) {
  if (selected) selected.classList.remove("sel");
  selected = span; span.classList.add("sel");
  const d = document.getElementById("detail");
  d.replaceChildren();
  d.appendChild(el("h2", "", "Token " + JSON.stringify(tok.token)));
  const m = el("div", "meta");
  m.textContent = tok.problem_id + " / sample " + tok.sample_idx + " · position " + tok.position
    + " · target id " + tok.target_id;
  d.appendChild(m);
  const facts = [
    ["pbar", fmt(tok.pbar, 4) + " (" + tok.bin + ")"],
    ["u(S)", fmt(tok.u_std, 4)],
    ["best alternative u", fmt(tok.max_alt, 4) + " (gain " + fmt(tok.gain_pp, 2) + " pp)"],
    ["alternatives beating S", tok.better_routes + " of " + tok.alternatives
      + " (by more than " + DATA.margin + ")"],
    ["rank of S", fmt(tok.rank_std, 1) + " of " + (tok.alternatives + 1)],
    ["alignment ρ(s, u)", fmt(tok.rho, 3)],
  ];
  const ft = el("table", "facts");
  for (const [k, v] of facts) {
    const tr = el("tr"); tr.appendChild(el("th", "", k)); tr.appendChild(el("td", "num", v));
    ft.appendChild(tr);
  }
  d.appendChild(ft);
  d.appendChild(el("h2", "", "Routes (experts, u, router score s)"));
  const rt = el("table", "routes");
  const head = el("tr");
  for (const h of ["route", "experts", "u(R)", "s(R)"]) head.appendChild(el("th", "", h));
  rt.appendChild(head);
  const row = (name, experts, u, s, cls) => {
    const tr = el("tr", cls);
    tr.appendChild(el("td", "", name)); tr.appendChild(el("td", "", experts));
    tr.appendChild(el("td", "num", fmt(u, 4))); tr.appendChild(el("td", "num", fmt(s, 3)));
    rt.appendChild(tr);
  };
  row("S (standard)", tok.std_route, tok.u_std, tok.s_std, "std");
  tok.best_routes.forEach((r, i) => row("best " + (i + 1), r, tok.best_u[i], tok.best_s[i], "alt"));
  d.appendChild(rt);
  d.appendChild(el("div", "meta", "context: …" + tok.context + "[" + tok.token + "]"));
}
function render() {
  const root = document.getElementById("trajectories");
  const spans = [];  // the first trajectory's token spans, by position
  DATA.trajectories.forEach((tr, k) => {
    const sec = el("section", "trajectory");
    sec.id = "t-" + k;  // an index: ids from data never become selectors
    sec.appendChild(el("h2", "", tr.problem_id + " / sample " + tr.sample_idx));
    sec.appendChild(el("div", "meta", tr.dataset + " · verified: " + tr.verified
      + " · answer " + JSON.stringify(tr.extracted_answer) + " (gold " + JSON.stringify(tr.gold_answer)
      + ") · " + tr.counts));
    const text = el("div", "text");
    const byPos = new Map(tr.tokens.map(t => [t.position + 1, t]));
    tr.pieces.forEach((piece, i) => {
      const tok = byPos.get(i);
      if (!tok) { text.appendChild(el("span", i < tr.prompt_len ? "prompt" : "", piece)); return; }
      const s = el("span", "tok bin-" + tok.bin, piece === "" ? "\\u200b" : piece);
      s.style.background = shade(tok.pbar);
      s.dataset.position = tok.position;
      s.title = "pbar " + fmt(tok.pbar, 3) + ", u(S) " + fmt(tok.u_std, 3);
      s.addEventListener("mouseenter", () => show(tok, s));
      s.addEventListener("click", () => show(tok, s));
      text.appendChild(s);
      if (k === 0) spans.push([tok, s]);
    });
    sec.appendChild(text);
    root.appendChild(sec);
  });
  // Start on the token the URL names (#t=<position>), else the lowest pbar of the first.
  if (!spans.length) return;
  const want = Number(new URLSearchParams(location.hash.slice(1)).get("t") ?? NaN);
  const pick = spans.find(([t]) => t.position === want)
    || spans.reduce((a, b) => ((b[0].pbar ?? 2) < (a[0].pbar ?? 2) ? b : a));
  show(pick[0], pick[1]);
}
render();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CSP = f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(STYLE)}"
PAGE = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content=\""""
    + CSP
    + """\">
<title>__TITLE__</title>
<style>"""
    + STYLE
    + """</style></head>
<body>
<div id="main">
<h1>__TITLE__</h1>
<div class="meta">__SUBTITLE__</div>
<div class="legend">pbar: <span>0</span><span class="bar"></span><span>1</span>
 &nbsp; grey text: prompt (not scored). Hover or click a token; the panel shows its routes.</div>
<div id="trajectories"></div>
</div>
<div id="side"><div id="detail">Hover or click a token.</div></div>
<script id="data" type="application/json">__DATA__</script>
<script>"""
    + SCRIPT
    + """</script>
</body></html>
"""
)
_SLOT = re.compile(r"__([A-Z]+)__")
# Every character JSON may leave raw that means something to an HTML parser inside a script
# element ("<", ">", "&"); ensure_ascii already escapes the rest (U+2028, U+2029, non-ASCII).
_SCRIPT_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def fill(template: str, values: dict[str, str]) -> str:
    """Every __NAME__ slot replaced by values[NAME] in one pass: no value is scanned again."""
    return _SLOT.sub(lambda m: values[m.group(1)], template)


def _finite(value: Any) -> Any:
    """NaN and infinities as None (JSON has no such numbers: JSON.parse would reject the page)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def script_json(data: Any) -> str:
    """`data` as JSON that is inert inside any HTML script element, whatever its strings."""
    blob = json.dumps(_finite(data), ensure_ascii=True, allow_nan=False)
    return blob.translate(_SCRIPT_ESCAPES)


def html_text(value: str) -> str:
    """`value` escaped as HTML text or a quoted attribute (a lone surrogate, e.g. from a file
    name that is not UTF-8, shown as its \\udcXX escape rather than failing the write)."""
    return html.escape(value.encode("utf-8", "backslashreplace").decode("utf-8"), quote=True)


# A page's file name: each value from data (model name, problem id) percent-encoded as UTF-8
# except letters, digits, "_", "." and "=" ("-" too in the model's folder; a leading dot is
# encoded), so it has no separator, no "..", no control character, and unquote gives it back.
# One longer than NAME_BYTES keeps its start and ends in "~" and a hash of the whole value
# ("~" never occurs otherwise); NAME_BYTES leaves room for a temporary name beside it.
NAME_BYTES = 180


def encode_name(value: str, keep: str = "_.=") -> str:
    """`value` as a safe file name component (see above); reversible with `decode_name`
    unless it was shortened."""
    safe = re.compile(f"[A-Za-z0-9{re.escape(keep)}]")
    parts = [
        c if safe.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in value
    ]
    if parts[:1] == ["."]:
        parts[0] = "%2E"
    if sum(map(len, parts)) <= NAME_BYTES:
        return "".join(parts)
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    head, size = [], 0
    for part in parts:  # whole characters only, so the head still decodes
        if size + len(part) > NAME_BYTES - len(digest) - 1:
            break
        head.append(part)
        size += len(part)
    return "".join(head) + "~" + digest


def decode_name(name: str) -> str:
    """The value `encode_name` encoded (not for a shortened one: it ends in ~<hash>)."""
    return unquote(name, errors="surrogatepass")


def page_path(
    run_dir: Path,
    model: str,
    layer: int,
    *,
    problem: str | None = None,
    sample: int = 0,
    top: int = 0,
) -> Path:
    """runs/<id>/inspect/<model>/L<layer>-<problem>-s<sample>.html (or
    L<layer>-top<N>-fragile.html), names encoded by `encode_name`. Its folder, resolved, is
    checked to lie inside the run's inspect/ folder (the page itself may be a link planted at
    its name: the write replaces that link, it never follows it)."""
    which = f"top{top}-fragile" if problem is None else f"{encode_name(problem)}-s{sample}"
    folder = run_dir / "inspect"
    path = folder / encode_name(model, keep="_.=-") / f"L{layer}-{which}.html"
    if not path.parent.resolve().is_relative_to(run_dir.resolve() / "inspect"):
        raise ValueError(f"page path {path} would leave {folder}")
    return path


def write_file(path: Path, text: str) -> None:
    """The page's one write: whole or not at all, never through a link (workers.atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def write_page(
    path: str | Path,
    tokens: pl.DataFrame,
    runs: pl.DataFrame,
    *,
    title: str,
    subtitle: str,
    cfg: AnalysisConfig,
) -> Path:
    """One self-contained HTML file (temp file, then rename)."""
    trajectories = []
    for run in runs.iter_rows(named=True):
        own = tokens.filter(
            (pl.col("problem_id") == run["problem_id"])
            & (pl.col("sample_idx") == run["sample_idx"])
        )
        counts = own["bin"].value_counts().sort("bin")
        trajectories.append(
            {
                "problem_id": run["problem_id"],
                "sample_idx": run["sample_idx"],
                "dataset": run["dataset"],
                "verified": run["verified"],
                "extracted_answer": run["extracted_answer"],
                "gold_answer": run["gold_answer"],
                "prompt_len": run["prompt_len"],
                "pieces": run["pieces"],
                "counts": ", ".join(f"{b} {n}" for b, n in counts.rows()) + " scored tokens",
                "tokens": own.to_dicts(),
            }
        )
    data = {"margin": cfg.margin, "trajectories": trajectories}
    page = fill(
        PAGE,
        {"TITLE": html_text(title), "SUBTITLE": html_text(subtitle), "DATA": script_json(data)},
    )
    path = Path(path)
    write_file(path, page)
    return path


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.inspect",
        description="Write one self-contained HTML page that shows tokens and their routes.",
    )
    parser.add_argument("run_dir", type=Path, help="runs/<run_id>")
    parser.add_argument("--model", required=True)
    parser.add_argument("--layer", required=True, help="decoder index, or early/middle/final")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--problem", help="problem_id of the trajectory")
    which.add_argument("--top-fragile", type=int, metavar="N", help="N most fragile trajectories")
    parser.add_argument("--sample", type=int, default=0, help="sample_idx (with --problem)")
    parser.add_argument("--alternatives", type=int, default=5, help="best alternatives shown")
    parser.add_argument("--out", type=Path, help="default: <run>/inspect/<model>/L<layer>-....html")
    args = parser.parse_args(argv)
    try:
        if not args.run_dir.is_dir():
            raise FileNotFoundError(f"run directory {args.run_dir} does not exist")
        if args.top_fragile is not None and args.top_fragile < 1:
            raise ValueError("--top-fragile must be >= 1")
        run_config = load_run_config(args.run_dir)
        cfg = AnalysisConfig(**((run_config or {}).get("analysis") or {}))
        layer = resolve_layer_arg(args.layer, args.model, run_config)
        paths = _score_paths(args.run_dir, args.model, layer)
        cfg = resolve_margin(cfg, paths)
        if args.problem is not None:
            wanted = [(args.problem, args.sample)]
        else:
            if not paths:
                raise FileNotFoundError(
                    f"no complete score shards under {args.run_dir}/scores/{args.model}/layer={layer}"
                )
            wanted = top_fragile(paths, cfg, args.top_fragile)
        tokens, runs = token_table(
            args.run_dir,
            args.model,
            layer,
            wanted,
            cfg=cfg,
            alternatives=args.alternatives,
            paths=paths,
        )
        label = layer_labels(run_config).get((args.model, layer), f"L{layer}")
        out = args.out or page_path(
            args.run_dir,
            args.model,
            layer,
            problem=args.problem,
            sample=args.sample,
            top=args.top_fragile or 0,
        )
        write_page(
            out,
            tokens,
            runs,
            title=f"{args.run_dir.name}: {args.model} · {label}",
            subtitle=(
                f"{len(runs)} trajectories, {tokens.height:,} scored tokens; bins: confident "
                f"pbar ≥ {cfg.confident}, fragile < {cfg.fragile}; win margin {cfg.margin:g}"
            ),
            cfg=cfg,
        )
    except (OSError, ValueError) as err:  # OSError: FileNotFoundError, or the page's write
        # A problem id or file name in the message may hold line breaks or terminal escapes.
        print(f"error: {_CONTROL.sub(lambda m: ascii(m.group())[1:-1], str(err))}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
