"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU; print a JSON report.

Run in a process where TRITON_INTERPRET is unset (Triton fixes the mode on import). Arguments are
specialised the way Triton's launcher would for Qwen3-30B-A3B's bf16 expert shapes: pointers 16-byte
aligned, integers divisible by 16 marked so, integers equal to 1 folded to constants. Without those
hints the loads cannot become cp.async and the main loops would not be software-pipelined.
"""
from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time

T, K, H, I, E, S = 4096, 8, 2048, 768, 128, 13
SMEM_LIMIT = 232448  # bytes of shared memory one H100 block may use


def specs():
    from expertmesh.kernels import ffn_bwd_kernels as bwd
    from expertmesh.kernels import ffn_fwd_kernels as fwd
    from expertmesh.kernels.ffn_triton import GPU_TILES as c

    tiles = dict(BM=c.block_m, BN=c.block_n, BK=c.block_k, PREC="tf32")
    meta = dict(perm_ptr="*i32", tile_group_ptr="*i32", tile_row_ptr="*i32", offsets_ptr="*i32", expert_ptr="*i32")
    w = dict(wb_ptr="*bf16", wc_ptr="*bf16")
    n_ti = -(-I // c.block_n_dual)
    dual = {**tiles, "BN": c.block_n_dual}
    return {
        "ffn_up_fwd": (fwd.ffn_up_fwd, dict(x_ptr="*bf16", sx_t=H, sx_h=1, **w, **meta, gu_ptr="*bf16", h_ptr="*bf16",
                                            K=K, H=H, I=I, S=S, G_ACTIVE=E, SAVE_GU=True, **dual)),
        "ffn_down_fwd": (fwd.ffn_down_fwd, dict(h_ptr="*bf16", **w, rw_ptr="*bf16", **meta, out_ptr="*bf16",
                                                H=H, I=I, S=S, G_ACTIVE=E, **tiles)),
        "ffn_dgu_bwd": (bwd.ffn_dgu_bwd, dict(dy_ptr="*bf16", sdy_t=H, sdy_h=1, gu_ptr="*bf16", **w, rw_ptr="*bf16",
                                              **meta, dgu_ptr="*bf16", drw_ptr="*fp32", K=K, H=H, I=I, S=S,
                                              G_ACTIVE=E, N_TILES_I=n_ti, NEED_DRW=True, **dual)),
        "ffn_dx_bwd": (bwd.ffn_dx_bwd, dict(dgu_ptr="*bf16", **w, **meta, dx_ptr="*bf16", H=H, I=I, S=S,
                                            G_ACTIVE=E, **tiles)),
        "ffn_dw_gate_up_bwd": (bwd.ffn_dw_gate_up_bwd, dict(dgu_ptr="*bf16", x_ptr="*bf16", sx_t=H, sx_h=1,
                                                            perm_ptr="*i32", offsets_ptr="*i32", dw_ptr="*bf16",
                                                            K=K, H=H, I=I, **tiles)),
        "ffn_dw_down_bwd": (bwd.ffn_dw_down_bwd, dict(dy_ptr="*bf16", sdy_t=H, sdy_h=1, gu_ptr="*bf16",
                                                      rw_ptr="*bf16", perm_ptr="*i32", offsets_ptr="*i32",
                                                      dw_ptr="*bf16", K=K, H=H, I=I, **tiles)),
    }


def compile_one(fn, args: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert set(args) == set(fn.arg_names), (fn.__name__, set(args) ^ set(fn.arg_names))
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = args[name]
        if name in constexpr_names or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            signature[name], constexprs[(i,)] = "constexpr", v
        elif isinstance(v, str):
            signature[name], attrs[(i,)] = v, [["tt.divisibility", 16]]
        else:
            signature[name] = "i32" if v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    from expertmesh.kernels.ffn_triton import GPU_TILES as c
    opts = dict(num_warps=c.num_warps, num_stages=c.num_stages) if fn.__name__.startswith("ffn") else {}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=opts)


def resource_usage(cubin: bytes) -> dict:
    """Registers and spill stack per thread, from the cuobjdump that ships with Triton."""
    import triton

    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return dict(regs=int(m.group(1)), stack=int(m.group(2)))


def main(names: list[str]) -> None:
    report = {}
    for name, (fn, args) in specs().items():
        if names and name not in names:
            continue
        t0 = time.time()
        k = compile_one(fn, args)
        ttgir = k.asm["ttgir"]
        report[name] = dict(seconds=round(time.time() - t0, 1), shared=k.metadata.shared,
                            smem_ok=k.metadata.shared <= SMEM_LIMIT, cubin_bytes=len(k.asm["cubin"]),
                            async_copies=ttgir.count("async_copy_global_to_local"),
                            wgmma=ttgir.count("warp_group_dot"), **resource_usage(k.asm["cubin"]))
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
