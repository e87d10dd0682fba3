#!/usr/bin/python3
"""Independent PyTorch reference of the moe engine's model.

Used by the test suite to check the C engine and by bench/torch_train.py.

  /usr/bin/python3 tests/ref/model_ref.py check DUMP.bin [--float64] [-v]
      Rebuilds the model described by a dump written by the C engine, runs it
      on the same weights and batch, and compares logits, losses, every
      parameter's gradient and the losses of n_steps AdamW steps. The
      selection bias (a buffer) must have an exactly zero gradient and be
      unchanged, bit for bit, after the steps (the other parameters after the
      steps are only reported: see check_dump).
      Exit 0 = all checks passed, 1 = some check failed, 2 = malformed dump.

  /usr/bin/python3 tests/ref/model_ref.py selftest
      Validates this file on its own: finite-difference gradients (float64),
      fast vs naive forward, AdamW by hand vs torch.optim.AdamW, dump
      write/read/check round trip, perturbed and malformed dumps.

Routing (docs/routing.md; token choice, dropless, no jitter): scores s =
softmax(l) or sigmoid(l); selection scores s + b with the selection bias b
(expert_bias); group-limited (n_group > 1: a group scores the sum of its two
best selection scores, only the topk_group best groups stay eligible); the k
best, ties to the lower id; weights routed_scale * s (renormalised over the k
when renorm_topk). Shared experts: one SwiGLU of n_shared_experts * d_shared
on every token, times sigmoid(x . w) when shared_gate. Loss = ce +
aux_loss_coef * aux + z_loss_coef * z + seq_aux_coef * seq_aux, each summed
over the MoE layers.

Dump format (little-endian):
  b"MOEREF02"
  int32 n_int (=29), int32 vocab_size, d_model, n_layers, n_heads, n_kv_heads,
        d_ff, n_experts, top_k, d_expert, moe_every, moe_first_dense,
        tied_embeddings, renorm_topk, B, T, n_steps,
        router (0 softmax, 1 sigmoid), n_group, topk_group, n_shared_experts,
        d_shared, shared_gate, expert_bias,
        attn (0 GQA, 1 MLA), qk_head_dim, v_head_dim, rope_dim, kv_lora_rank,
        q_lora_rank (head sizes resolved: never 0)
  int32 n_float (=11), float32 rope_base, norm_eps, aux_loss_coef, z_loss_coef,
        weight_decay, beta1, beta2, adam_eps, grad_clip, routed_scale, seq_aux_coef
  int32 tokens[B*T], int32 targets[B*T]
  int64 n_params, float32 params[n_params]     (order: param_specs)
  float32 logits[B*T*V]
  float32 loss_total, loss_ce, loss_aux, loss_z, loss_seq_aux
  float32 grads[n_params]
  float32 lrs[n_steps], float32 step_losses[n_steps]
  float32 final_params[n_params]               (after the n_steps AdamW steps)
(MOEREF01, the first version, had the first 16 ints, the first 9 floats, 4
losses and no final_params; it is no longer read.)
"""
import math
import os
import struct
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

MAGIC = b"MOEREF02"
INT_FIELDS = ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
              "n_experts", "top_k", "d_expert", "moe_every", "moe_first_dense",
              "tied_embeddings", "renorm_topk", "B", "T", "n_steps",
              "router", "n_group", "topk_group", "n_shared_experts", "d_shared",
              "shared_gate", "expert_bias",
              "attn", "qk_head_dim", "v_head_dim", "rope_dim", "kv_lora_rank", "q_lora_rank"]
FLOAT_FIELDS = ["rope_base", "norm_eps", "aux_loss_coef", "z_loss_coef", "weight_decay",
                "beta1", "beta2", "adam_eps", "grad_clip", "routed_scale", "seq_aux_coef"]
LOSS_NAMES = ["loss_total", "loss_ce", "loss_aux", "loss_z", "loss_seq_aux"]
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
                    init_std=0.02, max_seq=0,
                    # routing and balance (docs/routing.md); the defaults are the
                    # plain softmax top-k model of MOEREF01 / bench/torch_train.py
                    router=0, routed_scale=1.0, n_group=1, topk_group=1,
                    n_shared_experts=0, d_shared=0, shared_gate=0, expert_bias=0,
                    seq_aux_coef=0.0,
                    # attention: 0 GQA, 1 MLA (multi-head latent attention); head
                    # sizes 0 mean the defaults (d_model / n_heads, all of it roped)
                    attn=0, qk_head_dim=0, v_head_dim=0, rope_dim=0, kv_lora_rank=0,
                    q_lora_rank=0)

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
        """q and k size per head (MLA: nope + rope)."""
        return self.qk_head_dim if self.qk_head_dim > 0 else self.d_model // self.n_heads

    @property
    def v_dim(self):
        return self.v_head_dim if self.v_head_dim > 0 else self.head_dim

    @property
    def rot_dim(self):
        """RoPE'd dims per head (MLA: the q_pe / k_pe part)."""
        return self.rope_dim if self.rope_dim > 0 else self.head_dim

    def layer_is_moe(self, l):
        return (self.n_experts > 0 and l >= self.moe_first_dense
                and (l - self.moe_first_dense) % self.moe_every == 0)

    @property
    def grouped(self):
        """Group-limited routing is on (some groups can be excluded)."""
        return self.n_group > 1 and self.topk_group < self.n_group

    @property
    def d_shared_total(self):
        """Hidden size of the shared experts' one SwiGLU (0: none)."""
        return self.n_shared_experts * self.d_shared if self.n_shared_experts > 0 else 0

    def validate(self):
        """Returns None if the model config is usable, else a message."""
        pos = ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads"]
        for k in pos:
            if getattr(self, k) <= 0:
                return "%s must be > 0 (got %d)" % (k, getattr(self, k))
        if self.attn == 1:
            if self.rot_dim % 2 or not 0 < self.rot_dim < self.head_dim:
                return "MLA needs an even rope_dim below head_dim"
            if self.kv_lora_rank <= 0 or self.q_lora_rank < 0:
                return "MLA needs kv_lora_rank > 0"
        elif self.attn != 0:
            return "attn must be 0 (GQA) or 1 (MLA)"
        elif self.d_model % self.n_heads and self.qk_head_dim == 0:
            return "d_model (%d) not divisible by n_heads (%d)" % (self.d_model, self.n_heads)
        elif self.head_dim % 2:
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
        if self.router not in (0, 1):
            return "router must be 0 (softmax) or 1 (sigmoid), got %d" % self.router
        for k in ("shared_gate", "expert_bias"):
            if getattr(self, k) not in (0, 1):
                return "%s must be 0 or 1" % k
        if not (self.routed_scale > 0 and math.isfinite(self.routed_scale)):
            return "routed_scale must be > 0"
        if not (self.seq_aux_coef >= 0 and math.isfinite(self.seq_aux_coef)):
            return "seq_aux_coef must be >= 0"
        if self.n_shared_experts < 0 or self.d_shared < 0:
            return "n_shared_experts and d_shared must be >= 0"
        if not 0 <= self.n_group <= 1024:
            return "n_group (%d) must be in 0..1024" % self.n_group
        if n_moe and self.n_shared_experts > 0 and self.d_shared < 1:
            return "d_shared must be >= 1 with shared experts"
        if n_moe and self.n_group > 1:
            if self.n_experts % self.n_group:
                return "n_group (%d) must divide n_experts (%d)" % (self.n_group, self.n_experts)
            if not 1 <= self.topk_group <= self.n_group:
                return "topk_group (%d) must be in 1..n_group (%d)" % (self.topk_group,
                                                                      self.n_group)
            if self.top_k > self.topk_group * (self.n_experts // self.n_group):
                return "top_k (%d) exceeds the experts of the eligible groups" % self.top_k
        return None


def param_specs(cfg):
    """Flat parameter order: list of (name, shape), shapes [out][in] like nn.Linear.
    Names are the GGUF names without their ".weight" / ".bias" suffix."""
    d, V, H, KVH, hd = cfg.d_model, cfg.vocab_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    E, de = cfg.n_experts, cfg.d_expert
    specs = [("token_embd", (V, d))]
    for l in range(cfg.n_layers):
        p = "blk.%d." % l
        specs.append((p + "attn_norm", (d,)))
        if cfg.attn == 1:
            # MLA; GGUF ne {nope, kvr, H} for attn_k_b is [H][kvr][nope] here,
            # ne {kvr, vd, H} for attn_v_b is [H][vd][kvr]
            kvr, R, vd = cfg.kv_lora_rank, cfg.rot_dim, cfg.v_dim
            if cfg.q_lora_rank > 0:
                qr = cfg.q_lora_rank
                specs += [(p + "attn_q_a", (qr, d)), (p + "attn_q_a_norm", (qr,)),
                          (p + "attn_q_b", (H * hd, qr))]
            else:
                specs.append((p + "attn_q", (H * hd, d)))
            specs += [(p + "attn_kv_a_mqa", (kvr + R, d)), (p + "attn_kv_a_norm", (kvr,)),
                      (p + "attn_k_b", (H, kvr, hd - R)), (p + "attn_v_b", (H, vd, kvr)),
                      (p + "attn_output", (d, H * vd)), (p + "ffn_norm", (d,))]
        else:
            specs += [(p + "attn_q", (H * hd, d)),
                      (p + "attn_k", (KVH * hd, d)), (p + "attn_v", (KVH * hd, d)),
                      (p + "attn_output", (d, H * hd)), (p + "ffn_norm", (d,))]
        if cfg.layer_is_moe(l):
            specs += [(p + "ffn_gate_inp", (E, d)), (p + "ffn_gate_exps", (E, de, d)),
                      (p + "ffn_up_exps", (E, de, d)), (p + "ffn_down_exps", (E, d, de))]
            if cfg.expert_bias:
                specs.append((p + "exp_probs_b", (E,)))      # selection bias: a buffer
            fs = cfg.d_shared_total
            if fs:
                if cfg.shared_gate:
                    specs.append((p + "ffn_gate_inp_shexp", (d,)))   # Linear(d, 1) weight
                specs += [(p + "ffn_gate_shexp", (fs, d)), (p + "ffn_up_shexp", (fs, d)),
                          (p + "ffn_down_shexp", (d, fs))]
        else:
            specs += [(p + "ffn_gate", (cfg.d_ff, d)), (p + "ffn_up", (cfg.d_ff, d)),
                      (p + "ffn_down", (d, cfg.d_ff))]
    specs.append(("output_norm", (d,)))
    if not cfg.tied_embeddings:
        specs.append(("output", (V, d)))
    return specs


def is_buffer(name):
    """Non-learned tensors: no gradient, no optimizer (the selection bias)."""
    return name.endswith(".exp_probs_b")


def is_norm(name):
    return name.endswith("_norm")


def has_decay(name):
    """AdamW weight decay: every learned weight except the RMSNorm gains. The
    shared-expert gate vector is the weight of a Linear(d, 1) projection
    (Qwen2-MoE's shared_expert_gate), so it decays although it is 1-D."""
    return not is_norm(name) and not is_buffer(name)


def n_params(cfg):
    return sum(int(np.prod(s)) for _, s in param_specs(cfg))


def init_params(cfg, seed=0, std=None, dtype=torch.float32):
    """Random init: N(0, std) for weights, ones for norm weights, zeros for the
    selection bias."""
    g = torch.Generator().manual_seed(seed)
    std = cfg.init_std if std is None else std
    P = OrderedDict()
    for name, shape in param_specs(cfg):
        if is_buffer(name):
            t = torch.zeros(shape, dtype=torch.float32)
        elif is_norm(name):
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


def attention_mla(cfg, P, p, h):
    """Multi-head latent attention (DeepSeek-V2/V3), written out plainly: the
    query (optionally through a normalised rank-q_lora_rank bottleneck), each
    head [q_nope | q_pe]; h W_kv_a = [latent | k_pe], the latent normalised,
    k_pe one rotary key shared by every head; head h's key is
    [latent @ W_kb[h] | k_pe] and its value latent @ W_vb[h]^T."""
    B, T, d = h.shape
    H, hd, vd, R, kvr = cfg.n_heads, cfg.head_dim, cfg.v_dim, cfg.rot_dim, cfg.kv_lora_rank
    nope = hd - R
    if cfg.q_lora_rank > 0:
        qa = rmsnorm(h @ P[p + "attn_q_a"].t(), P[p + "attn_q_a_norm"], cfg.norm_eps)
        q = qa @ P[p + "attn_q_b"].t()
    else:
        q = h @ P[p + "attn_q"].t()
    q = q.view(B, T, H, hd)
    cos, sin = rope_tables(T, R, cfg.rope_base, h.dtype, h.device)
    q = torch.cat([q[..., :nope], apply_rope(q[..., nope:], cos, sin)], dim=-1)
    kv = h @ P[p + "attn_kv_a_mqa"].t()                              # [B,T,kvr+R]
    latent = rmsnorm(kv[..., :kvr], P[p + "attn_kv_a_norm"], cfg.norm_eps)
    k_pe = apply_rope(kv[..., kvr:].reshape(B, T, 1, R), cos, sin)   # [B,T,1,R]
    k_nope = torch.einsum("btr,hrj->bthj", latent, P[p + "attn_k_b"])
    v = torch.einsum("btr,hvr->bthv", latent, P[p + "attn_v_b"])     # [B,T,H,vd]
    k = torch.cat([k_nope, k_pe.expand(B, T, H, R)], dim=-1)        # [B,T,H,hd]
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    mask = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
    a = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)
    o = torch.einsum("bhts,bshv->bthv", a, v).reshape(B, T, H * vd)
    return o @ P[p + "attn_output"].t()


def swiglu(z, wg, wu, wd):
    return (F.silu(z @ wg.t()) * (z @ wu.t())) @ wd.t()


def select_experts(cfg, sel):
    """Token-choice selection from selection scores sel [N, E] (scores + bias,
    no gradient). Returns ids [N, k] (best first; ties to the lower id) and the
    per-token margin of the decisions: the gap between the last kept and the
    first excluded group score (group-limited) and between the k-th and the
    (k+1)-th eligible expert (inf when nothing was excluded)."""
    N, E = sel.shape
    k = cfg.top_k
    inf = torch.full((N,), float("inf"), dtype=torch.float64)
    margin = inf
    if cfg.grouped:
        G, tg = cfg.n_group, cfg.topk_group
        gs = E // G
        # a group's score: the sum of its two best (its best when it holds one)
        top2 = sel.view(N, G, gs).sort(dim=-1, descending=True).values[..., :min(2, gs)]
        gscore = top2[..., 0] + top2[..., 1] if gs >= 2 else top2[..., 0]
        gv, gorder = gscore.sort(dim=-1, descending=True, stable=True)
        margin = torch.minimum(margin, (gv[:, tg - 1] - gv[:, tg]).double())
        keep = torch.zeros(N, G, dtype=torch.bool).scatter(1, gorder[:, :tg], True)
        sel = sel.masked_fill(~keep.repeat_interleave(gs, dim=1), float("-inf"))
    v, order = sel.sort(dim=-1, descending=True, stable=True)
    if k < E:
        gap = (v[:, k - 1] - v[:, k]).double()
        margin = torch.minimum(margin, torch.where(torch.isfinite(gap), gap, inf))
    return order[:, :k], margin


def select_experts_naive(cfg, sel):
    """The same rule token by token with plain Python loops (for the selftest)."""
    N, E = sel.shape
    G = cfg.n_group if cfg.grouped else 1
    gs = E // G
    rows = []
    for t in range(N):
        row = [float(x) for x in sel[t]]
        if G > 1:
            score = []
            for g in range(G):
                vals = sorted(row[g * gs:(g + 1) * gs], reverse=True)
                score.append(vals[0] + vals[1] if gs >= 2 else vals[0])
            kept = []
            for _ in range(cfg.topk_group):
                best = max((g for g in range(G) if g not in kept), key=lambda g: (score[g], -g))
                kept.append(best)
            row = [x if e // gs in kept else float("-inf") for e, x in enumerate(row)]
        ids = []
        for _ in range(cfg.top_k):
            ids.append(max((e for e in range(E) if e not in ids), key=lambda e: (row[e], -e)))
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.int64)


def moe_ffn(cfg, P, p, z, seq_len=None, naive=False):
    """z: [N, d] (N = B * seq_len tokens). Returns y [N, d], aux, zloss, seq_aux
    and a route dict (ids [N, k], weights [N, k], scores [N, E], margin [N],
    changed: tokens whose expert set the selection bias changed)."""
    N, d = z.shape
    E, k = cfg.n_experts, cfg.top_k
    T = seq_len or N
    logits_r = z @ P[p + "ffn_gate_inp"].t()                  # [N, E]
    if cfg.router == 1:
        scores = torch.sigmoid(logits_r)
        q = scores / scores.sum(-1, keepdim=True)            # normalised for the balance terms
    else:
        scores = torch.softmax(logits_r, dim=-1)
        q = scores
    with torch.no_grad():
        bias = P[p + "exp_probs_b"].detach() if cfg.expert_bias else None
        sel = scores.detach() + bias if bias is not None else scores.detach()
        if naive:
            ids, margin = select_experts_naive(cfg, sel), None
        else:
            ids, margin = select_experts(cfg, sel)
        changed = 0
        if bias is not None:
            ids0, _ = select_experts(cfg, scores.detach())
            changed = int((ids0.sort(-1).values != ids.sort(-1).values).any(-1).sum())
    vals = scores.gather(1, ids)
    w = vals / vals.sum(-1, keepdim=True) if cfg.renorm_topk else vals
    if cfg.routed_scale != 1.0:
        w = w * cfg.routed_scale
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
    fs = cfg.d_shared_total
    if fs:
        sg, su, sd = P[p + "ffn_gate_shexp"], P[p + "ffn_up_shexp"], P[p + "ffn_down_shexp"]
        if naive:
            # n_shared_experts separate experts of d_shared each, summed
            ys = torch.zeros_like(z)
            for i in range(cfg.n_shared_experts):
                rows = slice(i * cfg.d_shared, (i + 1) * cfg.d_shared)
                ys = ys + swiglu(z, sg[rows], su[rows], sd[:, rows])
        else:
            ys = swiglu(z, sg, su, sd)
        if cfg.shared_gate:
            ys = torch.sigmoid(z @ P[p + "ffn_gate_inp_shexp"])[:, None] * ys
        y = y + ys
    # balance terms: counts are the chosen assignments, treated as constants
    counts = torch.bincount(ids.reshape(-1), minlength=E).to(z.dtype)
    f = (counts / (N * k)).detach()
    aux = E * (f * q.mean(0)).sum()
    zl = torch.logsumexp(logits_r, dim=-1).pow(2).mean()
    # DeepSeek-V3 sequence-wise: per sequence f_i = E/(k T) count_i, P_i = mean_t q
    B = N // T
    onehot = torch.zeros(N, E, dtype=z.dtype, device=z.device).scatter_add(
        1, ids, torch.ones(N, k, dtype=z.dtype, device=z.device))
    fseq = (E / (k * T)) * onehot.view(B, T, E).sum(1)                   # [B, E]
    seq_aux = (fseq.detach() * q.view(B, T, E).mean(1)).sum(-1).mean()
    route = dict(ids=ids, w=w, scores=scores, margin=margin, changed=changed)
    return y, aux, zl, seq_aux, route


def forward(cfg, P, tokens, targets=None, naive=False):
    """tokens, targets: int64 [B, T]. Returns dict of logits [B,T,V] and losses."""
    B, T = tokens.shape
    x = P["token_embd"][tokens]
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    aux_total, z_total, seq_total = zero, zero, zero
    routes = []
    for l in range(cfg.n_layers):
        p = "blk.%d." % l
        h = rmsnorm(x, P[p + "attn_norm"], cfg.norm_eps)
        x = x + (attention_mla(cfg, P, p, h) if cfg.attn == 1 else attention(cfg, P, p, h, naive))
        h2 = rmsnorm(x, P[p + "ffn_norm"], cfg.norm_eps)
        if cfg.layer_is_moe(l):
            y, aux, zl, sq, r = moe_ffn(cfg, P, p, h2.reshape(B * T, -1), T, naive)
            x = x + y.view(B, T, -1)
            aux_total = aux_total + aux
            z_total = z_total + zl
            seq_total = seq_total + sq
            routes.append(r)
        else:
            x = x + swiglu(h2, P[p + "ffn_gate"], P[p + "ffn_up"], P[p + "ffn_down"])
    fin = rmsnorm(x, P["output_norm"], cfg.norm_eps)
    head = P["token_embd"] if cfg.tied_embeddings else P["output"]
    logits = fin @ head.t()
    out = dict(logits=logits, routes=routes, loss_aux=aux_total, loss_z=z_total,
               loss_seq_aux=seq_total)
    if targets is not None:
        ce = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))
        out["loss_ce"] = ce
        total = ce + cfg.aux_loss_coef * aux_total + cfg.z_loss_coef * z_total
        if cfg.seq_aux_coef:
            total = total + cfg.seq_aux_coef * seq_total
        out["loss_total"] = total
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
    """Weight decay for every learned weight but the norm gains (see has_decay)."""
    return OrderedDict((n, has_decay(n)) for n in P)


def adamw_steps(cfg, P, tokens, targets, lrs, impl="torch", naive=False, margins=None):
    """Runs len(lrs) AdamW steps on the same batch; returns the loss_total
    recorded before each update, and the final parameters. Buffers (the
    selection bias) get no optimizer and stay as they are. When margins is a
    list, the smallest routing margin of each step's forward is appended."""
    names = list(P.keys())
    params = [t.detach().clone().requires_grad_(not is_buffer(n)) for n, t in P.items()]
    learned = [p for n, p in zip(names, params) if not is_buffer(n)]
    decay = [p for n, p in zip(names, params) if not is_buffer(n) and has_decay(n)]
    nodecay = [p for n, p in zip(names, params) if not is_buffer(n) and not has_decay(n)]
    losses = []
    if impl == "torch":
        opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                                 dict(params=nodecay, weight_decay=0.0)],
                                lr=float(lrs[0]) if len(lrs) else 1e-3,
                                betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    else:
        m = [torch.zeros_like(p) for p in learned]
        v = [torch.zeros_like(p) for p in learned]
        wd = [has_decay(n) for n in names if not is_buffer(n)]
    for s, lr in enumerate(lrs):
        lr = float(lr)
        Pd = OrderedDict(zip(names, params))
        for p in learned:
            p.grad = None
        out = forward(cfg, Pd, tokens, targets, naive)
        out["loss_total"].backward()
        losses.append(float(out["loss_total"]))
        if margins is not None:
            margins.append(routing_margin(out["routes"]))
        for p in learned:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if impl == "torch":
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(learned, cfg.grad_clip)
            for grp in opt.param_groups:
                grp["lr"] = lr
            opt.step()
        else:
            with torch.no_grad():
                if cfg.grad_clip > 0:
                    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in learned))
                    coef = cfg.grad_clip / (norm + 1e-6)
                    if coef < 1.0:
                        for p in learned:
                            p.grad.mul_(coef)
                t = s + 1
                bc1 = 1.0 - cfg.beta1 ** t
                bc2 = 1.0 - cfg.beta2 ** t
                for i, p in enumerate(learned):
                    g = p.grad
                    if wd[i]:
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

    magic = take(8, "magic")
    if magic == b"MOEREF01":
        raise DumpError("MOEREF01 is the old dump format (this reader takes %s: rebuild "
                        "tests/test_model_ref)" % MAGIC.decode())
    if magic != MAGIC:
        raise DumpError("bad magic (not a %s dump)" % MAGIC.decode())
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
    losses = arr("<f4", len(LOSS_NAMES), "losses")
    for nm, x in zip(LOSS_NAMES, losses):
        setattr(d, nm, float(x))
    d.grads = arr("<f4", np_, "grads")
    d.lrs = arr("<f4", cfg.n_steps, "lrs")
    d.step_losses = arr("<f4", cfg.n_steps, "step_losses")
    d.final_params = arr("<f4", np_, "final_params")
    if pos[0] != len(buf):
        raise DumpError("%d extra bytes after the end of the dump (offset %d)"
                        % (len(buf) - pos[0], pos[0]))
    if not np.all(np.isfinite(d.params)):
        raise DumpError("params contain NaN/Inf")
    if not np.all(np.isfinite(d.lrs)):
        raise DumpError("lrs contain NaN/Inf")
    return d


def build_dump(cfg, tokens, targets, params, logits, losses, grads, lrs, step_losses,
               final_params):
    """Serialises a dump (bytes). losses: values in LOSS_NAMES order."""
    assert len(losses) == len(LOSS_NAMES)
    out = [MAGIC, struct.pack("<i", len(INT_FIELDS)),
           np.array([getattr(cfg, k) for k in INT_FIELDS], dtype="<i4").tobytes(),
           struct.pack("<i", len(FLOAT_FIELDS)),
           np.array([getattr(cfg, k) for k in FLOAT_FIELDS], dtype="<f4").tobytes(),
           np.asarray(tokens, dtype="<i4").tobytes(), np.asarray(targets, dtype="<i4").tobytes()]
    params = np.asarray(params, dtype="<f4").reshape(-1)
    out += [struct.pack("<q", params.size), params.tobytes(),
            np.asarray(logits, dtype="<f4").tobytes(),
            np.asarray(losses, dtype="<f4").tobytes(),
            np.asarray(grads, dtype="<f4").reshape(-1).tobytes(),
            np.asarray(lrs, dtype="<f4").tobytes(),
            np.asarray(step_losses, dtype="<f4").tobytes(),
            np.asarray(final_params, dtype="<f4").reshape(-1).tobytes()]
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


MARGIN_WARN = 1e-4  # routing margins below this may flip between float32 engines


def routing_margin(routes):
    """Smallest routing margin of a forward's MoE layers (see select_experts):
    how far every token's expert choice is from a tie. inf without MoE layers."""
    m = float("inf")
    for r in routes:
        if r["margin"] is not None and r["margin"].numel():
            m = min(m, float(r["margin"].min()))
    return m


def tensor_slices(cfg):
    off = 0
    for name, shape in param_specs(cfg):
        n = int(np.prod(shape))
        yield name, shape, slice(off, off + n)
        off += n


def check_dump(d, dtype=torch.float32, checker=None, verbose=False):
    """Runs every check of a parsed dump; returns the Checker."""
    ck = checker or Checker()
    cfg = d.cfg
    tokens = torch.as_tensor(d.tokens.astype(np.int64))
    targets = torch.as_tensor(d.targets.astype(np.int64))
    P = params_from_flat(cfg, d.params, dtype)
    out, grads = forward_backward(cfg, P, tokens, targets)
    ck.close(d.logits, out["logits"].double().numpy(), "logits")
    for nm in LOSS_NAMES:
        ck.close(np.float64(getattr(d, nm)), float(out[nm]), nm)
    if cfg.expert_bias and out["routes"]:
        # the dump's bias must actually matter, or the test does not test it
        changed = sum(r["changed"] for r in out["routes"])
        ck.check("the selection bias changes the chosen experts", changed > 0,
                 "  (%d of %d token-layers)" % (changed, len(out["routes"]) * cfg.B * cfg.T))
    for name, shape, sl in tensor_slices(cfg):
        ref = grads[name].double().reshape(-1).numpy()
        if is_buffer(name):
            # no gradient at all: exactly zero in the engine and in the reference
            nz = int(np.count_nonzero(d.grads[sl])) + int(np.count_nonzero(ref))
            ck.check("grad " + name + " is exactly zero (buffer)", nz == 0,
                     "  (%d non-zero entries; engine max |g| %.3g)"
                     % (nz, float(np.max(np.abs(d.grads[sl])))))
        else:
            ck.close(d.grads[sl], ref, "grad " + name)
    margins = [routing_margin(out["routes"])]
    if cfg.n_steps > 0:
        losses, final = adamw_steps(cfg, P, tokens, targets, d.lrs, impl="torch",
                                    margins=margins)
        for s in range(cfg.n_steps):
            ck.close(np.float64(d.step_losses[s]), losses[s], "adamw step %d loss" % s)
        worst, worst_name = 0.0, ""
        for name, shape, sl in tensor_slices(cfg):
            ref = final[name].double().reshape(-1).numpy()
            if is_buffer(name):
                # skipped by AdamW (and no bias balancing in this loop): unchanged, bit for bit
                same = (np.array_equal(d.final_params[sl], d.params[sl])
                        and np.array_equal(ref, P[name].double().reshape(-1).numpy()))
                ck.check("%s unchanged by %d AdamW steps (buffer)" % (name, cfg.n_steps), same)
            else:
                e = rel_err(d.final_params[sl], ref)
                if e >= worst:
                    worst, worst_name = e, name
        # Not a check: AdamW divides by sqrt(v), so an entry whose gradient is
        # ~1e-6 of the tensor's largest moves by about lr per step whatever the
        # rounding noise in that gradient; float32 engines then differ by up to
        # ~1e-4 of the tensor's scale. The step losses above are the check.
        print("note: learned parameters after %d steps: worst rel err %.3g (%s), shown only"
              % (cfg.n_steps, worst, worst_name), file=ck.out)
    m = min(margins)
    if out["routes"]:
        print("note: smallest routing margin (initial forward and %d AdamW steps) %.3g"
              % (cfg.n_steps, m), file=ck.out)
        if ck.failed and m < MARGIN_WARN:
            print("note: that margin is below %.0e: a near tie in expert selection can flip "
                  "between the engines and explain the failures above" % MARGIN_WARN,
                  file=ck.out)
    if verbose:
        print("reference " + " ".join("%s %.8g" % (nm, float(out[nm])) for nm in LOSS_NAMES),
              file=ck.out)
    return ck


# ---------------------------------------------------------------------------
# selftest
# ---------------------------------------------------------------------------
def vary_1d(P, g, dtype=torch.float32):
    """Non-trivial norm weights and selection bias (in place), so their roles
    are exercised: norms 1 + 0.1 N(0, 1), the bias 0.3 N(0, 1)."""
    for n, t in P.items():
        if is_norm(n):
            P[n] = 1.0 + 0.1 * torch.randn(t.shape, generator=g, dtype=dtype)
        elif is_buffer(n):
            P[n] = 0.3 * torch.randn(t.shape, generator=g, dtype=dtype)


def make_selftest_dump(cfg, seed=1234, naive=True, impl="manual"):
    """A dump computed by this file's own model (naive forward, manual AdamW)."""
    g = torch.Generator().manual_seed(seed)
    N = cfg.B * cfg.T
    tokens = torch.randint(0, cfg.vocab_size, (cfg.B, cfg.T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (cfg.B, cfg.T), generator=g)
    P = init_params(cfg, seed=seed + 1, std=0.2)
    vary_1d(P, g)
    out, grads = forward_backward(cfg, P, tokens, targets, naive=naive)
    lrs = np.array([1e-3 * min(1.0, (s + 1) / 3) for s in range(cfg.n_steps)], dtype=np.float32)
    losses, final = adamw_steps(cfg, P, tokens, targets, lrs, impl=impl, naive=naive)
    buf = build_dump(cfg, tokens.numpy(), targets.numpy(), flat_from_params(P),
                     out["logits"].numpy(), [float(out[k]) for k in LOSS_NAMES],
                     flat_from_params(grads), lrs, losses, flat_from_params(final))
    assert len(out["logits"].shape) == 3 and out["logits"].shape[0] * out["logits"].shape[1] == N
    return buf


def finite_difference_check(ck, cfg, seed=7, label=""):
    """Analytic float64 gradients vs central differences for a few entries of
    every tensor; routing must be unchanged by each perturbation."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (cfg.B, cfg.T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (cfg.B, cfg.T), generator=g)
    P = init_params(cfg, seed=seed, std=0.3, dtype=torch.float64)
    vary_1d(P, g, torch.float64)
    out, grads = forward_backward(cfg, P, tokens, targets)
    base_routes = [r["ids"].clone() for r in out["routes"]]
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
                if any(not torch.equal(a, r["ids"]) for a, r in zip(base_routes, o["routes"])):
                    route_changes += 1
                vals.append(float(o["loss_total"]))
            fd = (vals[0] - vals[1]) / (2 * h)
            an = float(grads[name].reshape(-1)[i])
            err = abs(fd - an) / max(abs(an), 1e-4)
            worst = max(worst, err)
            n_checked += 1
    sfx = (", " + label) if label else ""
    ck.check("routing unchanged under finite-difference perturbations" + sfx,
             route_changes == 0, "  (%d changes)" % route_changes)
    ck.check("float64 gradients vs finite differences (%d entries)%s" % (n_checked, sfx),
             worst < 1e-5, "  (worst rel err %.3g)" % worst)


# the C test's routing variants (tests/test_model_ref.c)
SELFTEST_V3 = dict(router=1, expert_bias=1, routed_scale=2.5, n_group=2, topk_group=1,
                   n_shared_experts=1, d_shared=16, shared_gate=1, seq_aux_coef=0.05)
SELFTEST_V2 = dict(n_experts=8, top_k=3, n_group=4, topk_group=2, expert_bias=1, renorm_topk=0,
                   routed_scale=1.5, n_shared_experts=2, d_shared=8, seq_aux_coef=0.05,
                   tied_embeddings=1)


def sub_check(d):
    sub = Checker(out=open(os.devnull, "w"))
    check_dump(d, checker=sub)
    return sub


def selftest():
    torch.set_num_threads(1)
    ck = Checker()
    cfg = Config()   # the C test's config (see Config.DEFAULTS)
    cfg_v3 = Config(**SELFTEST_V3)
    cfg_v2 = Config(**SELFTEST_V2)
    for c, nm in ((cfg_v3, "sigmoid/bias/groups/shared"), (cfg_v2, "softmax/bias/groups/shared")):
        msg = c.validate()
        ck.check("routing variant config is valid, " + nm, msg is None, "  (%s)" % msg)

    # 1. finite differences (float64), MoE config and a tied, all-dense one
    finite_difference_check(ck, cfg)
    cfg_t = Config(tied_embeddings=1, n_experts=0, renorm_topk=0, n_kv_heads=4)
    finite_difference_check(ck, cfg_t, seed=8)
    cfg_nr = Config(renorm_topk=0, moe_first_dense=0, moe_every=2, n_layers=3, top_k=1)
    finite_difference_check(ck, cfg_nr, seed=9)
    finite_difference_check(ck, cfg_v3, seed=10, label="sigmoid/bias/groups/shared")
    finite_difference_check(ck, cfg_v2, seed=11, label="softmax/bias/groups/shared")

    # 2. fast (sort + index_add, vectorised selection, one shared SwiGLU) vs naive
    #    (all experts, per-head, per-token selection loops, shared experts one by one)
    for c, nm in ((cfg, "default"), (cfg_nr, "top1/no-renorm/every2"),
                  (cfg_v3, "sigmoid/bias/groups/shared"), (cfg_v2, "softmax/bias/groups/shared")):
        g = torch.Generator().manual_seed(3)
        tok = torch.randint(0, c.vocab_size, (c.B, c.T), generator=g)
        tgt = torch.randint(0, c.vocab_size, (c.B, c.T), generator=g)
        P = init_params(c, seed=4, std=0.2, dtype=torch.float64)
        vary_1d(P, g, torch.float64)
        a, ga = forward_backward(c, P, tok, tgt, naive=False)
        b, gb = forward_backward(c, P, tok, tgt, naive=True)
        same = all(torch.equal(x["ids"], y["ids"]) for x, y in zip(a["routes"], b["routes"]))
        e = max([rel_err(a["logits"], b["logits"])] +
                [rel_err(float(a[k]), float(b[k])) for k in LOSS_NAMES] +
                [rel_err(ga[n], gb[n]) for n in ga])
        ck.check("fast vs naive forward+backward, %s" % nm, same and e < 1e-12,
                 "  (same experts: %s, rel err %.3g)" % (same, e))

    # 3. dump round trip: naive forward + manual AdamW written, checked with the
    #    fast forward + torch.optim.AdamW
    for c, nm in ((cfg, "default"), (cfg_v3, "sigmoid/bias/groups/shared"),
                  (cfg_v2, "softmax/bias/groups/shared")):
        buf = make_selftest_dump(c)
        d = parse_dump(buf)
        ok = (all(getattr(d.cfg, k) == getattr(c, k) for k in INT_FIELDS)
              and d.params.size == n_params(c)
              and build_dump(d.cfg, d.tokens, d.targets, d.params, d.logits,
                             [getattr(d, k) for k in LOSS_NAMES], d.grads, d.lrs,
                             d.step_losses, d.final_params) == buf)
        ck.check("dump write/read round trip is byte-exact, " + nm, ok)
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                            "moe_ref_selftest_%d.bin" % os.getpid())
        try:
            with open(path, "wb") as fh:
                fh.write(buf)
            sub = sub_check(read_dump(path))
            ck.check("own dump passes all %d checks, %s" % (sub.passed + sub.failed, nm),
                     sub.failed == 0 and sub.passed > 0,
                     "  (%d passed, %d failed: %s)" % (sub.passed, sub.failed,
                                                       ", ".join(sub.failed_names)))
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
    buf = make_selftest_dump(cfg)
    buf_v3 = make_selftest_dump(cfg_v3)

    # 4. one gradient perturbed by 1% must fail exactly that check
    def seg_of(c, name):
        return dict((n, sl) for n, _, sl in tensor_slices(c))[name]

    d2 = parse_dump(buf)
    sl = seg_of(cfg, "blk.1.ffn_gate_exps")
    j = int(np.abs(d2.grads[sl]).argmax())
    d2.grads[sl.start + j] *= 1.01
    sub = sub_check(d2)
    ck.check("1%-perturbed gradient fails (only) its check",
             sub.failed_names == ["grad blk.1.ffn_gate_exps"],
             "  (failed: %s)" % (", ".join(sub.failed_names) or "none"))
    # a perturbed logit and a perturbed step loss must fail too
    d3 = parse_dump(buf)
    d3.logits.reshape(-1)[5] += 0.01 * np.abs(d3.logits).max()
    d3.step_losses[7] *= 1.001
    sub = sub_check(d3)
    ck.check("perturbed logits and step loss fail",
             sub.failed_names == ["logits", "adamw step 7 loss"],
             "  (failed: %s)" % (", ".join(sub.failed_names) or "none"))
    d4 = parse_dump(buf)
    d4.grads[3] = np.nan
    sub = sub_check(d4)
    ck.check("NaN gradient fails", sub.failed_names == ["grad token_embd"],
             "  (failed: %s)" % (", ".join(sub.failed_names) or "none"))
    # the routing variant: each new loss term, shared-expert gradients, the
    # buffer's zero gradient and unchanged value, a bias that changes nothing
    sh_inp = seg_of(cfg_v3, "blk.1.ffn_gate_inp_shexp")
    bias = seg_of(cfg_v3, "blk.1.exp_probs_b")

    def scale_seq_aux(d):
        d.loss_seq_aux *= 1.01

    def scale_shared_gate_grad(d):
        d.grads[sh_inp] *= 1.01

    def bias_grad(d):
        d.grads[bias.start + 2] = 1e-30

    def move_bias(d):
        d.final_params[bias.start] = np.nextafter(d.final_params[bias.start], np.float32(1))

    expect = [
        ("1%-perturbed seq_aux loss fails", scale_seq_aux, ["loss_seq_aux"]),
        ("1%-perturbed shared-gate gradient fails", scale_shared_gate_grad,
         ["grad blk.1.ffn_gate_inp_shexp"]),
        ("tiny non-zero bias gradient fails", bias_grad,
         ["grad blk.1.exp_probs_b is exactly zero (buffer)"]),
        ("bias moved by one ulp by the steps fails", move_bias,
         ["blk.1.exp_probs_b unchanged by 10 AdamW steps (buffer)"]),
    ]
    for what, edit, names in expect:
        dv = parse_dump(buf_v3)
        edit(dv)
        sub = sub_check(dv)
        ck.check(what, sub.failed_names == names,
                 "  (failed: %s)" % (", ".join(sub.failed_names) or "none"))
    # a zero bias changes no selection: that check must notice (other checks
    # may fail too, since the dump's values were computed with the bias)
    dz = parse_dump(buf_v3)
    dz.params[seg_of(cfg_v3, "blk.1.exp_probs_b")] = 0.0
    sub = sub_check(dz)
    ck.check("a bias that changes no selection is reported",
             "the selection bias changes the chosen experts" in sub.failed_names,
             "  (failed: %s)" % (", ".join(sub.failed_names) or "none"))

    # 5. malformed dumps are rejected with DumpError
    bad = {
        "truncated": buf[:-1],
        "extra byte": buf + b"\0",
        "bad magic": b"MOEREF99" + buf[8:],
        "old format": b"MOEREF01" + buf[8:],
        "empty": b"",
        "wrong n_int": buf[:8] + struct.pack("<i", len(INT_FIELDS) - 1) + buf[12:],
        "n_params mismatch": None,
        "token out of range": None,
    }
    # n_params field sits after header + tokens + targets
    hdr = 8 + 4 + 4 * len(INT_FIELDS) + 4 + 4 * len(FLOAT_FIELDS)
    npos = hdr + 8 * cfg.B * cfg.T
    bad["n_params mismatch"] = buf[:npos] + struct.pack("<q", n_params(cfg) + 1) + buf[npos + 8:]
    bad["token out of range"] = buf[:hdr] + struct.pack("<i", cfg.vocab_size) + buf[hdr + 4:]

    def with_int(b, field, value):
        o = 12 + 4 * INT_FIELDS.index(field)
        return b[:o] + struct.pack("<i", value) + b[o + 4:]

    def with_float(b, field, value):
        o = 12 + 4 * len(INT_FIELDS) + 4 + 4 * FLOAT_FIELDS.index(field)
        return b[:o] + struct.pack("<f", value) + b[o + 4:]

    bad["router 2"] = with_int(buf_v3, "router", 2)
    bad["n_group not dividing n_experts"] = with_int(buf_v3, "n_group", 3)
    bad["top_k beyond the eligible groups"] = with_int(with_int(buf_v3, "n_group", 4),
                                                       "topk_group", 1)
    bad["shared experts of size 0"] = with_int(buf_v3, "d_shared", 0)
    bad["routed_scale 0"] = with_float(buf_v3, "routed_scale", 0.0)
    bad["seq_aux_coef NaN"] = with_float(buf_v3, "seq_aux_coef", float("nan"))
    bad["expert_bias 2"] = with_int(buf_v3, "expert_bias", 2)
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
