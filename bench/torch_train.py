#!/usr/bin/python3
"""PyTorch training baseline for `make bench`.

Trains the engine's architecture (the model code of tests/ref/model_ref.py:
batched attention, MoE by sorting tokens per expert and index_add) with AdamW,
on random token batches or on a token file, and prints one JSON line:

  {"tokens_per_s": ..., "step_ms_median": ..., "threads": ..., "torch": "..."}

usage: /usr/bin/python3 bench/torch_train.py CONFIG [--tokens FILE] [--quiet]
  CONFIG is JSON text ('{"n_experts": 8, "batch": 8, ...}') or a JSON file.
  Fields: any moe_config field (vocab_size, d_model, n_layers, n_heads,
  n_kv_heads, d_ff, n_experts, top_k, d_expert, moe_every, moe_first_dense,
  tied_embeddings, renorm_topk, max_seq, rope_base, norm_eps, aux_loss_coef,
  z_loss_coef, init_std), plus
    preset   base config: default | tiny | dense | mixtral (as in src/model/config.c)
    batch, seq, steps, threads, warmup (untimed first steps, default 3),
    matmul (fp32 | bf16: forward under torch.autocast("cpu", torch.bfloat16),
            PyTorch's own mixed precision, to compare with moe's matmul=bf16),
    lr, weight_decay, beta1, beta2, adam_eps, grad_clip, seed,
    tokens (path of a token file; same as --tokens),
    token_dtype (int32 | uint16 | int64; raw little-endian, default int32).
Unset fields take the values of the engine's "default" preset.
"""
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ref"))
import model_ref  # noqa: E402

# base_config of src/model/config.c and its presets (keep in sync)
BASE = dict(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=768,
            n_experts=8, top_k=2, d_expert=384, moe_every=1, moe_first_dense=0,
            tied_embeddings=0, renorm_topk=1, max_seq=256, rope_base=10000.0, norm_eps=1e-5,
            aux_loss_coef=0.01, z_loss_coef=0.001, init_std=0.02)
PRESETS = {
    "default": {},
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                 n_experts=4, top_k=2, d_expert=64, max_seq=128),
    "dense": dict(d_ff=2 * 384, n_experts=0, top_k=0),
    "mixtral": dict(n_experts=8, top_k=2),
}
TRAIN = dict(batch=8, seq=128, steps=10, threads=0, warmup=3, lr=3e-4, weight_decay=0.1,
             beta1=0.9, beta2=0.95, adam_eps=1e-8, grad_clip=1.0, seed=1, tokens=None,
             token_dtype="int32", matmul="fp32")


def die(msg):
    print("torch_train: error: " + msg, file=sys.stderr)
    sys.exit(2)


def load_config(arg):
    text = arg
    if not arg.lstrip().startswith("{"):
        try:
            with open(arg) as fh:
                text = fh.read()
        except OSError as e:
            die("cannot read config %s: %s" % (arg, e.strerror))
    try:
        user = json.loads(text)
    except ValueError as e:
        die("config is not valid JSON: %s" % e)
    if not isinstance(user, dict):
        die("config must be a JSON object")
    model = dict(BASE)
    preset = user.get("preset", "default")
    if preset not in PRESETS:
        die("unknown preset %r (known: %s)" % (preset, ", ".join(PRESETS)))
    model.update(PRESETS[preset])
    train = dict(TRAIN)
    for k, v in user.items():
        if k == "preset":
            continue
        if k in model:
            model[k] = v
        elif k in TRAIN:
            train[k] = v
        else:
            print("torch_train: note: ignoring unknown config field %r" % k, file=sys.stderr)
    try:
        cfg = model_ref.Config(**model)
    except (TypeError, ValueError) as e:
        die("bad config: %s" % e)
    msg = cfg.validate()
    if msg:
        die("bad config: " + msg)
    for k in ("batch", "seq", "steps", "threads", "warmup", "seed"):
        try:
            train[k] = int(train[k])
        except (TypeError, ValueError):
            die("%s must be an integer" % k)
    for k in ("lr", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip"):
        try:
            train[k] = float(train[k])
        except (TypeError, ValueError):
            die("%s must be a number" % k)
    if train["matmul"] not in ("fp32", "bf16"):
        die("matmul must be fp32 or bf16")
    if train["batch"] <= 0 or train["seq"] <= 0:
        die("batch and seq must be > 0")
    if cfg.max_seq > 0 and train["seq"] > cfg.max_seq:
        die("seq (%d) exceeds max_seq (%d)" % (train["seq"], cfg.max_seq))
    if train["warmup"] < 0 or train["steps"] <= train["warmup"]:
        die("steps (%d) must exceed warmup (%d)" % (train["steps"], train["warmup"]))
    return cfg, train


class Batches:
    def __init__(self, cfg, train):
        self.B, self.T, self.V = train["batch"], train["seq"], cfg.vocab_size
        self.g = torch.Generator().manual_seed(train["seed"])
        self.data = None
        if train["tokens"]:
            dt = {"int32": "<i4", "uint16": "<u2", "int64": "<i8"}.get(train["token_dtype"])
            if dt is None:
                die("token_dtype must be int32, uint16 or int64")
            try:
                arr = np.fromfile(train["tokens"], dtype=dt)
            except OSError as e:
                die("cannot read token file %s: %s" % (train["tokens"], e.strerror))
            if arr.size < self.T + 2:
                die("token file %s has only %d tokens" % (train["tokens"], arr.size))
            if arr.min() < 0 or arr.max() >= self.V:
                die("token file has ids outside [0, %d)" % self.V)
            self.data = torch.from_numpy(arr.astype(np.int64))

    def next(self):
        if self.data is None:
            x = torch.randint(0, self.V, (self.B, self.T + 1), generator=self.g)
        else:
            starts = torch.randint(0, self.data.numel() - self.T - 1, (self.B,), generator=self.g)
            x = torch.stack([self.data[s:s + self.T + 1] for s in starts.tolist()])
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def blas_in_use():
    """Which BLAS library the process has loaded (Debian's torch uses the
    libblas.so.3 alternative: netlib's reference BLAS unless OpenBLAS/BLIS is
    installed), so a result can be read fairly."""
    try:
        with open("/proc/self/maps") as fh:
            libs = {ln.split()[-1] for ln in fh if "blas" in ln.lower() and "/" in ln}
    except OSError:
        return "unknown"
    names = sorted({os.path.realpath(l) for l in libs})
    for key in ("openblas", "blis", "mkl", "atlas"):
        if any(key in n for n in names):
            return key
    return "netlib" if names else "none"


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    args = list(argv)
    quiet = "--quiet" in args
    args = [a for a in args if a != "--quiet"]
    tok_path = None
    if "--tokens" in args:
        i = args.index("--tokens")
        if i + 1 >= len(args):
            die("--tokens needs a file")
        tok_path = args[i + 1]
        del args[i:i + 2]
    if len(args) != 1:
        die("expected exactly one CONFIG argument (JSON text or file)")
    cfg, train = load_config(args[0])
    if tok_path:
        train["tokens"] = tok_path
    threads = train["threads"] if train["threads"] > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.manual_seed(train["seed"])

    P = model_ref.init_params(cfg, seed=train["seed"])
    params = [t.requires_grad_(True) for t in P.values()]
    opt = torch.optim.AdamW(
        [dict(params=[p for p in params if p.dim() >= 2], weight_decay=train["weight_decay"]),
         dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)],
        lr=train["lr"], betas=(train["beta1"], train["beta2"]), eps=train["adam_eps"])
    data = Batches(cfg, train)
    times, losses = [], []
    for step in range(train["steps"]):
        x, y = data.next()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if train["matmul"] == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model_ref.forward(cfg, P, x, y)
        else:
            out = model_ref.forward(cfg, P, x, y)
        out["loss_total"].backward()
        if train["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, train["grad_clip"])
        opt.step()
        loss = float(out["loss_total"])
        dt = time.perf_counter() - t0
        losses.append(loss)
        if step >= train["warmup"]:
            times.append(dt)
        if not quiet:
            print("step %d loss %.4f %.1f ms" % (step, loss, dt * 1e3), file=sys.stderr)
    med = statistics.median(times)
    n_total = model_ref.n_params(cfg)
    res = {
        "tokens_per_s": round(train["batch"] * train["seq"] / med, 2),
        "step_ms_median": round(med * 1e3, 3),
        "threads": threads,
        "torch": torch.__version__,
        "blas": blas_in_use(),
        "batch": train["batch"], "seq": train["seq"], "steps_timed": len(times),
        "params": n_total, "loss_first": round(losses[0], 5), "loss_last": round(losses[-1], 5),
    }
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
