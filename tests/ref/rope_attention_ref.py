#!/usr/bin/python3
"""Independent PyTorch (float64) reference for the kernels' general RoPE
(partial n_rot, NeoX or adjacent pairs, YaRN as in the YaRN paper and
Hugging Face's rope utilities) and for causal grouped-query attention with
separate q/k and v head sizes and an explicit scale.

  /usr/bin/python3 tests/ref/rope_attention_ref.py check DUMP.bin
      Recomputes every record of a dump written by tests/test_kernels.c and
      compares forward outputs and gradients (autograd of sum(out * G)).
      Exit 0 = all checks passed, 1 = some check failed, 2 = malformed dump.

Dump (little-endian): b"ROPEATT1", int32 n_records, then per record int32 kind:
  kind 0 (RoPE): int32 N, H, D, n_rot, neox, n_ctx_orig;
        float32 base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow;
        int32 pos[N]; float32 x[N,H,D], y[N,H,D] (forward), g[N,H,D],
        dx[N,H,D] (backward of g)
  kind 1 (attention): int32 B, T, H, KVH, Dk, Dv; float32 scale;
        float32 q[B,T,H,Dk], k[B,T,KVH,Dk], v[B,T,KVH,Dv], out[B,T,H,Dv],
        g[B,T,H,Dv], dq, dk, dv (same shapes as q, k, v)
"""
import math
import sys

import numpy as np
import torch

TOL = 1e-5


class DumpError(Exception):
    pass


class Reader:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, dtype, count):
        it = np.dtype(dtype).itemsize
        if count < 0 or self.pos + count * it > len(self.buf):
            raise DumpError("truncated at offset %d" % self.pos)
        a = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * it
        return a

    def ints(self, n):
        return [int(v) for v in self.take("<i4", n)]

    def floats(self, n):
        return [float(v) for v in self.take("<f4", n)]

    def tensor(self, *shape):
        return torch.from_numpy(self.take("<f4", int(np.prod(shape))).reshape(shape)).double()


def rel_err(a, b):
    d = (a.double() - b.double()).abs().max().item()
    s = b.double().abs().max().item()
    return d / max(s, 1e-30)


def inv_freqs(n_rot, base, freq_scale, ext_factor, beta_fast, beta_slow, n_ctx_orig):
    """Per-pair frequencies and the cos/sin magnitude. YaRN blends the
    interpolated (freq_scale * f) and original frequencies with a linear ramp
    between the correction dims, and scales cos/sin by 1 + 0.1 ln(1/freq_scale)."""
    i = torch.arange(n_rot // 2, dtype=torch.float64)
    f_extra = base ** (-2.0 * i / n_rot)
    f_inter = freq_scale * f_extra
    if ext_factor == 0.0:
        return f_inter, 1.0

    def corr_dim(beta):
        return n_rot * math.log(n_ctx_orig / (beta * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), n_rot - 1)
    if high == low:
        high += 0.001
    ramp = ((i - low) / (high - low)).clamp(0, 1)
    extra_share = (1 - ramp) * ext_factor
    return f_inter * (1 - extra_share) + f_extra * extra_share, 1.0 + 0.1 * math.log(1.0 / freq_scale)


def rope_torch(x, pos, n_rot, neox, freqs, mscale):
    """x[N,H,D] float64 -> rotated copy; dims past n_rot pass through."""
    ang = pos.double()[:, None] * freqs[None, :]            # [N, n_rot/2]
    c = (torch.cos(ang) * mscale)[:, None, :]
    s = (torch.sin(ang) * mscale)[:, None, :]
    rot, rest = x[..., :n_rot], x[..., n_rot:]
    if neox:
        x0, x1 = rot[..., : n_rot // 2], rot[..., n_rot // 2:]
        y = torch.cat([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    else:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
        y = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return torch.cat([y, rest], dim=-1)


def attention_torch(q, k, v, scale):
    """q[B,T,H,Dk], k[B,T,KVH,Dk], v[B,T,KVH,Dv] -> out[B,T,H,Dv], causal."""
    B, T, H, _ = q.shape
    G = H // k.shape[2]
    kk = k.repeat_interleave(G, dim=2)                       # head h uses kv head h // G
    vv = v.repeat_interleave(G, dim=2)
    s = torch.einsum("bthd,buhd->bhtu", q, kk) * scale
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhtu,buhd->bthd", p, vv)


def check(path):
    buf = open(path, "rb").read()
    if buf[:8] != b"ROPEATT1":
        raise DumpError("bad magic")
    r = Reader(buf)
    r.pos = 8
    (n,) = r.ints(1)
    passed = failed = 0

    def report(name, a, b):
        nonlocal passed, failed
        e = rel_err(a, b)
        if e <= TOL:
            passed += 1
            print("ok   %s  (rel err %.3g)" % (name, e))
        else:
            failed += 1
            print("FAIL %s  (rel err %.3g > %g)" % (name, e, TOL))

    for rec in range(n):
        (kind,) = r.ints(1)
        if kind == 0:
            N, H, D, n_rot, neox, n_ctx_orig = r.ints(6)
            base, fs, ext, attn, bf, bs = r.floats(6)
            pos = torch.tensor(r.ints(N))
            x, y, g, dx = (r.tensor(N, H, D) for _ in range(4))
            freqs, msc = inv_freqs(n_rot, base, fs, ext, bf, bs, n_ctx_orig)
            msc *= attn
            xr = x.clone().requires_grad_(True)
            want = rope_torch(xr, pos, n_rot, neox, freqs, msc)
            (want * g).sum().backward()
            name = "rope %d: D %d n_rot %d %s%s" % (rec, D, n_rot, "NeoX" if neox else "adjacent",
                                                   ", YaRN 1/%g" % (1 / fs) if ext else "")
            report(name + " forward", y, want.detach())
            report(name + " backward", dx, xr.grad)
        elif kind == 1:
            B, T, H, KVH, Dk, Dv = r.ints(6)
            (scale,) = r.floats(1)
            q, k, v = r.tensor(B, T, H, Dk), r.tensor(B, T, KVH, Dk), r.tensor(B, T, KVH, Dv)
            out, g = r.tensor(B, T, H, Dv), r.tensor(B, T, H, Dv)
            dq, dk, dv = r.tensor(B, T, H, Dk), r.tensor(B, T, KVH, Dk), r.tensor(B, T, KVH, Dv)
            qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
            want = attention_torch(qr, kr, vr, scale)
            (want * g).sum().backward()
            name = "attention %d: B %d T %d H %d KVH %d Dk %d Dv %d" % (rec, B, T, H, KVH, Dk, Dv)
            report(name + " out", out, want.detach())
            report(name + " dq", dq, qr.grad)
            report(name + " dk", dk, kr.grad)
            report(name + " dv", dv, vr.grad)
        else:
            raise DumpError("record %d: unknown kind %d" % (rec, kind))
    if r.pos != len(buf):
        raise DumpError("%d trailing bytes" % (len(buf) - r.pos))
    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


def main():
    if len(sys.argv) != 3 or sys.argv[1] != "check":
        print(__doc__)
        return 2
    try:
        return check(sys.argv[2])
    except (DumpError, OSError) as e:
        print("malformed dump: %s" % e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
