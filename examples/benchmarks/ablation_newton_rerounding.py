"""Ablation (not adopted): change codes of a saved checkpoint after the end-to-end stage, from the model's KL gradient.

For every packed linear it measures, over calibration windows, the mean gradient ``G`` of the KL (teacher: the
full-precision SmolLM2-135M) with respect to the dequantized weight (in the stored, rotated basis), the input second
moment ``H`` and a per-output-row curvature ``c`` (Monte-Carlo Fisher: labels sampled from the student; ``--fisher
emp`` uses the KL's own output gradients). Then either

* ``--alphas``: re-rounds each layer with GPTQ (same ``H``, the layer's trained scales and zeros) toward
  ``W_hat - alpha * H_damped^-1 G / c`` (a damped K-FAC Newton step), or
* ``--diag``: flips the K codes (over the whole model) whose diagonal second-order estimate
  ``-|G| s + c H_jj s^2 / 2`` of the change in loss is lowest, each by one level against its gradient,

and reports the KL on other calibration windows (``--check``, none of them in ``--grad``) and how many codes changed.
``--stats`` caches the measured ``G``, ``H``, ``c``; several cached files (equal window counts) are averaged.

    python examples/benchmarks/ablation_newton_rerounding.py CKPT WINDOWS.pt --grad 0:48 --check 192:224 \
        --alphas 0.001,0.003 --stats stats.pt --out record.jsonl

``THREADS`` (environment, default 2) sets torch's thread count.
"""
import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import torch
import torch.nn.functional as F
from bench_real_model import evaluation_input
from hf_decoupleq.kernels import reference
from transformers import AutoModelForCausalLM

from hf_decoupleq.e2e import _cast_head, _decode, _kl, _parts, capture_teacher
from hf_decoupleq.evaluation import perplexity
from hf_decoupleq.hadamard import transform_input
from hf_decoupleq.nn.linear import DecoupleQLinear
from hf_decoupleq.packing import pack
from hf_decoupleq.solver.rounding import gptq_round, prepare_gptq

p = argparse.ArgumentParser()
p.add_argument("ckpt")
p.add_argument("windows")
p.add_argument("--grad", default="0:48")
p.add_argument("--check", default="192:224")
p.add_argument("--alphas", default="0,0.1,0.3,1")
p.add_argument("--fisher", default="mc")
p.add_argument("--ppl", default=None, help="comma list of alphas / flip counts to also measure the fixed protocol's perplexity for")
p.add_argument("--stats", action="append", required=True, help="cache of G, H, c (several: averaged)")
p.add_argument("--damp", type=float, default=0.01)
p.add_argument("--floor", type=float, default=1e-2)
p.add_argument("--out", required=True)
p.add_argument("--diag", default=None, help="comma list of flip counts (greedy diag selection)")
a = p.parse_args()
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
bf = torch.bfloat16
cpu = torch.device("cpu")


def sl(s):
    i, j = s.split(":")
    return slice(int(i), int(j))


windows = torch.load(a.windows, weights_only=True)
gw, cw = windows[sl(a.grad)], windows[sl(a.check)]
fp = _common.load_model(torch.float32)
t0 = time.perf_counter()
need_grad_teacher = not os.path.exists(a.stats[0])
t_grad = capture_teacher(fp, gw, batch_size=8, compute_dtype=bf, device=cpu) if need_grad_teacher else None
t_check = capture_teacher(fp, cw, batch_size=8, compute_dtype=bf, device=cpu)
print("teacher", time.perf_counter() - t0, flush=True)
del fp
q = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=torch.float32)
q.eval()
decoder, head = _parts(q)
headc = _cast_head(head, bf)
mods = {n: m for n, m in q.named_modules() if isinstance(m, DecoupleQLinear)}


def pairs(teacher, w):
    out = []
    for b, ids in enumerate(w.split(teacher.batch_size)):
        for i in range(ids.shape[0]):
            out.append((ids[i : i + 1], teacher.hidden[b][i : i + 1]))
    return out


@torch.no_grad()
def check_kl():
    tot = 0.0
    ps = pairs(t_check, cw)
    for ids, t in ps:
        with torch.autocast("cpu", dtype=bf):
            tot += float(_kl(_decode(decoder, ids), t, headc))
    return tot / len(ps)


for m in mods.values():
    m._codes0 = m.unpacked_codes().clone()
    m._qweight0 = m.qweight.clone()

if need_grad_teacher:
    state = {"mode": None}

    def fwd(self, x):
        K = self.in_features
        lead = x.shape[:-1]
        x2 = x.reshape(-1, K)
        if self.hadamard_signs is not None:
            x2 = transform_input(x2, self.hadamard_signs)
        w = reference.dequantize_codes(self._codes0, self.scales, self.zeros, self.effective_group_size, dtype=torch.float32)
        w.requires_grad_(True)
        self._w = w
        xf = x2.detach().float()
        self._H.addmm_(xf.T, xf)
        self._n += xf.shape[0]
        y = x2 @ w.T
        T = y.shape[0]

        def hook(g, self=self, T=T):
            d = (g.float() * T).pow(2).sum(0)
            if state["mode"] == "mc":
                self._cmc += d
            else:
                self._cemp += d

        y.register_hook(hook)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    for m in mods.values():
        m._H = torch.zeros(m.in_features, m.in_features)
        m._n = 0
        m._cmc = torch.zeros(m.out_features)
        m._cemp = torch.zeros(m.out_features)
        m._G = torch.zeros(m.out_features, m.in_features)
        m._orig_forward = m.forward
        m.forward = types.MethodType(fwd, m)
    gen = torch.Generator().manual_seed(0)
    ps = pairs(t_grad, gw)
    t0 = time.perf_counter()
    for k, (ids, t) in enumerate(ps):
        with torch.autocast("cpu", dtype=bf):
            h = _decode(decoder, ids)
            logits = head(h[0])
        logits = logits.float()
        with torch.no_grad():
            tl = F.linear(t[0].float(), head.weight)  # teacher logits in float32
        state["mode"] = "mc"
        y = torch.multinomial(logits.detach().softmax(-1), 1, generator=gen).squeeze(1)
        F.cross_entropy(logits, y).backward(retain_graph=True)
        for m in mods.values():
            m._w.grad = None
        state["mode"] = "kl"
        kl = (tl.log_softmax(-1).exp() * (tl.log_softmax(-1) - logits.log_softmax(-1))).sum(-1).mean()
        kl.backward()
        for m in mods.values():
            m._G += m._w.grad
            m._w.grad = None
            m._w = None
        if k % 8 == 0:
            print("grad window", k, float(kl.detach()), time.perf_counter() - t0, flush=True)
    nwin = len(ps)
    stats = {}
    for n, m in mods.items():
        m.forward = m._orig_forward
        stats[n] = {
            "H": m._H / m._n,
            "G": m._G / nwin,
            "cmc": m._cmc / m._n,
            "cemp": m._cemp / m._n,
        }
    torch.save(stats, a.stats[0])
    print("grad pass", time.perf_counter() - t0, flush=True)
loaded = [torch.load(f, weights_only=True) for f in a.stats]
stats = {n: {k: sum(s[n][k] for s in loaded) / len(loaded) for k in loaded[0][n]} for n in loaded[0]}
del loaded

base = check_kl()
print("check KL base", base, flush=True)
results = []


def apply(alpha):
    flips = 0
    total = 0
    t0 = time.perf_counter()
    for n, m in mods.items():
        st = stats[n]
        codes0 = m._codes0.float()
        s = m.scales.float().T.contiguous()  # [N, G]
        z = m.zeros.float().T.contiguous()
        g = m.effective_group_size
        w_hat = reference.dequantize_codes(m._codes0, m.scales.float(), m.zeros.float(), g, dtype=torch.float32)
        H = st["H"].double()
        if alpha > 0:
            c = st["cmc" if a.fisher == "mc" else "cemp"].double()
            c = c.clamp_min(a.floor * float(c.mean()))
            Hd = H + a.damp * float(H.diagonal().mean()) * torch.eye(H.shape[0], dtype=H.dtype)
            step = -torch.linalg.solve(Hd, st["G"].double().T).T / c[:, None]
            target = (w_hat.double() + alpha * step).float()
        else:
            target = w_hat
        factor = prepare_gptq(H.float(), damp=a.damp)
        codes = gptq_round(target, s, z, m.bits, g, factor)
        flips += int((codes != codes0).sum())
        total += codes.numel()
        m.qweight = pack(codes.round().to(torch.int32), m.bits)
        m.post_init()
    return flips, total, time.perf_counter() - t0


def diag_scores():
    allv = []
    for n, m in mods.items():
        st = stats[n]
        c = st["cmc" if a.fisher == "mc" else "cemp"]
        c = c.clamp_min(a.floor * float(c.mean()))
        G = st["G"]
        g = m.effective_group_size
        s = m.scales.float().T.repeat_interleave(g, dim=1)[:, : m.in_features]
        codes0 = m._codes0.float()
        d = -torch.sign(G)
        ok = ((codes0 + d) >= 0) & ((codes0 + d) <= 2 ** m.bits - 1) & (d != 0)
        score = -G.abs() * s + 0.5 * c[:, None] * st["H"].diagonal()[None, :] * s * s
        score = torch.where(ok, score, torch.full_like(score, float("inf")))
        m._score, m._dir = score, d
        allv.append(score.flatten())
    return torch.cat(allv)


def apply_diag(k):
    allv = diag_scores()
    thr = torch.kthvalue(allv, k).values
    flips = 0
    for m in mods.values():
        sel = m._score <= thr
        codes = m._codes0.float() + torch.where(sel, m._dir, torch.zeros_like(m._dir))
        flips += int(sel.sum())
        m.qweight = pack(codes.round().to(torch.int32), m.bits)
        m.post_init()
    return flips, float(thr)


def restore():
    for m in mods.values():
        m.qweight = m._qweight0.clone()
        m.post_init()


tok = _common.load_tokenizer()
ppl_values = [float(x) for x in (a.ppl or "").split(",") if x]


def fixed_protocol_ppl() -> float:
    eval_input = evaluation_input(tok, _common.DEFAULT_EVAL_PATH, 0)
    return perplexity(q, tok, eval_input, seq_len=2048, max_windows=40, progress=False).ppl


def report(rec: dict, value: float) -> None:
    """Measure the changed model, write ``rec`` with the measurements, and put the original codes back."""
    rec.update({"check_kl": check_kl(), "check_kl_base": base, "grad": a.grad, "check": a.check, "ckpt": a.ckpt})
    if value in ppl_values:
        rec["ppl"] = fixed_protocol_ppl()
    print(json.dumps(rec), flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    restore()


for alpha in [float(x) for x in a.alphas.split(",") if x]:
    flips, total, secs = apply(alpha)
    report({"alpha": alpha, "fisher": a.fisher, "damp": a.damp, "floor": a.floor, "flips": flips,
            "frac": flips / total, "round_s": secs}, alpha)  # fmt: skip
for k in [int(x) for x in a.diag.split(",")] if a.diag else []:
    flips, thr = apply_diag(k)
    report({"diag_k": k, "fisher": a.fisher, "floor": a.floor, "flips": flips, "thr": thr}, k)
