"""Fix llama.cpp's AMX kernel in a llama-cpp-python source tree before it is built.

`ggml_tile_config_init` fills a tile configuration on the stack and hands it to
`_tile_loadconfig`. GCC 12's intrinsic tells the optimizer that `ldtilecfg` reads only a pointer's
worth of that memory, so at -O3 the stores of the tile rows and column widths are removed as dead
(check: `g++ -O3 -march=sapphirerapids -S`). The AMX matrix kernel then runs on an unconfigured
tile set and crashes on every batch of two or more tokens. An empty asm statement that takes the
configuration's address and clobbers memory keeps the stores.
"""

from __future__ import annotations

import sys
from pathlib import Path

TARGET = Path("vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp")
CALL = "    _tile_loadconfig(&tc);\n"
BARRIER = '    __asm__ __volatile__("" : : "r"(&tc) : "memory");  // magpie: keep the stores\n'


def patch(source_tree: Path) -> str:
    path = source_tree / TARGET
    text = path.read_text()
    if BARRIER in text:
        return "already patched"
    if text.count(CALL) != 1:
        return "not patched: the tile configuration code changed (the runtime probe still guards)"
    path.write_text(text.replace(CALL, BARRIER + CALL))
    return "patched"


if __name__ == "__main__":
    print(f"AMX tile-config fix: {patch(Path(sys.argv[1]))}")
