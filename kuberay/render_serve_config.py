"""Copy serve_config.gpu.yaml into the RayService's serveConfigV2, so the two never drift.

The GPU profile of the Serve application is written once, at the repository root; the
RayService embeds it verbatim (comments included) as the block scalar `serveConfigV2`.

    python kuberay/render_serve_config.py           # rewrite kuberay/base/rayservice.yaml
    python kuberay/render_serve_config.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO / "serve_config.gpu.yaml"
RAYSERVICE = REPO / "kuberay" / "base" / "rayservice.yaml"

# `  serveConfigV2: |` and every following line that is blank or indented deeper than the key.
_BLOCK = re.compile(r"^(?P<indent> *)serveConfigV2: \|[^\n]*\n(?:(?:(?P=indent) +[^\n]*|[ \t]*)\n)*", re.M)


def render(rayservice_text: str, serve_config_text: str) -> str:
    """The RayService text with its serveConfigV2 block replaced by the serve config."""
    match = _BLOCK.search(rayservice_text)
    if match is None:
        raise ValueError(f"no `serveConfigV2: |` block in {RAYSERVICE}")
    indent = match.group("indent") + "  "
    body = "".join(
        (indent + line if line.strip() else "\n") if line.endswith("\n") else indent + line + "\n"
        for line in serve_config_text.rstrip("\n").splitlines(keepends=True)
    )
    block = f"{match.group('indent')}serveConfigV2: |\n{body}"
    return rayservice_text[: match.start()] + block + rayservice_text[match.end() :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail instead of writing")
    args = parser.parse_args(argv)
    current = RAYSERVICE.read_text()
    wanted = render(current, SERVE_CONFIG.read_text())
    if current == wanted:
        return 0
    if args.check:
        print(f"{RAYSERVICE} is out of date: run python kuberay/render_serve_config.py", file=sys.stderr)
        return 1
    RAYSERVICE.write_text(wanted)
    print(f"wrote {RAYSERVICE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
