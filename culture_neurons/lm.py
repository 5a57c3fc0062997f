"""The language-modelling task: next-token negative log-likelihood (NLL) of plain sentences.

An item is a sentence (``culture_neurons.data.faker_text.TextItem``: ``id, culture, text``),
tokenized as the model's tokenizer does by default (a BOS token where the model uses one), with
no chat template. Its score under a condition (the full model, or one ablation set) is

    nll_sum[i] = - sum_{t=1}^{T_i - 1} log p(x_t | x_<t)      (nats; T_i = item i's tokens)

and a culture's metric is the token-weighted mean ``sum_i nll_sum[i] / sum_i (T_i - 1)`` in
nats/token, i.e. ``log`` of its perplexity, as LAPE (Tang et al. 2024) measured languages.
The ablation matrices hold ``delta[s][c'] = NLL_ablated - NLL_full``: positive = the ablation
hurt culture c'. So here, unlike multiple-choice accuracy, a *more positive* self and gap mean a
more selective method.

There is no right answer to a sentence, so identification records every identification item
(``identify_on`` does not apply). Batches are right-padded: real tokens keep positions 0..T_i-1,
exactly as in an unpadded forward (models take positions from the cache, not the mask).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from . import adapters
from .errors import DataError, UsageError
from .metrics import nan_to_none, per_culture_mean, self_cross
from .prompting import tokenizer_of

# Token rows per head chunk: the Gemma 3 vocabulary (262144) makes a logit row 1 MiB in fp32,
# so 256 rows keep the transient logits at 256 MiB whatever the batch.
HEAD_CHUNK_ROWS = 256
UNITS = {"nll": "nats/token", "delta": "nats/token (ablated - full; positive = hurt)"}


def check_model(model) -> None:
    """The LM task scores text with a causal LM head; VLM families are not wired for it."""
    adapter = adapters.get_adapter(model)
    if adapter.vlm:
        raise UsageError(
            f"the lm task runs on text-only causal LMs; {adapter.name} is a vision-language "
            "family (use --task mc, or load its text-only checkpoint)"
        )


def encode_text(model, processor, items, device=None) -> dict:
    """A right-padded batch ``{input_ids, attention_mask}`` ``[B, T]`` of the items' texts."""
    tok = tokenizer_of(processor)
    side, tok.padding_side = tok.padding_side, "right"
    restore_pad = tok.pad_token is None
    if restore_pad:  # padding is masked out; any id does
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    try:
        batch = tok([it.text for it in items], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
        if restore_pad:
            tok.pad_token = None
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def target_counts(attention_mask: torch.Tensor) -> torch.Tensor:
    """int64 ``[B]``: predicted tokens per row (every real token but the first)."""
    return (attention_mask.long().sum(dim=1) - 1).clamp(min=0).cpu()


@torch.no_grad()
def nll_sums(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """float64 ``[B]``: each right-padded row's summed next-token NLL (nats).

    The decoder runs once; the LM head (and Gemma's final soft-capping, where configured) runs
    on the real positions only, ``HEAD_CHUNK_ROWS`` at a time, so full ``[B, T, V]`` logits are
    never held.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
    hidden = hidden.last_hidden_state[:, :-1]  # [B, T-1, H] position t predicts token t+1
    valid = attention_mask[:, 1:].bool()  # [B, T-1] right padding: a real target
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    rows = rows[:, None].expand_as(valid)[valid]  # [R] which row each target belongs to
    h, targets = hidden[valid], input_ids[:, 1:][valid]  # [R, H], [R]
    head = model.get_output_embeddings()
    cap = getattr(adapters.text_config(model), "final_logit_softcapping", None)
    out = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=input_ids.device)
    for start in range(0, targets.numel(), HEAD_CHUNK_ROWS):
        part = slice(start, start + HEAD_CHUNK_ROWS)
        logits = head(h[part]).float()  # [r, V]
        if cap:
            logits = torch.tanh(logits / cap) * cap
        nll = F.cross_entropy(logits, targets[part], reduction="none")  # [r]
        out.index_add_(0, rows[part], nll.double())
    return out.cpu()


class LMGroup:
    """B sentences scored under many conditions (an ablation set id, -1 = the full model):
    ``predict(conditions) -> float64 [len(conditions), B]`` summed NLL (nats)."""

    def __init__(self, model, processor, items, *, device=None):
        self.model, self.items = model, list(items)
        device = device if device is not None else next(model.parameters()).device
        self.inputs = encode_text(model, processor, self.items, device=device)

    @property
    def size(self) -> int:
        return len(self.items)

    def predict(self, conditions: list[int], ablator=None) -> torch.Tensor:
        if ablator is None and any(c >= 0 for c in conditions):
            raise UsageError("ablation conditions need an ablator (culture_neurons.ablate)")
        k = len(conditions)
        inputs = {key: v.repeat(k, 1) for key, v in self.inputs.items()}  # [k*B, T]
        set_ids = torch.tensor(conditions, dtype=torch.int32).repeat_interleave(self.size)
        if ablator is not None:
            ablator.set_batch(None, ablate=set_ids, **inputs)
        try:
            sums = nll_sums(self.model, inputs["input_ids"], inputs["attention_mask"])
        finally:
            if ablator is not None:
                ablator.clear_batch()
        return sums.view(k, self.size)


def culture_nll(sums: torch.Tensor, tokens: torch.Tensor, culture: torch.Tensor,
                C: int) -> torch.Tensor:  # fmt: skip
    """Token-weighted mean NLL per culture, nats/token: ``sums`` ``[..., n]`` summed NLL of
    each item, ``tokens`` int64 ``[n]`` its predicted tokens, ``culture`` ``[n]`` -> ``[..., C]``
    (NaN for a culture without items)."""
    # ratio of per-culture means = ratio of per-culture sums (the item counts cancel)
    return per_culture_mean(sums, culture, C) / per_culture_mean(tokens.double(), culture, C)


def nll_matrices(full: torch.Tensor, sums: torch.Tensor, tokens: torch.Tensor,
                 culture: torch.Tensor, C: int) -> dict:  # fmt: skip
    """``nll_full`` [C] and ``nll`` / ``delta`` [S, C] in nats/token from summed NLL ``full``
    [n] (the full model) and ``sums`` [S, n] (row s under ablation set s)."""
    nll_full = culture_nll(full, tokens, culture, C)
    nll = culture_nll(sums, tokens, culture, C)
    return {"nll_full": nll_full, "nll": nll, "delta": nll - nll_full}


def method_result(name: str, masks, sums, full, tokens, culture, cultures: list[str]) -> dict:
    """The ``eval/<method>.json`` of the LM task (``self``/``cross``/``gap`` of ``delta``)."""
    C = len(cultures)
    m = nll_matrices(full, sums, tokens, culture, C)
    res = {
        "method": name,
        "task": "lm",
        "cultures": cultures,
        "labels_available": False,  # sentences have no answer key: no accuracy, no flips
        "units": UNITS,
        "items_per_culture": torch.bincount(culture, minlength=C).tolist(),
        "tokens_per_culture": per_culture_sum(tokens, culture, C),
        "set_sizes": masks.sizes().tolist(),
        "layer_counts": masks.layer_counts().tolist(),
        "accuracy_full": None,
        "accuracy": None,
        "flip": None,
    }
    for key in ("nll_full", "nll", "delta"):
        res[key] = nan_to_none(m[key].tolist())
    res.update(self_cross(m["delta"]))
    return res


def per_culture_sum(values: torch.Tensor, culture: torch.Tensor, C: int) -> list[int]:
    """int per culture: the sum of ``values`` ``[n]`` over its items."""
    return torch.zeros(C, dtype=torch.int64).index_add_(0, culture, values.long()).tolist()


# -- report.md of an lm run ----------------------------------------------------------------------
REPORT_FILE = "report.md"


def write_report(out_dir, description: str = "") -> Path:
    """``OUT/report.md`` of an lm run: full-model NLL, per-method self/cross/gap of the NLL
    change (most selective = largest gap first, against RND's mean +- sd), layer counts and
    every delta matrix. (report.write_report reads accuracy and flip matrices, which an lm run
    does not have.)"""
    out = Path(out_dir)
    evals = {p.stem: json.loads(p.read_text(encoding="utf-8"))
             for p in sorted((out / "eval").glob("*.json")) if p.stem != "full"}  # fmt: skip
    if not evals:
        raise DataError(f"{out}/eval holds no results yet; run `culture-neurons evaluate` first")
    meta = _read(out / "run.json")
    stats = _read(out / "stats.json")
    rnd = evals.pop("rnd", None)
    first = next(iter(evals.values()))
    cultures = first["cultures"]
    lines = ["# Culture-sensitive neurons: ablation report (language modelling)", "",
             "## What was run", "", description.strip() or "(no description given)", ""]  # fmt: skip
    fp, cfg = stats.get("fingerprint") or meta.get("fingerprint") or {}, meta.get("config", {})
    if fp:
        lines.append(f"- **Model**: `{fp.get('model_type')}`, {fp.get('num_layers')} decoder "
                     f"layers x {fp.get('num_neurons')} MLP neurons")  # fmt: skip
    lines += [
        f"- **Data**: {meta.get('data', '')}; {len(cultures)} cultures; evaluation sentences "
        f"per culture {first['items_per_culture']}, predicted tokens {first['tokens_per_culture']}",
        f"- **Identification**: every identification sentence ({stats.get('items_counted')} "
        "counted; a sentence has no right answer, so `identify_on` does not apply)",
        f"- **Selection**: ratio {cfg.get('ratio')}, activation `{cfg.get('activation')}`, scope "
        f"`{cfg.get('scope')}`, RND: {cfg.get('rnd_draws')} draws size-matched to "
        f"`{cfg.get('rnd_like')}`",
        "- **Metric**: mean next-token NLL per culture (nats/token, token-weighted); "
        "`delta[s][c'] = NLL_ablated - NLL_full` with row s the culture whose neurons were "
        "ablated: **positive = the ablation hurt**. self = mean diagonal, cross = mean "
        "off-diagonal, gap = self - cross: **a larger (more positive) gap = more selective**.",
        "", "## Full model", "",
    ]  # fmt: skip
    rows = [[c, _f(x, sign=False), _f(math.exp(x) if x is not None else None, 2, sign=False)]
            for c, x in zip(cultures, first["nll_full"], strict=True)]  # fmt: skip
    lines += _md_table(["culture", "NLL (nats/token)", "perplexity"], rows) + ["", "## Summary", ""]
    ranked = sorted(evals, key=lambda m: -_num(evals[m]["gap"]))
    rows = [[m, _f(evals[m]["self"]), _f(evals[m]["cross"]), _f(evals[m]["gap"]),
             _vs_rnd(evals[m]["gap"], rnd)] for m in ranked]  # fmt: skip
    if rnd is not None:
        rows.append([f"rnd ({len(rnd.get('draws', []))} draws)", _pm(rnd, "self"),
                     _pm(rnd, "cross"), _pm(rnd, "gap"), ""])  # fmt: skip
    lines += _md_table(["method", "self", "cross", "gap", "gap above RND + 2 sd"], rows)
    lines += ["", "## Selected neurons per layer (summed over cultures)", ""]
    layer_rows = {**evals, **({"rnd (mean)": rnd} if rnd else {})}
    L = len(first["layer_counts"][0]) if first["layer_counts"] else 0
    rows = [[m, *(f"{x:g}" for x in _layer_totals(ev["layer_counts"]))]
            for m, ev in layer_rows.items()]  # fmt: skip
    lines += _md_table(["method", *(f"L{i}" for i in range(L))], rows)
    for m, ev in {**evals, **({"rnd": rnd} if rnd else {})}.items():
        lines += ["", f"## {m}: NLL change (nats/token; row = ablated culture)", ""]
        lines += _md_table(["ablated \\ evaluated", *cultures],
                           [[c, *(_f(x) for x in row)]
                            for c, row in zip(cultures, ev["delta"], strict=True)])  # fmt: skip
    path = out / REPORT_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _f(x, decimals: int = 4, sign: bool = True) -> str:
    """A number for the report, signed by default (deltas); ``n/a`` when undefined."""
    if x is None or x != x:
        return "n/a"
    return f"{x:+.{decimals}f}" if sign else f"{x:.{decimals}f}"


def _pm(res: dict, key: str) -> str:
    return f"{_f(res.get(key))} +- {_num(res.get(key + '_sd')):.4f}"


def _vs_rnd(gap, rnd: dict | None) -> str:
    if rnd is None or gap is None or rnd.get("gap") is None:
        return "n/a"
    return "yes" if gap > rnd["gap"] + 2 * _num(rnd.get("gap_sd")) else "no"


def _layer_totals(counts) -> list[float]:
    return torch.tensor(counts, dtype=torch.float64).sum(0).tolist() if counts else []


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return [line(header), line([":---"] + ["---:"] * (len(header) - 1))] + [line(r) for r in rows]
