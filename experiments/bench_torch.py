"""Stage-B training step: ours (``steps.make_pair_train_step``, jitted) vs plain PyTorch eager.

The same step on the same CPU with the same thread count: the default student (``cnn``: 4
convs 16/32/64/64, BatchNorm frozen, 8-bit per-channel weight fake-quant, per-example
activation fake-quant at its 4 sites), batch 64 with the P = 8 quantized passes on the first
32 inputs (configs/fmnist_pair.py), robust KD loss with temperature 4, the policy network
(convs 8/16, stride 2) sampling budget-exact allocations (masked autoregressive Gumbel-max),
the KL reward, REINFORCE with a leave-one-out baseline and an entropy bonus, AdamW/Adam
updates. PyTorch folds the P policies into the batch (activations are quantized per example,
so that is exact), which is what one would write by hand.

Before timing, the PyTorch network is loaded with our weights and both compute the FP and
quantized logits of the same inputs at the same bits; their difference is reported, so the
two sides demonstrably compute the same function.

Both run at the core count (``torch.set_num_threads``, XLA's default) and, in the full run,
also single-threaded in a fresh process (robust to background load, which stalls PyTorch's
OpenMP threads far more than XLA's); the reported ratio is the worse of the two. A profile
splits our step into forward/backward pieces and times each convolution of the student in
XLA:CPU and in PyTorch (oneDNN), forward and forward+backward.

Needs the ``bench`` extra (``pip install -e '.[bench]'``: torch 2.13 CPU); without torch the
bench reports ``skipped``.

  python experiments/bench_torch.py [--quick]
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from typing import Any

import bench_lib  # noqa: I001  (sets sys.path to the repository)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ptq_adversary import backend, models, policy, steps

NAME = "stage-B step vs PyTorch eager"
GOAL = "ours >= 1.5x the steps/s of the same step in PyTorch eager (same CPU and threads)"

BATCH, QUANT_BATCH, NUM_SAMPLES = 64, 32, 8
CHOICES, BUDGET = (2, 3, 4, 5, 6, 8), 4.0
TEMPERATURE, ENTROPY_COEF, QUANT_WEIGHT = 4.0, 0.01, 1.0


# ------------------------------------------------------------------------------ PyTorch side
def _torch_modules(torch, budget: policy.Budget):
    """The PyTorch student, policy net and step (closures over ``torch``)."""
    F = torch.nn.functional
    choices_t = torch.tensor(budget.choices, dtype=torch.long)
    reachable_t = torch.from_numpy(np.array(budget.reachable))
    num_sites, width = budget.num_sites, budget.reachable.shape[1]

    def fake_quant_act(x, bits):
        """Per-example asymmetric min/max fake-quant with STE; bits int [B]."""
        flat = x.detach().flatten(1)
        lo = flat.amin(1).clamp(max=0.0)
        hi = flat.amax(1).clamp(min=0.0)
        n = (2.0 ** bits.to(x.dtype)) - 1.0
        scale = (hi - lo) / n
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        zero = torch.round(-lo * inv)
        shape = (-1,) + (1,) * (x.dim() - 1)
        s, z, inv, n = scale.view(shape), zero.view(shape), inv.view(shape), n.view(shape)
        q = torch.clamp(torch.round(x.detach() * inv) + z, min=torch.zeros_like(n), max=n)
        x_hat = torch.where(s > 0, s * (q - z), x.detach())
        return x + (x_hat - x).detach()

    def fake_quant_weight(w, bits=8):
        """Symmetric per-output-channel (axis 0) fake-quant, restricted range, STE."""
        qmax = 2 ** (bits - 1) - 1
        scale = w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -qmax, qmax)

    class Student(torch.nn.Module):
        def __init__(self, widths=(16, 32, 64, 64), strides=(1, 2, 2, 1), num_classes=10):
            super().__init__()
            c_in = 1
            self.convs = torch.nn.ModuleList()
            self.bns = torch.nn.ModuleList()
            self.strides = strides
            for c_out in widths:
                self.convs.append(torch.nn.Conv2d(c_in, c_out, 3, bias=False))
                self.bns.append(torch.nn.BatchNorm2d(c_out, eps=1e-5))
                c_in = c_out
            self.head = torch.nn.Linear(c_in, num_classes)

        def forward(self, x, bits=None):
            # x: [B, 1, H, W]; bits: int [B, L] or None (full precision).
            for i, (conv, bn, s) in enumerate(zip(self.convs, self.bns, self.strides, strict=True)):
                w = conv.weight
                if bits is not None:
                    if i > 0:
                        x = fake_quant_act(x, bits[:, i - 1])
                    w = fake_quant_weight(w)
                x = F.relu(bn(F.conv2d(x, w, stride=s, padding=1)))
            x = x.mean(dim=(2, 3))
            w = self.head.weight
            if bits is not None:
                x = fake_quant_act(x, bits[:, -1])
                w = fake_quant_weight(w)
            return F.linear(x, w, self.head.bias)

    class PolicyNet(torch.nn.Module):
        def __init__(self, widths=(8, 16)):
            super().__init__()
            c_in = 1
            self.convs = torch.nn.ModuleList()
            for c_out in widths:
                self.convs.append(torch.nn.Conv2d(c_in, c_out, 3, stride=2))
                c_in = c_out
            self.head = torch.nn.Linear(c_in, num_sites * len(budget.choices))
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

        def forward(self, x):
            for conv in self.convs:
                x = F.relu(conv(F.pad(x, (0, 1, 0, 1))))  # XLA "SAME" at stride 2
            return self.head(x.mean(dim=(2, 3))).view(x.shape[0], num_sites, -1)

    def allowed(remaining, sites_left):
        rest = remaining[..., None] - choices_t
        rows = torch.clamp(torch.as_tensor(sites_left) - 1, 0, num_sites)[..., None]
        return (rest >= 0) & reachable_t[rows, rest.clamp(0, width - 1)]

    def sample(logits_blk, num_samples, generator):
        """Budget-exact allocations ``bit_idx [P, B, L]`` (masked Gumbel-max, site by site)."""
        b = logits_blk.shape[0]
        u = torch.rand((num_samples, b, num_sites, len(budget.choices)), generator=generator)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        remaining = torch.full((num_samples, b), budget.total, dtype=torch.long)
        idx = []
        for site in range(num_sites):
            ok = allowed(remaining, num_sites - site)
            scores = torch.where(ok, logits_blk[None, :, site] + gumbel[:, :, site], -1e9)
            k = scores.argmax(-1)
            idx.append(k)
            remaining = remaining - choices_t[k]
        return torch.stack(idx, -1)

    def log_prob_entropy(logits_blk, bit_idx):
        """Teacher-forced masked log-prob and path entropy, ``[P, B]`` each."""
        bits = choices_t[bit_idx]
        remaining = budget.total - (torch.cumsum(bits, -1) - bits)
        sites_left = num_sites - torch.arange(num_sites)
        ok = allowed(remaining, sites_left)  # [P, B, L, K]
        masked = torch.where(ok, logits_blk[None], torch.full_like(logits_blk[None], -1e9))
        logp = torch.log_softmax(masked, -1)
        chosen = logp.gather(-1, bit_idx[..., None]).squeeze(-1).sum(-1)
        ent = -(logp.exp() * logp).sum((-1, -2))
        return chosen, ent

    def kd(student, teacher):
        t = TEMPERATURE
        log_p = torch.log_softmax(student / t, -1)
        log_t = torch.log_softmax(teacher / t, -1)
        return t * t * (log_t.exp() * (log_t - log_p)).sum(-1)

    def make_step(net, pol):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
        popt = torch.optim.Adam(pol.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        net.eval()  # BatchNorm on its running statistics (frozen), gradients still flow

        def step(images, teacher_logits):
            qimg = images[:QUANT_BATCH]
            logits_blk = pol(qimg)
            bit_idx = sample(logits_blk.detach(), NUM_SAMPLES, gen)  # [P, Bq, L]
            bits = choices_t[bit_idx].reshape(-1, num_sites)  # [P * Bq, L]
            fp = net(images)
            kd_fp = kd(fp, teacher_logits).mean()
            q = net(qimg.repeat(NUM_SAMPLES, 1, 1, 1), bits).view(NUM_SAMPLES, QUANT_BATCH, -1)
            target = fp[:QUANT_BATCH].detach()
            q_term = kd(q, target[None].expand_as(q)).mean()
            loss = kd_fp + QUANT_WEIGHT * q_term
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # Policy: reward = -KL(fp || q) (robust), leave-one-out baseline, entropy bonus.
            with torch.no_grad():
                log_fp = torch.log_softmax(target, -1)
                log_q = torch.log_softmax(q.detach(), -1)
                rewards = -(log_fp.exp() * (log_fp - log_q)).sum(-1)  # [P, Bq]
                baseline = (rewards.sum(0, keepdim=True) - rewards) / (NUM_SAMPLES - 1)
                advantages = rewards - baseline
            logp, ent = log_prob_entropy(logits_blk, bit_idx)
            pol_loss = -(advantages * logp).mean() - ENTROPY_COEF * ent.mean()
            popt.zero_grad(set_to_none=True)
            pol_loss.backward()
            popt.step()
            return loss.detach(), pol_loss.detach()

        return step

    return Student, PolicyNet, make_step


def _copy_student_weights(torch, net, params, rest) -> None:
    """Loads our ``cnn`` student's parameters and BatchNorm statistics into the torch net."""
    p = nnx.to_pure_dict(params)["net"]  # zoo.ConvNet: conv1..conv4, bn1..bn4, head
    r = nnx.to_pure_dict(rest)["net"]
    with torch.no_grad():
        for i, (conv, bn) in enumerate(zip(net.convs, net.bns, strict=True), start=1):
            kernel = np.asarray(p[f"conv{i}"]["kernel"])  # HWIO
            conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            norm_p, norm_r = p[f"bn{i}"], r[f"bn{i}"]
            bn.weight.copy_(torch.from_numpy(np.asarray(norm_p["scale"])))
            bn.bias.copy_(torch.from_numpy(np.asarray(norm_p["bias"])))
            bn.running_mean.copy_(torch.from_numpy(np.asarray(norm_r["mean"])))
            bn.running_var.copy_(torch.from_numpy(np.asarray(norm_r["var"])))
        net.head.weight.copy_(torch.from_numpy(np.asarray(p["head"]["kernel"]).T.copy()))
        net.head.bias.copy_(torch.from_numpy(np.asarray(p["head"]["bias"])))


# ------------------------------------------------------------------------------ the bench
def _ours(graphdef, params, rest, budget, chunk=None):
    pol = policy.PolicyNet(
        num_sites=budget.num_sites, num_choices=budget.num_choices, in_channels=1,
        widths=(8, 16), rngs=nnx.Rngs(0),
    )  # fmt: skip
    pol_graphdef, pol_params, pol_rest = nnx.split(pol, nnx.Param, ...)
    optimizer, policy_optimizer = optax.adamw(1e-3, weight_decay=0.0), optax.adam(3e-3)
    state = steps.create_pair_state(
        params, rest, optimizer, pol_params, pol_rest, policy_optimizer, 0
    )
    step = steps.make_pair_train_step(
        graphdef, pol_graphdef, optimizer, policy_optimizer, budget, mode="robust",
        num_samples=NUM_SAMPLES, temperature=TEMPERATURE, quant_weight=QUANT_WEIGHT, margin=5.0,
        reward="kl", entropy_coef=ENTROPY_COEF, quant_batch=QUANT_BATCH, chunk=chunk,
    )  # fmt: skip
    return jax.jit(step, donate_argnums=0), state


def _compare(torch, threads: int, quick: bool, vmap_row: bool = False) -> dict[str, Any]:
    """Both steps on the same data, timed in interleaved rounds at ``threads`` torch threads.

    With ``vmap_row``, also our step with its 8 quantized passes as one vmap instead of the
    library's default chunks (the evidence for ``backend.GRAD_CHUNK_EXAMPLES``).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, graphdef, params, rest = bench_lib.make_cnn()
    budget = policy.Budget(choices=CHOICES, num_sites=model.num_sites, budget=BUDGET)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(BATCH, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, size=BATCH).astype(np.int32)
    teacher = rng.normal(size=(BATCH, 10)).astype(np.float32) * 3

    Student, PolicyNet, make_step = _torch_modules(torch, budget)
    net, pol = Student(), PolicyNet()
    _copy_student_weights(torch, net, params, rest)
    net.eval()

    # Same function: FP and quantized logits at the same bits, our weights in both.
    bits = np.asarray(bench_lib.random_bits(jax.random.PRNGKey(3), (BATCH, model.num_sites)))
    ours_fp, _ = models.apply_model(graphdef, params, rest, images)
    ours_q, _ = models.apply_model(graphdef, params, rest, images, bits)
    x_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        t_fp = net(x_t).numpy()
        t_q = net(x_t, torch.from_numpy(bits).long()).numpy()

    jax_step, state = _ours(graphdef, params, rest, budget)
    torch_step = make_step(net, pol)
    batch = tuple(jnp.asarray(a) for a in (images, labels, teacher))
    tb = (x_t, torch.from_numpy(teacher))
    holder = {"state": state}

    def ours_once():
        holder["state"], metrics = jax_step(holder["state"], *batch)
        return metrics["loss"]

    t0 = time.perf_counter()
    jax.block_until_ready(ours_once())
    compile_s = time.perf_counter() - t0
    candidates = {"ours": ours_once, "torch": lambda: torch_step(*tb)}
    out: dict[str, Any] = {}
    if vmap_row:
        _, g2, p2, r2 = bench_lib.make_cnn()  # fresh buffers: the other state is donated
        vmap_step, vmap_state = _ours(g2, p2, r2, budget, chunk=NUM_SAMPLES)
        holder["vmap"] = vmap_state

        def vmap_once():
            holder["vmap"], metrics = vmap_step(holder["vmap"], *batch)
            return metrics["loss"]

        t0 = time.perf_counter()
        jax.block_until_ready(vmap_once())
        out["vmap_compile_s"] = time.perf_counter() - t0
        candidates["vmap"] = vmap_once
    torch_step(*tb)  # warm-up (oneDNN primitive caches)
    rounds, per_round = (2, 3) if quick else (3, 3)
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):  # interleaved, so load changes hit every candidate alike
        for name, fn in candidates.items():
            times[name].append(bench_lib.time_fn(fn, warmup=1, repeats=per_round)["median_s"])
    if vmap_row:
        out["vmap_s"] = float(np.median(times["vmap"]))
    return {
        **out, "threads": threads, "ours_s": float(np.median(times["ours"])),
        "torch_s": float(np.median(times["torch"])), "compile_s": compile_s,
        "fp_diff": float(np.max(np.abs(t_fp - np.asarray(ours_fp)))),
        "q_diff": float(np.max(np.abs(t_q - np.asarray(ours_q)))),
        "logit_scale": float(np.max(np.abs(np.asarray(ours_fp)))),
    }  # fmt: skip


SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _single_thread(quick: bool) -> dict[str, Any] | None:
    """:func:`_compare` with one thread on both sides, in a fresh process (XLA flags)."""
    env = {**os.environ, "XLA_FLAGS": SINGLE_THREAD_XLA}
    proc = subprocess.run(
        [sys.executable, __file__, "--single-thread-child"] + (["--quick"] if quick else []),
        capture_output=True, text=True, env=env, timeout=400,
    )  # fmt: skip
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def run(quick: bool = False) -> dict[str, Any]:
    """Steps per second of both implementations at the core count (the goal) and at 1 thread."""
    result: dict[str, Any] = {
        "name": NAME, "goal": GOAL,
        "metric": "ours / torch steps/s (worse of core-count and 1 thread)",
    }  # fmt: skip
    try:
        import torch
    except ImportError:
        return {**result, "ratio": None, "met": None, "rows": [{"status": "skipped"}],
                "notes": ["torch is not installed (pip install -e '.[bench]')"]}  # fmt: skip
    version = torch.__version__
    runs = [_compare(torch, bench_lib.cpu_count(), quick, vmap_row=not quick)]
    if not quick:
        single = _single_thread(quick)
        if single is not None:
            runs.append(single)
    rows = []
    for r in runs:
        rows.append(
            {
                "threads": r["threads"],
                "impl": "ours (JAX, jit)",
                "ms/step": 1e3 * r["ours_s"],
                "steps/s": 1 / r["ours_s"],
                "compile s": r["compile_s"],
                "ours / torch steps/s": r["torch_s"] / r["ours_s"],
            }
        )
        if "vmap_s" in r:
            rows.append({"threads": r["threads"],
                         "impl": "ours, the 8 quantized passes as one vmap (not the default)",
                         "ms/step": 1e3 * r["vmap_s"], "steps/s": 1 / r["vmap_s"],
                         "compile s": r["vmap_compile_s"],
                         "ours / torch steps/s": r["torch_s"] / r["vmap_s"]})  # fmt: skip
        rows.append({"threads": r["threads"], "impl": f"PyTorch {version} eager",
                     "ms/step": 1e3 * r["torch_s"], "steps/s": 1 / r["torch_s"],
                     "compile s": 0.0})  # fmt: skip
    main = runs[0]
    ratios = [r["torch_s"] / r["ours_s"] for r in runs]
    ratio = min(ratios)  # the worse of the core-count and the 1-thread comparison
    notes = [
        f"same function: max |logit diff| FP {main['fp_diff']:.2e}, quantized "
        f"{main['q_diff']:.2e} (logit scale {main['logit_scale']:.2f}; rounding-boundary flips "
        "of single activation codes explain quantized differences)",
        "ratio = the worse of the core-count and the 1-thread comparison. The 1-thread rows "
        f"(fresh process, XLA flags `{SINGLE_THREAD_XLA}`) are robust to background load, "
        "which stalls PyTorch's multi-threaded (OpenMP) steps far more than XLA's: with one "
        "other busy process, 2-thread PyTorch steps take several times its 1-thread time",
    ]
    out = {**result, "ratio": ratio, "met": ratio >= 1.5, "rows": rows, "notes": notes}
    out["profile"] = _profile(quick)
    out[f"conv_profile_{main['threads']}_threads"] = _conv_profile(torch, quick, main["threads"])
    for r in runs[1:]:
        out["conv_profile_1_thread"] = r["conv_profile"]
    return out


def _conv_profile(torch, quick: bool, threads: int) -> list[dict[str, Any]]:
    """Each conv of the student at the quantized passes' batch (256): XLA:CPU vs oneDNN."""
    from jax import lax

    F = torch.nn.functional
    batch = 64 if quick else NUM_SAMPLES * QUANT_BATCH
    torch.set_num_threads(threads)
    rows = []
    layers = (("conv1", 28, 1, 16, 1), ("conv2", 28, 16, 32, 2), ("conv3", 14, 32, 64, 2),
              ("conv4", 7, 64, 64, 1))  # fmt: skip
    for name, size, c_in, c_out, stride in layers:
        x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, c_in))
        w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c_in, c_out))

        def conv(x, w, stride=stride):
            return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip

        g = jnp.ones_like(conv(x, w))
        fwd = jax.jit(conv)
        both = jax.jit(
            lambda x, w, g, conv=conv: (lambda y, vjp: (y, *vjp(g)))(*jax.vjp(conv, x, w))
        )
        xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_()
        wt = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()).requires_grad_()
        gt = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())

        def t_fwd(stride=stride, xt=xt, wt=wt):
            with torch.no_grad():
                return F.conv2d(xt, wt, stride=stride, padding=1)

        def t_both(stride=stride, xt=xt, wt=wt, gt=gt):
            y = F.conv2d(xt, wt, stride=stride, padding=1)
            return torch.autograd.grad(y, (xt, wt), gt)

        timed = bench_lib.time_interleaved(
            {"jf": lambda f=fwd, x=x, w=w: f(x, w), "jb": lambda f=both, x=x, w=w, g=g: f(x, w, g),
             "tf": t_fwd, "tb": t_both}, rounds=3 if quick else 5, warmup=1,
        )  # fmt: skip
        ms = {k: 1e3 * v["median_s"] for k, v in timed.items()}
        rows.append({"conv": f"{name} {c_in}->{c_out} /{stride} at {size}x{size}, batch {batch}",
                     "XLA fwd ms": ms["jf"], "XLA fwd+bwd ms": ms["jb"],
                     "torch fwd ms": ms["tf"], "torch fwd+bwd ms": ms["tb"],
                     "XLA / torch fwd+bwd": ms["jb"] / ms["tb"]})  # fmt: skip
    return rows


def _profile(quick: bool) -> list[dict[str, Any]]:
    """Where our step's time goes: forward and forward+backward pieces, jitted separately.

    The full run adds the quantized forward+backward of the 8 x 32 policy passes as one vmap,
    as unrolled chunks (4, and the library default) and as chunks of 4 in a ``lax.map`` loop:
    the evidence behind ``map_policies(..., unroll=True)`` and ``GRAD_CHUNK_EXAMPLES``.
    """
    _, graphdef, params, rest = bench_lib.make_cnn()  # the step's were donated
    x = jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, 28, 28, 1)), jnp.float32)
    xq = jnp.tile(x[:QUANT_BATCH], (NUM_SAMPLES, 1, 1, 1))
    bits = bench_lib.random_bits(jax.random.PRNGKey(0), (NUM_SAMPLES * QUANT_BATCH, 4))
    bits_pbl = bits.reshape(NUM_SAMPLES, QUANT_BATCH, 4)

    def fwd(p, x, b=None):
        out = models.apply_model(graphdef, p, rest, x, b, train=True, frozen_bn=True)[0]
        return jnp.sum(out**2)

    def policies(p, chunk, unroll):
        per = lambda b: fwd(p, x[:QUANT_BATCH], b)
        return jnp.sum(steps.map_policies(per, bits_pbl, chunk=chunk, unroll=unroll))

    pieces = {
        "FP forward, 64": (jax.jit(fwd), (params, x)),
        "FP forward+backward, 64": (jax.jit(jax.grad(fwd)), (params, x)),
        "quantized forward, 256": (jax.jit(fwd), (params, xq, bits)),
        "quantized forward+backward, 256": (jax.jit(jax.grad(fwd)), (params, xq, bits)),
    }
    if not quick:
        default = backend.policy_chunk(NUM_SAMPLES, QUANT_BATCH, differentiated=True)
        for name, chunk, unroll in (("one vmap", NUM_SAMPLES, False),
                                    ("unrolled chunks of 4", 4, True),
                                    (f"unrolled chunks of {default} (default)", default, True),
                                    ("lax.map, chunks of 4", 4, False)):  # fmt: skip
            fn = jax.jit(jax.grad(functools.partial(policies, chunk=chunk, unroll=unroll)))
            pieces[f"quantized fwd+bwd, 8 x 32 policy passes, {name}"] = (fn, (params,))
    timed = bench_lib.time_interleaved(
        {name: functools.partial(fn, *args) for name, (fn, args) in pieces.items()},
        rounds=3, warmup=1, budget_s=30.0,
    )  # fmt: skip
    return [{"piece": name, "ms": 1e3 * t["median_s"]} for name, t in timed.items()]


if __name__ == "__main__":
    if "--single-thread-child" in sys.argv:
        import torch

        quick = "--quick" in sys.argv
        out = _compare(torch, 1, quick)
        out["conv_profile"] = _conv_profile(torch, quick, threads=1)
        print(json.dumps(out))
    else:
        bench_lib.main(run)
