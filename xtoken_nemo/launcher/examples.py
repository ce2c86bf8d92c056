"""The sbatch script of every paper recipe, as ``xtoken launch --sweep paper --container ...``
renders it, with placeholders for the machine-specific paths: these are the files under
``launcher/scripts/`` in the repository (``tests/test_launcher_scripts.py`` checks they are
current). Regenerate them from the repository root with::

    python -m xtoken_nemo.launcher.examples            # writes launcher/scripts/<recipe>.sbatch

The placeholders are literal paths, not shell variables, because sbatch does not expand variables
in ``#SBATCH`` lines (``--output``) and the embedded config is a quoted here-document; so the
scripts are valid as they are, and one ``sed`` adapts them::

    sed -e 's|/path/to/XTOKEN_ROOT|/lustre/xtoken|g' -e 's|/path/to/xtoken-nemo.sqsh|/shared/xtoken-nemo.sqsh|g' \\
        launcher/scripts/qwen3-pkl.sbatch > qwen3-pkl.sbatch

(``xtoken launch --recipe qwen3-pkl --root ... --container ...`` renders the same script with
your paths and checks the input files first.) No render date, so the files are deterministic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xtoken_nemo.launcher.sbatch import JobOptions
from xtoken_nemo.launcher.submit import prepare
from xtoken_nemo.recipes import paper_recipes

ROOT = "/path/to/XTOKEN_ROOT"
CONTAINER = "/path/to/xtoken-nemo.sqsh"
COMMAND = "python -m xtoken_nemo.launcher.examples"
DEFAULT_DIR = Path("launcher") / "scripts"


def render_examples() -> dict[str, str]:
    """File name -> script text, one per paper recipe (the runs of ``--sweep paper``)."""
    note = f"example from `{COMMAND}`: replace {ROOT} and {CONTAINER}"
    scripts = {}
    for recipe in paper_recipes():
        opts = JobOptions(container=CONTAINER, container_mounts=[f"{ROOT}:{ROOT}"], time_limit=None)
        job = prepare(recipe.name, Path(ROOT), [], None, None, opts, check=False, note=note)
        scripts[f"{recipe.name}.sbatch"] = job.script
    return scripts


def write_examples(directory: Path) -> list[Path]:
    """Write the scripts to ``directory``; removes ``*.sbatch`` files there that no recipe makes."""
    directory.mkdir(parents=True, exist_ok=True)
    scripts = render_examples()
    for stale in directory.glob("*.sbatch"):
        if stale.name not in scripts:
            stale.unlink()
    paths = []
    for name, text in scripts.items():
        path = directory / name
        path.write_text(text)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description="write the sbatch script of every paper recipe, with placeholder paths"
    )
    parser.add_argument(
        "dir",
        nargs="?",
        default=str(DEFAULT_DIR),
        help=f"output directory (default {DEFAULT_DIR}, relative to the repository root)",
    )
    args = parser.parse_args(argv)
    paths = write_examples(Path(args.dir))
    print(f"wrote {len(paths)} scripts to {args.dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
