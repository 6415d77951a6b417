"""Train a small network of every family on Fashion-MNIST; write upstream-format checkpoints + a manifest.

    python benchmarks/train_fashion_mnist.py [--families repmlpnet,resmlp,...] [--epochs N]
        [--out-dir tests/fixtures/fashion_mnist] [--seed 0] [--threads 2]

Each fixture is the package's own train-time form (``vismlp_deploy.create_model`` of a named
config with a small override, at 32x32), trained with AdamW (decoupled weight decay on
matrices and kernels only), linear warm-up then cosine decay per step, label smoothing 0.1
and random horizontal flips. BatchNorm statistics are the running averages of training.

The checkpoint is a plain ``state_dict`` in the key layout of the family's upstream code
(the file a user of the official repo / timm would have): where the format's
``to_model_keys`` renames keys, the inverse renaming below writes them. The written file is
then loaded back through detection (``load_checkpoint(path, input_size=(32, 32))``), which
must find the recorded format and give logits identical to the trained model's; that loaded
model's top-1 on the full 10k test set is what the manifest records (``manifest.json``, and
``README.md``, a table generated from it). ``--families`` retrains only those fixtures and
keeps the manifest entries of the others.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# On a shared machine, OpenMP threads that spin-wait between ops burn the cores other
# processes need (measured here: 2 spinning threads ran a training step 4-8x slower than
# passive ones under load); libgomp reads this when torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import vismlp_deploy  # noqa: E402
from vismlp_deploy.benchmark.machine import cpu_model  # noqa: E402
from vismlp_deploy.datasets import load_fashion_mnist  # noqa: E402
from vismlp_deploy.errors import UserError  # noqa: E402
from vismlp_deploy.models.registry import get_format  # noqa: E402

SIZE = 32  # Fashion-MNIST's 28x28, zero-padded
EVAL_BATCH = 500
console = Console(stderr=True)
StateDict = dict[str, Tensor]


# ----------------------------------------------------------- model keys -> upstream keys
def deit_resmlp_keys(sd: StateDict) -> StateDict:
    """timm/internal ResMLP keys -> facebookresearch/deit ``resmlp_models.py`` keys (inverse of
    ``resmlp.deit_to_timm_keys``): ``stem.``→``patch_embed.``, ``linear_tokens``→``attn``,
    ``mlp_channels``→``mlp``, ``lsI``→``gamma_I``; Affine alpha/beta (1, 1, C) -> (C,)."""
    out = {}
    for k, v in sd.items():
        new = re.sub(r"^stem\.", "patch_embed.", k)
        new = re.sub(r"\.linear_tokens\.", ".attn.", new)
        new = re.sub(r"\.mlp_channels\.", ".mlp.", new)
        new = re.sub(r"\.ls(\d)$", r".gamma_\1", new)
        out[new] = v.reshape(-1) if new.endswith((".alpha", ".beta")) else v
    return out


def locuslab_convmixer_keys(sd: StateDict) -> StateDict:
    """timm ConvMixer keys -> locuslab's flat ``nn.Sequential`` indices (inverse of
    ``convmixer._official_to_model``): conv 0, act 1, BN 2, blocks 3.., pool, flatten, Linear."""
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    out = {}
    for k, v in sd.items():
        head, rest = k.split(".", 1)
        if head == "stem":
            out[rest] = v
        elif head == "blocks":
            i, rest = rest.split(".", 1)
            out[f"{3 + int(i)}.{rest}"] = v
        elif head == "head":
            out[f"{depth + 5}.{rest}"] = v
        else:
            raise ValueError(f"unexpected ConvMixer key {k}")
    return out


# ------------------------------------------------------------------------------ fixtures
@dataclass(frozen=True)
class Fixture:
    """One trained checkpoint: a named config of the zoo shrunk by ``overrides``, at 32x32."""

    family: str
    format: str  # the format the written file has (what detection must find)
    named: str  # the named config the train form is created from
    overrides: dict
    in_chans: int
    epochs: int = 3
    to_upstream: Callable[[StateDict], StateDict] = dict  # model keys -> the format's keys

    @property
    def name(self) -> str:
        return f"{self.family}_c{self.in_chans}"


FIXTURES = [
    Fixture("repmlpnet", "official-repmlpnet", "repmlpnet_t224", dict(
        in_channels=1, num_class=10, patch_size=[2, 2], channels=[32, 64, 128], num_blocks=[1, 1, 1],
        hs=[8, 8, 4], ws=[8, 8, 4], sharesets_nums=[8, 16, 32]), in_chans=1),
    Fixture("repmlp-res50", "vismlp-repmlp-res50", "repmlp_res50_light", dict(
        in_channels=3, num_classes=10, image_size=SIZE, width=16, layers=[2, 2, 2], repmlp_stages=[0, 1],
        partitions=[[4, 4], [4, 4]], reparam_conv_k=[1, 3], fc1_fc2_reduction=4, fc3_groups=4, mlp_reduction=4),
        in_chans=3),
    Fixture("resmlp", "official-deit-resmlp", "resmlp_12", dict(
        in_chans=1, num_classes=10, patch_size=4, num_blocks=4, embed_dim=64, block_layer="ResBlock(init_values=0.1)"),
        in_chans=1, epochs=4, to_upstream=deit_resmlp_keys),
    Fixture("mixer", "timm-mixer", "mixer_s16", dict(
        in_chans=3, num_classes=10, patch_size=4, num_blocks=4, embed_dim=64), in_chans=3, epochs=4),
    Fixture("convmixer", "official-convmixer", "convmixer_1536_20", dict(  # GELU: the upstream default
        in_chans=3, num_classes=10, dim=64, depth=6, kernel_size=5, patch_size=2), in_chans=3,
        to_upstream=locuslab_convmixer_keys),
    Fixture("convmlp", "official-convmlp", "convmlp_s", dict(  # the official tokenizer takes 3 channels
        num_classes=10, blocks=[1, 1], dims=[64, 128], mlp_ratios=[2, 2], channels=32, n_conv_blocks=1),
        in_chans=3, epochs=4),
    Fixture("smlpnet", "official-smlpnet", "smlpnet_t", dict(
        in_chans=1, num_classes=10, dim=32, depths=[1, 1, 1], alpha=3, patch_size=4, dp_rate=0.0),
        in_chans=1, epochs=4),
    Fixture("asmlp", "official-asmlp", "asmlp_t", dict(  # shift 5: the size detection assumes
        in_chans=1, num_classes=10, embed_dim=32, depths=[1, 1, 1], shift_size=5, drop_path_rate=0.0),
        in_chans=1, epochs=4),
]
FAMILIES = {f.family: f for f in FIXTURES}


@dataclass
class Recipe:
    optimizer: str = "AdamW"
    lr: float = 2e-3
    weight_decay: float = 0.05  # matrices and kernels only: biases, norms, affines, layer scales get none
    batch_size: int = 128
    schedule: str = "linear warm-up (1/2 epoch) then cosine to 0, per step"
    label_smoothing: float = 0.1
    augmentation: str = "random horizontal flip (p=0.5)"
    seed: int = 0


# ------------------------------------------------------------------------------ training
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only tensors with two or more non-trivial dimensions (weights of linears and convs)."""
    decay, plain = [], []
    for p in model.parameters():
        (decay if sum(d > 1 for d in p.shape) >= 2 else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return f


def train(model: nn.Module, x: Tensor, y: Tensor, in_chans: int, epochs: int, recipe: Recipe,
          progress: Progress) -> None:
    """AdamW + warm-up/cosine on (x (N, 1, 32, 32) grey, y (N,)), shuffled with ``recipe.seed``.

    The grey channel is replicated to ``in_chans`` per batch (what ``channels=3`` loads, without 3x the memory).
    """
    g = torch.Generator().manual_seed(recipe.seed)
    steps_per_epoch = len(x) // recipe.batch_size  # drop the last partial batch (BN on a tiny batch)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps_per_epoch // 2, total))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    task = progress.add_task("train", total=total, info="")
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=g)
        t0, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        for i in range(steps_per_epoch):
            idx = order[i * recipe.batch_size:(i + 1) * recipe.batch_size]
            xb, yb = x[idx].expand(-1, in_chans, -1, -1), y[idx]
            flip = torch.rand(len(xb), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            out = model(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(yb)
            correct += int((out.argmax(1) == yb).sum())
            loss_sum += loss.item() * len(yb)
            progress.update(task, advance=1, info=f"epoch {epoch + 1}/{epochs} loss {loss_sum / seen:.3f}")
        console.log(f"  epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.4f}, train top-1 {correct / seen:.4f}, "
                    f"{seen / (time.perf_counter() - t0):.0f} img/s")
    progress.remove_task(task)
    model.eval()


def predict(model: nn.Module, x: Tensor, batch: int = EVAL_BATCH) -> Tensor:
    """Logits (N, classes) of an eval-mode model, in batches."""
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


# ------------------------------------------------------------------------------ writing
def save_atomic(obj, path: Path) -> None:
    """torch.save to a temp file beside ``path``, then rename (no half-written file on a crash)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def upstream_state_dict(fx: Fixture, model: nn.Module) -> StateDict:
    """The trained weights in ``fx.format``'s keys, checked to map back onto the model's exactly."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    up = fx.to_upstream(sd)
    back = get_format(fx.format).to_model_keys(up)
    if back.keys() != sd.keys() or any(back[k].shape != v.shape or not torch.equal(back[k], v) for k, v in sd.items()):
        raise RuntimeError(f"{fx.name}: the upstream key mapping does not invert {fx.format}'s to_model_keys")
    return up


def run_fixture(fx: Fixture, args: argparse.Namespace, data: dict, progress: Progress) -> dict:
    epochs = args.epochs or fx.epochs
    recipe = Recipe(seed=args.seed)
    torch.manual_seed(args.seed)
    model = vismlp_deploy.create_model(fx.named, input_size=SIZE, **fx.overrides)
    params = sum(p.numel() for p in model.parameters())
    console.rule(f"{fx.name}: {fx.format}, {params / 1e3:.1f}k parameters, {epochs} epochs")
    x_train, y_train = data["train"]
    x_test, y_test = data["test", fx.in_chans]
    t0 = time.perf_counter()
    train(model, x_train, y_train, fx.in_chans, epochs, recipe, progress)
    train_s = time.perf_counter() - t0

    path = args.out_dir / f"{fx.name}.pth"
    save_atomic(upstream_state_dict(fx, model), path)
    loaded = vismlp_deploy.load_checkpoint(path, input_size=(SIZE, SIZE))
    if loaded.arch != fx.format:
        raise RuntimeError(f"{path}: detected as {loaded.arch}, written as {fx.format}")
    logits = predict(loaded, x_test)
    if not torch.equal(logits, predict(model, x_test)):
        raise RuntimeError(f"{path}: the reloaded model's logits differ from the trained model's")
    correct = int((logits.argmax(1) == y_test).sum())
    console.log(f"  {fx.name}: test top-1 {correct / len(y_test):.4f} ({correct}/{len(y_test)}), "
                f"trained in {train_s:.0f} s, {path.stat().st_size / 2**20:.2f} MiB")
    return {
        "file": path.name, "family": fx.family, "format": loaded.arch, "config": loaded.config,
        "in_chans": fx.in_chans, "input_size": list(loaded.input_size), "params": params,
        "file_bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "epochs": epochs, "recipe": asdict(recipe),
        "train_time_s": round(train_s, 1), "test_correct": correct, "test_images": len(y_test),
        "test_top1": correct / len(y_test), "eval_batch": EVAL_BATCH,
        "torch": torch.__version__, "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }


def readme(manifest: dict) -> str:
    rows = ["| file | format | in_chans | params | size (KiB) | epochs | train time (s) | test top-1 (10k) |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in manifest.values():
        rows.append(f"| {e['file']} | {e['format']} | {e['in_chans']} | {e['params']:,} | {e['file_bytes'] / 1024:.0f} "
                    f"| {e['epochs']} | {e['train_time_s']:.0f} | {100 * e['test_top1']:.2f} % ({e['test_correct']}) |")
    first = next(iter(manifest.values()))
    r = first["recipe"]
    return "\n".join([
        "# Fashion-MNIST fixtures: small trained networks of every family",
        "",
        "Written by `benchmarks/train_fashion_mnist.py` (generated from `manifest.json`; do not edit).",
        "Plain `state_dict` files, float32, in each family's upstream key layout; inputs 28x28 zero-padded to",
        "32x32, normalized (`vismlp_deploy.datasets.load_fashion_mnist`). Top-1 of the train form on the full",
        f"10k test set, evaluated in batches of {first['eval_batch']}. Recipe: {r['optimizer']}, lr {r['lr']}, "
        f"weight decay {r['weight_decay']}, batch {r['batch_size']},",
        f"{r['schedule']}, label smoothing {r['label_smoothing']}, {r['augmentation']}.",
        f"Trained on {first['cpu']} ({first['threads']} threads), torch {first['torch']}.",
        "",
        *rows,
        "",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES),
                   help=f"comma-separated, from {', '.join(FAMILIES)} (default: all)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every family (default: each fixture's own)")
    p.add_argument("--out-dir", type=Path, default=Path("tests/fixtures/fashion_mnist"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        p.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        chans = sorted({FAMILIES[f].in_chans for f in args.families})
        data = {"train": load_fashion_mnist("train", channels=1, size=SIZE),
                **{("test", c): load_fashion_mnist("test", channels=c, size=SIZE) for c in chans}}
    except UserError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    manifest_path = args.out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console) as progress:
        for family in args.families:
            fx = FAMILIES[family]
            manifest[fx.name] = run_fixture(fx, args, data, progress)
            ordered = {f.name: manifest[f.name] for f in FIXTURES if f.name in manifest}
            write_text_atomic(json.dumps(ordered, indent=1) + "\n", manifest_path)  # after each: a crash keeps the rest
            write_text_atomic(readme(ordered), args.out_dir / "README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
