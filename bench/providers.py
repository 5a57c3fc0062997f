"""What bench/gpu_check.py times and checks against: batches, models and named providers.

A provider is ``setup() -> run`` (untimed: attach, allocate), ``run()`` timed, ``cleanup()``
untimed. Families: ``model_providers`` (a Qwen2-shaped stack through the package's backends),
``op_providers`` (the fused op alone per layer), ``MLP_PROVIDERS`` (one or many ``Qwen2MLP``s:
plain, a hand-written hook, the fused op, the masked GEMM) and ``sweep_providers`` (the kernel
alone over candidate tiles).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from shapes import DecoderShape

import culture_neurons as cn
from culture_neurons.kernels import LayerOp, act_and_record


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def batch_ids(R: int, C: int, num_sets: int, gen: torch.Generator, item_len=(1, 10)):
    """Per-row culture and ablation-set ids in runs, like items of a batch: [R] int32 each.

    ~10% of runs are -1 (padding / out of scope) for cultures; sets are -1 or 0..num_sets-1.
    """
    cultures, sets = [], []
    while len(cultures) < R:
        run = int(torch.randint(item_len[0], item_len[1], (1,), generator=gen))
        c = int(torch.randint(0, C, (1,), generator=gen))
        if float(torch.rand(1, generator=gen)) < 0.1:
            c = -1
        cultures += [c] * run
        sets += [int(torch.randint(-1, num_sets, (1,), generator=gen))] * run
    return torch.tensor(cultures[:R], dtype=torch.int32), torch.tensor(sets[:R], dtype=torch.int32)


def zeros_stats(C: int, N: int, dev, L: int | None = None):
    shape = (C, N) if L is None else (L, C, N)
    return (torch.zeros(shape, dtype=torch.int64, device=dev),
            torch.zeros(shape, dtype=torch.float64, device=dev),
            torch.zeros(shape, dtype=torch.float64, device=dev))  # fmt: skip


class Provider:
    """``setup() -> run`` (untimed: attach, allocate), ``run()`` timed, ``cleanup()`` untimed."""

    def __init__(self, setup, cleanup=None):
        self.setup, self.cleanup = setup, cleanup or (lambda: None)


def build_model(shape: DecoderShape, dev, dtype):
    """A random-weight Qwen2ForCausalLM of ``shape`` built on the device in ``dtype``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                      hidden_act=shape.act_fn, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16: no fp32 copy of 7B weights on the way
    try:
        with torch.device(dev):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.to(dev, dtype).eval()


def model_masks(model, num_sets: int = 4, share: float = 0.005):
    """``num_sets`` random sets of ``share`` of all L x N neurons (0.5 %: the paper's ratio)."""
    from culture_neurons.masks import Masks
    from culture_neurons.models import adapters

    fp = adapters.fingerprint(model)
    total = fp.num_layers * fp.num_neurons
    gen = torch.Generator().manual_seed(1)
    sets = [torch.randperm(total, generator=gen)[: max(1, int(share * total))]
            for _ in range(num_sets)]  # fmt: skip
    return Masks.from_sets([f"s{i}" for i in range(num_sets)], sets, fp, method="gpu_check")


def model_providers(model, inputs: dict, cultures: list[str], masks, kinds) -> dict:
    """Providers through the package's real backends; each attaches before and detaches after
    its timed forward (attach is not timed; set_batch and every per-forward cost are)."""
    B = inputs["input_ids"].shape[0]
    culture = [i % len(cultures) for i in range(B)]
    set_ids = [i % (len(masks) + 1) - 1 for i in range(B)]  # -1 (none) and every set
    held = {}

    def plain():
        return lambda: model(**inputs)

    def recorder(backend):
        def setup():
            held["inst"] = cn.record(model, cultures, backend=backend)
            return lambda: held["inst"](culture, **inputs)

        return Provider(setup, lambda: held.pop("inst").detach() if "inst" in held else None)

    def ablator(backend):
        def setup():
            held["inst"] = cn.ablate(model, masks, backend=backend)
            return lambda: held["inst"](set_ids=set_ids, **inputs)

        return Provider(setup, lambda: held.pop("inst").detach() if "inst" in held else None)

    table = {"plain": Provider(plain), "hooks_record": recorder("hooks"),
             "fused_record": recorder("fused"), "hooks_ablate": ablator("hooks"),
             "fused_ablate": ablator("fused")}  # fmt: skip
    return {k: table[k] for k in kinds}


def op_providers(shape: DecoderShape, dev, dtype, R: int) -> dict:
    """The fused op alone, once per layer over ``shape.layers`` layers at R rows (ablation):
    what an eager decode step pays per MLP beside its GEMMs."""
    gen = torch.Generator().manual_seed(2)
    N, L = shape.intermediate, shape.layers
    g = torch.randn(R, N, generator=gen).to(dtype).to(dev)
    u = torch.randn(R, N, generator=gen).to(dtype).to(dev)
    keep = (torch.rand(L, 4, N, generator=gen) > 0.005).to(torch.uint8).to(dev)
    set_ids = (torch.arange(R) % 5 - 1).to(torch.int32).to(dev)
    ops = [LayerOp(N, dev, act_fn=shape.act_fn, keep=keep[layer]) for layer in range(L)]

    def op_plain():
        return lambda: [F.silu(g) * u for _ in range(L)]

    def op_layer():
        return lambda: [op(g, u, None, set_ids) for op in ops]

    def op_face():
        return lambda: [act_and_record(g, u, act_fn=shape.act_fn, keep=keep[layer],
                                       set_ids=set_ids) for layer in range(L)]  # fmt: skip

    return {"op_plain": Provider(op_plain), "op_layer": Provider(op_layer),
            "op_face": Provider(op_face)}  # fmt: skip


def build_mlps(shape: DecoderShape, layers: int, dev, dtype):
    """``layers`` random-weight transformers ``Qwen2MLP``s (initialised on the device: fast)."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    cfg = Qwen2Config(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      hidden_act=shape.act_fn, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4)  # divide any hidden size
    torch.manual_seed(0)
    with torch.device(dev):
        return [Qwen2MLP(cfg).to(dtype).eval() for _ in range(layers)]


class MlpEnv:
    """What every MLP provider gets: the MLPs, one batch and per-layer accumulators."""

    def __init__(self, shape, mlps, R: int, dev, dtype):
        gen = torch.Generator().manual_seed(R)
        self.shape, self.mlps = shape, mlps
        self.x = torch.randn(R, shape.hidden, generator=gen).to(dtype).to(dev)
        # Items of 50..400 tokens, as CVQA prompts with an image; 4 ablation sets.
        culture, set_ids = batch_ids(R, shape.cultures, 4, gen, item_len=(50, 400))
        self.culture, self.set_ids = culture.to(dev), set_ids.to(dev)
        self.keep = (torch.rand(4, shape.intermediate, generator=gen) > 0.005).to(dev)
        # [L, C, N]: K[l] is the contiguous [C, N] total the op adds into.
        self.K, self.S, self.Q = zeros_stats(shape.cultures, shape.intermediate, dev, len(mlps))

    def zero_stats(self):
        self.K.zero_()
        self.S.zero_()
        self.Q.zero_()


def _no_cleanup():
    return None


def mlp_plain(env: MlpEnv):
    """transformers' Qwen2MLP as is."""

    def run():
        for mlp in env.mlps:
            y = mlp(env.x)
        return y

    return run, _no_cleanup


def mlp_hooks(env: MlpEnv):
    """What people write by hand: a forward hook on act_fn reducing K/S/Q with index_add_."""
    counted = (env.culture >= 0).nonzero().squeeze(1)
    culture = env.culture[counted].long()
    N = env.shape.intermediate
    handles = []
    for layer, mlp in enumerate(env.mlps):

        def hook(module, inputs, out, layer=layer):
            a = out.reshape(-1, N)[counted].float()
            env.K[layer].index_add_(0, culture, (a > 0).long())
            env.S[layer].index_add_(0, culture, a.double())
            env.Q[layer].index_add_(0, culture, (a * a).double())

        handles.append(mlp.act_fn.register_forward_hook(hook))
    run, _ = mlp_plain(env)
    return run, lambda: [h.remove() for h in handles]


def _fused_stack(env: MlpEnv, record: bool, ablate: bool):
    """Every MLP as gate/up linears + act_and_record + down_proj: ``run() -> y``."""
    op = dict(act_fn=env.shape.act_fn, activation="gate")
    if ablate:
        op.update(keep=env.keep, set_ids=env.set_ids)

    def run():
        for layer, mlp in enumerate(env.mlps):
            g, u = mlp.gate_proj(env.x), mlp.up_proj(env.x)
            stats = dict(culture=env.culture, K=env.K[layer], S=env.S[layer],
                         Q=env.Q[layer]) if record else {}  # fmt: skip
            y = mlp.down_proj(act_and_record(g, u, **op, **stats))
        return y

    return run


def mlp_fused_record(env: MlpEnv):
    """gate/up linears + act_and_record (statistics) + down_proj."""
    return _fused_stack(env, record=True, ablate=False), _no_cleanup


def mlp_fused_ablate(env: MlpEnv):
    """gate/up linears + act_and_record (mask only, no statistics) + cuBLAS down_proj."""
    return _fused_stack(env, record=False, ablate=True), _no_cleanup


def mlp_masked_gemm(env: MlpEnv):
    """gate/up linears + act_and_record (plain act * u) + masked_down_proj (mask in the GEMM)."""
    from masked_down import masked_down_proj  # bench/

    def run():
        for mlp in env.mlps:
            g, u = mlp.gate_proj(env.x), mlp.up_proj(env.x)
            h = act_and_record(g, u, act_fn=env.shape.act_fn)
            y = masked_down_proj(h, mlp.down_proj.weight, env.keep, env.set_ids)
        return y

    return run, _no_cleanup


MLP_PROVIDERS = {
    "plain": mlp_plain,
    "hooks": mlp_hooks,
    "fused_record": mlp_fused_record,
    "fused_ablate": mlp_fused_ablate,
    "masked_gemm": mlp_masked_gemm,
}


def mlp_provider(env: MlpEnv, make) -> Provider:
    """A provider of one MLP_PROVIDERS entry on ``env`` (its cleanup run after each timing)."""
    held = {}

    def setup():
        run, held["cleanup"] = make(env)
        return run

    return Provider(setup, lambda: held.pop("cleanup", _no_cleanup)())


SWEEP_TILES = [(32, 128, 4), (64, 128, 8), (16, 128, 2), (32, 64, 2), (16, 64, 1), (64, 64, 4),
               (32, 256, 8), (128, 128, 8)]  # fmt: skip


def sweep_providers(dev, dtype, R: int, N: int, C: int) -> dict:
    """The fused kernel alone at ``R x N`` over :data:`SWEEP_TILES`, against eager
    ``silu(g) * u``; also a one-culture batch with the kernel's search vs the host naming it."""
    from culture_neurons.kernels.act_record import act_and_record_triton

    gen = torch.Generator().manual_seed(0)
    g = (torch.randn(R, N, generator=gen) * 2).to(dtype).to(dev)
    u = torch.randn(R, N, generator=gen).to(dtype).to(dev)
    rc, rs = batch_ids(R, C, 4, gen, item_len=(50, 400))
    rc, rs = rc.to(dev), rs.to(dev)
    one = torch.where(rc >= 0, 7, -1).to(torch.int32)
    keep = (torch.rand(4, N, generator=gen) > 0.005).to(dev)
    K, S, Q = zeros_stats(C, N, dev)
    args = (g, u, rc, K, S, Q, keep, rs, "silu", "gate")
    providers = {
        "plain": Provider(lambda: lambda: F.silu(g) * u),
        "no record, no ablation": Provider(lambda: lambda: act_and_record_triton(*args, False,
                                                                                 False)),
        "ablation only": Provider(lambda: lambda: act_and_record_triton(*args, False, True)),
        "one culture, searched": Provider(lambda: lambda: act_and_record_triton(
            g, u, one, K, S, Q, keep, rs, "silu", "gate", True, False)),
        "one culture, host-known": Provider(lambda: lambda: act_and_record_triton(
            g, u, one, K, S, Q, keep, rs, "silu", "gate", True, False, one_culture=7)),
    }  # fmt: skip
    for br, bn, w in SWEEP_TILES:
        providers[f"record {br}x{bn}x{w}"] = Provider(
            lambda b=(br, bn, w): lambda: act_and_record_triton(
                *args, True, False, block_r=b[0], block_n=b[1], num_warps=b[2]))
    return providers
