#!/usr/bin/python3
"""Independent GGUF (v2/v3) reader and dequantisers for the reference models.

Only struct and numpy. The file is memory-mapped (numpy.memmap); tensors are
dequantised to float32 on demand with vectorised numpy code written from the
published block layouts (llama.cpp ggml-common.h / ggml-quants.c: facts only).

  GGUFFile(path)           .version, .metadata (dict), .tensors (dict name ->
                           TensorInfo), .alignment, .data_offset
  f.tensor(name)           float32 array in numpy order: shape = ne reversed
  f.tensor_type(name)      ggml type id (GGML_F32, GGML_Q4_K, ...)
  dequantize(raw, type, n) float32 values of n elements from raw bytes
  act_roundtrip(x, type)   the float values llama.cpp's x86 CPU dot product
                           effectively sees for activations x multiplied with
                           weights of that type (see the function)

File layout (little-endian):
  "GGUF", u32 version, u64 n_tensors, u64 n_kv           (v1 used u32 counts;
                                                          not supported)
  n_kv x  { string key, u32 value_type, value }
  n_tensors x { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type,
                u64 offset (relative to the data section) }
  padding to general.alignment (default 32), then the data section.
  string = u64 length + bytes (no terminator); array = u32 elem_type,
  u64 count, elements.
"""
import struct
import sys

import numpy as np

# --- GGUF metadata value types
GGUF_UINT8, GGUF_INT8, GGUF_UINT16, GGUF_INT16 = 0, 1, 2, 3
GGUF_UINT32, GGUF_INT32, GGUF_FLOAT32, GGUF_BOOL = 4, 5, 6, 7
GGUF_STRING, GGUF_ARRAY, GGUF_UINT64, GGUF_INT64, GGUF_FLOAT64 = 8, 9, 10, 11, 12

_SCALAR_FMT = {
    GGUF_UINT8: "<B", GGUF_INT8: "<b", GGUF_UINT16: "<H", GGUF_INT16: "<h",
    GGUF_UINT32: "<I", GGUF_INT32: "<i", GGUF_FLOAT32: "<f", GGUF_BOOL: "<?",
    GGUF_UINT64: "<Q", GGUF_INT64: "<q", GGUF_FLOAT64: "<d",
}
_SCALAR_NP = {
    GGUF_UINT8: "<u1", GGUF_INT8: "<i1", GGUF_UINT16: "<u2", GGUF_INT16: "<i2",
    GGUF_UINT32: "<u4", GGUF_INT32: "<i4", GGUF_FLOAT32: "<f4", GGUF_BOOL: "<u1",
    GGUF_UINT64: "<u8", GGUF_INT64: "<i8", GGUF_FLOAT64: "<f8",
}

# --- ggml tensor types (ids from ggml.h)
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0 = 0, 1, 2, 8
GGML_Q4_K, GGML_Q5_K, GGML_Q6_K, GGML_Q8_K = 12, 13, 14, 15
GGML_BF16 = 30

# type id -> (name, elements per block, bytes per block)
TYPE_INFO = {
    GGML_F32: ("F32", 1, 4),
    GGML_F16: ("F16", 1, 2),
    GGML_BF16: ("BF16", 1, 2),
    GGML_Q4_0: ("Q4_0", 32, 18),     # f16 d; u8 qs[16]
    GGML_Q8_0: ("Q8_0", 32, 34),     # f16 d; i8 qs[32]
    GGML_Q4_K: ("Q4_K", 256, 144),   # f16 d, dmin; u8 scales[12]; u8 qs[128]
    GGML_Q5_K: ("Q5_K", 256, 176),   # f16 d, dmin; scales[12]; qh[32]; qs[128]
    GGML_Q6_K: ("Q6_K", 256, 210),   # u8 ql[128]; qh[64]; i8 scales[16]; f16 d
}
TYPE_BY_NAME = {v[0]: k for k, v in TYPE_INFO.items()}


class GGUFError(Exception):
    pass


class TensorInfo:
    def __init__(self, name, ne, ggml_type, offset):
        self.name = name
        self.ne = tuple(ne)            # ggml order: ne[0] is the contiguous dim
        self.type = ggml_type
        self.offset = offset           # relative to the data section

    @property
    def shape(self):                   # numpy (row-major) order
        return tuple(reversed(self.ne))

    @property
    def n_elements(self):
        n = 1
        for d in self.ne:
            n *= d
        return n

    def n_bytes(self):
        if self.type not in TYPE_INFO:
            raise GGUFError("tensor %s: unsupported ggml type %d" % (self.name, self.type))
        _, blk, size = TYPE_INFO[self.type]
        if self.ne[0] % blk:
            raise GGUFError("tensor %s: row of %d not a multiple of block %d"
                            % (self.name, self.ne[0], blk))
        return self.n_elements // blk * size


class _Cursor:
    """Bounds-checked sequential reader over the mapped bytes."""

    def __init__(self, buf):
        self.buf = buf
        self.pos = 0

    def take(self, n):
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError("truncated file at offset %d (need %d bytes)" % (self.pos, n))
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def scalar(self, vtype):
        fmt = _SCALAR_FMT[vtype]
        return struct.unpack(fmt, bytes(self.take(struct.calcsize(fmt))))[0]

    def string(self):
        n = self.scalar(GGUF_UINT64)
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, vtype, depth=0):
        if vtype in _SCALAR_FMT:
            return self.scalar(vtype)
        if vtype == GGUF_STRING:
            return self.string()
        if vtype == GGUF_ARRAY:
            if depth > 4:
                raise GGUFError("arrays nested too deeply")
            etype = self.scalar(GGUF_UINT32)
            count = self.scalar(GGUF_UINT64)
            if etype in _SCALAR_NP:
                size = np.dtype(_SCALAR_NP[etype]).itemsize
                if count > len(self.buf):
                    raise GGUFError("array count %d exceeds the file" % count)
                raw = self.take(count * size)
                arr = np.frombuffer(bytes(raw), dtype=_SCALAR_NP[etype])
                return arr.astype(bool) if etype == GGUF_BOOL else arr
            if count > len(self.buf):
                raise GGUFError("array count %d exceeds the file" % count)
            return [self.value(etype, depth + 1) for _ in range(count)]
        raise GGUFError("unknown metadata value type %d" % vtype)


class GGUFFile:
    def __init__(self, path):
        self.path = path
        self.mm = np.memmap(path, dtype=np.uint8, mode="r")
        cur = _Cursor(self.mm)
        if bytes(cur.take(4)) != b"GGUF":
            raise GGUFError("%s: not a GGUF file" % path)
        self.version = cur.scalar(GGUF_UINT32)
        if self.version not in (2, 3):
            raise GGUFError("unsupported GGUF version %d" % self.version)
        n_tensors = cur.scalar(GGUF_UINT64)
        n_kv = cur.scalar(GGUF_UINT64)
        if n_tensors > len(self.mm) or n_kv > len(self.mm):
            raise GGUFError("implausible counts")
        self.metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.scalar(GGUF_UINT32)
            self.metadata[key] = cur.value(vtype)
        self.tensors = {}
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar(GGUF_UINT32)
            if n_dims > 4:
                raise GGUFError("tensor %s: %d dims" % (name, n_dims))
            ne = [cur.scalar(GGUF_UINT64) for _ in range(n_dims)]
            ttype = cur.scalar(GGUF_UINT32)
            off = cur.scalar(GGUF_UINT64)
            self.tensors[name] = TensorInfo(name, ne, ttype, off)
        self.alignment = int(self.metadata.get("general.alignment", 32))
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise GGUFError("alignment %d not a power of two" % self.alignment)
        a = self.alignment
        self.data_offset = (cur.pos + a - 1) // a * a
        for t in self.tensors.values():
            if t.offset % a:
                raise GGUFError("tensor %s offset %d not aligned" % (t.name, t.offset))
            end = self.data_offset + t.offset + t.n_bytes()
            if end > len(self.mm):
                raise GGUFError("tensor %s runs past the end of the file" % t.name)

    def get(self, key, default=None):
        return self.metadata.get(key, default)

    def has(self, name):
        return name in self.tensors

    def tensor_type(self, name):
        return self.tensors[name].type

    def raw(self, name):
        t = self.tensors[name]
        start = self.data_offset + t.offset
        return self.mm[start:start + t.n_bytes()]

    def tensor(self, name):
        t = self.tensors[name]
        return dequantize(self.raw(name), t.type, t.n_elements).reshape(t.shape)


# ---------------------------------------------------------------- dequantise

def _f16(raw_u8_pairs):
    """(..., 2) uint8 little-endian -> float32."""
    return np.ascontiguousarray(raw_u8_pairs).view("<f2").astype(np.float32)[..., 0]


def _k_scales_mins(sc):
    """The 6-bit scales and mins of Q4_K/Q5_K: sc (nb, 12) uint8 -> two (nb, 8).

    Sub-blocks 0..3: low 6 bits of bytes 0..3 (scale) and 4..7 (min).
    Sub-blocks 4..7: low nibble (scale) / high nibble (min) of bytes 8..11,
    with the top 2 bits taken from bytes 0..3 (scale) / 4..7 (min)."""
    sc = sc.astype(np.uint8)
    scales = np.empty(sc.shape[:-1] + (8,), np.uint8)
    mins = np.empty_like(scales)
    scales[:, :4] = sc[:, 0:4] & 63
    mins[:, :4] = sc[:, 4:8] & 63
    scales[:, 4:] = (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)
    mins[:, 4:] = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return scales, mins


def dequantize(raw, ggml_type, n):
    """raw bytes (uint8 array) of a tensor -> float32 array of n values.

    Arithmetic is float32 in the order ggml's dequantize_row_* uses (equal to
    llama.cpp's dequantised weights up to a possible FMA contraction there)."""
    raw = np.asarray(raw, dtype=np.uint8)
    if ggml_type == GGML_F32:
        return raw.view("<f4").astype(np.float32)[:n]
    if ggml_type == GGML_F16:
        return raw.view("<f2").astype(np.float32)[:n]
    if ggml_type == GGML_BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)[:n]
    if ggml_type not in TYPE_INFO:
        raise GGUFError("unsupported ggml type %d" % ggml_type)
    _, blk, size = TYPE_INFO[ggml_type]
    nb = n // blk
    b = raw[:nb * size].reshape(nb, size)
    if ggml_type == GGML_Q8_0:
        d = _f16(b[:, 0:2].reshape(nb, 1, 2))              # (nb, 1)
        q = b[:, 2:34].view(np.int8).astype(np.float32)    # (nb, 32)
        return (q * d).reshape(-1)
    if ggml_type == GGML_Q4_0:
        d = _f16(b[:, 0:2].reshape(nb, 1, 2))
        qs = b[:, 2:18]
        lo = (qs & 0xF).astype(np.int32) - 8              # elements 0..15
        hi = (qs >> 4).astype(np.int32) - 8               # elements 16..31
        q = np.concatenate([lo, hi], axis=1).astype(np.float32)
        return (q * d).reshape(-1)
    if ggml_type in (GGML_Q4_K, GGML_Q5_K):
        d = _f16(b[:, 0:2].reshape(nb, 1, 2))
        dmin = _f16(b[:, 2:4].reshape(nb, 1, 2))
        scales, mins = _k_scales_mins(b[:, 4:16])
        d_sub = d * scales.astype(np.float32)              # (nb, 8)
        m_sub = dmin * mins.astype(np.float32)
        if ggml_type == GGML_Q4_K:
            qs = b[:, 16:144].reshape(nb, 4, 32)           # 4 chunks of 64 values
        else:
            qh = b[:, 16:48]                               # (nb, 32)
            qs = b[:, 48:176].reshape(nb, 4, 32)
        # chunk c: sub-block 2c = low nibbles, 2c+1 = high nibbles
        q = np.stack([qs & 0xF, qs >> 4], axis=2).astype(np.int32)   # (nb, 4, 2, 32)
        if ggml_type == GGML_Q5_K:
            # 5th bit of sub-block s is bit s of qh[l]
            bits = np.arange(8).reshape(4, 2)
            high = (qh[:, None, None, :] >> bits[None, :, :, None]) & 1
            q = q + 16 * high.astype(np.int32)
        q = q.reshape(nb, 8, 32).astype(np.float32)
        return (d_sub[:, :, None] * q - m_sub[:, :, None]).reshape(-1)
    if ggml_type == GGML_Q6_K:
        ql = b[:, 0:128].reshape(nb, 2, 64)                # two halves of 128 values
        qh = b[:, 128:192].reshape(nb, 2, 32)
        sc = b[:, 192:208].view(np.int8).astype(np.float32).reshape(nb, 2, 8)
        d = _f16(b[:, 208:210].reshape(nb, 1, 2)).reshape(nb, 1, 1, 1)
        lo = ql & 0xF
        hi = ql >> 4
        # quarter j of a half (32 values each): low bits from ql, 2 high bits
        # from qh[l] >> (2j)
        q4 = [lo[:, :, 0:32], lo[:, :, 32:64], hi[:, :, 0:32], hi[:, :, 32:64]]
        qs = []
        for j in range(4):
            h = (qh >> (2 * j)) & 3
            qs.append((q4[j].astype(np.int32) | (h.astype(np.int32) << 4)) - 32)
        q = np.stack(qs, axis=2).astype(np.float32)        # (nb, 2, 4, 32)
        # scale index within the half: 2j + (l >= 16)
        scale = sc.reshape(nb, 2, 4, 2)                     # [half, j, l//16]
        scale = np.repeat(scale, 16, axis=3)               # (nb, 2, 4, 32)
        return ((d * scale) * q).reshape(-1)
    raise GGUFError("unsupported ggml type %d" % ggml_type)


# ----------------------------------------------- activation fake quantisation

def _rne_f32(v):
    """Round float32 values half-to-even, as _mm256_round_ps(_MM_ROUND_NEAREST)
    and ggml's nearest_int (the 1.5*2^23 trick) do."""
    return np.rint(v).astype(np.float32)


def fp16_round(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def bf16_round(x):
    """float32 -> bf16 -> float32, round to nearest even (ggml's
    GGML_FP32_TO_BF16). Note: the AVX512-BF16 conversion llama.cpp uses on
    this CPU also flushes denormal inputs to zero; not emulated."""
    u = np.ascontiguousarray(np.asarray(x, np.float32)).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    out = r.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, out).astype(np.float32)


def q8_0_roundtrip(x):
    """Activation rows (..., n) -> values of their Q8_0 quantisation (x86
    quantize_row_q8_0): per block of 32, amax = max|x| (fp32), id = 127/amax
    (fp32), q = rne(x*id), d = fp16(amax/127); the dot product sees q*d."""
    x = np.asarray(x, np.float32)
    shp = x.shape
    assert shp[-1] % 32 == 0, "Q8_0 activation row not a multiple of 32"
    b = x.reshape(-1, 32)
    amax = np.max(np.abs(b), axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        idv = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0)).astype(np.float32)
    q = _rne_f32((b * idv).astype(np.float32))
    d = fp16_round((amax / np.float32(127.0)).astype(np.float32))
    return (q * d).astype(np.float32).reshape(shp)


def q8_k_roundtrip(x):
    """Activation rows -> values of their Q8_K quantisation (quantize_row_q8_K:
    per block of 256, iscale = -127/max with max the signed value of largest
    magnitude (fp32), q = min(127, nearest(iscale*x)), d = 1/iscale stored as
    fp32; the dot product sees q*d). The sign of iscale cancels; this uses
    |iscale| = 127/amax which gives the same values."""
    x = np.asarray(x, np.float32)
    shp = x.shape
    assert shp[-1] % 256 == 0, "Q8_K activation row not a multiple of 256"
    b = x.reshape(-1, 256)
    idx = np.argmax(np.abs(b), axis=1)
    mx = b[np.arange(b.shape[0]), idx][:, None]        # signed max (first of ties)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(mx != 0, np.float32(-127.0) / mx, np.float32(0)).astype(np.float32)
        q = _rne_f32((iscale * b).astype(np.float32))
        q = np.minimum(q, np.float32(127))
        d = np.where(mx != 0, (np.float32(1.0) / iscale).astype(np.float32), np.float32(0))
    return (q * d).astype(np.float32).reshape(shp)


# weight type -> the activation conversion its CPU dot product uses
# (ggml-cpu type_traits_cpu[].vec_dot_type)
VEC_DOT_ROUNDTRIP = {
    GGML_F32: None,
    GGML_F16: fp16_round,
    GGML_BF16: bf16_round,
    GGML_Q8_0: q8_0_roundtrip,
    GGML_Q4_0: q8_0_roundtrip,
    GGML_Q4_K: q8_k_roundtrip,
    GGML_Q5_K: q8_k_roundtrip,
    GGML_Q6_K: q8_k_roundtrip,
}


def act_roundtrip(x, weight_type):
    """The float values llama.cpp's x86 CPU matmul effectively multiplies with
    weights of weight_type, for float32 activations x (rows along the last
    axis). F32 weights: x unchanged (as float32)."""
    f = VEC_DOT_ROUNDTRIP.get(weight_type, "missing")
    if f == "missing":
        raise GGUFError("no activation rule for ggml type %d" % weight_type)
    x = np.asarray(x, np.float32)
    return x if f is None else f(x)


def main(argv):
    if len(argv) < 2:
        print("usage: gguf_read.py FILE.gguf   (prints metadata and tensor infos)")
        return 2
    f = GGUFFile(argv[1])
    print("GGUF v%d, %d kv, %d tensors, alignment %d, data at %d"
          % (f.version, len(f.metadata), len(f.tensors), f.alignment, f.data_offset))
    for k, v in f.metadata.items():
        if isinstance(v, (list, np.ndarray)) and len(v) > 8:
            v = "[%d items] %s ..." % (len(v), list(v[:4]))
        print("  %s = %s" % (k, v))
    for t in f.tensors.values():
        print("  %-40s %-5s %s" % (t.name, TYPE_INFO.get(t.type, ("?%d" % t.type,))[0], list(t.ne)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
