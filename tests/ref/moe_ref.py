#!/usr/bin/python3
"""Independent PyTorch reference of the moe engine's MoE layer (one layer, all
router and balance variants; docs/routing.md has the formulas).

  /usr/bin/python3 tests/ref/moe_ref.py check DUMP.bin
      Recomputes every record of a dump written by tests/test_moe_ref.c in
      float64 and compares: chosen experts, which assignments capacity kept,
      combine weights, output, aux / z / sequence-wise losses and the gradient
      of  sum(out * R) + a*aux + zc*z + sc*seq_aux  for every input and weight.
      Also checks that the selection bias gets no gradient.
      Exit 0 = all checks passed, 1 = some check failed, 2 = malformed dump.

Dump (little-endian): b"MOELAY01", int32 n_records, then per record:
  char label[64]
  int32 N, d, E, k, F, Fs, score (0 softmax, 1 sigmoid), mode (0 token, 1 expert,
        2 sequence), renorm, n_group, topk_group, overflow (0 position, 1 score),
        seq_len, use_bias, use_gate, jitter
  float32 scale, capacity, aux_coef, z_coef, seq_coef
  float32 x[N,d], router[E,d], gate[E,F,d], up[E,F,d], down[E,d,F], bias[E],
          sh_gate[Fs,d], sh_up[Fs,d], sh_down[d,Fs], sh_inp[d],
          noise[N,d] (only when jitter), R[N,d]
  int32 ids[N,S], kept[N,S]; float32 w[N,S]   (S = E for expert choice, else k)
  float32 out[N,d]; float64 aux, z, seq_aux
  float32 dx, drouter, dgate, dup, ddown, dsh_gate, dsh_up, dsh_down, dsh_inp
"""
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from model_ref import Checker  # the same comparison rule and tolerance as the model reference

INTS = ["N", "d", "E", "k", "F", "Fs", "score", "mode", "renorm", "n_group", "topk_group",
        "overflow", "seq_len", "use_bias", "use_gate", "jitter"]
FLOATS = ["scale", "capacity", "aux_coef", "z_coef", "seq_coef"]


class DumpError(Exception):
    pass


class Reader:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, dtype, count, shape=None):
        it = np.dtype(dtype).itemsize
        if count < 0 or self.pos + count * it > len(self.buf):
            raise DumpError("truncated at offset %d" % self.pos)
        a = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * it
        return a.reshape(shape) if shape else a


def read_records(buf):
    r = Reader(buf)
    if buf[:8] != b"MOELAY01":
        raise DumpError("bad magic")
    r.pos = 8
    n = int(r.take("<i4", 1)[0])
    recs = []
    for _ in range(n):
        rec = {"label": bytes(r.take("u1", 64)).split(b"\0")[0].decode()}
        rec.update({k: int(v) for k, v in zip(INTS, r.take("<i4", len(INTS)))})
        rec.update({k: float(v) for k, v in zip(FLOATS, r.take("<f4", len(FLOATS)))})
        N, d, E, k, Fh, Fs = (rec[x] for x in ("N", "d", "E", "k", "F", "Fs"))
        S = E if rec["mode"] == 1 else k
        f4 = "<f4"
        rec["x"] = r.take(f4, N * d, (N, d))
        rec["router"] = r.take(f4, E * d, (E, d))
        rec["gate"] = r.take(f4, E * Fh * d, (E, Fh, d))
        rec["up"] = r.take(f4, E * Fh * d, (E, Fh, d))
        rec["down"] = r.take(f4, E * d * Fh, (E, d, Fh))
        rec["bias"] = r.take(f4, E)
        rec["sh_gate"] = r.take(f4, Fs * d, (Fs, d))
        rec["sh_up"] = r.take(f4, Fs * d, (Fs, d))
        rec["sh_down"] = r.take(f4, d * Fs, (d, Fs))
        rec["sh_inp"] = r.take(f4, d)
        rec["noise"] = r.take(f4, N * d, (N, d)) if rec["jitter"] else None
        rec["R"] = r.take(f4, N * d, (N, d))
        rec["c_ids"] = r.take("<i4", N * S, (N, S))
        rec["c_kept"] = r.take("<i4", N * S, (N, S))
        rec["c_w"] = r.take(f4, N * S, (N, S))
        rec["c_out"] = r.take(f4, N * d, (N, d))
        rec["c_aux"], rec["c_z"], rec["c_seq"] = (float(v) for v in r.take("<f8", 3))
        for nm, shape in (("x", (N, d)), ("router", (E, d)), ("gate", (E, Fh, d)),
                          ("up", (E, Fh, d)), ("down", (E, d, Fh)), ("sh_gate", (Fs, d)),
                          ("sh_up", (Fs, d)), ("sh_down", (d, Fs)), ("sh_inp", (d,))):
            rec["c_d" + nm] = r.take(f4, int(np.prod(shape)), shape)
        recs.append(rec)
    if r.pos != len(buf):
        raise DumpError("%d trailing bytes" % (len(buf) - r.pos))
    return recs


def swiglu(x, wg, wu, wd):
    return (F.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t()


def group_mask(sel, n_group, topk_group):
    """sel [M, E] -> sel with experts outside the best topk_group groups at -inf.
    A group scores the sum of its two best entries (its best if it holds one)."""
    M, E = sel.shape
    if n_group <= 1 or topk_group >= n_group:
        return sel
    g = sel.view(M, n_group, E // n_group)
    gscore = g.topk(min(2, E // n_group), dim=-1).values.sum(-1)
    keep = torch.zeros(M, n_group, dtype=torch.bool)
    keep.scatter_(1, gscore.topk(topk_group, dim=-1).indices, True)
    mask = keep.unsqueeze(-1).expand(M, n_group, E // n_group).reshape(M, E)
    return sel.masked_fill(~mask, float("-inf"))


def capacity_of(cf, k, N, E):
    return int(min(max(math.ceil(cf * k * N / E), 1), N))


def layer(rec, P):
    """Returns a dict of tensors; P holds float64 leaf tensors."""
    N, E, k = rec["N"], rec["E"], rec["k"]
    mode, T = rec["mode"], rec["seq_len"] or rec["N"]
    B = N // T
    x = P["x"]
    xr = x * torch.as_tensor(rec["noise"], dtype=torch.float64) if rec["jitter"] else x
    logits = xr @ P["router"].t()
    if rec["score"] == 0:
        s = torch.softmax(logits, -1)
        q = s
    else:
        s = torch.sigmoid(logits)
        q = s / s.sum(-1, keepdim=True)
    bias = P["bias"] if rec["use_bias"] else torch.zeros(E, dtype=torch.float64)
    scale = rec["scale"] or 1.0
    if mode == 1:  # expert choice: each expert its c best tokens
        c = capacity_of(rec["capacity"] or 1.0, k, N, E)
        chosen = torch.zeros(N, E, dtype=torch.bool)
        for e in range(E):
            # stable sort: equal scores keep token order
            order = sorted(range(N), key=lambda t: (-float(s[t, e]), t))[:c]
            chosen[order, e] = True
        ids = torch.where(chosen, torch.arange(E).expand(N, E), torch.full((N, E), -1))
        w = torch.where(chosen, s * scale, torch.zeros_like(s))
        kept = chosen.clone()
    else:
        with torch.no_grad():
            if mode == 0:
                sel = group_mask(s + bias, rec["n_group"], rec["topk_group"])
                ids = sel.topk(k, dim=-1).indices
            else:  # one set per sequence from the mean scores (+ bias)
                mean = s.view(B, T, E).mean(1) + bias
                mean = group_mask(mean, rec["n_group"], rec["topk_group"])
                ids = mean.topk(k, dim=-1).indices.repeat_interleave(T, dim=0)
        v = s.gather(1, ids)
        w = (v / v.sum(-1, keepdim=True) if rec["renorm"] else v) * scale
        kept = torch.ones(N, k, dtype=torch.bool)
        if rec["capacity"] > 0:
            C = capacity_of(rec["capacity"], k, N, E)
            slots = [(t, j) for t in range(N) for j in range(k)]
            for e in range(E):
                mine = [(t, j) for (t, j) in slots if int(ids[t, j]) == e]
                if rec["overflow"] == 1:
                    mine.sort(key=lambda tj: (-float(v[tj[0], tj[1]]), tj[0] * k + tj[1]))
                for (t, j) in mine[C:]:
                    kept[t, j] = False
    out = torch.zeros_like(x)
    for t in range(N):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= 0 and kept[t, j]:
                out[t] = out[t] + w[t, j] * swiglu(x[t:t + 1], P["gate"][e], P["up"][e], P["down"][e])[0]
    if rec["Fs"]:
        y = swiglu(x, P["sh_gate"], P["sh_up"], P["sh_down"])
        if rec["use_gate"]:
            y = torch.sigmoid(x @ P["sh_inp"])[:, None] * y
        out = out + y
    # balance terms (counts: chosen assignments, before capacity)
    valid = ids >= 0
    counts = torch.zeros(E, dtype=torch.float64)
    counts.index_add_(0, ids[valid], torch.ones(int(valid.sum()), dtype=torch.float64))
    f = counts / counts.sum()
    aux = E * (f * q.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    seq = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        ib = ids[b * T:(b + 1) * T]
        vb = ib[ib >= 0]
        cb = torch.zeros(E, dtype=torch.float64).index_add_(0, vb, torch.ones(vb.numel(), dtype=torch.float64))
        fb = E * cb / (k * T)
        seq = seq + (fb * q[b * T:(b + 1) * T].mean(0)).sum()
    seq = seq / B
    return dict(out=out, ids=ids, kept=kept, w=w, aux=aux, z=z, seq=seq)


def check_record(ck, rec):
    lab = rec["label"]
    names = ["x", "router", "gate", "up", "down", "bias", "sh_gate", "sh_up", "sh_down", "sh_inp"]
    P = {n: torch.tensor(rec[n], dtype=torch.float64, requires_grad=True) for n in names}
    res = layer(rec, P)
    ids = res["ids"].numpy()
    same = np.array_equal(ids, rec["c_ids"])  # in order: both sort by descending score
    ck.check("%s: chosen experts" % lab, same)
    ck.check("%s: assignments kept by capacity" % lab,
             np.array_equal(res["kept"].numpy().astype(np.int32), rec["c_kept"]))
    if not same:
        return
    ck.close(rec["c_w"], res["w"].detach().numpy(), "%s: combine weights" % lab)
    ck.close(rec["c_out"], res["out"].detach().numpy(), "%s: output" % lab)
    for nm in ("aux", "z", "seq"):
        ck.close(np.float64(rec["c_" + nm]), float(res[nm]), "%s: %s loss" % (lab, nm))
    R = torch.tensor(rec["R"], dtype=torch.float64)
    loss = ((res["out"] * R).sum() + rec["aux_coef"] * res["aux"] + rec["z_coef"] * res["z"]
            + rec["seq_coef"] * res["seq"])
    used = [n for n in names if n != "bias"]
    if not rec["Fs"]:
        used = [n for n in used if not n.startswith("sh_")]
    elif not rec["use_gate"]:
        used.remove("sh_inp")
    grads = torch.autograd.grad(loss, [P[n] for n in used] + [P["bias"]], allow_unused=True)
    for n, g in zip(used, grads):
        g = torch.zeros_like(P[n]) if g is None else g
        ck.close(rec["c_d" + n], g.numpy(), "%s: grad %s" % (lab, n))
    gb = grads[-1]
    ck.check("%s: the selection bias gets no gradient" % lab,
             gb is None or float(gb.abs().max()) == 0.0)


def main(argv):
    if len(argv) != 2 or argv[0] != "check":
        print(__doc__)
        return 2
    torch.set_num_threads(1)
    try:
        with open(argv[1], "rb") as fh:
            recs = read_records(fh.read())
    except (OSError, DumpError) as e:
        print("error: %s" % e)
        print("0 passed, 1 failed")
        return 2
    ck = Checker()
    for rec in recs:
        check_record(ck, rec)
    ck.summary()
    return 0 if ck.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
