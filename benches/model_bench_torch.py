"""PyTorch side of the model bench: the same mPLUG-base vision tower and ITM fusion, built
from torch.nn modules laid out as the reference (CLIP ResidualAttentionBlock with
nn.MultiheadAttention; HF-BERT-style fusion layers), on the weights and inputs the candle
bench wrote. Prints a table comparing both and checks the outputs agree.

Usage: model_bench_torch.py DIR [ITERS]
"""

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file

WIDTH, LAYERS, HEADS, PATCH, RES = 768, 12, 12, 16, 384
BERT_HEADS, FUSION_LAYERS, STRIDE = 12, 6, 3


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, w, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(w, heads)
        self.ln_1 = nn.LayerNorm(w, eps=1e-5)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(w, 4 * w))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * w, w))
        self.ln_2 = nn.LayerNorm(w, eps=1e-5)

    def forward(self, x):  # (L, B, W), as CLIP runs it
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Vision(nn.Module):
    def __init__(self):
        super().__init__()
        w, g = WIDTH, RES // PATCH
        self.conv1 = nn.Conv2d(3, w, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(g * g + 1, w))
        self.ln_pre = nn.LayerNorm(w, eps=1e-5)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[Block(w, HEADS) for _ in range(LAYERS)])
        self.ln_post = nn.LayerNorm(w, eps=1e-5)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer.resblocks(x).permute(1, 0, 2)
        return self.ln_post(x)


class SelfOut(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.dense = nn.Linear(h, h)
        self.LayerNorm = nn.LayerNorm(h, eps=1e-12)


class Attn(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.self = nn.Module()
        for n in ("query", "key", "value"):
            setattr(self.self, n, nn.Linear(h, h))
        self.output = SelfOut(h)

    def forward(self, x, kv, mask):
        b, lq, h = x.shape
        d = h // BERT_HEADS

        def heads(t):
            return t.view(b, -1, BERT_HEADS, d).transpose(1, 2)

        q, k, v = heads(self.self.query(x)), heads(self.self.key(kv)), heads(self.self.value(kv))
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d) + mask
        ctx = torch.matmul(s.softmax(-1), v).transpose(1, 2).reshape(b, lq, h)
        return self.output.LayerNorm(self.output.dense(ctx) + x)


class FusionLayer(nn.Module):
    def __init__(self, h, ffn):
        super().__init__()
        self.attention = Attn(h)
        self.crossattention = Attn(h)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(h, ffn)
        self.output = SelfOut(h)
        self.output.dense = nn.Linear(ffn, h)

    def ffn(self, x):
        return self.output.LayerNorm(self.output.dense(F.gelu(self.intermediate.dense(x))) + x)


class Fusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([FusionLayer(768, 3072) for _ in range(FUSION_LAYERS)])

    def forward(self, t, t_mask, v):
        tm = (1.0 - t_mask[:, None, None, :].to(t.dtype)) * -10000.0
        im = torch.zeros(v.shape[0], 1, 1, v.shape[1], dtype=t.dtype)
        for k, layer in enumerate(self.encoder.layer):
            if k != 0 and k % STRIDE == 0:
                x = torch.cat([v, t], 1)
                y = layer.ffn(layer.attention(x, x, torch.cat([im, tm], -1)))
                v, t = v + y[:, : v.shape[1]], y[:, v.shape[1]:]
            else:
                a = layer.attention(t, t, tm)
                t = layer.ffn(layer.crossattention(a, v, im))
        return v, t


def load(module, weights, prefix):
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    own = module.state_dict()
    state = {k: v for k, v in state.items() if k in own}
    # A connected fusion layer never runs its cross-attention, so the weights omit it.
    missing = [k for k in own if k not in state and ".crossattention." not in k]
    assert not missing, f"{prefix}: missing {missing[:5]}"
    module.load_state_dict(state, strict=False)
    return module.eval()


def best(iters, fn):
    """Best wall seconds of `iters` runs after one warm-up, mean process CPU seconds per run
    (all threads), and the output."""
    out = fn()
    times = []
    cpu0 = time.process_time()
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), (time.process_time() - cpu0) / iters, out


def main():
    out_dir = Path(sys.argv[1])
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    weights = load_file(out_dir / "weights.safetensors")
    io = load_file(out_dir / "io.safetensors")
    candle = json.loads((out_dir / "candle.json").read_text())

    vision = load(Vision(), weights, "visual_encoder.visual.")
    fusion = load(Fusion(), weights, "fusion_encoder.")
    vproj_w, vproj_b = weights["vision_proj.weight"], weights["vision_proj.bias"]
    itm_w, itm_b = weights["itm_head.weight"], weights["itm_head.bias"]
    g = RES // PATCH
    flops = 2 * g * g * 3 * PATCH * PATCH * WIDTH
    flops += LAYERS * (2 * (g * g + 1) * 12 * WIDTH**2 + 4 * (g * g + 1) ** 2 * WIDTH)

    rows, results, cpu = [], {}, {}
    # Without our bf16 rows (a CPU without AVX512-BF16) there is nothing to compare torch's
    # bf16 with, and torch emulates bf16 there at a small fraction of its f32 speed.
    ours_bf16 = any(r["case"].endswith(" bf16") for r in candle)
    dtypes = (torch.float32, torch.bfloat16) if ours_bf16 else (torch.float32,)
    for dtype in dtypes:
        label = "f32" if dtype == torch.float32 else "bf16"
        vis, fus = vision.to(dtype), fusion.to(dtype)
        with torch.inference_mode():
            for b in (1, 8):
                px = io["pixels"][:b].to(dtype)
                s, c, v = best(iters, lambda: vis(px))
                rows.append((f"vision b{b} {label}", s, b / s, flops * b / s / 1e9))
                cpu[f"vision b{b} {label}"] = c
                if b == 1:
                    v1 = v
            emb = F.normalize(F.linear(v1[:, 0].float(), vproj_w, vproj_b), dim=-1)
            v16 = v1.repeat(16, 1, 1)
            t, tm = io["t"].to(dtype), io["t_mask"]

            def rerank():
                return F.linear(fus(t, tm, v16)[1][:, 0].float(), itm_w, itm_b)

            s, c, logits = best(iters, rerank)
            rows.append((f"itm rerank x16 {label}", s, 1 / s, 0.0))
            cpu[f"itm rerank x16 {label}"] = c
            results[label] = (emb, logits)

    emb_diff = (results["f32"][0] - io["image_embeds"]).abs().max().item()
    itm_diff = (results["f32"][1] - io["itm_logits"]).abs().max().item()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {load_average()}")
    print_table(rows, {r["case"]: r for r in candle})
    print_cpu(cpu, {r["case"]: r for r in candle})
    print(f"candle vs torch f32: image_embeds max|diff| {emb_diff:.2e}, "
          f"itm_logits max|diff| {itm_diff:.2e}")


def load_average():
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def print_table(rows, ours):
    """One line per case: torch f32/bf16 and ours f32/bf16 in ms, then throughput ratios
    (ours f32 / torch f32, ours bf16 / torch f32, ours bf16 / ours f32, ours bf16 / torch
    bf16) and our matmul GFLOP/s."""
    torch_s = {name: s for name, s, _, _ in rows}
    nan = {"seconds": float("nan"), "flops": float("nan")}
    print(f"{'case':<16} {'torch f32':>9} {'torch bf16':>10} {'ours f32':>9} {'ours bf16':>9} "
          f"{'f32/torch':>9} {'bf16/torch f32':>14} {'bf16/f32':>8} {'bf16/torch bf16':>15} "
          f"{'GF/s f32':>8} {'GF/s bf16':>9}")
    for case in ("vision b1", "vision b8", "itm rerank x16"):
        tf, tb = torch_s[f"{case} f32"], torch_s.get(f"{case} bf16", float("nan"))
        of, ob = ours.get(f"{case} f32", nan), ours.get(f"{case} bf16", nan)
        sf, sb = of["seconds"], ob["seconds"]
        print(f"{case:<16} {tf * 1e3:>9.1f} {tb * 1e3:>10.1f} {sf * 1e3:>9.1f} {sb * 1e3:>9.1f} "
              f"{tf / sf:>8.2f}x {tf / sb:>13.2f}x {sf / sb:>7.2f}x {tb / sb:>14.2f}x "
              f"{of['flops'] / sf / 1e9:>8.1f} {ob['flops'] / sb / 1e9:>9.1f}")


def print_cpu(cpu, ours):
    """f32 CPU seconds per call over all threads, torch and ours: on a shared machine they
    move less with other load than wall times (both include threads spinning idle)."""
    print(f"{'case':<16} {'torch f32 cpu ms':>16} {'ours f32 cpu ms':>15} {'torch/ours':>10}")
    for case in ("vision b1", "vision b8", "itm rerank x16"):
        tc = cpu[f"{case} f32"]
        oc = ours.get(f"{case} f32", {}).get("cpu_seconds", float("nan"))
        print(f"{case:<16} {tc * 1e3:>16.1f} {oc * 1e3:>15.1f} {tc / oc:>9.2f}x")


if __name__ == "__main__":
    main()
