"""Patch llama.cpp in a llama-cpp-python source tree before it is built.

1. AMX tile configuration. `ggml_tile_config_init` fills a tile configuration on the stack and
   hands it to `_tile_loadconfig`. GCC 12's intrinsic tells the optimizer that `ldtilecfg` reads
   only a pointer's worth of that memory, so at -O3 the stores of the tile rows and column widths
   are removed as dead (check: `g++ -O3 -march=sapphirerapids -S`). The AMX matrix kernel then
   runs on an unconfigured tile set and crashes on every batch of two or more tokens. An empty
   asm statement that takes the configuration's address and clobbers memory keeps the stores.
2. Flash attention over an F16 KV cache, row by row (every decode step, and prompts of under 64
   tokens per sequence): `scripts/fa_rows.cpp` computes a row a block of cells at a time, with a
   vectorized exp and an F32 accumulator, on x86 CPUs with AVX2 or AVX-512. The query heads that
   share a KV head are computed together (each key and value row read once for all of them, with
   the rows fetched ahead), and the rows after the first are taken from that group's results. At
   the CPU demo's contexts llama.cpp's kernel took about half of the decode time.
3. F16 matrix products on AVX2 (not AVX-512), the weights `weights=auto` runs there: decode
   steps of 2-4 sequences go to `scripts/sgemm_few.cpp` (rows walked once for all columns, the
   next rows fetched ahead); tinyBLAS keeps every other product, unchanged. Each element is
   computed as tinyBLAS computes it, so logits are the same bit for bit.

Each patch is applied only where the code it expects is found; otherwise the build goes on
without it and says so. The package's version gets a local label naming the patches applied
(`0.3.36+magpie.amx.fa.mm`), so a manifest says which kernels made a dataset.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU = Path("vendor/llama.cpp/ggml/src/ggml-cpu")

AMX_TARGET = CPU / "amx/mmq.cpp"
AMX_CALL = "    _tile_loadconfig(&tc);\n"
AMX_BARRIER = '    __asm__ __volatile__("" : : "r"(&tc) : "memory");  // magpie: keep the stores\n'

FA_TARGET = CPU / "ops.cpp"
FA_SOURCE = HERE / "fa_rows.cpp"
FA_KERNEL = "static void ggml_compute_forward_flash_attn_ext_f16_one_chunk(\n"
FA_LOOP_START = "        q_to_vec_dot(pq, Q_q, DK);\n"
FA_ROW_LOOP = "    for (int ir = ir0; ir < ir1; ++ir) {\n"
FA_GROUPS = """\
#ifdef MAGPIE_FA_LANES
    magpie_fa_groups magpie_groups;  // rows computed with an earlier row of their KV head
#endif
"""
FA_BLOCK_ROWS = """\
#ifdef MAGPIE_FA_LANES
        if (k->type == GGML_TYPE_F16 && v->type == GGML_TYPE_F16 && logit_softcap == 0.0f &&
            DK % MAGPIE_FA_LANES == 0 && DV % MAGPIE_FA_LANES == 0) {
            const bool groupable = rk2 > 1 && rk2 == rv2 && max_bias == 0.0f &&
                                   (!mask || mask->ne[2] == 1);
            magpie_fa_row_f16(magpie_groups, ir, ir1, neq1, iq1, iq2, rk2, groupable, pq, nbq2,
                              (const char *) k->data + ik2*nbk2 + ik3*nbk3, nbk1,
                              (const char *) v->data + iv2*nbv2 + iv3*nbv3, nbv1, mp, slope, scale,
                              ic_start, ic_end, DK, DV, VKQ32, &M, &S);
        } else
#endif
        {
"""
FA_LOOP_END = """\
                VKQ32[d] = GGML_CPU_FP16_TO_FP32(VKQ16[d]);
            }
        }
"""
FA_MARK = "magpie_fa_row_f16(magpie_groups"

MM_TARGET = CPU / "llamafile/sgemm.cpp"
MM_SOURCE = HERE / "sgemm_few.cpp"
MM_ENTRY = "\nbool llamafile_sgemm("
MM_F16_AVX2 = """\
#elif (defined(__AVX__) || defined(__AVX2__)) && defined(__F16C__)
        if (Btype == GGML_TYPE_F16) {
"""
MM_FEW_CALL = """\
#ifdef MAGPIE_FEW_COLUMNS
            if (magpie_sgemm_f16_few(params, m, n, k, (const ggml_fp16_t *)A, lda,
                                     (const ggml_fp16_t *)B, ldb, (float *)C, ldc))
                return true;
#endif
"""
MM_MARK = "magpie_sgemm_f16_few(params"

VERSION_FILE = Path("llama_cpp/__init__.py")


def patch_amx(tree: Path) -> str:
    path = tree / AMX_TARGET
    text = path.read_text()
    if AMX_BARRIER in text:
        return "already patched"
    if text.count(AMX_CALL) != 1:
        return "not patched: the tile configuration code changed (the runtime probe still guards)"
    path.write_text(text.replace(AMX_CALL, AMX_BARRIER + AMX_CALL))
    return "patched"


def patch_flash_attention(tree: Path) -> str:
    path = tree / FA_TARGET
    text = path.read_text()
    if FA_MARK in text:
        return "already patched"
    anchors = (FA_KERNEL, FA_LOOP_START, FA_LOOP_END)
    kernel = text.find(FA_KERNEL)
    loop = text.find(FA_ROW_LOOP, kernel)
    start, end = text.find(FA_LOOP_START), text.find(FA_LOOP_END) + len(FA_LOOP_END)
    if any(text.count(anchor) != 1 for anchor in anchors) or not 0 <= kernel < loop < start < end:
        return "not patched: the row-by-row kernel changed (llama.cpp's own kernel is used)"
    body = FA_BLOCK_ROWS + text[start:end] + "        }\n"
    text = (
        text[:kernel]
        + FA_SOURCE.read_text()
        + "\n"
        + text[kernel:loop]
        + FA_GROUPS
        + text[loop:start]
        + body
        + text[end:]
    )
    path.write_text(text)
    return "patched"


def patch_f16_matmul(tree: Path) -> str:
    path = tree / MM_TARGET
    text = path.read_text()
    if MM_MARK in text:
        return "already patched"
    if any(text.count(anchor) != 1 for anchor in (MM_ENTRY, MM_F16_AVX2)):
        return "not patched: llamafile_sgemm changed (tinyBLAS computes every F16 product)"
    text = text.replace(MM_F16_AVX2, MM_F16_AVX2 + MM_FEW_CALL)
    text = text.replace(MM_ENTRY, "\n" + MM_SOURCE.read_text() + MM_ENTRY)
    path.write_text(text)
    return "patched"


def label_version(tree: Path, labels: list[str]) -> str:
    """Add `+magpie.<labels>` to the package's `__version__` (the wheel's version comes from it)."""
    path = tree / VERSION_FILE
    text = path.read_text()
    match = re.search(r'__version__ = "([^"+]+)"', text)
    if not labels or match is None:
        return "unchanged"
    version = f"{match.group(1)}+magpie.{'.'.join(labels)}"
    path.write_text(text.replace(match.group(0), f'__version__ = "{version}"'))
    return version


if __name__ == "__main__":
    tree = Path(sys.argv[1])
    results = {
        "amx": patch_amx(tree),
        "fa": patch_flash_attention(tree),
        "mm": patch_f16_matmul(tree),
    }
    print(f"AMX tile-config fix: {results['amx']}")
    print(f"flash attention by blocks: {results['fa']}")
    print(f"F16 matrix products on AVX2: {results['mm']}")
    applied = [name for name, result in results.items() if result == "patched"]
    print(f"version: {label_version(tree, applied)}")
