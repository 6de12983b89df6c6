#!/usr/bin/env python
"""Train the tiny self-trained CLIP ("tiny-synth") on synthetic captioned shapes; CPU, a few minutes.

    .venv/bin/python scripts/train_tiny_clip.py            # writes src/clipengine/weights/tiny-synth/

Reproducible: data, initialisation and batch order are functions of --seed; with the same torch
build and thread count the checkpoint is bit-identical. The output folder holds
    config.json        CLIPConfig.to_dict() plus "preprocess": PreprocessConfig.to_dict()
    model.safetensors  the CLIP module's state_dict (OpenAI key names), float16
    training.json      the recipe, the wall time and the held-out zero-shot accuracies
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipengine.eval import synthetic
from clipengine.image.preprocess import PreprocessConfig, preprocess_image
from clipengine.models.clip import CLIP, build_model
from clipengine.models.config import CLIPConfig, TextConfig, VisionConfig
from clipengine.text.tokenizer import tokenize

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "clipengine" / "weights" / "tiny-synth"
PROMPTS = REPO / "src" / "clipengine" / "eval" / "prompts" / "zeroshot_prompts.json"

TOWERS = {
    # 32 px / patch 8 = 4x4 grid: CIFAR-sized inputs, 17 tokens, fast on CPU.
    "vit": VisionConfig(image_size=32, layers=4, width=128, patch_size=8, head_width=32),
    # ModifiedResNet: convolutions learn shapes from few images far faster than a tiny ViT.
    "rn": VisionConfig(image_size=32, layers=(1, 1, 1, 1), width=16),
}


def make_config(tower: str) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=64,
        vision=TOWERS[tower],
        # Width 48 keeps the full 49408-token embedding (any CLIP token id works) at 4.7 MB in fp16.
        text=TextConfig(context_length=77, vocab_size=49408, width=48, heads=4, layers=4),
        quick_gelu=False,
        name="tiny-synth",
    )


def _pixels(images: np.ndarray, sizes: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """(N, h, w, 3) uint8 renders -> (N, 3, S, S) through the real CLIP preprocessing."""
    out = np.empty((len(images), 3, cfg.image_size, cfg.image_size), dtype=np.float32)
    for i, (img, size) in enumerate(zip(images, sizes, strict=True)):
        pil = Image.fromarray(img)
        if size != img.shape[0]:  # some training images arrive at another resolution
            pil = pil.resize((int(size), int(size)), Image.Resampling.BICUBIC)
        out[i] = preprocess_image(pil, cfg)
    return torch.from_numpy(out)


class _CompactText:
    """Trains only the token-embedding rows the captions use (a few dozen of 49408).

    Rows never seen get no gradient anyway; a compact table makes each optimiser step touch ~100
    rows instead of 3.2 M numbers. `merge()` copies the trained rows back into the full table.
    Token rows are cached per caption string, so tokenization runs once per distinct caption.
    """

    def __init__(self, model: CLIP, rows: int = 1024) -> None:
        self.model = model
        self.ids: dict[int, int] = {}  # CLIP token id -> compact row
        self.table = torch.nn.Parameter(torch.zeros(rows, model.token_embedding.weight.shape[1]))
        self._cache: dict[str, tuple[list[int], int]] = {}

    def tokens(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact (N, L') ids and (N,) EOT positions, L' = longest caption in the batch."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            for c, row in zip(missing, tokenize(missing, context_length=77), strict=True):
                ids = [int(t) for t in row if t != 0]
                for t in ids:
                    if t not in self.ids:
                        with torch.no_grad():
                            self.table[len(self.ids)] = self.model.token_embedding.weight[t]
                        self.ids[t] = len(self.ids)
                self._cache[c] = ([self.ids[t] for t in ids], len(ids) - 1)
        rows = [self._cache[c] for c in captions]
        length = max(len(r) for r, _ in rows)
        out = torch.zeros(len(rows), length, dtype=torch.long)
        for i, (r, _) in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out, torch.tensor([eot for _, eot in rows])

    def encode(self, captions: list[str]) -> torch.Tensor:
        """encode_text on tokens cut after the longest caption: exact, the causal mask hides the rest."""
        m = self.model
        tokens, eot = self.tokens(captions)
        length = tokens.shape[1]
        x = F.embedding(tokens, self.table) + m.positional_embedding[:length]
        x = m.ln_final(m.transformer(x, m.attn_mask[:length, :length]))
        return x[torch.arange(x.shape[0]), eot] @ m.text_projection

    def merge(self) -> None:
        """Write the trained rows back into model.token_embedding."""
        with torch.no_grad():
            for t, row in self.ids.items():
                self.model.token_embedding.weight[t] = self.table[row]


def _zero_shot(
    model: CLIP, ds: synthetic.SyntheticDataset, templates: list[str], cfg: PreprocessConfig
) -> float:
    """Prompt-ensembled zero-shot top-1 with the full (merged) model, as `clipengine eval` does it."""
    with torch.no_grad():
        img = F.normalize(model.encode_image(_pixels(ds.images, np.full(len(ds), 32), cfg)), dim=-1)
        weights = []
        for name in ds.classnames:
            tokens = torch.from_numpy(tokenize([tpl.format(name) for tpl in templates]).astype(np.int64))
            t = F.normalize(model.encode_text(tokens), dim=-1)
            weights.append(F.normalize(t.mean(0), dim=0))
        pred = (img @ torch.stack(weights, 1)).argmax(1).numpy()
    return float((pred == ds.labels).mean())


def _probe(
    model: CLIP, text: _CompactText, monitor: dict[str, synthetic.SyntheticDataset], pre: PreprocessConfig
) -> dict[str, float]:
    """Progress only: top-1 with one template ("a photo of a {}.") on small held-out sets.

    Runs in eval mode so BatchNorm neither uses nor updates batch statistics from these images:
    the checkpoint does not depend on --log-every.
    """
    out = {}
    model.eval()
    with torch.no_grad():
        for task, ds in monitor.items():
            img = F.normalize(model.encode_image(_pixels(ds.images, np.full(len(ds), 32), pre)), dim=-1)
            txt = F.normalize(text.encode([f"a photo of a {c}." for c in ds.classnames]), dim=-1)
            out[task] = round(float(((img @ txt.t()).argmax(1).numpy() == ds.labels).mean()), 3)
    model.train()
    return out


def _param_groups(model: CLIP, text: _CompactText, wd: float) -> list[dict[str, object]]:
    decay, no_decay = [], [text.table]
    for name, p in model.named_parameters():
        if name == "token_embedding.weight":
            continue  # trained through the compact table
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def train(args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    pre = PreprocessConfig(image_size=make_config(args.tower).vision.image_size)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()

    # Training pool: colour x shape images at 32 px, plus some at 48/64 px that the real
    # preprocessing resizes (robust to ImageFolder inputs of other sizes).
    pool = synthetic.generate(args.pool, seed=args.seed, task="colour", image_size=32)
    big = synthetic.generate(args.pool // 4, seed=args.seed + 100, task="colour", image_size=64)
    sizes = rng.choice([32, 48, 64], size=len(big))  # 64 px renders resized to one of these first
    attrs = pool.attributes + big.attributes
    pixels = torch.cat([_pixels(pool.images, np.full(len(pool), 32), pre), _pixels(big.images, sizes, pre)])
    n = len(attrs)
    prep_s = time.perf_counter() - t0

    model = build_model(make_config(args.tower)).train()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))  # CLIP's training init (the module starts at 100)
    text = _CompactText(model)
    opt = torch.optim.AdamW(_param_groups(model, text, 0.1), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    labels = torch.arange(args.batch)
    monitor = None
    if args.log_every < args.steps:
        monitor = {
            t: synthetic.generate(300, seed=args.seed + 2, task=t, image_size=32) for t in synthetic.TASKS
        }
    t1 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = rng.choice(n, size=args.batch, replace=False)
        img = F.normalize(model.encode_image(pixels[idx]), dim=-1)
        txt = F.normalize(text.encode([synthetic.caption(attrs[i], rng) for i in idx]), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % args.log_every == 0 or step == args.steps - 1:
            probe = _probe(model, text, monitor, pre) if monitor is not None else {}
            print(
                f"step {step:4d}  loss {loss.item():.3f}  scale {model.logit_scale.exp().item():.1f}  "
                f"{time.perf_counter() - t1:.0f}s  {probe}",
                flush=True,
            )
    train_s = time.perf_counter() - t1
    text.merge()
    model.eval()

    templates = json.loads(PROMPTS.read_text())["CIFAR10"]["templates"]
    results: dict[str, object] = {}
    for task in synthetic.TASKS:
        held_out = synthetic.generate(args.eval_n, seed=args.seed + 1, task=task, image_size=32)
        results[f"zeroshot_{task}_top1"] = round(_zero_shot(model, held_out, templates, pre), 4)
        results[f"zeroshot_{task}_chance"] = round(1 / len(held_out.classnames), 4)
    print(json.dumps(results), flush=True)
    _save(model.half(), pre, args, Path(args.out), results, prep_s, train_s, n)
    return results


def _save(
    model: CLIP,
    pre: PreprocessConfig,
    args: argparse.Namespace,
    out: Path,
    results: dict[str, object],
    prep_s: float,
    train_s: float,
    n: int,
) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})  # one key: byte-stable header
    (out / "config.json").write_text(
        json.dumps({**model.config.to_dict(), "preprocess": pre.to_dict()}, indent=2) + "\n"
    )
    recipe = {k: v for k, v in vars(args).items() if k != "out"}
    info = {
        "recipe": recipe,
        "train_images": n,
        "data_seconds": round(prep_s, 1),
        "train_seconds": round(train_s, 1),
        "torch": torch.__version__,
        "held_out": results,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tower", choices=sorted(TOWERS), default="rn")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--pool", type=int, default=16000, help="32 px training images (plus pool/4 at 64 px)")
    p.add_argument("--eval-n", type=int, default=1000, help="held-out images per task")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 is fastest on a loaded shared machine (2 threads spin-wait)",
    )
    p.add_argument("--log-every", type=int, default=100, help="print loss and a quick held-out probe")
    train(p.parse_args())


if __name__ == "__main__":
    main()
