"""Forward + backward milliseconds of the experts' LoRA path, as grouped thin GEMMs (what
`kernels.moe` does) and as dense GEMMs over all experts' factors at once, on 20b shapes.
A design measurement, not a test: run on the GPU with `python3 scripts/gpu/lora_variants.py`."""

import torch

from gptoss_tune.kernels.moe import grouped_mm, sort_by_expert

torch.manual_seed(0)
dev = torch.device("cuda")
N, H, M, E, K, R = 16384, 2880, 2880, 32, 4, 8
bf = torch.bfloat16
indices = torch.rand(N, E, device=dev).topk(K, dim=1).indices
routing = sort_by_expert(indices, E)
S = N * K
weights = torch.rand(N, K, device=dev, dtype=bf).reshape(-1).index_select(0, routing.order)


def timed(name, make, repeats=10):
    out = make()
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        make().float().square().mean().backward()
    end.record()
    torch.cuda.synchronize()
    print(f"{name:60s} {start.elapsed_time(end) / repeats:7.3f} ms")


def param(*shape):
    return (torch.randn(*shape, device=dev) * 0.02).to(bf).requires_grad_(True)


hidden = param(N, H)
act = param(S, M)
A1, B1 = param(E, H, R), param(E, R, 2 * M)
A2, B2 = param(E, M, R), param(E, R, H)
grad_probe = torch.randn(S, 2 * M, device=dev, dtype=bf)


def gather_rows():
    return hidden.index_select(0, routing.tokens)


def gate_up_grouped():
    rows = hidden.index_select(0, routing.tokens)
    return grouped_mm(grouped_mm(rows, A1, routing.offsets), B1, routing.offsets)


def gate_up_dense_a():
    u_all = (hidden @ A1.permute(1, 0, 2).reshape(H, E * R)).view(N, E, R)
    u = u_all[routing.tokens, routing.experts]
    return grouped_mm(u, B1, routing.offsets)


def gate_up_dense_ab():
    u_all = (hidden @ A1.permute(1, 0, 2).reshape(H, E * R)).view(N, E, R)
    u = u_all[routing.tokens, routing.experts]
    spread = u.new_zeros(S, E, R).index_put((torch.arange(S, device=dev), routing.experts), u)
    return spread.view(S, E * R) @ B1.reshape(E * R, 2 * M)


def down_grouped():
    update = grouped_mm(grouped_mm(act, A2, routing.offsets), B2, routing.offsets)
    per = (update * weights.unsqueeze(-1)).index_select(0, routing.inverse)
    return per.view(N, K, H).sum(1)


def down_dense_b():
    u = grouped_mm(act, A2, routing.offsets) * weights.unsqueeze(-1)
    spread = u.new_zeros(N, E, R).index_put((routing.tokens, routing.experts), u)
    return spread.view(N, E * R) @ B2.reshape(E * R, H)


def down_dense_ab():
    u_all = (act @ A2.permute(1, 0, 2).reshape(M, E * R)).view(S, E, R)
    u = u_all[torch.arange(S, device=dev), routing.experts] * weights.unsqueeze(-1)
    spread = u.new_zeros(N, E, R).index_put((routing.tokens, routing.experts), u)
    return spread.view(N, E * R) @ B2.reshape(E * R, H)


with torch.no_grad():  # the variants agree
    for a, b in [
        (gate_up_grouped, gate_up_dense_a),
        (gate_up_grouped, gate_up_dense_ab),
        (down_grouped, down_dense_b),
        (down_grouped, down_dense_ab),
    ]:
        x, y = a().float(), b().float()
        print(f"{a.__name__} vs {b.__name__}: max rel diff {((x - y).norm() / x.norm()).item():.2e}")
for fn in [
    gather_rows,
    gate_up_grouped,
    gate_up_dense_a,
    gate_up_dense_ab,
    down_grouped,
    down_dense_b,
    down_dense_ab,
]:
    timed(fn.__name__, fn)
