"""End-to-end HaF training step of a causal LM: fused loss on the body's hidden states vs the naive loss.

One step = forward of the body, reward head on the last token, the HaF loss (BT on rewards + alpha · DPO
sigmoid on sequence log-probs, reference-free, β = 0.1, alpha = 0.2, reward_weight = 1), backward, AdamW.

    haf    hidden = model.model(ids).last_hidden_state; fused_haf_loss(hidden, lm_head.weight, labels, r)
    naive  logits = model.lm_head(hidden) (what ``model(ids).logits`` computes: [2B, T, V] in the model
           dtype), then .float().log_softmax(-1).gather(...) and the same O(B) loss

Models are built locally from ``transformers.LlamaConfig`` with random weights (no downloads):
``tiny``/``cpu`` small Llamas on CPU, ``gpu`` a ~0.5B-parameter Llama (Qwen2.5-0.5B-like dims) in bf16.
Reported: tokens/s (2·pairs·T / median step time), peak memory at a fixed batch (CPU: peak RSS of the
worker and its rise above the RSS after model + inputs were built; CUDA: max_memory_allocated), and on CUDA
the largest batch (pairs) that still runs, each try in a fresh subprocess.

    python benchmarks/bench_train.py                 # --preset cpu -> results/cpu-<date>-train.*
    python benchmarks/bench_train.py --preset gpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

BETA, ALPHA, REWARD_WEIGHT = 0.1, 0.2, 1.0
IGNORE = -100
SEED = 1234

MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    "cpu": dict(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    # Qwen2.5-0.5B-like dimensions (tied embeddings): ~0.49B parameters
    "gpu": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        device="cpu", dtype="float32", model="tiny", pairs=2, T=32, reps=3, warmup=1, threads=1, max_batch=False
    ),
    "cpu": dict(device="cpu", dtype="float32", model="cpu", pairs=4, T=256, reps=5, warmup=1, max_batch=False),
    "gpu": dict(device="cuda", dtype="bfloat16", model="gpu", pairs=4, T=512, reps=10, warmup=3, max_batch=True),
}
METHODS = ["naive", "haf"]


def build(spec: dict[str, Any]):
    """Seeded model, reward head, AdamW and a batch ``(ids [2B,T], labels [2B,T])``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    cfg = LlamaConfig(**MODELS[spec["model"]], max_position_embeddings=max(2048, spec["T"]))
    cfg.use_cache = False
    with torch.device(device):  # initialise on the device (fast for the 0.5B model on CUDA)
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype=dtype)
    model.train()
    head = torch.nn.Linear(cfg.hidden_size, 1).to(device=device, dtype=dtype)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    pairs, t = spec["pairs"], spec["T"]
    gen = torch.Generator(device=device).manual_seed(SEED)
    ids = torch.randint(0, cfg.vocab_size, (2 * pairs, t), generator=gen, device=device)
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    prompt = int(spec.get("prompt_frac", 0.25) * t)
    labels[:, :prompt] = IGNORE  # prompt tokens carry no log-prob (HaF: prompt 128 of 512)
    n_params = sum(p.numel() for p in params)
    return model, head, opt, ids, labels, n_params


def make_step(method: str, model, head, opt, ids, labels):
    import torch.nn.functional as F

    from haf_kernels import fused_haf_loss

    b = ids.shape[0] // 2

    def step():
        opt.zero_grad(set_to_none=True)
        hidden = model.model(input_ids=ids).last_hidden_state  # [2B, T, D]
        rewards = head(hidden[:, -1]).squeeze(-1).float()  # [2B]
        if method == "haf":
            out = fused_haf_loss(
                hidden, model.lm_head.weight, labels, rewards, beta=BETA, alpha=ALPHA, reward_weight=REWARD_WEIGHT
            )
            loss = out.loss
        else:
            logits = model.lm_head(hidden)  # what model(ids).logits holds: [2B, T, V]
            mask = labels != IGNORE
            logp = logits.float().log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
            seq = (logp * mask).sum(-1)
            bt = -F.logsigmoid(rewards[:b] - rewards[b:]).mean()
            dpo = -F.logsigmoid(BETA * (seq[:b] - seq[b:])).mean()
            loss = REWARD_WEIGHT * bt + ALPHA * dpo
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    cuda = spec["device"] == "cuda"
    try:
        model, head, opt, ids, labels, n_params = build(spec)
        step = make_step(spec["method"], model, head, opt, ids, labels)
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        rss_built = bu.rss_bytes()

        def timed():
            return bu.timed_call(step, cuda)

        first_loss = None
        for i in range(spec["warmup"]):
            _, loss = timed()
            if i == 0:
                first_loss = float(loss.float().item())
        times = []
        for _ in range(spec["reps"]):
            dt_, loss = timed()
            times.append(dt_)
    except torch.OutOfMemoryError as exc:
        return {"status": "oom", "reason": str(exc)[:300]}
    med = bu.median(times) if times else None
    tokens = ids.numel()
    res: dict[str, Any] = {
        "status": "ok",
        "n_params": n_params,
        "tokens_per_step": tokens,
        "first_loss": first_loss,
        "reps": spec["reps"],
        "warmup": spec["warmup"],
    }
    if spec["method"] == "haf":
        from haf_kernels import backends

        res["loss_backend"] = backends.resolve("auto", torch.device(spec["device"]))
    if med is not None:
        res.update(
            step_ms=round(1e3 * med, 2),
            times_ms=[round(1e3 * t, 2) for t in times],
            tokens_per_s=round(tokens / med, 1),
        )
    if cuda:
        res["mem"] = {
            "peak_allocated_mib": bu.mib(torch.cuda.max_memory_allocated()),
            "peak_above_model_mib": bu.mib(torch.cuda.max_memory_allocated() - base),
        }
    else:
        res["mem"] = {
            "peak_rss_mib": bu.mib(bu.lifetime_peak_bytes()),
            "rss_after_build_mib": bu.mib(rss_built),
            "peak_above_build_mib": bu.mib(bu.lifetime_peak_bytes() - rss_built),
        }
    return res


def max_batch(script: str, base: dict[str, Any], timeout: float, cap: int) -> dict[str, Any]:
    """Largest pairs count whose step runs (1 warm-up step, 1 timed step), doubling then bisecting."""
    tries: dict[int, str] = {}

    def fits(p: int) -> bool:
        r = bu.run_worker(script, {**base, "pairs": p, "reps": 1, "warmup": 1}, timeout)
        tries[p] = r["status"]
        log(f"    pairs={p}: {r['status']}")
        return r["status"] == "ok"

    lo, hi = 0, None
    p = 1
    while p <= cap:
        if fits(p):
            lo, p = p, p * 2
        else:
            hi = p
            break
    if hi is None:
        return {"max_pairs": lo, "capped_at": cap, "tries": tries}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return {"max_pairs": lo, "first_failing": hi, "tries": tries}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    preset = dict(PRESETS[args.preset])
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("preset needs a CUDA device and none is visible")
    for key in ("pairs", "T", "reps", "warmup"):
        if getattr(args, key, None):
            preset[key] = getattr(args, key)
    threads = args.threads or preset.get("threads")
    script = str(Path(__file__).resolve())
    rows = []
    for m in args.methods.split(",") if args.methods else METHODS:
        spec = {
            "device": preset["device"],
            "dtype": preset["dtype"],
            "model": preset["model"],
            "T": preset["T"],
            "pairs": preset["pairs"],
            "reps": preset["reps"],
            "warmup": preset["warmup"],
            "method": m,
            "threads": threads,
            "prompt_frac": args.prompt_frac,
        }
        r = bu.run_worker(script, spec, args.timeout)
        r["method"] = m
        log(f"{m:6s} {r['status']} {r.get('step_ms')} ms/step {r.get('tokens_per_s')} tok/s mem {r.get('mem')}")
        if preset["max_batch"] and not args.no_max_batch:
            r["max_batch"] = max_batch(script, spec, args.timeout, args.max_pairs)
            log(f"  max batch: {r['max_batch']}")
        rows.append(r)
    return {
        "bench": "train",
        "preset": args.preset,
        "date": bu.now_iso(),
        "device": bu.device_info(preset["device"]),
        "versions": bu.versions(),
        "dtype": preset["dtype"],
        "model": MODELS[preset["model"]],
        "config": {
            "pairs": preset["pairs"],
            "T": preset["T"],
            "reps": preset["reps"],
            "warmup": preset["warmup"],
            "prompt_frac": args.prompt_frac,
            "beta": BETA,
            "alpha": ALPHA,
            "reward_weight": REWARD_WEIGHT,
            "optimizer": "AdamW(lr=1e-5)",
            "seed": SEED,
            "threads": threads,
        },
        "results": rows,
    }


def to_markdown(res: dict[str, Any]) -> str:
    c, m = res["config"], res["model"]
    cuda = res["device"]["type"] == "cuda"
    out = [
        f"# HaF training step — {res['device']['name']} ({res['device']['type']}), {res['date']}",
        "",
        f"Llama (random init) vocab={m['vocab_size']} D={m['hidden_size']} layers={m['num_hidden_layers']}, "
        f"{res['dtype']}; pairs={c['pairs']}, T={c['T']} ({2 * c['pairs'] * c['T']} tokens/step), prompt fraction "
        f"{c['prompt_frac']} masked; median of {c['reps']} steps after {c['warmup']} warm-up; "
        + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v),
        "",
    ]
    if res.get("note"):
        out += [f"Note: {res['note']}", ""]
    if cuda:
        header = ["method", "status", "params", "step (ms)", "tokens/s", "peak alloc (MiB)", "max pairs", "loss@0"]
    else:
        header = [
            "method",
            "status",
            "params",
            "step (ms)",
            "tokens/s",
            "peak RSS (MiB)",
            "peak above build (MiB)",
            "loss@0",
        ]
    rows = []
    for r in res["results"]:
        mem = r.get("mem", {})
        tail = (
            [mem.get("peak_allocated_mib"), r.get("max_batch", {}).get("max_pairs")]
            if cuda
            else [mem.get("peak_rss_mib"), mem.get("peak_above_build_mib")]
        )
        rows.append(
            [
                r["method"] + (f" ({r['loss_backend']})" if r.get("loss_backend") else ""),
                r["status"],
                r.get("n_params"),
                r.get("step_ms"),
                r.get("tokens_per_s"),
                *tail,
                r.get("first_loss"),
            ]
        )
    return "\n".join(out + [bu.md_table(header, rows), ""])


def plot(res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in res["results"] if r["status"] == "ok"]
    cuda = res["device"]["type"] == "cuda"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    names = [r["method"] for r in ok]
    axes[0].barh(names, [r.get("tokens_per_s") or 0 for r in ok], color="tab:blue")
    axes[0].set_xlabel("tokens / s")
    key = "peak_allocated_mib" if cuda else "peak_rss_mib"
    axes[1].barh(names, [r["mem"].get(key) or 0 for r in ok], color="tab:orange")
    axes[1].set_xlabel("peak allocated (MiB)" if cuda else "peak RSS (MiB)")
    fig.suptitle(f"HaF train step, {res['device']['name']}, {res['dtype']}, {res['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--methods", help="comma list of naive,haf (default both)")
    p.add_argument("--tag", default="", help="extra file-name tag")
    p.add_argument("--pairs", type=int)
    p.add_argument("--T", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--prompt-frac", type=float, default=0.25)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--no-max-batch", action="store_true")
    p.add_argument("--max-pairs", type=int, default=512, help="cap of the largest-batch search")
    p.add_argument("--out-dir", default=str(bu.RESULTS))
    p.add_argument("--note", default="", help="free text printed above the table (e.g. machine load)")
    p.add_argument("--render", metavar="JSON", help="rewrite the .md/.png (and note) of an existing result")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        try:
            bu.emit(worker(json.loads(args.spec)))
        except Exception as exc:
            import traceback

            traceback.print_exc()
            msg = f"{type(exc).__name__}: {exc}"
            bu.emit({"status": "oom" if "out of memory" in msg.lower() else "error", "reason": msg[:800]})
        return 0
    if args.render:
        src = Path(args.render)
        res = json.loads(src.read_text())
        stem, out = src.stem, src.parent
    else:
        res = run(args)
        slug = bu.device_slug(PRESETS[args.preset]["device"])
        stem = f"{slug}-{bu.today()}-train" + ("" if args.preset in ("cpu", "gpu") else f"-{args.preset}")
        stem += f"-{args.tag}" if args.tag else ""
        out = Path(args.out_dir)
    if args.note:
        res["note"] = args.note
    bu.write_json(out / f"{stem}.json", res)
    (out / f"{stem}.md").write_text(to_markdown(res))
    plot(res, out / f"{stem}.png")
    log(f"wrote {out / stem}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
