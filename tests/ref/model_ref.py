#!/usr/bin/python3
"""Independent PyTorch reference of the moe engine's model.

Used by the test suite to check the C engine and by bench/torch_train.py.

  /usr/bin/python3 tests/ref/model_ref.py check DUMP.bin [--float64] [-v]
      Rebuilds the model described by a dump written by the C engine, runs it
      on the same weights and batch, and compares logits, losses, every
      parameter's gradient and the losses of n_steps AdamW steps.
      Exit 0 = all checks passed, 1 = some check failed, 2 = malformed dump.

  /usr/bin/python3 tests/ref/model_ref.py selftest
      Validates this file on its own: finite-difference gradients (float64),
      fast vs naive forward, AdamW by hand vs torch.optim.AdamW, dump
      write/read/check round trip, perturbed and malformed dumps.

Dump format (little-endian):
  b"MOEREF01"
  int32 n_int (=16), int32 vocab_size, d_model, n_layers, n_heads, n_kv_heads,
        d_ff, n_experts, top_k, d_expert, moe_every, moe_first_dense,
        tied_embeddings, renorm_topk, B, T, n_steps
  int32 n_float (=9), float32 rope_base, norm_eps, aux_loss_coef, z_loss_coef,
        weight_decay, beta1, beta2, adam_eps, grad_clip
  int32 tokens[B*T], int32 targets[B*T]
  int64 n_params, float32 params[n_params]
  float32 logits[B*T*V]
  float32 loss_total, loss_ce, loss_aux, loss_z
  float32 grads[n_params]
  float32 lrs[n_steps], float32 step_losses[n_steps]
"""
import math
import os
import struct
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

MAGIC = b"MOEREF01"
INT_FIELDS = ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
              "n_experts", "top_k", "d_expert", "moe_every", "moe_first_dense",
              "tied_embeddings", "renorm_topk", "B", "T", "n_steps"]
FLOAT_FIELDS = ["rope_base", "norm_eps", "aux_loss_coef", "z_loss_coef", "weight_decay",
                "beta1", "beta2", "adam_eps", "grad_clip"]
TOL = 1e-4


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------
class Config:
    """Model (and, for dumps, batch/optimizer) configuration.

    Field names follow moe_config in include/moe.h."""

    DEFAULTS = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                    n_experts=4, top_k=2, d_expert=24, moe_every=1, moe_first_dense=1,
                    tied_embeddings=0, renorm_topk=1, B=2, T=8, n_steps=10,
                    rope_base=10000.0, norm_eps=1e-5, aux_loss_coef=0.01, z_loss_coef=0.001,
                    weight_decay=0.1, beta1=0.9, beta2=0.95, adam_eps=1e-8, grad_clip=1.0,
                    init_std=0.02, max_seq=0)

    def __init__(self, **kw):
        for k, v in self.DEFAULTS.items():
            setattr(self, k, v)
        for k, v in kw.items():
            if k not in self.DEFAULTS:
                raise ValueError("unknown config field %r" % k)
            setattr(self, k, type(self.DEFAULTS[k])(v))

    def as_dict(self):
        return {k: getattr(self, k) for k in self.DEFAULTS}

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    def layer_is_moe(self, l):
        return (self.n_experts > 0 and l >= self.moe_first_dense
                and (l - self.moe_first_dense) % self.moe_every == 0)

    def validate(self):
        """Returns None if the model config is usable, else a message."""
        pos = ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads"]
        for k in pos:
            if getattr(self, k) <= 0:
                return "%s must be > 0 (got %d)" % (k, getattr(self, k))
        if self.d_model % self.n_heads:
            return "d_model (%d) not divisible by n_heads (%d)" % (self.d_model, self.n_heads)
        if self.head_dim % 2:
            return "head_dim (%d) must be even for RoPE" % self.head_dim
        if self.n_heads % self.n_kv_heads:
            return "n_heads (%d) not divisible by n_kv_heads (%d)" % (self.n_heads,
                                                                       self.n_kv_heads)
        if self.n_experts < 0:
            return "n_experts must be >= 0"
        if self.moe_every <= 0 and self.n_experts > 0:
            return "moe_every must be > 0"
        if self.moe_first_dense < 0:
            return "moe_first_dense must be >= 0"
        n_moe = sum(self.layer_is_moe(l) for l in range(self.n_layers))
        if n_moe:
            if not 1 <= self.top_k <= self.n_experts:
                return "top_k (%d) must be in 1..n_experts (%d)" % (self.top_k, self.n_experts)
            if self.d_expert <= 0:
                return "d_expert must be > 0"
        if n_moe < self.n_layers and self.d_ff <= 0:
            return "d_ff must be > 0 (model has dense layers)"
        if self.tied_embeddings not in (0, 1) or self.renorm_topk not in (0, 1):
            return "tied_embeddings and renorm_topk must be 0 or 1"
        if not (self.rope_base > 0 and math.isfinite(self.rope_base)):
            return "rope_base must be positive"
        if not (self.norm_eps >= 0 and math.isfinite(self.norm_eps)):
            return "norm_eps must be >= 0"
        return None


def param_specs(cfg):
    """Flat parameter order: list of (name, shape), shapes [out][in] like nn.Linear."""
    d, V, H, KVH, hd = cfg.d_model, cfg.vocab_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    E, de = cfg.n_experts, cfg.d_expert
    specs = [("token_embd", (V, d))]
    for l in range(cfg.n_layers):
        p = "blk.%d." % l
        specs += [(p + "attn_norm", (d,)), (p + "attn_q", (H * hd, d)),
                  (p + "attn_k", (KVH * hd, d)), (p + "attn_v", (KVH * hd, d)),
                  (p + "attn_output", (d, H * hd)), (p + "ffn_norm", (d,))]
        if cfg.layer_is_moe(l):
            specs += [(p + "ffn_gate_inp", (E, d)), (p + "ffn_gate_exps", (E, de, d)),
                      (p + "ffn_up_exps", (E, de, d)), (p + "ffn_down_exps", (E, d, de))]
        else:
            specs += [(p + "ffn_gate", (cfg.d_ff, d)), (p + "ffn_up", (cfg.d_ff, d)),
                      (p + "ffn_down", (d, cfg.d_ff))]
    specs.append(("output_norm", (d,)))
    if not cfg.tied_embeddings:
        specs.append(("output", (V, d)))
    return specs


def n_params(cfg):
    return sum(int(np.prod(s)) for _, s in param_specs(cfg))


def init_params(cfg, seed=0, std=None, dtype=torch.float32):
    """Random init: N(0, std) for matrices, ones for norm weights."""
    g = torch.Generator().manual_seed(seed)
    std = cfg.init_std if std is None else std
    P = OrderedDict()
    for name, shape in param_specs(cfg):
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.float32)
        else:
            t = torch.randn(shape, generator=g, dtype=torch.float32) * std
        P[name] = t.to(dtype)
    return P


def params_from_flat(cfg, flat, dtype=torch.float32):
    flat = torch.as_tensor(np.asarray(flat, dtype=np.float32))
    P, off = OrderedDict(), 0
    for name, shape in param_specs(cfg):
        n = int(np.prod(shape))
        P[name] = flat[off:off + n].reshape(shape).clone().to(dtype)
        off += n
    assert off == flat.numel()
    return P


def flat_from_params(P):
    return torch.cat([t.detach().reshape(-1).float() for t in P.values()]).numpy()


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------
def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


_rope_cache = {}


def rope_tables(T, hd, base, dtype, device=None):
    key = (T, hd, float(base), dtype, device)
    if key not in _rope_cache:
        i = torch.arange(hd // 2, dtype=torch.float64)
        inv = torch.tensor(float(base), dtype=torch.float64) ** (-2.0 * i / hd)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]   # [T, hd/2]
        # angles in float64, cos/sin rounded to float32 (then to dtype)
        cos = torch.cos(ang).float().to(dtype)
        sin = torch.sin(ang).float().to(dtype)
        if device is not None:
            cos, sin = cos.to(device), sin.to(device)
        _rope_cache[key] = (cos, sin)
    return _rope_cache[key]


def apply_rope(x, cos, sin):
    """x: [B, T, nh, hd]; rotates adjacent pairs (x[2i], x[2i+1])."""
    B, T, nh, hd = x.shape
    xp = x.reshape(B, T, nh, hd // 2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).reshape(B, T, nh, hd)


def attention(cfg, P, p, h, naive=False):
    B, T, d = h.shape
    H, KVH, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = (h @ P[p + "attn_q"].t()).view(B, T, H, hd)
    k = (h @ P[p + "attn_k"].t()).view(B, T, KVH, hd)
    v = (h @ P[p + "attn_v"].t()).view(B, T, KVH, hd)
    cos, sin = rope_tables(T, hd, cfg.rope_base, h.dtype, h.device)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scale = 1.0 / math.sqrt(hd)
    if naive:
        # one head at a time, explicit kv-head lookup and explicit causal loop mask
        outs = []
        mask = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
        for hh in range(H):
            kvh = hh // (H // KVH)
            s = torch.einsum("btd,bsd->bts", q[:, :, hh], k[:, :, kvh]) * scale
            s = s.masked_fill(mask, float("-inf"))
            a = torch.softmax(s, dim=-1)
            outs.append(torch.einsum("bts,bsd->btd", a, v[:, :, kvh]))
        o = torch.stack(outs, dim=2).reshape(B, T, H * hd)
    else:
        rep = H // KVH
        q = q.transpose(1, 2)                                    # [B,H,T,hd]
        k = k.transpose(1, 2).repeat_interleave(rep, dim=1)      # [B,H,T,hd]
        v = v.transpose(1, 2).repeat_interleave(rep, dim=1)
        s = (q @ k.transpose(-1, -2)) * scale
        mask = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
        o = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(B, T, H * hd)
    return o @ P[p + "attn_output"].t()


def swiglu(z, wg, wu, wd):
    return (F.silu(z @ wg.t()) * (z @ wu.t())) @ wd.t()


def moe_ffn(cfg, P, p, z, naive=False):
    """z: [N, d]. Returns y [N, d], aux, zloss, (ids, weights)."""
    N, d = z.shape
    E, k = cfg.n_experts, cfg.top_k
    logits_r = z @ P[p + "ffn_gate_inp"].t()                  # [N, E]
    probs = torch.softmax(logits_r, dim=-1)
    vals, ids = torch.topk(probs, k, dim=-1, largest=True, sorted=True)
    w = vals / vals.sum(-1, keepdim=True) if cfg.renorm_topk else vals
    wg, wu, wd = P[p + "ffn_gate_exps"], P[p + "ffn_up_exps"], P[p + "ffn_down_exps"]
    if naive:
        # every expert on every token, combined through a dense [N, E] weight matrix
        comb = torch.zeros(N, E, dtype=z.dtype, device=z.device).scatter(1, ids, w)
        y = torch.zeros_like(z)
        for e in range(E):
            y = y + comb[:, e:e + 1] * swiglu(z, wg[e], wu[e], wd[e])
    else:
        # the usual way: sort (token, slot) assignments by expert, run each expert
        # on the rows routed to it, scatter-add the weighted outputs back
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts_l = torch.bincount(flat_ids, minlength=E).tolist()
        tok_sorted = torch.div(order, k, rounding_mode="floor")
        xs = z.index_select(0, tok_sorted)
        outs, start = [], 0
        for e in range(E):
            c = counts_l[e]
            if c:
                outs.append(swiglu(xs[start:start + c], wg[e], wu[e], wd[e]))
            start += c
        out = torch.cat(outs, 0) * w.reshape(-1).index_select(0, order)[:, None]
        y = torch.zeros_like(z).index_add(0, tok_sorted, out.to(z.dtype))
    counts = torch.bincount(ids.reshape(-1), minlength=E).to(z.dtype)
    f = (counts / (N * k)).detach()
    Pm = probs.mean(0)
    aux = E * (f * Pm).sum()
    zl = torch.logsumexp(logits_r, dim=-1).pow(2).mean()
    return y, aux, zl, (ids, w, probs)


def forward(cfg, P, tokens, targets=None, naive=False):
    """tokens, targets: int64 [B, T]. Returns dict of logits [B,T,V] and losses."""
    B, T = tokens.shape
    x = P["token_embd"][tokens]
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    aux_total, z_total = zero, zero
    routes = []
    for l in range(cfg.n_layers):
        p = "blk.%d." % l
        h = rmsnorm(x, P[p + "attn_norm"], cfg.norm_eps)
        x = x + attention(cfg, P, p, h, naive)
        h2 = rmsnorm(x, P[p + "ffn_norm"], cfg.norm_eps)
        if cfg.layer_is_moe(l):
            y, aux, zl, r = moe_ffn(cfg, P, p, h2.reshape(B * T, -1), naive)
            x = x + y.view(B, T, -1)
            aux_total = aux_total + aux
            z_total = z_total + zl
            routes.append(r)
        else:
            x = x + swiglu(h2, P[p + "ffn_gate"], P[p + "ffn_up"], P[p + "ffn_down"])
    fin = rmsnorm(x, P["output_norm"], cfg.norm_eps)
    head = P["token_embd"] if cfg.tied_embeddings else P["output"]
    logits = fin @ head.t()
    out = dict(logits=logits, routes=routes, loss_aux=aux_total, loss_z=z_total)
    if targets is not None:
        ce = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))
        out["loss_ce"] = ce
        out["loss_total"] = ce + cfg.aux_loss_coef * aux_total + cfg.z_loss_coef * z_total
    return out


def forward_backward(cfg, P, tokens, targets, naive=False):
    """Returns (out dict with detached tensors, grads OrderedDict)."""
    Pg = OrderedDict((n, t.detach().clone().requires_grad_(True)) for n, t in P.items())
    out = forward(cfg, Pg, tokens, targets, naive)
    gl = torch.autograd.grad(out["loss_total"], list(Pg.values()), allow_unused=True)
    grads = OrderedDict()
    for (n, t), g in zip(Pg.items(), gl):
        grads[n] = torch.zeros_like(t) if g is None else g.detach()
    res = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}
    return res, grads


def decay_mask(P):
    """Weight decay only for tensors of 2+ dims."""
    return OrderedDict((n, t.dim() >= 2) for n, t in P.items())


def adamw_steps(cfg, P, tokens, targets, lrs, impl="torch", naive=False):
    """Runs len(lrs) AdamW steps on the same batch; returns the loss_total
    recorded before each update, and the final parameters."""
    params = [t.detach().clone().requires_grad_(True) for t in P.values()]
    names = list(P.keys())
    decay = [p for p in params if p.dim() >= 2]
    nodecay = [p for p in params if p.dim() < 2]
    losses = []
    if impl == "torch":
        opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                                 dict(params=nodecay, weight_decay=0.0)],
                                lr=float(lrs[0]) if len(lrs) else 1e-3,
                                betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    else:
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
    for s, lr in enumerate(lrs):
        lr = float(lr)
        Pd = OrderedDict(zip(names, params))
        for p in params:
            p.grad = None
        out = forward(cfg, Pd, tokens, targets, naive)
        out["loss_total"].backward()
        losses.append(float(out["loss_total"]))
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if impl == "torch":
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            for grp in opt.param_groups:
                grp["lr"] = lr
            opt.step()
        else:
            with torch.no_grad():
                if cfg.grad_clip > 0:
                    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
                    coef = cfg.grad_clip / (norm + 1e-6)
                    if coef < 1.0:
                        for p in params:
                            p.grad.mul_(coef)
                t = s + 1
                bc1 = 1.0 - cfg.beta1 ** t
                bc2 = 1.0 - cfg.beta2 ** t
                for i, p in enumerate(params):
                    g = p.grad
                    if p.dim() >= 2:
                        p.mul_(1.0 - lr * cfg.weight_decay)
                    m[i].mul_(cfg.beta1).add_(g, alpha=1.0 - cfg.beta1)
                    v[i].mul_(cfg.beta2).addcmul_(g, g, value=1.0 - cfg.beta2)
                    denom = v[i].sqrt() / math.sqrt(bc2) + cfg.adam_eps
                    p.sub_(lr / bc1 * m[i] / denom)
    return losses, OrderedDict((n, p.detach()) for n, p in zip(names, params))


# ---------------------------------------------------------------------------
# dump reader / writer
# ---------------------------------------------------------------------------
class DumpError(Exception):
    pass


class Dump:
    pass


def read_dump(path):
    try:
        with open(path, "rb") as fh:
            buf = fh.read()
    except OSError as e:
        raise DumpError("cannot read %s: %s" % (path, e.strerror or e))
    return parse_dump(buf)


def parse_dump(buf):
    pos = [0]

    def take(n, what):
        if n < 0 or pos[0] + n > len(buf):
            raise DumpError("truncated: need %d bytes for %s at offset %d, file has %d"
                            % (n, what, pos[0], len(buf)))
        b = buf[pos[0]:pos[0] + n]
        pos[0] += n
        return b

    def arr(dtype, count, what):
        it = np.dtype(dtype).itemsize
        if count < 0 or count * it > len(buf) - pos[0]:
            raise DumpError("truncated: need %d bytes for %s (%d x %s) at offset %d, "
                            "%d left" % (count * it, what, count, np.dtype(dtype).name,
                                         pos[0], len(buf) - pos[0]))
        return np.frombuffer(take(count * it, what), dtype=dtype).copy()

    if take(8, "magic") != MAGIC:
        raise DumpError("bad magic (not a MOEREF01 dump)")
    n_int = int(arr("<i4", 1, "n_int")[0])
    if n_int != len(INT_FIELDS):
        raise DumpError("n_int is %d, expected %d" % (n_int, len(INT_FIELDS)))
    ints = arr("<i4", n_int, "int fields")
    n_float = int(arr("<i4", 1, "n_float")[0])
    if n_float != len(FLOAT_FIELDS):
        raise DumpError("n_float is %d, expected %d" % (n_float, len(FLOAT_FIELDS)))
    floats = arr("<f4", n_float, "float fields")
    kw = {k: int(v) for k, v in zip(INT_FIELDS, ints)}
    kw.update({k: float(v) for k, v in zip(FLOAT_FIELDS, floats)})
    cfg = Config(**kw)
    msg = cfg.validate()
    if msg:
        raise DumpError("bad config: " + msg)
    if cfg.B <= 0 or cfg.T <= 0 or cfg.n_steps < 0:
        raise DumpError("bad batch: B=%d T=%d n_steps=%d" % (cfg.B, cfg.T, cfg.n_steps))
    for k in FLOAT_FIELDS:
        if not math.isfinite(getattr(cfg, k)):
            raise DumpError("float field %s is not finite" % k)
    N = cfg.B * cfg.T
    d = Dump()
    d.cfg = cfg
    d.tokens = arr("<i4", N, "tokens").reshape(cfg.B, cfg.T)
    d.targets = arr("<i4", N, "targets").reshape(cfg.B, cfg.T)
    for nm in ("tokens", "targets"):
        a = getattr(d, nm)
        if a.min() < 0 or a.max() >= cfg.vocab_size:
            raise DumpError("%s out of range [0, %d): min %d max %d"
                            % (nm, cfg.vocab_size, a.min(), a.max()))
    np_ = int(arr("<i8", 1, "n_params")[0])
    exp = n_params(cfg)
    if np_ != exp:
        raise DumpError("n_params is %d but the config implies %d" % (np_, exp))
    d.params = arr("<f4", np_, "params")
    d.logits = arr("<f4", N * cfg.vocab_size, "logits").reshape(cfg.B, cfg.T, cfg.vocab_size)
    losses = arr("<f4", 4, "losses")
    d.loss_total, d.loss_ce, d.loss_aux, d.loss_z = [float(x) for x in losses]
    d.grads = arr("<f4", np_, "grads")
    d.lrs = arr("<f4", cfg.n_steps, "lrs")
    d.step_losses = arr("<f4", cfg.n_steps, "step_losses")
    if pos[0] != len(buf):
        raise DumpError("%d extra bytes after the end of the dump (offset %d)"
                        % (len(buf) - pos[0], pos[0]))
    if not np.all(np.isfinite(d.params)):
        raise DumpError("params contain NaN/Inf")
    if not np.all(np.isfinite(d.lrs)):
        raise DumpError("lrs contain NaN/Inf")
    return d


def build_dump(cfg, tokens, targets, params, logits, losses4, grads, lrs, step_losses):
    """Serialises a dump (bytes). losses4 = (total, ce, aux, z)."""
    out = [MAGIC, struct.pack("<i", len(INT_FIELDS)),
           np.array([getattr(cfg, k) for k in INT_FIELDS], dtype="<i4").tobytes(),
           struct.pack("<i", len(FLOAT_FIELDS)),
           np.array([getattr(cfg, k) for k in FLOAT_FIELDS], dtype="<f4").tobytes(),
           np.asarray(tokens, dtype="<i4").tobytes(), np.asarray(targets, dtype="<i4").tobytes()]
    params = np.asarray(params, dtype="<f4").reshape(-1)
    out += [struct.pack("<q", params.size), params.tobytes(),
            np.asarray(logits, dtype="<f4").tobytes(),
            np.asarray(losses4, dtype="<f4").tobytes(),
            np.asarray(grads, dtype="<f4").reshape(-1).tobytes(),
            np.asarray(lrs, dtype="<f4").tobytes(),
            np.asarray(step_losses, dtype="<f4").tobytes()]
    return b"".join(out)


# ---------------------------------------------------------------------------
# checking
# ---------------------------------------------------------------------------
def rel_err(a, b):
    """max|a-b| / max(max|b|, 1e-12), b is the reference; inf if a is non-finite."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


class Checker:
    def __init__(self, out=sys.stdout):
        self.passed = 0
        self.failed = 0
        self.out = out
        self.failed_names = []

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            print("ok   %s%s" % (name, detail), file=self.out)
        else:
            self.failed += 1
            self.failed_names.append(name)
            print("FAIL %s%s" % (name, detail), file=self.out)
        return ok

    def close(self, a, b, name, tol=TOL):
        e = rel_err(a, b)
        if e <= tol:
            return self.check(name, True, "  (rel err %.3g)" % e)
        return self.check(name, False, "  (rel err %.3g > %g)" % (e, tol))

    def summary(self):
        print("%d passed, %d failed" % (self.passed, self.failed), file=self.out)


def routing_margin(routes, k):
    """Smallest gap between the k-th and (k+1)-th router probability."""
    m = float("inf")
    for ids, w, probs in routes:
        if probs.shape[1] > k:
            top = torch.topk(probs, k + 1, dim=-1).values
            m = min(m, float((top[:, k - 1] - top[:, k]).min()))
    return m


def check_dump(d, dtype=torch.float32, checker=None, verbose=False):
    """Runs every check of a parsed dump; returns the Checker."""
    ck = checker or Checker()
    cfg = d.cfg
    tokens = torch.as_tensor(d.tokens.astype(np.int64))
    targets = torch.as_tensor(d.targets.astype(np.int64))
    P = params_from_flat(cfg, d.params, dtype)
    out, grads = forward_backward(cfg, P, tokens, targets)
    ck.close(d.logits, out["logits"].double().numpy(), "logits")
    for nm in ("loss_total", "loss_ce", "loss_aux", "loss_z"):
        ck.close(np.float64(getattr(d, nm)), float(out[nm]), nm)
    off = 0
    for name, shape in param_specs(cfg):
        n = int(np.prod(shape))
        ck.close(d.grads[off:off + n], grads[name].double().reshape(-1).numpy(),
                 "grad " + name)
        off += n
    if cfg.n_steps > 0:
        losses, _ = adamw_steps(cfg, P, tokens, targets, d.lrs, impl="torch")
        for s in range(cfg.n_steps):
            ck.close(np.float64(d.step_losses[s]), losses[s], "adamw step %d loss" % s)
    if ck.failed and out["routes"]:
        m = routing_margin(out["routes"], cfg.top_k)
        print("note: smallest top-k routing margin in the reference is %.3g "
              "(a tiny margin can flip routing between engines)" % m, file=ck.out)
    if verbose:
        print("reference loss_total %.8g ce %.8g aux %.8g z %.8g" % (
            float(out["loss_total"]), float(out["loss_ce"]), float(out["loss_aux"]),
            float(out["loss_z"])), file=ck.out)
    return ck


# ---------------------------------------------------------------------------
# selftest
# ---------------------------------------------------------------------------
def make_selftest_dump(cfg, seed=1234, naive=True, impl="manual"):
    """A dump computed by this file's own model (naive forward, manual AdamW)."""
    g = torch.Generator().manual_seed(seed)
    N = cfg.B * cfg.T
    tokens = torch.randint(0, cfg.vocab_size, (cfg.B, cfg.T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (cfg.B, cfg.T), generator=g)
    P = init_params(cfg, seed=seed + 1, std=0.2)
    # non-trivial norm weights so their gradients and roles are exercised
    for n, t in P.items():
        if t.dim() == 1:
            P[n] = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
    out, grads = forward_backward(cfg, P, tokens, targets, naive=naive)
    lrs = np.array([1e-3 * min(1.0, (s + 1) / 3) for s in range(cfg.n_steps)], dtype=np.float32)
    losses, _ = adamw_steps(cfg, P, tokens, targets, lrs, impl=impl, naive=naive)
    buf = build_dump(cfg, tokens.numpy(), targets.numpy(), flat_from_params(P),
                     out["logits"].numpy(), [float(out[k]) for k in
                                             ("loss_total", "loss_ce", "loss_aux", "loss_z")],
                     flat_from_params(grads), lrs, losses)
    assert len(out["logits"].shape) == 3 and out["logits"].shape[0] * out["logits"].shape[1] == N
    return buf


def finite_difference_check(ck, cfg, seed=7):
    """Analytic float64 gradients vs central differences for a few entries of
    every tensor; routing must be unchanged by each perturbation."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (cfg.B, cfg.T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (cfg.B, cfg.T), generator=g)
    P = init_params(cfg, seed=seed, std=0.3, dtype=torch.float64)
    for n, t in P.items():
        if t.dim() == 1:
            P[n] = 1.0 + 0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64)
    out, grads = forward_backward(cfg, P, tokens, targets)
    base_routes = [r[0].clone() for r in out["routes"]]
    h = 1e-6
    worst, n_checked, route_changes = 0.0, 0, 0
    for name, t in P.items():
        flat = t.reshape(-1)
        idx = torch.randint(0, flat.numel(), (2,), generator=g).tolist()
        # also the largest-gradient entry, so the check is not only on tiny values
        idx.append(int(grads[name].abs().reshape(-1).argmax()))
        for i in idx:
            vals = []
            for sgn in (1.0, -1.0):
                Q = OrderedDict((n, x.clone()) for n, x in P.items())
                Q[name].view(-1)[i] += sgn * h
                with torch.no_grad():
                    o = forward(cfg, Q, tokens, targets)
                if any(not torch.equal(a, r[0]) for a, r in zip(base_routes, o["routes"])):
                    route_changes += 1
                vals.append(float(o["loss_total"]))
            fd = (vals[0] - vals[1]) / (2 * h)
            an = float(grads[name].reshape(-1)[i])
            err = abs(fd - an) / max(abs(an), 1e-4)
            worst = max(worst, err)
            n_checked += 1
    ck.check("routing unchanged under finite-difference perturbations", route_changes == 0,
             "  (%d changes)" % route_changes)
    ck.check("float64 gradients vs finite differences (%d entries)" % n_checked,
             worst < 1e-5, "  (worst rel err %.3g)" % worst)


def selftest():
    torch.set_num_threads(1)
    ck = Checker()
    cfg = Config()   # the C test's config (see Config.DEFAULTS)

    # 1. finite differences (float64), MoE config and a tied, all-dense one
    finite_difference_check(ck, cfg)
    cfg_t = Config(tied_embeddings=1, n_experts=0, renorm_topk=0, n_kv_heads=4)
    finite_difference_check(ck, cfg_t, seed=8)
    cfg_nr = Config(renorm_topk=0, moe_first_dense=0, moe_every=2, n_layers=3, top_k=1)
    finite_difference_check(ck, cfg_nr, seed=9)

    # 2. fast (index_add) forward vs naive (all experts, per-head) forward
    for c, nm in ((cfg, "default"), (cfg_nr, "top1/no-renorm/every2")):
        g = torch.Generator().manual_seed(3)
        tok = torch.randint(0, c.vocab_size, (c.B, c.T), generator=g)
        tgt = torch.randint(0, c.vocab_size, (c.B, c.T), generator=g)
        P = init_params(c, seed=4, std=0.2, dtype=torch.float64)
        a, ga = forward_backward(c, P, tok, tgt, naive=False)
        b, gb = forward_backward(c, P, tok, tgt, naive=True)
        e = max([rel_err(a["logits"], b["logits"])] +
                [rel_err(ga[n], gb[n]) for n in ga])
        ck.check("fast vs naive forward+backward, %s" % nm, e < 1e-12, "  (rel err %.3g)" % e)

    # 3. dump round trip: naive forward + manual AdamW written, checked with the
    #    fast forward + torch.optim.AdamW
    buf = make_selftest_dump(cfg)
    d = parse_dump(buf)
    ok = (d.cfg.as_dict()["n_steps"] == 10 and d.params.size == n_params(cfg)
          and build_dump(d.cfg, d.tokens, d.targets, d.params, d.logits,
                         [d.loss_total, d.loss_ce, d.loss_aux, d.loss_z], d.grads, d.lrs,
                         d.step_losses) == buf)
    ck.check("dump write/read round trip is byte-exact", ok)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "moe_ref_selftest_%d.bin" % os.getpid())
    try:
        with open(path, "wb") as fh:
            fh.write(buf)
        sub = Checker(out=open(os.devnull, "w"))
        check_dump(read_dump(path), checker=sub)
        ck.check("own dump passes all %d checks" % (sub.passed + sub.failed),
                 sub.failed == 0 and sub.passed > 0,
                 "  (%d passed, %d failed: %s)" % (sub.passed, sub.failed,
                                                   ", ".join(sub.failed_names)))
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass

    # 4. one gradient perturbed by 1% must fail exactly that check
    d2 = parse_dump(buf)
    specs = param_specs(cfg)
    off = 0
    for name, shape in specs:
        if name == "blk.1.ffn_gate_exps":
            break
        off += int(np.prod(shape))
    n = int(np.prod(dict(specs)["blk.1.ffn_gate_exps"]))
    seg = d2.grads[off:off + n]
    j = int(np.abs(seg).argmax())
    d2.grads[off + j] *= 1.01
    sub = Checker(out=open(os.devnull, "w"))
    check_dump(d2, checker=sub)
    ck.check("1%-perturbed gradient fails (only) its check",
             sub.failed_names == ["grad blk.1.ffn_gate_exps"],
             "  (failed: %s)" % (", ".join(sub.failed_names) or "none"))
    # a perturbed logit and a perturbed step loss must fail too
    d3 = parse_dump(buf)
    d3.logits.reshape(-1)[5] += 0.01 * np.abs(d3.logits).max()
    d3.step_losses[7] *= 1.001
    sub = Checker(out=open(os.devnull, "w"))
    check_dump(d3, checker=sub)
    ck.check("perturbed logits and step loss fail",
             sub.failed_names == ["logits", "adamw step 7 loss"],
             "  (failed: %s)" % (", ".join(sub.failed_names) or "none"))
    d4 = parse_dump(buf)
    d4.grads[3] = np.nan
    sub = Checker(out=open(os.devnull, "w"))
    check_dump(d4, checker=sub)
    ck.check("NaN gradient fails", sub.failed_names == ["grad token_embd"],
             "  (failed: %s)" % (", ".join(sub.failed_names) or "none"))

    # 5. malformed dumps are rejected with DumpError
    bad = {
        "truncated": buf[:-1],
        "extra byte": buf + b"\0",
        "bad magic": b"MOEREF02" + buf[8:],
        "empty": b"",
        "wrong n_int": buf[:8] + struct.pack("<i", 15) + buf[12:],
        "n_params mismatch": None,
        "token out of range": None,
    }
    # n_params field sits after header + tokens + targets
    hdr = 8 + 4 + 4 * 16 + 4 + 4 * 9
    npos = hdr + 8 * cfg.B * cfg.T
    bad["n_params mismatch"] = buf[:npos] + struct.pack("<q", n_params(cfg) + 1) + buf[npos + 8:]
    bad["token out of range"] = buf[:hdr] + struct.pack("<i", cfg.vocab_size) + buf[hdr + 4:]
    for what, b in bad.items():
        try:
            parse_dump(b)
            ck.check("malformed dump rejected: " + what, False, "  (accepted)")
        except DumpError as e:
            ck.check("malformed dump rejected: " + what, True, "  (%s)" % e)

    ck.summary()
    return 0 if ck.failed == 0 else 1


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
USAGE = """usage: model_ref.py check DUMP.bin [--float64] [-v]
       model_ref.py selftest
       model_ref.py gen OUT.bin [SEED]   (writes a dump from this reference, selftest config)"""


def main(argv):
    if len(argv) < 1 or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd = argv[0]
    if cmd == "selftest":
        return selftest()
    if cmd == "gen" and len(argv) in (2, 3):
        torch.set_num_threads(1)
        buf = make_selftest_dump(Config(), seed=int(argv[2]) if len(argv) == 3 else 1234)
        with open(argv[1], "wb") as fh:
            fh.write(buf)
        print("wrote %s (%d bytes)" % (argv[1], len(buf)))
        return 0
    if cmd == "check":
        args = argv[1:]
        dtype = torch.float64 if "--float64" in args else torch.float32
        verbose = "-v" in args
        files = [a for a in args if not a.startswith("-")]
        if len(files) != 1:
            print(USAGE, file=sys.stderr)
            return 2
        torch.set_num_threads(1)
        try:
            d = read_dump(files[0])
        except DumpError as e:
            print("error: malformed dump %s: %s" % (files[0], e), file=sys.stderr)
            print("0 passed, 1 failed")
            return 2
        ck = check_dump(d, dtype=dtype, verbose=verbose)
        ck.summary()
        return 0 if ck.failed == 0 else 1
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
