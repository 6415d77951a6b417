"""Conversion cost of a full-size model: wall time, peak extra RSS, and where the time goes.

    python benchmarks/convert_speed.py [--model repmlpnet_b224] [--repeats 3] [--threads 2]

Each repeat runs in a fresh child process (the peak RSS is per process): build and randomize
the train model, reset the kernel's high-water mark (/proc/self/clear_refs, Linux), then
time ``reparameterize(model, count=False)`` (deep copy + folds) and, separately, the FLOP
counting that ``count=True`` adds. Peak extra memory = VmHWM after - VmRSS before, printed
next to the size of the converted weights. Also times the deploy forward of the batched-matmul
fc3 against the grouped 1x1 conv form (the official one) on one image.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def one_run(model_name: str, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from vismlp_deploy import create_model, reparameterize
    from vismlp_deploy.models import repmlpnet
    from vismlp_deploy.models.init import randomize_
    from vismlp_deploy.reparam.report import count_flops

    torch.set_num_threads(threads)
    # warm-up on a tiny model: the first call of each op pages in library code, which
    # would otherwise count as RSS of the conversion
    small = create_model("repmlpnet_t224", channels=[8, 16, 32, 64], hs=[8, 4, 2, 1], ws=[8, 4, 2, 1],
                         sharesets_nums=[1, 4, 8, 16], num_blocks=[1, 1, 1, 1])
    reparameterize(randomize_(small, 0), count=False)
    model = randomize_(create_model(model_name), 0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss0 = _status("VmRSS:")
    t0 = time.perf_counter()
    deploy = reparameterize(model, count=False)
    convert_s = time.perf_counter() - t0
    peak_mb = _status("VmHWM:") - rss0
    weights_mb = sum(p.numel() * p.element_size() for p in deploy.parameters()) / 2**20
    weights_mb += sum(b.numel() * b.element_size() for b in deploy.buffers()) / 2**20
    t0 = time.perf_counter()
    copy.deepcopy(model)  # the walker's private copy, part of convert_s
    deepcopy_s = time.perf_counter() - t0
    x = torch.zeros(1, 3, 224, 224) if "224" in model_name else torch.zeros(1, 3, 256, 256)
    t0 = time.perf_counter()
    count_flops(model, x), count_flops(deploy, x)
    flops_s = time.perf_counter() - t0

    def fwd_ms(m, n=3):
        with torch.inference_mode():
            m(x)
            ts = []
            for _ in range(n):
                t = time.perf_counter()
                m(x)
                ts.append(time.perf_counter() - t)
        return 1e3 * statistics.median(ts)

    bmm_ms = fwd_ms(deploy)
    block_cls = repmlpnet.RepMLPNetDeployBlock
    original = block_cls.forward

    def conv_forward(self, inp):  # the official grouped 1x1 conv on (B, S*h*w, 1, 1)
        gate = self.gp(inp)
        n = self.S * self.h * self.w
        blocks = repmlpnet.sharesets_partition(inp, self.h, self.w, self.S).reshape(-1, n, 1, 1)
        out = F.conv2d(blocks, self.weight.reshape(n, -1, 1, 1), self.bias.reshape(-1), groups=self.S)
        return repmlpnet.sharesets_reassemble(out, self.C, inp.shape[2], inp.shape[3], self.h, self.w, self.S) * gate

    block_cls.forward = conv_forward
    conv_ms = fwd_ms(deploy)
    block_cls.forward = original
    return dict(convert_s=convert_s, deepcopy_s=deepcopy_s, peak_extra_mb=peak_mb, converted_weights_mb=weights_mb,
                flop_count_s=flops_s, deploy_fwd_bmm_ms=bmm_ms, deploy_fwd_grouped_conv_ms=conv_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="repmlpnet_b224")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(args.model, args.threads)))
        return
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, __file__, "--child", "--model", args.model,
                              "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.model}, {args.threads} threads, {args.repeats} fresh processes (median [min, max]):")
    for key in runs[0]:
        vals = [r[key] for r in runs]
        print(f"  {key:28s} {statistics.median(vals):10.3f}   [{min(vals):.3f}, {max(vals):.3f}]")


if __name__ == "__main__":
    main()
