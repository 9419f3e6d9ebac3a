"""One client round on a Llama base in fp32, bf16 and 4-bit NF4: peak memory and samples/s, one run.

    python benchmarks/client_precision.py                              # small Llama on the CPU
    python benchmarks/client_precision.py --preset llama7b --device cuda --steps 10

The base is a Llama built from its config with random weights (speed and memory depend on shapes,
not on weights; no model hub): `llama7b` has Llama-2-7B's shapes, `small` a 4-layer 512-wide one.
Each mode trains a LoRA r=16 on q_proj/v_proj with fedpeft's local loop (training.train_steps, the
autocast of training.prepare_round) on random token sequences of one length, loss on every token:
- fp32: float32 base, no autocast (the baseline);
- bf16: bfloat16 base weights, bf16 autocast;
- 4bit: the base's decoder Linear layers as bitsandbytes NF4 (double quantisation, bf16 compute),
  the rest bfloat16: what model.quantization=4bit loads (built in bf16 on the device, then
  quantised layer by layer).
`--checkpointing` adds gradient checkpointing to every mode. The LoRA factors are float32 in all
three. It prints, per mode, examples per second over --steps timed steps (after one warm-up step),
the speed ratio against fp32, and the peak memory of the round: torch.cuda.max_memory_allocated
from the end of the build on a GPU (resident weights, activations, optimiser state); on the CPU the
peak resident set above the one after imports, which for 4bit includes the bf16 build. Every
mode runs in a fresh subprocess of this script (--single), so no mode's memory or allocator state
reaches another. With --json the rows are also written as JSON (gpu_check.sh's table).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

try:
    from fedpeft import training
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedpeft import training

PRESETS = {
    "llama7b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 32000,
    },
    "small": {
        "hidden_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "intermediate_size": 1376,
        "vocab_size": 8000,
    },
}
MODES = ("fp32", "bf16", "4bit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--layers", type=int, help="override the preset's layer count")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of fp32,bf16,4bit")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed optimiser steps per mode")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--single", choices=MODES, help=argparse.SUPPRESS)  # one mode, JSON out
    return parser.parse_args(argv)


def quantize_nf4(model: torch.nn.Module, device: torch.device) -> None:
    """Replace every decoder Linear by a bitsandbytes NF4 Linear4bit, one at a time."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for name, child in list(layer.named_modules()):
            if not isinstance(child, torch.nn.Linear):
                continue
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
                compress_statistics=True,
                device="cpu",
            )
            q.weight = bnb.nn.Params4bit(
                child.weight.data,
                requires_grad=False,
                quant_type="nf4",
                compress_statistics=True,
            )
            setattr(parent, name.rsplit(".", 1)[-1], q.to(device))  # quantises here
            if device.type == "cpu":
                q.support_avx512bf16_for_cpu = False  # see fedpeft.models._keep_4bit_trainable
            del child
        gc.collect()


def build(config: LlamaConfig, mode: str, device: torch.device) -> torch.nn.Module:
    """The base in `mode`'s weights, on `device`, with a float32 LoRA r=16 on q_proj/v_proj."""
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy inflates the peak
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
        if mode == "4bit":
            quantize_nf4(model, device)
    finally:
        torch.set_default_dtype(default)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    return peft_model


def peak_rss() -> int:
    """This process's peak resident set so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(device: torch.device, rss_before: int) -> int:
    """Peak memory of the mode: the CUDA allocator's peak, or peak RSS growth on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss() - rss_before


def run_mode(args: argparse.Namespace, config: LlamaConfig, mode: str) -> dict:
    """Build, warm up and time one mode; its row."""
    device = torch.device(args.device)
    gc.collect()
    rss = peak_rss()
    model = build(config, mode, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    generator = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + 1)
    ids = torch.randint(3, config.vocab_size, (n, args.seq_len), generator=generator)
    examples = [
        {"input_ids": row.tolist(), "attention_mask": [1] * args.seq_len, "labels": row.tolist()}
        for row in ids
    ]
    hp = training.TrainSettings(
        batch_size=args.batch,
        lr=1e-4,
        head_lr=None,
        optimizer="adamw",
        weight_decay=0.0,
        momentum=0.0,
        max_length=args.seq_len,
        max_grad_norm=None,
        precision="fp32" if mode == "fp32" else "bf16",
        gradient_checkpointing=args.checkpointing,
        local_steps=1,
        local_epochs=None,
    )
    optimizer, _ = training.local_round(model, hp, len(examples))
    common = {"batch_size": args.batch, "pad_token_id": 0, "device": device, "seed": 0}
    training.train_steps(model, examples[: args.batch], optimizer, steps=1, **common)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = training.train_steps(model, examples, optimizer, steps=args.steps, **common)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    row = {
        "mode": mode,
        "samples_per_s": result.examples_seen / elapsed,
        "peak_gib": peak_bytes(device, rss) / 2**30,
        "loss": result.loss,
    }
    del model, optimizer
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the modes, print the table (ratios against fp32), optionally write JSON."""
    args = parse_args(argv)
    sizes = dict(PRESETS[args.preset])
    if args.layers:
        sizes["num_hidden_layers"] = args.layers
    config = LlamaConfig(**sizes, num_key_value_heads=sizes["num_attention_heads"])
    if args.single:
        print(json.dumps(run_mode(args, config, args.single)))
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: {unknown[0]} is not one of {', '.join(MODES)}")
    own = [
        *("--preset", args.preset, "--device", args.device, "--batch", str(args.batch)),
        *("--seq-len", str(args.seq_len), "--steps", str(args.steps)),
        *(("--layers", str(args.layers)) if args.layers else ()),
        *(("--checkpointing",) if args.checkpointing else ()),
    ]
    rows = []
    for mode in modes:
        out = subprocess.run(
            [sys.executable, __file__, *own, "--single", mode],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise SystemExit(f"mode {mode} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["mode"] == "fp32"), rows[0])
    for row in rows:
        row["speed_vs_fp32"] = row["samples_per_s"] / base["samples_per_s"]
        row["memory_vs_fp32"] = row["peak_gib"] / base["peak_gib"] if base["peak_gib"] else None
    table = Table(
        title=f"client round, {args.preset} ({sizes['num_hidden_layers']} layers), "
        f"batch {args.batch} x {args.seq_len}, {args.device}"
        + (", checkpointing" if args.checkpointing else "")
    )
    for column in ("mode", "samples/s", "vs fp32", "peak GiB", "memory vs fp32"):
        table.add_column(column, justify="right")
    for row in rows:
        mem = row["memory_vs_fp32"]
        table.add_row(
            row["mode"],
            f"{row['samples_per_s']:.2f}",
            f"{row['speed_vs_fp32']:.2f}x",
            f"{row['peak_gib']:.2f}",
            "-" if mem is None else f"{mem:.2f}x",
        )
    Console().print(table)
    print(
        "vs fp32: "
        + "; ".join(
            f"{r['mode']} {r['speed_vs_fp32']:.2f}x speed, "
            + ("-" if r["memory_vs_fp32"] is None else f"{r['memory_vs_fp32']:.2f}x memory")
            for r in rows
            if r["mode"] != "fp32"
        )
    )
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
