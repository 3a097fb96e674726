"""Deprecated: the experiment grid is research scaffolding and lives in ``experiments/`` beside the package.

Run ``python experiments/grid.py`` instead of ``python -m torchrec_qr.experiments``, and import from
``experiments.settings``, ``experiments.runs`` and ``experiments.report``. From a source checkout this
module still works: it warns, then delegates (the checkout's root goes on ``sys.path`` to find them).
"""

import sys
import warnings
from pathlib import Path

warnings.warn(
    "torchrec_qr.experiments is deprecated: run python experiments/grid.py and import from experiments.settings, "
    "experiments.runs or experiments.report",
    DeprecationWarning,
    stacklevel=1 if __name__ == "__main__" else 2,  # shown for `python -m`, and to the importing module
)

_ROOT = Path(__file__).resolve().parents[1]
if not (_ROOT / "experiments" / "grid.py").is_file():
    raise ImportError(
        f"torchrec_qr.experiments moved to experiments/ in the source repository, not found under {_ROOT}: "
        "run python experiments/grid.py from a checkout"
    )
if str(_ROOT) not in sys.path:
    sys.path.append(str(_ROOT))

from experiments.grid import main  # noqa: E402
from experiments.report import (  # noqa: E402
    Aggregate,
    aggregate,
    comparison_table,
    markdown_table,
    plot_pareto,
    welch_z,
    write_markdown,
)
from experiments.runs import RunRecord, read_csv, record_from_summary, run_setting, write_csv  # noqa: E402
from experiments.settings import Grid, Setting, expand_grid, supported_combines  # noqa: E402

__all__ = [
    "Aggregate",
    "Grid",
    "RunRecord",
    "Setting",
    "aggregate",
    "comparison_table",
    "expand_grid",
    "main",
    "markdown_table",
    "plot_pareto",
    "read_csv",
    "record_from_summary",
    "run_setting",
    "supported_combines",
    "welch_z",
    "write_csv",
    "write_markdown",
]

if __name__ == "__main__":
    sys.exit(main())
