"""The run's settings in one line of a report, from ``run.json`` (every option that changes the
numbers: selection and its per-method options, the RND control, the bootstrap, the
intervention)."""

from __future__ import annotations

from culture_neurons.report.files import RunFiles


def settings_line(run: RunFiles) -> str:
    """``name = value; ...`` of every recorded option (``not recorded`` without run.json)."""
    cfg, st = run.config, run.stats
    if not cfg:
        return "not recorded (no run.json)"
    per = "per layer" if cfg.get("per_layer") else "ranked across all layers"
    draws = cfg.get("rnd_draws")
    intervention = cfg.get("intervention", "ablate")
    items = [
        ("methods", ", ".join(cfg.get("methods", []))),
        ("ratio (cas, lap, mad)", f"{100 * cfg['ratio']:g}% of all neurons per culture ({per})"
         if "ratio" in cfg else "n/a"),
        ("cas normalize", cfg.get("cas_normalize")),
        ("mad contrast", cfg.get("mad_contrast")),
        ("lape top_rate / filter_rate / bar_ratio",
         " / ".join(str(cfg.get(k)) for k in ("lape_top_rate", "lape_filter_rate",
                                              "lape_bar_ratio"))),
        ("RND control", f"{draws} draws per method, size-matched to its own sets"
         if draws else "none"),
        ("bootstrap", f"{cfg.get('resamples')} resamples of the evaluation items"),
        ("intervention", "ablate (a := 0)" if intervention == "ablate"
         else f"steer (a := (1 + alpha) a, alpha = {cfg.get('alpha')})"),
        ("matrix", {"exact": "exact (one prefill per condition)",
                    "estimate": "estimate (first order, every cell)",
                    "screen": f"screen (estimate; diagonal + {cfg.get('screen_budget')} most "
                    "affected cells per mask exact, more where the estimate drifts or a "
                    "conclusion depends on it)",
                    "sample": f"sample (exact; off-diagonal cells on a {cfg.get('sample_share')} "
                    "share of each culture's items)"}.get(cfg.get("matrix", "exact"))),
        ("activation", cfg.get("activation", st.get("activation"))),
        ("scope", cfg.get("scope", st.get("scope"))),
        ("identified on", {"correct": "items the full model answers correctly",
                           "all": "all items"}.get(cfg.get("identify_on"), cfg.get("identify_on"))),
        ("identification share", cfg.get("split_ratio")),
        ("scoring", cfg.get("scoring")),
        ("seed", cfg.get("seed")),
    ]  # fmt: skip
    return "; ".join(f"{k} = {v}" for k, v in items if v is not None)


def tokens_line(run: RunFiles) -> str | None:
    """Image and prompt tokens per item of the evaluation and identification items, and the
    image-token budget (``eval/full.json``'s ``input_tokens``); None for runs from before it."""
    tokens = run.full.get("input_tokens")
    if not tokens:
        return None
    budget = tokens.get("budget") or {}
    parts = []
    for split in ("identification", "evaluation"):
        t = tokens.get(split) or {}
        if not t.get("items"):
            continue
        text = f"{split}: {t['prompt_mean']:.0f} prompt tokens per item (max {t['prompt_max']})"
        if t.get("image_mean") is not None:
            text += (f", of them {t['image_mean']:.0f} image tokens (max {t['image_max']}; "
                     f"{100 * t['image_share']:.0f} % of all prompt tokens)")  # fmt: skip
        parts.append(text)
    limit = budget.get("max_image_tokens")
    how = f"at most {limit} image tokens per image ({budget.get('how')})" if limit else \
        "the processor's default image size (no --max-image-tokens)"  # fmt: skip
    return "; ".join(parts) + f". Budget: {how}."
